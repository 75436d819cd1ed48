//! Cold start per guest language: component size, compile time on a
//! compile-cache miss, load time on a hit, and the first call on a fresh
//! instance. Each figure is the median of several runs in this process.
//!
//! ```sh
//! cargo xtask build
//! cargo run --release -p weir-integration-tests --bin cold-start-bench
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::sync::Arc;
use std::time::{Duration, Instant};

use weir::state::{CommittedState, MemoryState};
use weir::{Event, Outcome, Sandbox, SandboxConfig};
use weir_integration_tests::dist;

const RUNS: usize = 3;
const ORDER: &str = r#"{"order_id":"1","customer_id":"ada","amount_cents":4599,"country":"NL","items":[{"sku":"mug","qty":2}]}"#;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let event = Event::new("bench-1", "orders.placed", ORDER);
    println!(
        "| language | plugin | component size | compile (cache miss) | load (cache hit) | first call, fresh instance |"
    );
    println!("|---|---|---|---|---|---|");
    for (language, name) in [
        ("Rust", "fraud"),
        ("Python", "loyalty"),
        ("JavaScript", "notify"),
        ("C", "analytics"),
    ] {
        let wasm = dist(&format!("plugins/{name}.wasm"));
        let size = std::fs::metadata(&wasm).unwrap().len();
        let (mut misses, mut hits, mut first_calls) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let cache = tempfile::tempdir().unwrap();
            let config = || SandboxConfig {
                cache_dir: Some(cache.path().to_owned()),
                ..SandboxConfig::with_default_cache()
            };
            // Each sandbox is a new engine: nothing is shared in memory.
            let cold = Sandbox::new(config()).unwrap();
            let started = Instant::now();
            cold.load(&wasm).unwrap();
            misses.push(started.elapsed());

            let warm = Sandbox::new(config()).unwrap();
            let started = Instant::now();
            let plugin = warm.load(&wasm).unwrap();
            hits.push(started.elapsed());

            let state: Arc<dyn CommittedState> = Arc::new(MemoryState::new());
            let started = Instant::now();
            let report = runtime.block_on(plugin.invoke(&event, state));
            first_calls.push(started.elapsed());
            assert_eq!(report.outcome, Outcome::Ok, "{name}");
        }
        println!(
            "| {language} | {name} | {:.2} MB | {} | {} | {} |",
            size as f64 / 1e6,
            ms(median(misses)),
            ms(median(hits)),
            ms(median(first_calls)),
        );
    }
}
