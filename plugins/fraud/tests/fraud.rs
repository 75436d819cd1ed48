//! The fraud plugin, run in the real sandbox with no broker.
//! Needs `cargo xtask build` first (`cargo xtask test` does it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use serde_json::{Value, json};
use weir::Outcome;
use weir::testing::{TestPlugin, json_event};

fn plugin() -> TestPlugin {
    TestPlugin::load("../../dist/plugins/fraud.wasm").expect("load the fraud plugin")
}

fn order(id: &str, amount_cents: u64, country: &str, qty: u32) -> Value {
    json!({
        "order_id": id,
        "customer_id": "c-1",
        "amount_cents": amount_cents,
        "country": country,
        "items": [{"sku": "sku-1", "qty": qty}],
    })
}

#[test]
fn small_order_passes_without_output() {
    let report = plugin().handle(json_event("orders.placed", &order("o-1", 1_000, "NL", 1)));
    assert_eq!(report.outcome, Outcome::Ok);
    assert!(report.emitted.is_empty());
    assert!(report.state_changes.is_empty());
}

#[test]
fn risky_order_is_flagged_with_reasons() {
    let report = plugin().handle(json_event("orders.placed", &order("o-2", 500_000, "ZZ", 1)));
    assert_eq!(report.outcome, Outcome::Ok);
    assert_eq!(report.emitted.len(), 1);
    let flagged = &report.emitted[0];
    assert_eq!(flagged.subject, "orders.flagged");
    assert_eq!(flagged.headers[0].key, "Customer-Id");
    let body: Value = serde_json::from_slice(&flagged.payload).unwrap();
    assert_eq!(body["order_id"], "o-2");
    assert_eq!(body["score"], 0.9);
    assert_eq!(body["reasons"].as_array().unwrap().len(), 2);
    assert!(report.logs.iter().any(|l| l.message.contains("flagged")));
}

#[test]
fn threshold_comes_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("strict.wasm");
    std::fs::copy("../../dist/plugins/fraud.wasm", &wasm).unwrap();
    let manifest = std::fs::read_to_string("fraud.toml")
        .unwrap()
        .replace("threshold = 0.7", "threshold = 0.0");
    std::fs::write(dir.path().join("strict.toml"), manifest).unwrap();
    let mut strict = TestPlugin::load(&wasm).unwrap();
    let report = strict.handle(json_event("orders.placed", &order("o-3", 1_000, "NL", 1)));
    assert_eq!(report.emitted.len(), 1, "a zero threshold flags everything");
}

#[test]
fn malformed_order_is_rejected_not_retried() {
    let report = plugin().handle(weir::testing::event("orders.placed", "{not json"));
    match report.outcome {
        Outcome::Reject { reason } => assert!(reason.contains("not the expected JSON"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(report.emitted.is_empty());
}
