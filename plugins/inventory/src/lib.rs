//! Inventory for the order flow.
//!
//! Keeps a stock count per SKU in plugin state. `inventory.restocked` adds
//! stock; `orders.placed` reserves it and emits `inventory.reserved`, or
//! `inventory.backordered` when there is not enough. Because state writes and
//! emitted events commit together with the event, a retried order never
//! reserves twice.

use serde::{Deserialize, Serialize};
use weir_guest::{Event, Plugin, Result, config, emit, log, reject, state};

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    /// Passed on so downstream consumers (notifications) can address the
    /// customer without looking the order up.
    #[serde(default)]
    customer_id: Option<String>,
    items: Vec<Line>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
struct Line {
    sku: String,
    qty: u32,
}

#[derive(Debug, Deserialize)]
struct Restock {
    sku: String,
    qty: u32,
}

#[derive(Debug, Serialize)]
struct Shortage {
    sku: String,
    requested: u32,
    available: u64,
}

fn stock_key(sku: &str) -> String {
    format!("stock.{sku}")
}

fn stock(sku: &str) -> Result<u64> {
    match state::get_json::<u64>(&stock_key(sku))? {
        Some(n) => Ok(n),
        None => Ok(config::parse("initial-stock")?.unwrap_or(0)),
    }
}

fn reserve(order: Order) -> Result {
    if order.items.is_empty() {
        return Err(reject(format!("order {} has no items", order.order_id)));
    }
    let mut shortages = Vec::new();
    let mut remaining = Vec::with_capacity(order.items.len());
    for line in &order.items {
        let available = stock(&line.sku)?;
        match available.checked_sub(u64::from(line.qty)) {
            Some(left) => remaining.push((line.sku.as_str(), left)),
            None => shortages.push(Shortage {
                sku: line.sku.clone(),
                requested: line.qty,
                available,
            }),
        }
    }
    if !shortages.is_empty() {
        log::warn(&format!("order {} backordered", order.order_id));
        return emit::json(
            "inventory.backordered",
            &serde_json::json!({
                "order_id": order.order_id,
                "customer_id": order.customer_id,
                "shortages": shortages,
            }),
        );
    }
    for (sku, left) in remaining {
        state::set_json(&stock_key(sku), &left)?;
    }
    emit::json(
        "inventory.reserved",
        &serde_json::json!({
            "order_id": order.order_id,
            "customer_id": order.customer_id,
            "items": order.items,
        }),
    )
}

fn restock(restock: Restock) -> Result {
    let level = stock(&restock.sku)? + u64::from(restock.qty);
    state::set_json(&stock_key(&restock.sku), &level)?;
    log::info(&format!("{} restocked to {level}", restock.sku));
    Ok(())
}

pub struct Inventory;

impl Plugin for Inventory {
    fn handle(event: Event) -> Result {
        match event.subject.as_str() {
            "orders.placed" => reserve(event.json()?),
            "inventory.restocked" => restock(event.json()?),
            other => Err(reject(format!("inventory does not handle subject {other}"))),
        }
    }
}

weir_guest::export_plugin!(Inventory);
