//! What the benchmark binaries share: the events they publish, the weir
//! configurations they measure, draining a backlog with weir or with a
//! plain pull consumer, and publish-to-ack latency at an offered rate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use weir::config::HostConfig;
use weir::supervisor::Supervisor;
use weir::telemetry::PluginStats;
use weir::telemetry::latency::{LatencyHistogram, LatencySnapshot};

use crate::dist;

/// An order; one in ten is large enough to be flagged, so the outbox is
/// exercised.
pub fn order(i: usize) -> String {
    let cents = if i.is_multiple_of(10) { 250_000 } else { 4_599 };
    format!(
        r#"{{"order_id":"{i}","customer_id":"c-{}","amount_cents":{cents},"country":"NL","items":[{{"sku":"mug","qty":1}}]}}"#,
        i % 50
    )
}

/// A stateful tally event for one of 50 customers.
pub fn tally(i: usize) -> String {
    format!("tally c-{}", i % 50)
}

/// One weir configuration to measure.
pub struct Run {
    pub label: &'static str,
    pub guest: &'static str,
    pub concurrency: u32,
    pub idempotency: bool,
    /// Order events per customer (subject token 3).
    pub keyed: bool,
    /// Payload of event `i`.
    pub payload: fn(usize) -> String,
}

impl Run {
    pub const fn fraud(label: &'static str, concurrency: u32, keyed: bool) -> Run {
        Run {
            label,
            guest: "plugins/fraud",
            concurrency,
            idempotency: true,
            keyed,
            payload: order,
        }
    }
}

/// Publish `payloads` at `rate` to the running fraud plugin and return the
/// p50 and p99 of its publish-to-ack latency over them.
pub async fn weir_latency(
    url: &str,
    stats: &PluginStats,
    subject: &str,
    payloads: &[String],
    rate: usize,
) -> (Option<Duration>, Option<Duration>) {
    let latency_before = stats.ack_latency();
    let before = stats.snapshot().processed;
    paced_publish(url, subject, payloads, rate).await;
    while stats.snapshot().processed < before + payloads.len() as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latency = stats.ack_latency().since(&latency_before);
    (latency.quantile(0.5), latency.quantile(0.99))
}

/// The host settings a benchmark run may override from the environment:
/// `BENCH_LONG_CALLS` (`runtime.long-calls`),
/// `BENCH_RUNNING_GUEST_CALLS` (`runtime.max-running-guest-calls`) and
/// `BENCH_RUNNING_LONG_CALLS` (`runtime.max-running-long-calls`), for
/// measuring what each does.
pub fn runtime_overrides(config: &mut HostConfig) {
    if let Some(policy) = std::env::var_os("BENCH_LONG_CALLS") {
        let policy = policy.to_string_lossy();
        config.runtime.long_calls = serde_json::from_value(serde_json::json!(policy))
            .unwrap_or_else(|e| panic!("BENCH_LONG_CALLS={policy}: {e}"));
    }
    config.runtime.max_running_guest_calls =
        count_from_env("BENCH_RUNNING_GUEST_CALLS").or(config.runtime.max_running_guest_calls);
    config.runtime.max_running_long_calls =
        count_from_env("BENCH_RUNNING_LONG_CALLS").or(config.runtime.max_running_long_calls);
}

fn count_from_env(name: &str) -> Option<usize> {
    let n = std::env::var_os(name)?;
    let n = n.to_string_lossy();
    Some(n.parse().unwrap_or_else(|e| panic!("{name}={n}: {e}")))
}

/// Start a host serving `run` on `subject` and wait until it processed `n`
/// events; returns the host (still running), its stats and events/s.
/// `replicas` is what the host asks for the state buckets and dead letters.
#[allow(clippy::too_many_arguments)] // a benchmark row's whole setup
pub async fn weir_drain(
    dir: &Path,
    url: &str,
    client: &async_nats::Client,
    run: &Run,
    index: usize,
    subject: &str,
    n: usize,
    replicas: usize,
) -> (Supervisor, Arc<PluginStats>, f64) {
    let plugins = dir.join(format!("plugins-{index}"));
    std::fs::create_dir_all(&plugins).unwrap();
    let wasm = dist(&format!("{}.wasm", run.guest));
    let name = format!("run{index}");
    std::fs::copy(&wasm, plugins.join(format!("{name}.wasm"))).unwrap();
    let key = if run.keyed {
        "ordering-key = { subject-token = 3 }\n"
    } else {
        ""
    };
    let manifest = format!(
        "subjects = [\"{subject}.>\"]\nstream = \"BENCH\"\nstart = \"all\"\nconcurrency = {}\n{key}{}",
        run.concurrency,
        config_of(&wasm.with_extension("toml"))
    );
    std::fs::write(plugins.join(format!("{name}.toml")), manifest).unwrap();
    let mut config = HostConfig::parse("", dir).unwrap();
    config.nats.url = Some(url.to_owned());
    config.plugins.dir = plugins;
    config.state.idempotency = run.idempotency;
    config.state.replicas = replicas;
    config.dead_letter.replicas = replicas;
    runtime_overrides(&mut config);
    // The latency row's host outlives the rows after it: every host gets
    // its own port.
    config.admin.listen = "127.0.0.1:0".into();
    let started = Instant::now();
    let _ = client;
    let host = Supervisor::start(config).await.unwrap();
    let stats = host.stats(&name).await.unwrap();
    while stats.snapshot().processed < n as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    (host, stats, rate)
}

