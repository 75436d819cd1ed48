//! Cost of one `handle` call through the sandbox, the way the pipeline makes
//! it (`Plugin::invoke`): with the default `isolation = "instance"`, where
//! instances are pooled and reused, and with `isolation = "event"`, a fresh
//! instance per event; for the Rust fraud plugin and for one plugin per
//! guest language handling the same order. Run `cargo xtask build` first,
//! then `cargo bench -p weir --bench handle`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use weir::manifest::{Isolation, Manifest};
use weir::state::{CommittedState, MemoryState};
use weir::{Event, Outcome, Plugin, Sandbox, SandboxConfig};

/// `path` loaded twice: pooled instances (the default) and fresh ones.
fn both_isolations(sandbox: &Sandbox, path: &str) -> [(&'static str, Plugin); 2] {
    let load = |isolation| {
        let wasm = Path::new(path);
        let mut manifest = Manifest::load(&Manifest::path_for(wasm)).expect("manifest");
        manifest.instances.isolation = isolation;
        sandbox
            .load_with_manifest(wasm, manifest)
            .unwrap_or_else(|e| panic!("load {path} (run `cargo xtask build` first): {e:#}"))
    };
    [
        ("pooled_instance", load(Isolation::Instance)),
        ("fresh_instance", load(Isolation::Event)),
    ]
}

fn handle(c: &mut Criterion) {
    let sandbox = Sandbox::new(SandboxConfig::with_default_cache()).expect("sandbox");
    let plugins = both_isolations(&sandbox, "../dist/plugins/fraud.wasm");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let state: Arc<dyn CommittedState> = Arc::new(MemoryState::new());
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
        for (isolation, plugin) in &plugins {
            let check = runtime.block_on(plugin.invoke(&event, state.clone()));
            assert_eq!(check.outcome, Outcome::Ok);
            group.bench_function(format!("{isolation}/{label}"), |b| {
                b.iter(|| runtime.block_on(plugin.invoke(&event, state.clone())))
            });
        }
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
        let state: Arc<dyn CommittedState> = Arc::new(MemoryState::new());
        for (isolation, plugin) in both_isolations(&sandbox, &path) {
            let check = runtime.block_on(plugin.invoke(&event, state.clone()));
            assert_eq!(check.outcome, Outcome::Ok, "{name}");
            group.bench_function(format!("{isolation}/{language}"), |b| {
                b.iter(|| runtime.block_on(plugin.invoke(&event, state.clone())))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, handle, languages);
criterion_main!(benches);
