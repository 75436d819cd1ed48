//! The inventory plugin, run in the real sandbox with no broker.
//! Needs `cargo xtask build` first (`cargo xtask test` does it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use serde_json::{Value, json};
use weir::Outcome;
use weir::testing::{TestPlugin, json_event};

fn plugin() -> TestPlugin {
    TestPlugin::load("../../dist/plugins/inventory.wasm").expect("load the inventory plugin")
}

fn stock(plugin: &TestPlugin, sku: &str) -> Option<u64> {
    plugin
        .state()
        .snapshot()
        .get(&format!("stock.{sku}"))
        .map(|v| serde_json::from_slice(v).unwrap())
}

fn place(id: &str, sku: &str, qty: u32) -> weir::Event {
    json_event(
        "orders.placed",
        &json!({"order_id": id, "items": [{"sku": sku, "qty": qty}]}),
    )
}

#[test]
fn orders_reserve_stock_from_the_configured_initial_level() {
    let mut plugin = plugin();
    let report = plugin.handle(place("o-1", "mug", 3));
    assert_eq!(report.outcome, Outcome::Ok);
    assert_eq!(report.emitted[0].subject, "inventory.reserved");
    assert_eq!(
        stock(&plugin, "mug"),
        Some(7),
        "initial-stock = 10 in the manifest"
    );
    plugin.handle(place("o-2", "mug", 7));
    assert_eq!(stock(&plugin, "mug"), Some(0));
}

#[test]
fn shortage_backorders_and_leaves_stock_alone() {
    let mut plugin = plugin();
    plugin.handle(place("o-1", "lamp", 8));
    let report = plugin.handle(place("o-2", "lamp", 5));
    assert_eq!(report.outcome, Outcome::Ok);
    assert_eq!(report.emitted[0].subject, "inventory.backordered");
    let body: Value = serde_json::from_slice(&report.emitted[0].payload).unwrap();
    assert_eq!(body["shortages"][0]["available"], 2);
    assert!(report.state_changes.is_empty());
    assert_eq!(stock(&plugin, "lamp"), Some(2));
}

#[test]
fn restock_adds_to_the_level() {
    let mut plugin = plugin();
    plugin.handle(place("o-1", "pen", 10));
    let report = plugin.handle(json_event(
        "inventory.restocked",
        &json!({"sku": "pen", "qty": 25}),
    ));
    assert_eq!(report.outcome, Outcome::Ok);
    assert_eq!(stock(&plugin, "pen"), Some(25));
}

#[test]
fn order_without_items_is_rejected_and_changes_nothing() {
    let mut plugin = plugin();
    let report = plugin.handle(json_event(
        "orders.placed",
        &json!({"order_id": "o-1", "items": []}),
    ));
    assert!(
        matches!(report.outcome, Outcome::Reject { .. }),
        "{:?}",
        report.outcome
    );
    assert!(plugin.state().snapshot().is_empty());
}

#[test]
fn unknown_subject_is_rejected() {
    let report = plugin().handle(json_event("orders.cancelled", &json!({})));
    assert!(
        matches!(report.outcome, Outcome::Reject { ref reason } if reason.contains("orders.cancelled"))
    );
}
