//! Pipeline benchmark: a plain async-nats pull consumer that acks each
//! message (the baseline) against the weir host running the Rust fraud
//! plugin, over the same events and the same nats-server, in one run.
//!
//! ```sh
//! cargo xtask build
//! cargo run --release -p weir-integration-tests --bin pipeline-bench -- [EVENTS] [RATE]
//! ```
//!
//! Prints events/s for both and their ratio, then p50/p99 latency from
//! publish to confirmed ack at a fixed offered rate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use weir::config::HostConfig;
use weir::pipeline::stats::LatencyHistogram;
use weir::runtime::Host;
use weir_integration_tests::{dist, publish_all};

fn order(i: usize) -> String {
    // One order in ten is large enough to be flagged, so the outbox is exercised.
    let cents = if i.is_multiple_of(10) { 250_000 } else { 4_599 };
    format!(
        r#"{{"order_id":"{i}","customer_id":"c-{}","amount_cents":{cents},"country":"NL","items":[{{"sku":"mug","qty":1}}]}}"#,
        i % 50
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let events: usize = args.get(1).map(|a| a.parse().unwrap()).unwrap_or(50_000);
    let rate: usize = args.get(2).map(|a| a.parse().unwrap()).unwrap_or(5_000);
    let dir = tempfile::tempdir().unwrap();
    let server =
        weir::dev::NatsServer::start(&dir.path().join("nats"), weir::dev::free_port().unwrap())
            .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "BASE".into(),
        subjects: vec!["base.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let payloads: Vec<String> = (0..events).map(order).collect();
    println!(
        "pipeline-bench: {events} events, nats-server {}, offered rate {rate}/s for latency",
        server.url()
    );

    // Baseline throughput: backlog first, then drain with a plain consumer.
    publish_all(&js, "base.orders", &payloads, None).await;
    let base_rate = baseline_drain(&js, events).await;

    // Weir throughput: the same backlog, drained by the fraud plugin.
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(dist("plugins/fraud.wasm"), plugins.join("fraud.wasm")).unwrap();
    std::fs::copy(dist("plugins/fraud.toml"), plugins.join("fraud.toml")).unwrap();
    publish_all(&js, "orders.placed", &payloads, None).await;
    let mut config = HostConfig::parse("", dir.path()).unwrap();
    config.nats.url = Some(server.url());
    let started = Instant::now();
    let host = Host::start_with_client(config, client.clone())
        .await
        .unwrap();
    let stats = host.stats("fraud").unwrap();
    while stats.snapshot().processed < events as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let weir_rate = events as f64 / started.elapsed().as_secs_f64();

    println!("\nthroughput (backlog of {events}, drained)");
    println!("  baseline pull consumer + ack   {base_rate:>10.0} events/s");
    println!(
        "  weir + fraud plugin            {weir_rate:>10.0} events/s   ({:.1}% of baseline)",
        100.0 * weir_rate / base_rate
    );

    // Latency at a fixed offered rate.
    let count = (rate * 10).min(events);
    stats.ack_latency.reset();
    let before = stats.snapshot().processed;
    paced_publish(&js, "orders.placed", &payloads[..count], rate).await;
    while stats.snapshot().processed < before + count as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let weir_latency = &stats.ack_latency;
    host.shutdown().await;

    let base_latency = Arc::new(LatencyHistogram::default());
    let stream = js.get_stream("BASE").await.unwrap();
    let consumer = stream
        .create_consumer(baseline_consumer_config("latency"))
        .await
        .unwrap();
    let consumer_task = tokio::spawn(baseline_latency(consumer, count, base_latency.clone()));
    paced_publish(&js, "base.orders", &payloads[..count], rate).await;
    consumer_task.await.unwrap();

    println!("\npublish-to-ack latency at {rate} events/s offered ({count} events)");
    for (label, h) in [
        ("baseline pull consumer + ack", base_latency.as_ref()),
        ("weir + fraud plugin", weir_latency),
    ] {
        let p = |q| {
            h.quantile(q)
                .map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
                .unwrap_or("-".into())
        };
        println!("  {label:<30} p50 {:>10}   p99 {:>10}", p(0.5), p(0.99));
    }
}

fn baseline_consumer_config(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::New,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Drain `n` backlog messages with a plain pull consumer that acks each.
async fn baseline_drain(js: &jetstream::Context, n: usize) -> f64 {
    let stream = js.get_stream("BASE").await.unwrap();
    let mut config = baseline_consumer_config("drain");
    config.deliver_policy = consumer::DeliverPolicy::All;
    let consumer = stream.create_consumer(config).await.unwrap();
    let started = Instant::now();
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..n {
        let message = messages.next().await.unwrap().unwrap();
        message.ack_with(AckKind::Ack).await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Consume `n` live messages, double-acking each (as weir does) and
/// recording the time from publish to confirmed ack.
async fn baseline_latency(
    consumer: consumer::PullConsumer,
    n: usize,
    histogram: Arc<LatencyHistogram>,
) {
    let mut messages = consumer.messages().await.unwrap();
    for _ in 0..n {
        let message = messages.next().await.unwrap().unwrap();
        message.double_ack().await.unwrap();
        let published = message.info().unwrap().published;
        histogram.record(Duration::try_from(time_now() - published).unwrap_or_default());
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Publish `payloads` at `rate` per second, in 1 ms ticks.
async fn paced_publish(js: &jetstream::Context, subject: &str, payloads: &[String], rate: usize) {
    let per_tick = (rate / 1000).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut acks = Vec::with_capacity(payloads.len());
    for chunk in payloads.chunks(per_tick) {
        ticker.tick().await;
        for payload in chunk {
            acks.push(
                js.publish(subject.to_owned(), payload.clone().into())
                    .await
                    .unwrap(),
            );
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}
