//! Pipeline benchmark, in one run against one nats-server:
//!
//! 1. throughput draining a backlog: a plain async-nats pull consumer that
//!    acks each message (the baseline), then the weir host with the Rust
//!    fraud plugin at several concurrencies, with idempotency records on
//!    and off, and with a stateful plugin; each row also prints its CPU
//!    per event (this process, which runs the consumer, plus nats-server)
//!    and the share of the machine left idle;
//! 2. publish-to-ack latency (p50/p99) at a fixed offered rate, baseline
//!    against weir, each also with a core taken: weir next to 16 guest
//!    calls that spin (plugins at concurrency 16, as many as it takes: the
//!    host runs no more of one plugin's calls computing than twice its
//!    guest-call slots), the baseline next to one spinning thread.
//!
//! ```sh
//! cargo xtask build
//! cargo run --release -p weir-integration-tests --bin pipeline-bench -- [EVENTS] [RATE] [ROWS]
//! ```
//!
//! `ROWS` keeps only the rows whose label contains it. The hosts' runtime
//! settings can be overridden for a run (`bench::runtime_overrides`):
//! `BENCH_LONG_CALLS=normal|long-slice|idle`, `BENCH_RUNNING_GUEST_CALLS=N`,
//! `BENCH_RUNNING_LONG_CALLS=N`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use weir::supervisor::Supervisor;
use weir::telemetry::latency::LatencySnapshot;
use weir_integration_tests::bench::{
    Run, SpinningThread, baseline_drain, baseline_paced_latency, order, publish_keyed, tally,
    weir_drain, weir_latency,
};
use weir_integration_tests::{command_line, cpu, dist, publish_all};

