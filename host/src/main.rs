// The event path allocates and frees many small buffers per event across
// threads (payloads, headers, run state, encoded records); with mimalloc a
// stateful plugin moved about 20% more events/s than with glibc malloc
// (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
