//! Cost of one `handle` call through the sandbox: a fresh instance per
//! event (what the pipeline does) against an instance reused across
//! events, for the Rust fraud plugin and for one plugin per guest language
//! handling the same order. Run `cargo xtask build` first, then
//! `cargo bench -p weir --bench handle`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use weir::state::{MemoryState, StateStore};
use weir::{Event, Outcome, Sandbox, SandboxConfig};

fn handle(c: &mut Criterion) {
    let sandbox = Sandbox::new(SandboxConfig::with_default_cache()).expect("sandbox");
    let plugin = sandbox
        .load(Path::new("../dist/plugins/fraud.wasm"))
        .expect("load dist/plugins/fraud.wasm (run `cargo xtask build` first)");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let state: Arc<dyn StateStore> = Arc::new(MemoryState::new());
    let orders = [
        (
            "passes",
            r#"{"order_id":"1","customer_id":"c","amount_cents":4599,"country":"NL","items":[{"sku":"a","qty":1}]}"#,
        ),
        (
            "flagged",
            r#"{"order_id":"2","customer_id":"c","amount_cents":250000,"country":"XX","items":[{"sku":"a","qty":1}]}"#,
        ),
    ];
    let mut group = c.benchmark_group("fraud_handle");
    for (label, payload) in orders {
        let event = Event::new("bench-1", "orders.placed", payload);
        let check = runtime.block_on(plugin.invoke(&event, state.clone()));
        assert_eq!(check.outcome, Outcome::Ok);
        group.bench_function(format!("fresh_instance/{label}"), |b| {
            b.iter(|| runtime.block_on(plugin.invoke(&event, state.clone())))
        });
        let mut warm = plugin.warm(state.clone());
        group.bench_function(format!("warm_instance/{label}"), |b| {
            b.iter(|| runtime.block_on(warm.invoke(&event)))
        });
    }
    group.finish();
}

/// The same order through a plugin in each language.
fn languages(c: &mut Criterion) {
    let sandbox = Sandbox::new(SandboxConfig::with_default_cache()).expect("sandbox");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let order = r#"{"order_id":"1","customer_id":"ada","amount_cents":4599,"country":"NL","items":[{"sku":"mug","qty":2}]}"#;
    let event = Event::new("bench-1", "orders.placed", order);
    let mut group = c.benchmark_group("language_handle");
    for (language, name) in [
        ("rust", "fraud"),
        ("python", "loyalty"),
        ("javascript", "notify"),
        ("c", "analytics"),
    ] {
        let path = format!("../dist/plugins/{name}.wasm");
        let plugin = sandbox
            .load(Path::new(&path))
            .unwrap_or_else(|e| panic!("load {path} (run `cargo xtask build` first): {e:#}"));
        let state: Arc<dyn StateStore> = Arc::new(MemoryState::new());
        let check = runtime.block_on(plugin.invoke(&event, state.clone()));
        assert_eq!(check.outcome, Outcome::Ok, "{name}");
        group.bench_function(format!("fresh_instance/{language}"), |b| {
            b.iter(|| runtime.block_on(plugin.invoke(&event, state.clone())))
        });
        let mut warm = plugin.warm(state.clone());
        group.bench_function(format!("warm_instance/{language}"), |b| {
            b.iter(|| runtime.block_on(warm.invoke(&event)))
        });
    }
    group.finish();
}

criterion_group!(benches, handle, languages);
criterion_main!(benches);
