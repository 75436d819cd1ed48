//! What replication costs: the same rows on one nats-server with
//! everything R1, then on a local three-node cluster with everything R3
//! (input stream, state buckets, dead letters), in one run:
//!
//! - a plain pull consumer acking each message, draining a backlog;
//! - weir + fraud (stateless, done records on), concurrency 16;
//! - weir + the stateful tally, concurrency 16;
//! - publish-to-ack latency of weir + fraud at a fixed offered rate.
//!
//! ```sh
//! cargo xtask build
//! cargo run --release -p weir-integration-tests --bin replication-bench -- [EVENTS] [RATE]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use weir::dev::{NatsCluster, NatsServer};
use weir_integration_tests::bench::{
    Run, baseline_drain, order, publish_keyed, tally, weir_drain, weir_latency,
};
use weir_integration_tests::{command_line, publish_all};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One setup's figures.
struct Figures {
    baseline: f64,
    fraud: f64,
    tally: f64,
    p50: Option<Duration>,
    p99: Option<Duration>,
}

#[tokio::main]
async fn main() {
    const USAGE: &str = "replication-bench [EVENTS (20000)] [RATE (2000)]";
    let args = command_line::args(USAGE);
    let events = command_line::count(&args, 0, 20_000, USAGE);
    let rate = command_line::count(&args, 1, 2_000, USAGE);
    println!("replication-bench: {events} events per row, latency at {rate} events/s offered");

    let single_dir = tempfile::tempdir().unwrap();
    let single = {
        let server = NatsServer::start_on_free_port(&single_dir.path().join("nats"), "").unwrap();
        let figures = measure(single_dir.path(), &server.url(), 1, events, rate).await;
        drop(server);
        figures
    };
    let cluster_dir = tempfile::tempdir().unwrap();
    let replicated = {
        let cluster =
            NatsCluster::start_on_free_ports(&cluster_dir.path().join("cluster"), 3).unwrap();
        let figures = measure(cluster_dir.path(), &cluster.urls(), 3, events, rate).await;
        drop(cluster);
        figures
    };

    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    println!(
        "\n  {:<44} {:>12} {:>12} {:>8}",
        "", "1 node, R1", "3 nodes, R3", "R3/R1"
    );
    for (label, r1, r3, unit) in [
        (
            "baseline: pull consumer, ack each",
            single.baseline,
            replicated.baseline,
            "/s",
        ),
        (
            "weir + fraud, concurrency 16",
            single.fraud,
            replicated.fraud,
            "/s",
        ),
        (
            "weir + stateful tally, concurrency 16",
            single.tally,
            replicated.tally,
            "/s",
        ),
        (
            "weir + fraud publish-to-ack p50",
            ms(single.p50),
            ms(replicated.p50),
            "ms",
        ),
        (
            "weir + fraud publish-to-ack p99",
            ms(single.p99),
            ms(replicated.p99),
            "ms",
        ),
    ] {
        let (r1s, r3s) = if unit == "ms" {
            (format!("{r1:.2} ms"), format!("{r3:.2} ms"))
        } else {
            (format!("{r1:.0}/s"), format!("{r3:.0}/s"))
        };
        println!("  {label:<44} {r1s:>12} {r3s:>12} {:>7.2}x", r3 / r1);
    }
    println!(
        "  weir + fraud share of its own baseline: R1 {:.1}%, R3 {:.1}%",
        100.0 * single.fraud / single.baseline,
        100.0 * replicated.fraud / replicated.baseline
    );
}

/// The rows against the server(s) at `url`, everything with `replicas`.
async fn measure(dir: &Path, url: &str, replicas: usize, events: usize, rate: usize) -> Figures {
    let client = async_nats::ConnectOptions::new()
        .connect(url.split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    // A new cluster answers once it has elected a meta leader.
    // The tally emits on hostile.out.
    for (name, subject) in [
        ("BASE", "base.>"),
        ("BENCH", "bench.>"),
        ("HOSTILE", "hostile.>"),
    ] {
        let config = jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            num_replicas: replicas,
            ..Default::default()
        };
        let mut tries = 0;
        while let Err(e) = js.create_stream(config.clone()).await {
            tries += 1;
            assert!(tries < 120, "creating {name}: {e}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let orders: Vec<String> = (0..events).map(order).collect();
    publish_all(&js, "base.orders", &orders, None).await;
    let baseline = baseline_drain(&js, events).await;
    println!("  R{replicas}: baseline {baseline:.0} events/s");

    let fraud_run = Run::fraud("fraud", 16, false);
    publish_keyed(&js, "bench.fraud", events, order).await;
    let (host, stats, fraud) = weir_drain(
        dir,
        url,
        &client,
        &fraud_run,
        0,
        "bench.fraud",
        events,
        replicas,
    )
    .await;
    println!("  R{replicas}: weir + fraud {fraud:.0} events/s");
    let count = (rate * 10).min(events);
    let (p50, p99) = weir_latency(url, &stats, "bench.fraud.c-0", &orders[..count], rate).await;
    host.shutdown().await;

    let tally_run = Run {
        label: "tally",
        guest: "test-guests/hostile",
        concurrency: 16,
        idempotency: true,
        keyed: false,
        payload: tally,
    };
    publish_keyed(&js, "bench.tally", events, tally).await;
    let (host, _, tally) = weir_drain(
        dir,
        url,
        &client,
        &tally_run,
        1,
        "bench.tally",
        events,
        replicas,
    )
    .await;
    println!("  R{replicas}: weir + tally {tally:.0} events/s");
    host.shutdown().await;
    Figures {
        baseline,
        fraud,
        tally,
        p50,
        p99,
    }
}
