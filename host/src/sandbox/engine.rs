//! The one wasmtime [`Engine`] every plugin shares, and its epoch clock.

use std::time::Duration;

use wasmtime::{Config, Engine, OptLevel};

/// How often the engine's epoch advances. Deadlines are checked at this
/// granularity, and a guest that never calls the host yields to the async
/// runtime (and its turn on the guest CPU, when another plugin's call
/// waits) this often, so it bounds how long another plugin's event or the
/// host's own I/O waits behind a busy guest. At 5 ms, 16 spinning calls
/// held a neighbour's events for seconds; at 250 µs the neighbour's p99
/// stays within about 3x of its unloaded value (BENCHMARKS.md), and the
/// tick costs a callback per 250 µs of guest time.
pub const EPOCH_TICK: Duration = Duration::from_micros(250);

/// Build the engine.
///
/// - Epoch interruption, not fuel: it costs a load and compare per loop
///   back-edge instead of fuel's counter updates, and deadlines are
///   wall-clock anyway.
/// - The wasm stack is capped at 1 MiB so runaway recursion traps as
///   "call stack exhausted" long before it threatens the host; async fibres
///   get 2 MiB so host frames below the guest always fit.
/// - The on-demand allocator with copy-on-write memory images. Instances
///   are reused across events (see `sandbox::instances`), so creating one
///   is off the per-event path; measured, the pooling allocator saves
///   12-22 µs on a fresh Rust or C instance and makes a fresh Python one
///   slower (its cost is faulting in the snapshotted heap, which pooling
///   does not avoid), while forcing one slot size on every plugin and a
///   failure mode when the pool runs out (BENCHMARKS.md).
pub(super) fn build() -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .max_wasm_stack(1 << 20)
        .async_stack_size(2 << 20)
        .cranelift_opt_level(OptLevel::Speed)
        .memory_init_cow(true);
    if std::env::var_os("WEIR_PERF_MAP").is_some_and(|v| v == "1") {
        // Names guest functions in `perf` profiles (/tmp/perf-<pid>.map),
        // so time inside a plugin is attributed to its functions.
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config)?;
    start_epoch_clock(&engine)?;
    Ok(engine)
}

/// Advance `engine`'s epoch every [`EPOCH_TICK`] until the engine is dropped.
fn start_epoch_clock(engine: &Engine) -> anyhow::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("weir-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                super::long_calls::rescue_starved(super::long_calls::STARVED_AFTER);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(())
}