/// Publish `n` events on `<subject>.c-<customer>` (50 customers), pipelined.
pub async fn publish_keyed(
    js: &jetstream::Context,
    subject: &str,
    n: usize,
    payload: fn(usize) -> String,
) {
    for start in (0..n).step_by(1000) {
        let mut acks = Vec::with_capacity(1000);
        for i in start..(start + 1000).min(n) {
            acks.push(
                js.publish(format!("{subject}.c-{}", i % 50), payload(i).into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

/// The `[config]` table (and everything after it) of a shipped manifest.
pub fn config_of(manifest: &Path) -> String {
    let text = std::fs::read_to_string(manifest).unwrap();
    text.find("[config]")
        .map(|i| text[i..].to_owned())
        .unwrap_or_default()
}

pub fn baseline_consumer_config(name: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy: consumer::DeliverPolicy::New,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// Drain `n` backlog messages with a plain pull consumer that acks each.
/// Drains the `BASE` stream.
pub async fn baseline_drain(js: &jetstream::Context, n: usize) -> f64 {
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

/// Consume `n` live messages, double-acking each and recording the time
/// from publish to confirmed ack. Up to 64 confirmations are awaited at
/// once, as a consumer written for throughput would, so one slow round
/// trip does not queue every later message behind it.
pub async fn baseline_latency(
    consumer: consumer::PullConsumer,
    n: usize,
    histogram: LatencyHistogram,
) {
    let mut messages = consumer.messages().await.unwrap();
    let window = Arc::new(tokio::sync::Semaphore::new(64));
    let mut confirming = tokio::task::JoinSet::new();
    for _ in 0..n {
        let message = messages.next().await.unwrap().unwrap();
        let permit = window.clone().acquire_owned().await.unwrap();
        let histogram = histogram.clone();
        confirming.spawn(async move {
            message.double_ack().await.unwrap();
            let published = message.info().unwrap().published;
            histogram.record(
                Duration::try_from(time::OffsetDateTime::now_utc() - published).unwrap_or_default(),
            );
            drop(permit);
        });
    }
    while confirming.join_next().await.is_some() {}
}

/// Publish `payloads` on `base.orders` at `rate` and measure a new
/// baseline consumer `name`'s publish-to-confirmed-ack latency over them.
pub async fn baseline_paced_latency(
    js: &jetstream::Context,
    url: &str,
    name: &str,
    payloads: &[String],
    rate: usize,
) -> LatencySnapshot {
    let histogram = LatencyHistogram::default();
    let consumer = js
        .get_stream("BASE")
        .await
        .unwrap()
        .create_consumer(baseline_consumer_config(name))
        .await
        .unwrap();
    let consuming = tokio::spawn(baseline_latency(
        consumer,
        payloads.len(),
        histogram.clone(),
    ));
    paced_publish(url, "base.orders", payloads, rate).await;
    consuming.await.unwrap();
    histogram.snapshot()
}

/// A thread that computes without a break until dropped, at normal
/// priority: a core taken from everything else, with no Weir involved.
pub struct SpinningThread {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SpinningThread {
    pub fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut spins = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        });
        SpinningThread {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SpinningThread {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Publish `payloads` on `subject` at `rate` per second in 1 ms ticks;
/// acks are awaited by a separate task so the pacing never stalls on them.
///
/// The producer runs on a thread and connection of its own, as a separate
/// service would: on the benchmark's runtime it would share worker threads
/// with the host under test, and a host whose guests keep those busy would
/// make the offered load bursty (its ticks late, then caught up at once).
pub async fn paced_publish(url: &str, subject: &str, payloads: &[String], rate: usize) {
    let (url, subject, payloads) = (url.to_owned(), subject.to_owned(), payloads.to_vec());
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A cluster's URLs come comma-separated.
            let client = async_nats::ConnectOptions::new()
                .connect(url.split(',').collect::<Vec<_>>())
                .await
                .unwrap();
            let js = jetstream::new(client.clone());
            publish_at(&js, &subject, &payloads, rate).await;
            client.flush().await.unwrap();
        });
        let _ = done.send(());
    });
    finished.await.expect("the producer thread panicked");
}

async fn publish_at(js: &jetstream::Context, subject: &str, payloads: &[String], rate: usize) {
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
    let waiter = tokio::spawn(async move {
        while let Some(ack) = rx.recv().await {
            ack.await.unwrap();
        }
    });
    let per_tick = (rate / 1000).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    for chunk in payloads.chunks(per_tick) {
        ticker.tick().await;
        for payload in chunk {
            tx.send(
                js.publish(subject.to_owned(), payload.clone().into())
                    .await
                    .unwrap(),
            )
            .unwrap();
        }
    }
    drop(tx);
    waiter.await.unwrap();
}