// The allocator the `weir` binary ships with, so the host measured here is
// the one users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    const USAGE: &str = "pipeline-bench [EVENTS (50000)] [RATE (5000)] [ROWS]";
    let args = command_line::args(USAGE);
    let events = command_line::count(&args, 0, 50_000, USAGE);
    let rate = command_line::count(&args, 1, 5_000, USAGE);
    // Rows whose label contains this (all rows when absent); the latency
    // part runs only when the concurrency-16 fraud row does.
    let only: Option<&str> = args.get(2).map(String::as_str);
    let (dir, server, client) = weir_integration_tests::bench_broker().await;
    let js = jetstream::new(client.clone());
    for (name, subject) in [
        ("BASE", "base.>"),
        ("ORDERS", "orders.>"),
        ("BENCH", "bench.>"),
        ("HOSTILE", "hostile.>"),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    println!(
        "pipeline-bench: {events} events per run, nats-server {}",
        server.url()
    );
    println!("\nthroughput, draining a backlog of {events} events");
    println!(
        "  (and per event, the CPU of this process, which runs the consumer, plus nats-server's, with the machine idle meanwhile)"
    );

    let server_pid = server.pid().unwrap();
    let orders: Vec<String> = (0..events).map(order).collect();
    publish_all(&js, "base.orders", &orders, None).await;
    let meter = cpu::Meter::start(server_pid);
    let base_rate = baseline_drain(&js, events).await;
    println!(
        "  {:<LABEL$} {base_rate:>9.0} events/s                      {}",
        "baseline: pull consumer, ack each",
        meter.per_event(events)
    );

    let runs = [
        Run::fraud("weir + fraud, concurrency 1", 1, false),
        Run::fraud("weir + fraud, concurrency 4", 4, false),
        Run::fraud("weir + fraud, concurrency 16", 16, false),
        Run::fraud("weir + fraud, concurrency 64", 64, false),
        Run::fraud("weir + fraud, keyed by customer, concurrency 1", 1, true),
        Run::fraud("weir + fraud, keyed by customer, concurrency 4", 4, true),
        Run::fraud("weir + fraud, keyed by customer, concurrency 16", 16, true),
        Run::fraud("weir + fraud, keyed by customer, concurrency 64", 64, true),
        Run {
            label: "weir + fraud, concurrency 16, idempotency off",
            guest: "plugins/fraud",
            concurrency: 16,
            idempotency: false,
            keyed: false,
            payload: order,
        },
        Run {
            label: "weir + stateful tally (50 keys), concurrency 16",
            guest: "test-guests/hostile",
            concurrency: 16,
            idempotency: true,
            keyed: false,
            payload: tally,
        },
        Run {
            label: "weir + stateful tally (50 keys), keyed, concurrency 16",
            guest: "test-guests/hostile",
            concurrency: 16,
            idempotency: true,
            keyed: true,
            payload: tally,
        },
    ];
    let mut latency_host = None;
    for (i, run) in runs.iter().enumerate() {
        if only.is_some_and(|only| !run.label.contains(only)) {
            continue;
        }
        let subject = format!("bench.run{i}");
        publish_keyed(&js, &subject, events, run.payload).await;
        let meter = cpu::Meter::start(server_pid);
        let (host, stats, rate) = weir_drain(
            dir.path(),
            &server.url(),
            &client,
            run,
            i,
            &subject,
            events,
            1,
        )
        .await;
        println!(
            "  {:<LABEL$} {rate:>9.0} events/s  ({:>5.1}% of baseline)  {}",
            run.label,
            100.0 * rate / base_rate,
            meter.per_event(events)
        );
        if i == 2 {
            latency_host = Some((host, stats, format!("{subject}.c-0")));
        } else {
            host.shutdown().await;
        }
    }

    // Latency at a fixed offered rate: weir (fraud, concurrency 16) and the
    // baseline consumer double-acking, as weir's acks are confirmed.
    let count = (rate * 10).min(events);
    println!("\npublish-to-ack latency at {rate} events/s offered ({count} events)");
    let Some((host, stats, subject)) = latency_host else {
        return;
    };
    let unloaded = weir_latency(&server.url(), &stats, &subject, &orders[..count], rate).await;
    // The same host and plugin again, now sharing the host with 16 calls
    // that spin until their deadline: what fair sharing of the guest CPU
    // has to protect.
    let spin_window = Duration::from_secs_f64(count as f64 / rate as f64);
    start_spinners(&js, &host, &dir.path().join("plugins-2"), spin_window).await;
    let neighboured = weir_latency(&server.url(), &stats, &subject, &orders[..count], rate).await;
    host.shutdown().await;

    let url = server.url();
    let base_latency = baseline_paced_latency(&js, &url, "latency", &orders[..count], rate).await;
    // The same consumer next to one thread spinning at normal priority: a
    // core taken, as weir's spinners take one by default (one long-call
    // permit on two turns). What the machine's own scheduling adds to a
    // tail, with no Weir in it.
    let spinning = SpinningThread::start();
    let beside_spin =
        baseline_paced_latency(&js, &url, "latency-beside-spin", &orders[..count], rate).await;
    drop(spinning);

    let ms = |d: Option<Duration>| {
        d.map(|d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
            .unwrap_or("-".into())
    };
    let percentiles = |s: &LatencySnapshot| (s.quantile(0.5), s.quantile(0.99));
    let base_p = percentiles(&base_latency);
    let beside_p = percentiles(&beside_spin);
    for (label, (p50, p99)) in [
        ("baseline: pull consumer, double-ack each", base_p),
        ("baseline, next to one spinning thread", beside_p),
        ("weir + fraud, concurrency 16", unloaded),
        (
            "weir + fraud, c16, next to 16 spinning guest calls",
            neighboured,
        ),
    ] {
        println!("  {label:<LABEL$} p50 {:>9}   p99 {:>9}", ms(p50), ms(p99));
    }
    for (label, alone, beside) in [
        (
            "baseline: p99 next to a spinning thread / p99 alone",
            base_p.1,
            beside_p.1,
        ),
        (
            "p99 next to spinning guests / p99 alone",
            unloaded.1,
            neighboured.1,
        ),
    ] {
        if let (Some(alone), Some(beside)) = (alone, beside) {
            println!(
                "  {label}: {:.2}x",
                beside.as_secs_f64() / alone.as_secs_f64()
            );
        }
    }
}

/// Width of the label column: the longest row label.
const LABEL: usize = 56;

/// Calls spinning at once next to the measured plugin.
const SPINNING_CALLS: usize = 16;

/// Add the hostile test guest to `host` as plugins at concurrency 16, as
/// many as it takes for [`SPINNING_CALLS`] calls to spin at once (the host
/// runs no more of one plugin's calls computing than twice its cores), and
/// feed them events that spin until their 1 s deadline, enough for
/// `window` and beyond; returns once they spin.
async fn start_spinners(
    js: &jetstream::Context,
    host: &Supervisor,
    plugins: &Path,
    window: Duration,
) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_plugin = 2 * cores.min(16);
    let names: Vec<String> = (0..SPINNING_CALLS.div_ceil(per_plugin))
        .map(|i| format!("spinners-{i}"))
        .collect();
    let wasm = dist("test-guests/hostile.wasm");
    for name in &names {
        std::fs::copy(&wasm, plugins.join(format!("{name}.wasm"))).unwrap();
        std::fs::write(
            plugins.join(format!("{name}.toml")),
            "subjects = [\"hostile.spin\"]\nstream = \"HOSTILE\"\nstart = \"all\"\n\
             concurrency = 16\n[retry]\nmax-deliveries = 1\n\
             [limits]\nmemory-mb = 16\ntimeout-ms = 1000\n",
        )
        .unwrap();
    }
    // Every plugin consumes every spin: each gets enough for its calls.
    let spins = per_plugin.max(16) * (window.as_secs() as usize + 4);
    let loops: Vec<String> = (0..spins).map(|_| "loop".to_owned()).collect();
    publish_all(js, "hostile.spin", &loops, None).await;
    host.reconcile().await.unwrap();
    for name in &names {
        let spinners = host.stats(name).await.expect("the spinners plugin runs");
        while spinners.snapshot().in_flight < per_plugin as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
