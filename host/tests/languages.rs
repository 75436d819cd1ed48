//! The Python, JavaScript and C plugins in the real sandbox under the
//! limits their manifests ship with: their runtimes fit, each call is
//! served by a fresh instance, and a cap too small for a runtime ends the
//! event with a clear out-of-memory outcome instead of taking the host
//! down. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use weir::Outcome;
use weir::testing::{TestPlugin, event};

const ORDER: &str = r#"{"order_id": "1", "customer_id": "ada", "amount_cents": 4599, "country": "NL", "items": [{"sku": "mug", "qty": 2}]}"#;

/// (plugin, language, subject it emits on first)
const PLUGINS: [(&str, &str, &str); 3] = [
    ("loyalty", "Python", "loyalty.awarded"),
    ("notify", "JavaScript", "notifications.email"),
    ("analytics", "C", "analytics.country"),
];

fn wasm(name: &str) -> String {
    format!("../dist/plugins/{name}.wasm")
}

#[test]
fn each_language_runs_repeatedly_within_its_shipped_limits() {
    for (name, language, subject) in PLUGINS {
        let mut plugin = TestPlugin::load(wasm(name)).unwrap();
        for i in 0..20 {
            let report = plugin.handle(event("orders.placed", ORDER));
            assert_eq!(
                report.outcome,
                Outcome::Ok,
                "{language} plugin {name}, call {i}"
            );
            assert_eq!(
                report.emitted[0].subject, subject,
                "{language} plugin {name}"
            );
        }
    }
}

/// The plugin with its manifest's memory cap replaced by `mb`.
fn with_memory_cap(dir: &std::path::Path, name: &str, mb: u32) -> TestPlugin {
    let manifest = std::fs::read_to_string(format!("../dist/plugins/{name}.toml")).unwrap();
    let capped: Vec<String> = manifest
        .lines()
        .map(|l| {
            if l.starts_with("memory-mb") {
                format!("memory-mb = {mb}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    let path = dir.join(format!("{name}-{mb}.toml"));
    std::fs::write(&path, capped.join("\n")).unwrap();
    TestPlugin::load_with_manifest(wasm(name), &path).unwrap()
}

#[test]
fn a_memory_cap_below_the_runtime_is_a_clean_out_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    // CPython and StarlingMonkey need more than 8 MiB (measured: 16 and 12).
    for (name, language, _) in &PLUGINS[..2] {
        let mut plugin = with_memory_cap(dir.path(), name, 8);
        let report = plugin.handle(event("orders.placed", ORDER));
        assert!(
            matches!(report.outcome, Outcome::OutOfMemory { limit_bytes } if limit_bytes == 8 << 20),
            "{language} plugin {name} under 8 MiB: {}",
            report.outcome
        );
        assert!(report.emitted.is_empty());
    }
    // A C plugin has no runtime to speak of: 1 MiB is plenty.
    let mut analytics = with_memory_cap(dir.path(), "analytics", 1);
    assert_eq!(
        analytics.handle(event("orders.placed", ORDER)).outcome,
        Outcome::Ok
    );
}
