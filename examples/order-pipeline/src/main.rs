//! The Weir demo: an order flow moved off synchronous REST calls.
//!
//! 1. Starts `weir dev` with the plugins in `dist/plugins`, in four
//!    languages: fraud scoring and inventory (Rust), loyalty points
//!    (Python), customer emails (JavaScript) and analytics (C). With no
//!    NATS server at `NATS_URL`, `weir dev` starts a private one.
//! 2. Publishes sample orders the way any producer would: plain JetStream
//!    publishes, knowing nothing about the consumers.
//! 3. Waits until every plugin has caught up, then tells what happened:
//!    flagged orders, reservations, stock levels, dead letters.
//!
//! Run it with `cargo xtask demo`, which builds the plugins first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::{Value, json};
use weir::supervisor::control;
use weir::telemetry::plugin_stats::StatsSnapshot;

/// The plugins and the language each is written in.
const PLUGINS: [(&str, &str); 5] = [
    ("fraud", "Rust"),
    ("inventory", "Rust"),
    ("loyalty", "Python"),
    ("notify", "JavaScript"),
    ("analytics", "C"),
];

fn main() -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(demo())
}

/// `weir dev` as a child process, stopped with SIGTERM at the end.
struct WeirDev {
    child: Child,
}

impl Drop for WeirDev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn weir_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("weir");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build -p weir` (cargo xtask demo does)",
            bin.display()
        );
    }
    Ok(bin)
}

async fn demo() -> anyhow::Result<()> {
    let example_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir()?;
    let port = weir::dev::free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let log_path = work.path().join("weir.log");

    println!("Weir demo: an order pipeline on NATS JetStream");
    println!("==============================================\n");
    let listed: Vec<String> = PLUGINS
        .iter()
        .map(|(name, language)| format!("{name} ({language})"))
        .collect();
    println!(
        "Starting `weir dev` with the plugins in dist/plugins: {}.",
        listed.join(", ")
    );
    let child = Command::new(weir_binary()?)
        .args(["dev", "--config"])
        .arg(example_dir.join("weir.toml"))
        .arg("--state-dir")
        .arg(work.path())
        .env("NATS_URL", &url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("starting weir dev")?;
    let _weir = WeirDev { child };
    wait_for_log(&log_path, "weir is running", Duration::from_secs(120))?;
    println!("  nats-server: {url} (private, started by weir dev; data in a temporary directory)");
    println!("  host log:    {}\n", log_path.display());

    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());

    let orders = sample_orders();
    println!(
        "A producer publishes {} orders on `orders.placed`, a restock on `inventory.restocked`,",
        orders.len()
    );
    println!("and one malformed message. It knows nothing about who consumes them.\n");
    publish(
        &js,
        "inventory.restocked",
        "restock-1",
        &json!({"sku": "lamp", "qty": 5}),
    )
    .await?;
    for order in &orders {
        let id = format!("order-{}", order["order_id"].as_str().unwrap_or("?"));
        publish(&js, "orders.placed", &id, order).await?;
    }
    let ack = js
        .send_publish(
            "orders.placed",
            jetstream::message::PublishMessage::build()
                .payload("{\"order_id\": 9999, oops".into())
                .message_id("order-broken"),
        )
        .await?;
    ack.await?;

    for (plugin, _) in PLUGINS {
        wait_caught_up(&js, plugin).await?;
    }
    report(&js).await?;
    rush_hour(&client, &js).await
}

/// Orders in the rush-hour burst.
const RUSH_ORDERS: usize = 10_000;

/// A burst of orders, watched through the host's control subject while the
/// plugins work through it.
async fn rush_hour(client: &async_nats::Client, js: &jetstream::Context) -> anyhow::Result<()> {
    let (admin, before) = plugin_counters(client).await?;
    println!("\nRush hour: {RUSH_ORDERS} more orders, watched live on http://{admin}/plugins");
    println!("(Prometheus metrics on http://{admin}/metrics)\n");
    // The clock starts with the first order sent: plugins work while the
    // burst is still being published.
    let started = Instant::now();
    // Pipelined, with the acknowledgements awaited a thousand at a time:
    // the client allows only so many unacknowledged publishes.
    let mut acks = Vec::with_capacity(1_000);
    for i in 0..RUSH_ORDERS {
        let order = json!({"order_id": format!("r{i}"), "customer_id": format!("c{}", i % 97),
            "amount_cents": 1_000 + (i % 50) * 700, "country": "NL", "items": [{"sku": "mug", "qty": 1}]});
        acks.push(
            js.send_publish("orders.placed", message(&format!("rush-{i}"), &order)?)
                .await?,
        );
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    let mut drained_after: std::collections::BTreeMap<&str, f64> = Default::default();
    let mut heading = String::from("  time ");
    for (plugin, _) in PLUGINS {
        heading.push_str(&format!("  {plugin:>14}"));
    }
    println!("{heading}\n  (per plugin: processed / failed / lag)");
    // A line every half second, however long the control request takes.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        // The host answers at once; the request then waits out its window
        // for other hosts, so the counters are as of when it was sent.
        let at = started.elapsed().as_secs_f64();
        let (_, now) = plugin_counters(client).await?;
        let mut line = format!("  {at:>4.1}s");
        let mut done = true;
        for (plugin, _) in PLUGINS {
            let (b, n) = (before[plugin], now[plugin]);
            let processed = n.processed - b.processed;
            let failed = (n.retried + n.dead_lettered + n.host_errors)
                - (b.retried + b.dead_lettered + b.host_errors);
            let lag = n.lag.pending + n.lag.ack_pending;
            let cell = format!("{processed} / {failed} / {lag}");
            line.push_str(&format!("  {cell:>14}"));
            let drained = processed >= RUSH_ORDERS as u64 && lag == 0;
            if drained {
                drained_after.entry(plugin).or_insert(at);
            }
            done &= drained;
        }
        println!("{line}");
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the rush-hour burst was not worked off within 120 s");
        }
    }
    println!("\n  plugin          drained after      rate");
    for (plugin, language) in PLUGINS {
        let seconds = drained_after[plugin];
        println!(
            "  {plugin:<14} {seconds:>9.1} s  {:>9.0} events/s   ({language})",
            RUSH_ORDERS as f64 / seconds
        );
    }
    println!(
        "\nEvery event was acknowledged only after its plugin succeeded and its outputs and state"
    );
    println!("were stored; every consumer has nothing pending. Stopping weir dev.");
    Ok(())
}

/// The host's admin endpoint and each plugin's counters, by name, as it
/// answers a `list` request on its control subject.
async fn plugin_counters(
    client: &async_nats::Client,
) -> anyhow::Result<(String, HashMap<String, StatsSnapshot>)> {
    let subject = weir::config::ControlConfig::default().subject();
    let answers = control::ask(
        client,
        &subject,
        &control::Request::List,
        None,
        Duration::from_millis(300),
    )
    .await?;
    let host = answers
        .into_iter()
        .next()
        .context("weir dev did not answer")?;
    let admin = host.admin.context("weir dev has no admin endpoint")?;
    let counters = host
        .plugins
        .into_iter()
        .map(|p| (p.name, p.counters))
        .collect();
    Ok((admin, counters))
}

fn sample_orders() -> Vec<Value> {
    let order = |id: &str, customer: &str, cents: u64, country: &str, sku: &str, qty: u32| {
        json!({"order_id": id, "customer_id": customer, "amount_cents": cents, "country": country,
               "items": [{"sku": sku, "qty": qty}]})
    };
    vec![
        order("1001", "ada", 4_599, "NL", "mug", 2),
        order("1002", "grace", 250_000, "XX", "laptop", 1),
        order("1003", "linus", 12_000, "US", "lamp", 4),
        order("1004", "barbara", 90_000, "US", "gift-card", 40),
        order("1005", "ken", 2_500, "DE", "mug", 3),
        order("1006", "margaret", 7_800, "FR", "lamp", 9),
        order("1007", "dennis", 150_000, "ZZ", "laptop", 2),
        order("1008", "ada", 1_999, "NL", "mug", 6),
    ]
}

async fn publish(
    js: &jetstream::Context,
    subject: &str,
    id: &str,
    body: &Value,
) -> anyhow::Result<()> {
    js.send_publish(subject.to_owned(), message(id, body)?)
        .await?
        .await?;
    Ok(())
}

/// A message with a dedup id, carrying the customer as a header the way a
/// producer that knows its consumers key by customer would.
fn message(id: &str, body: &Value) -> anyhow::Result<jetstream::message::PublishMessage> {
    let mut message = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(body)?.into())
        .message_id(id);
    if let Some(customer) = body["customer_id"].as_str() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Customer-Id", customer);
        message = message.headers(headers);
    }
    Ok(message)
}

fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return Ok(());
        }
        if log.contains("weir dev:") || started.elapsed() > timeout {
            bail!("weir dev did not start:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the plugin's consumer has nothing pending and nothing unacked.
async fn wait_caught_up(js: &jetstream::Context, plugin: &str) -> anyhow::Result<()> {
    let stream = js.get_stream("ORDERS").await?;
    let started = Instant::now();
    loop {
        let info = stream
            .consumer_info(weir::jetstream::generation::durable_name(plugin, 0))
            .await?;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "plugin {plugin} did not catch up: {} pending, {} unacked",
                info.num_pending,
                info.num_ack_pending
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plugin's state entries whose keys start with `prefix`, as
/// `(key without prefix, value)`, sorted. Plugin state lives in the KV
/// bucket `weir_state_<plugin>` under `s.` (done records under `d.`).
async fn state_entries(
    js: &jetstream::Context,
    plugin: &str,
    prefix: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let kv = js.get_key_value(format!("weir_state_{plugin}")).await?;
    let mut keys: Vec<String> = kv
        .keys()
        .await?
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    keys.sort();
    let full_prefix = format!("s.{prefix}");
    let mut out = Vec::new();
    for key in keys.iter().filter(|k| k.starts_with(&full_prefix)) {
        if let Some(value) = kv.get(key).await? {
            let name = key[full_prefix.len()..].to_owned();
            out.push((name, String::from_utf8_lossy(&value).into_owned()));
        }
    }
    Ok(out)
}

/// Every message on `filter` in `stream`.
async fn read(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let stream = js.get_stream(stream).await?;
    let mut consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter.to_owned(),
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    while consumer.info().await?.num_pending > 0 {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            out.push(message.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
    }
    Ok(out)
}

fn body(message: &jetstream::Message) -> Value {
    serde_json::from_slice(&message.payload).unwrap_or(Value::Null)
}

fn header<'a>(message: &'a jetstream::Message, key: &str) -> &'a str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(key))
        .map(|v| v.as_str())
        .unwrap_or("?")
}

async fn report(js: &jetstream::Context) -> anyhow::Result<()> {
    println!("What the plugins did");
    println!("--------------------\n");

    let flagged = read(js, "ORDERS", "orders.flagged").await?;
    println!(
        "Fraud scoring (plugin `fraud`) flagged {} orders on `orders.flagged`:",
        flagged.len()
    );
    for m in &flagged {
        let b = body(m);
        let reasons: Vec<&str> = b["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "  order {} by {}: score {} ({})",
            b["order_id"].as_str().unwrap_or("?"),
            b["customer_id"].as_str().unwrap_or("?"),
            b["score"],
            reasons.join("; ")
        );
    }

    let reserved = read(js, "ORDERS", "inventory.reserved").await?;
    let backordered = read(js, "ORDERS", "inventory.backordered").await?;
    println!(
        "\nInventory (plugin `inventory`) reserved stock for {} orders and backordered {}:",
        reserved.len(),
        backordered.len()
    );
    for m in &reserved {
        let b = body(m);
        let items: Vec<String> = b["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| format!("{} x{}", i["sku"].as_str().unwrap_or("?"), i["qty"]))
            .collect();
        println!(
            "  reserved    order {}: {}",
            b["order_id"].as_str().unwrap_or("?"),
            items.join(", ")
        );
    }
    for m in &backordered {
        let b = body(m);
        let shortages: Vec<String> = b["shortages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                format!(
                    "{} wanted {}, {} left",
                    s["sku"].as_str().unwrap_or("?"),
                    s["requested"],
                    s["available"]
                )
            })
            .collect();
        println!(
            "  backordered order {}: {}",
            b["order_id"].as_str().unwrap_or("?"),
            shortages.join(", ")
        );
    }

    println!(
        "\nStock levels, kept in the inventory plugin's state (JetStream KV bucket weir_state_inventory):"
    );
    let stock = state_entries(js, "inventory", "stock.").await?;
    for (sku, level) in &stock {
        println!("  {sku:<10} {level}");
    }

    println!(
        "\nLoyalty points (plugin `loyalty`, Python), kept in its state; tier changes on `loyalty.tier`:"
    );
    let points = state_entries(js, "loyalty", "points.").await?;
    for (customer, total) in &points {
        println!("  {customer:<10} {total}");
    }
    for m in read(js, "ORDERS", "loyalty.tier").await? {
        let b = body(&m);
        println!(
            "  {} reached tier {}",
            b["customer_id"].as_str().unwrap_or("?"),
            b["tier"]
        );
    }

    let emails = read(js, "ORDERS", "notifications.email").await?;
    println!(
        "\nCustomer emails (plugin `notify`, JavaScript) on `notifications.email`: {}",
        emails.len()
    );
    for m in &emails {
        let b = body(m);
        println!(
            "  to {:<28} {}",
            b["to"].as_str().unwrap_or("?"),
            b["subject"].as_str().unwrap_or("?")
        );
    }

    println!("\nOrders and revenue per country (plugin `analytics`, C), kept in its state:");
    let revenue: std::collections::BTreeMap<String, String> =
        state_entries(js, "analytics", "revenue.")
            .await?
            .into_iter()
            .collect();
    let countries = state_entries(js, "analytics", "orders.").await?;
    for (country, orders) in &countries {
        let cents: u64 = revenue
            .get(country)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        println!(
            "  {country:<4} {orders} orders, EUR {}.{:02}",
            cents / 100,
            cents % 100
        );
    }

    let letters = read(js, "WEIR_DLQ", ">").await?;
    println!(
        "\nDead letters (events a plugin gave up on), in stream WEIR_DLQ: {}",
        letters.len()
    );
    for m in &letters {
        println!(
            "  {} from {} ({}), plugin {}: {}",
            header(m, "Weir-Dlq-Event-Id"),
            header(m, "Weir-Dlq-Subject"),
            header(m, "Weir-Dlq-Reason"),
            header(m, "Weir-Dlq-Plugin"),
            header(m, "Weir-Dlq-Error")
        );
    }

    // The demo doubles as a smoke test of the README's demo command.
    let seen = [
        ("flagged", flagged.len(), 3),
        ("reserved", reserved.len(), 6),
        ("backordered", backordered.len(), 2),
        ("stock levels", stock.len(), 3),
        ("customers with points", points.len(), 7),
        ("emails", emails.len(), 10),
        ("countries", countries.len(), 6),
        // The malformed order, rejected by each of the five plugins.
        ("dead letters", letters.len(), 5),
    ];
    let wrong: Vec<String> = seen
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what}: {got}, expected {want}"))
        .collect();
    if !wrong.is_empty() {
        bail!("unexpected demo result: {}", wrong.join("; "));
    }
    Ok(())
}
