// The event path allocates and frees many small buffers per event across
// threads (payloads, headers, encoded records); mimalloc's thread-local free
// lists measured 30% more events/s than glibc malloc for a Python plugin
// (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    weir::cli::main()
}
