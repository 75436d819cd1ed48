//! The Python, JavaScript and C plugins together on one stream, against a
//! real nats-server and the real `weir` binary: every order reaches every
//! plugin once, state adds up exactly, and the malformed order is
//! dead-lettered by each. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use weir_integration_tests::{TestEnv, consumer_backlog, count, read_stream, wait_until};

const STREAMS: &[(&str, &[&str])] = &[(
    "ORDERS",
    &["orders.>", "loyalty.>", "notifications.>", "analytics.>"],
)];
const PLUGINS: [&str; 3] = ["loyalty", "notify", "analytics"];
const ORDERS: usize = 300;
const CUSTOMERS: [&str; 5] = ["ada", "ken", "grace", "linus", "barbara"];
const COUNTRIES: [&str; 3] = ["NL", "DE", "US"];

async fn state(js: &jetstream::Context, plugin: &str, key: &str) -> Option<u64> {
    let kv = js
        .get_key_value(format!("weir_state_{plugin}"))
        .await
        .unwrap();
    let value = kv.get(format!("s.{key}")).await.unwrap()?;
    Some(std::str::from_utf8(&value).unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn python_javascript_and_c_plugins_share_one_stream_exactly() {
    let mut env = TestEnv::new(STREAMS);
    for plugin in PLUGINS {
        env.install(&format!("plugins/{plugin}"), plugin, |m| m);
    }
    env.start_host();
    let js = env.jetstream().await;

    let mut points: BTreeMap<&str, u64> = BTreeMap::new();
    let mut per_country: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut acks = Vec::new();
    for i in 0..ORDERS {
        let (customer, country) = (CUSTOMERS[i % 5], COUNTRIES[i % 3]);
        let cents = 1_000 + (i as u64 * 37) % 90_000;
        *points.entry(customer).or_default() += cents / 100;
        let entry = per_country.entry(country).or_default();
        entry.0 += 1;
        entry.1 += cents;
        let body = serde_json::json!({"order_id": i.to_string(), "customer_id": customer,
            "amount_cents": cents, "country": country, "items": [{"sku": "mug", "qty": 1}]});
        let mut headers = HeaderMap::new();
        headers.insert("Customer-Id", customer);
        headers.insert("Nats-Msg-Id", format!("order-{i}").as_str());
        let payload = serde_json::to_vec(&body).unwrap().into();
        acks.push(
            js.publish_with_headers("orders.placed", headers, payload)
                .await
                .unwrap(),
        );
    }
    acks.push(js.publish("orders.placed", "{oops".into()).await.unwrap());
    for ack in acks {
        ack.await.unwrap();
    }

    wait_until(
        Duration::from_secs(120),
        "every plugin to drain",
        || async {
            let mut drained = true;
            for plugin in PLUGINS {
                drained &= consumer_backlog(&js, "ORDERS", plugin).await == (0, 0);
            }
            drained
        },
    )
    .await;

    let n = ORDERS as u64;
    assert_eq!(count(&js, "ORDERS", "loyalty.awarded").await, n);
    assert_eq!(count(&js, "ORDERS", "notifications.email").await, n);
    assert_eq!(count(&js, "ORDERS", "analytics.country").await, n);
    for (customer, expected) in &points {
        assert_eq!(
            state(&js, "loyalty", &format!("points.{customer}")).await,
            Some(*expected),
            "points of {customer}"
        );
    }
    for (country, (orders, revenue)) in &per_country {
        assert_eq!(
            state(&js, "analytics", &format!("orders.{country}")).await,
            Some(*orders)
        );
        assert_eq!(
            state(&js, "analytics", &format!("revenue.{country}")).await,
            Some(*revenue)
        );
    }
    let letters = read_stream(&js, "WEIR_DLQ", ">").await;
    let mut rejected_by: Vec<&str> = letters
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .unwrap()
                .get("Weir-Dlq-Plugin")
                .unwrap()
                .as_str()
        })
        .collect();
    rejected_by.sort();
    assert_eq!(rejected_by, ["analytics", "loyalty", "notify"]);
    // Emails carry the customer's address and come out in one piece.
    let email = &read_stream(&js, "ORDERS", "notifications.email").await[0];
    let email: serde_json::Value = serde_json::from_slice(&email.payload).unwrap();
    assert!(
        email["to"]
            .as_str()
            .unwrap()
            .ends_with("@customers.example")
    );
}
