//! The Weir demo: an order flow moved off synchronous REST calls.
//!
//! 1. Starts `weir dev` with the plugins in `dist/plugins` (fraud scoring
//!    and inventory, both Rust). With no NATS server at `NATS_URL`, `weir
//!    dev` starts a private one.
//! 2. Publishes sample orders the way any producer would: plain JetStream
//!    publishes, knowing nothing about the consumers.
//! 3. Waits until every plugin has caught up, then tells what happened:
//!    flagged orders, reservations, stock levels, dead letters.
//!
//! Run it with `cargo xtask demo`, which builds the plugins first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::{Value, json};

const PLUGINS: [&str; 2] = ["fraud", "inventory"];

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
    println!(
        "Starting `weir dev` with the plugins in dist/plugins: {}.",
        PLUGINS.join(", ")
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
    let js = jetstream::new(client);

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

    for plugin in PLUGINS {
        wait_caught_up(&js, plugin).await?;
    }
    report(&js).await?;
    let admin = admin_addr(&log_path)?;
    rush_hour(&js, &admin).await
}

/// Orders in the rush-hour burst.
const RUSH_ORDERS: usize = 5_000;

/// A burst of orders, watched through the host's admin endpoint while the
/// plugins work through it.
async fn rush_hour(js: &jetstream::Context, admin: &str) -> anyhow::Result<()> {
    println!("\nRush hour: {RUSH_ORDERS} more orders, watched live on http://{admin}/plugins");
    println!("(Prometheus metrics on http://{admin}/metrics)\n");
    let before = plugin_counters(admin)?;
    let mut acks = Vec::with_capacity(RUSH_ORDERS);
    for i in 0..RUSH_ORDERS {
        let order = json!({"order_id": format!("r{i}"), "customer_id": format!("c{}", i % 97),
            "amount_cents": 1_000 + (i % 50) * 700, "country": "NL", "items": [{"sku": "mug", "qty": 1}]});
        let message = jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(&order)?.into())
            .message_id(format!("rush-{i}"));
        acks.push(js.send_publish("orders.placed", message).await?);
    }
    for ack in acks {
        ack.await?;
    }
    let started = Instant::now();
    loop {
        let now = plugin_counters(admin)?;
        let mut line = format!("  {:>5.1}s", started.elapsed().as_secs_f64());
        let mut done = true;
        for plugin in PLUGINS {
            let (b, n) = (&before[plugin], &now[plugin]);
            let processed =
                n["processed"].as_u64().unwrap_or(0) - b["processed"].as_u64().unwrap_or(0);
            let failed = ["retried", "dead_lettered", "host_errors"]
                .iter()
                .map(|k| n[k].as_u64().unwrap_or(0) - b[k].as_u64().unwrap_or(0))
                .sum::<u64>();
            let lag = n["pending"].as_u64().unwrap_or(0) + n["ack_pending"].as_u64().unwrap_or(0);
            line.push_str(&format!(
                "   {plugin}: {processed:>5} processed, {failed} failed, lag {lag:>5}"
            ));
            done &= processed >= RUSH_ORDERS as u64 && lag == 0;
        }
        println!("{line}");
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the rush-hour burst was not worked off within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "\nEvery event was acknowledged only after its plugin succeeded and its outputs and state"
    );
    println!("were stored; every consumer has nothing pending. Stopping weir dev.");
    Ok(())
}

/// Each plugin's counters from the admin endpoint's `/plugins`, by name.
fn plugin_counters(admin: &str) -> anyhow::Result<std::collections::HashMap<String, Value>> {
    let (status, body) = weir::admin::http_get(admin, "/plugins", None)?;
    if status != 200 {
        bail!("GET /plugins answered {status}: {body}");
    }
    let plugins: Vec<Value> = serde_json::from_str(&body)?;
    Ok(plugins
        .into_iter()
        .map(|p| (p["name"].as_str().unwrap_or("?").to_owned(), p))
        .collect())
}

/// The admin endpoint's address, from the host's start-up log line.
fn admin_addr(log_path: &Path) -> anyhow::Result<String> {
    let log = std::fs::read_to_string(log_path)?;
    log.lines()
        .filter(|l| l.contains("admin endpoint listening"))
        .find_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("addr=")))
        .map(str::to_owned)
        .context("the host log names no admin endpoint")
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
    let message = jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(body)?.into())
        .message_id(id);
    js.send_publish(subject.to_owned(), message).await?.await?;
    Ok(())
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
            .consumer_info(weir::source::durable_name(plugin))
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
    let kv = js.get_key_value("weir_state_inventory").await?;
    let mut keys: Vec<String> = kv
        .keys()
        .await?
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    keys.sort();
    // Plugin state keys live under `s.` in the bucket (done records under `d.`).
    let mut levels = 0;
    for key in keys.iter().filter(|k| k.starts_with("s.stock.")) {
        if let Some(value) = kv.get(key).await? {
            println!(
                "  {:<10} {}",
                key.trim_start_matches("s.stock."),
                String::from_utf8_lossy(&value)
            );
            levels += 1;
        }
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
    let seen = (
        flagged.len(),
        reserved.len(),
        backordered.len(),
        levels,
        letters.len(),
    );
    if seen != (3, 6, 2, 3, 2) {
        bail!(
            "unexpected demo result (flagged, reserved, backordered, stock levels, dead letters) = {seen:?}"
        );
    }
    Ok(())
}
