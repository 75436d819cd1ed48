//! Fraud scorer for the order flow.
//!
//! Scores each `orders.placed` event and emits `orders.flagged` when the
//! score reaches the manifest's `threshold`. A payload that is not an order
//! is rejected, so it lands in the dead-letter stream instead of being
//! retried forever.

use serde::{Deserialize, Serialize};
use weir_guest::{Event, Plugin, Result, config, emit, log};

/// The part of an order this plugin reads.
#[derive(Debug, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub amount_cents: u64,
    #[serde(default)]
    pub country: Option<String>,
    #[serde(default)]
    pub items: Vec<Item>,
}

#[derive(Debug, Deserialize)]
pub struct Item {
    pub sku: String,
    pub qty: u32,
}

/// Scoring settings, from the manifest's `[config]` table.
#[derive(Debug)]
pub struct Rules {
    /// Orders scoring at or above this are flagged (0.0 to 1.0).
    pub threshold: f64,
    /// An amount at or above this counts fully towards the amount score.
    pub large_amount_cents: u64,
    /// Countries whose orders get extra scrutiny.
    pub high_risk_countries: Vec<String>,
    /// Orders with more units than this look like resale.
    pub max_units: u32,
}

impl Rules {
    fn from_config() -> Result<Self> {
        let high_risk_countries = match config::get("high-risk-countries") {
            None => Vec::new(),
            Some(raw) => serde_json::from_str(&raw).map_err(|e| {
                weir_guest::reject(format!(
                    "config high-risk-countries must be a list of strings: {e}"
                ))
            })?,
        };
        Ok(Rules {
            threshold: config::parse("threshold")?.unwrap_or(0.7),
            large_amount_cents: config::parse("large-amount-cents")?.unwrap_or(100_000),
            high_risk_countries,
            max_units: config::parse("max-units")?.unwrap_or(20),
        })
    }
}

/// Why an order was flagged, as published on `orders.flagged`.
#[derive(Debug, Serialize, PartialEq)]
pub struct Flagged {
    pub order_id: String,
    pub customer_id: String,
    pub score: f64,
    pub reasons: Vec<String>,
}

/// The score of `order` under `rules` and the reasons that contributed.
pub fn score(order: &Order, rules: &Rules) -> (f64, Vec<String>) {
    let mut score = 0.0;
    let mut reasons = Vec::new();
    let amount = (order.amount_cents as f64 / rules.large_amount_cents.max(1) as f64).min(1.0);
    if amount > 0.0 {
        score += 0.6 * amount;
        if amount >= 1.0 {
            reasons.push(format!("amount {} cents is large", order.amount_cents));
        }
    }
    if let Some(country) = &order.country
        && rules
            .high_risk_countries
            .iter()
            .any(|c| c.eq_ignore_ascii_case(country))
    {
        score += 0.3;
        reasons.push(format!("country {country} is high risk"));
    }
    let units: u64 = order.items.iter().map(|i| u64::from(i.qty)).sum();
    if units > u64::from(rules.max_units) {
        score += 0.2;
        reasons.push(format!("{units} units in one order"));
    }
    (score.min(1.0), reasons)
}

pub struct FraudScorer;

impl Plugin for FraudScorer {
    fn handle(event: Event) -> Result {
        let order: Order = event.json()?;
        let rules = Rules::from_config()?;
        let (score, reasons) = score(&order, &rules);
        if score < rules.threshold {
            log::debug(&format!(
                "order {} passed with score {score:.2}",
                order.order_id
            ));
            return Ok(());
        }
        log::info(&format!(
            "order {} flagged with score {score:.2}",
            order.order_id
        ));
        let flagged = Flagged {
            order_id: order.order_id,
            customer_id: order.customer_id.clone(),
            score: (score * 100.0).round() / 100.0,
            reasons,
        };
        emit::Message::new("orders.flagged")
            .header("Customer-Id", order.customer_id)
            .json(&flagged)?
            .send()?;
        Ok(())
    }
}

weir_guest::export_plugin!(FraudScorer);
