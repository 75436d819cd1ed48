//! Hot-reload benchmark: time from a new plugin version landing in the
//! plugin directory to it serving events, with and without a compile-cache
//! hit, and the throughput around each swap, under steady load.
//!
//! ```sh
//! cargo xtask build
//! cargo run --release -p weir-integration-tests --bin reload-bench
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use weir::config::HostConfig;
use weir::supervisor::Supervisor;
use weir_integration_tests::{custom_section, dist, version_of};

const RATE: usize = 2_000;
const WINDOW: Duration = Duration::from_millis(100);

/// Write `tag`'s version of the hostile guest as plugin `swap`, atomically.
fn deploy(dir: &Path, tag: &str) -> String {
    let mut wasm = std::fs::read(dist("test-guests/hostile.wasm")).unwrap();
    wasm.extend(custom_section("weir-bench-version", tag.as_bytes()));
    let manifest = std::fs::read_to_string(dist("test-guests/hostile.toml"))
        .unwrap()
        .replace("start = \"all\"", "start = \"all\"\nconcurrency = 8");
    std::fs::write(dir.join("swap.toml"), manifest).unwrap();
    let tmp = dir.join(".swap.wasm.tmp");
    std::fs::write(&tmp, &wasm).unwrap();
    std::fs::rename(&tmp, dir.join("swap.wasm")).unwrap();
    version_of(&wasm)
}

/// Deploy and wait until the host reports the new version: the time from
/// the file landing to the version serving.
async fn swap(host: &Supervisor, dir: &Path, tag: &str) -> Duration {
    let landed = Instant::now();
    let version = deploy(dir, tag);
    loop {
        if host
            .plugins()
            .await
            .iter()
            .any(|p| p.name == "swap" && p.version == version)
        {
            return landed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let server = weir::dev::NatsServer::start_on_free_port(&dir.path().join("nats"), "").unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    deploy(&plugins, "v1");
    let mut config = HostConfig::parse(
        "[[streams]]\nname = \"HOSTILE\"\nsubjects = [\"hostile.>\"]\n",
        dir.path(),
    )
    .unwrap();
    config.nats.url = Some(server.url());
    config.plugins.dir = plugins.clone();
    let host = Supervisor::start(config).await.unwrap();
    let stats = host.stats("swap").await.unwrap();
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());

    let running = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (js, running) = (js.clone(), running.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            let mut acks = Vec::new();
            while running.load(Ordering::Relaxed) {
                ticker.tick().await;
                for _ in 0..RATE / 100 {
                    acks.push(js.publish("hostile.in", "echo".into()).await.unwrap());
                }
                if acks.len() >= 1000 {
                    for ack in acks.drain(..) {
                        ack.await.unwrap();
                    }
                }
            }
            for ack in acks {
                ack.await.unwrap();
            }
        })
    };
    let sampler = {
        let (stats, running) = (stats.clone(), running.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(WINDOW);
            let start = Instant::now();
            while running.load(Ordering::Relaxed) {
                ticker.tick().await;
                samples.push((start.elapsed(), stats.snapshot().processed));
            }
            samples
        })
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let miss_at = started.elapsed();
    let unique = format!(
        "miss-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let miss = swap(&host, &plugins, &unique).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hit_at = started.elapsed();
    let hit = swap(&host, &plugins, "v1").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    running.store(false, Ordering::Relaxed);
    publisher.await.unwrap();
    let samples = sampler.await.unwrap();

    println!("reload-bench: hostile guest (Rust), concurrency 8, {RATE} events/s offered");
    println!(
        "  file landed -> new version serving, compile cache miss  {:>8.1} ms",
        miss.as_secs_f64() * 1e3
    );
    println!(
        "  file landed -> new version serving, compile cache hit   {:>8.1} ms",
        hit.as_secs_f64() * 1e3
    );
    println!("  (both include the watcher's {} ms debounce)", 300);
    let rates: Vec<(Duration, f64)> = samples
        .windows(2)
        .map(|w| {
            (
                w[1].0,
                (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0).as_secs_f64(),
            )
        })
        .collect();
    let mut steady: Vec<f64> = rates
        .iter()
        .filter(|(t, _)| *t > Duration::from_secs(1))
        .map(|(_, r)| *r)
        .collect();
    steady.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = steady.get(steady.len() / 2).copied().unwrap_or(0.0);
    for (label, at, took) in [("miss", miss_at, miss), ("hit", hit_at, hit)] {
        let around: Vec<f64> = rates
            .iter()
            .filter(|(t, _)| *t >= at && *t <= at + took + Duration::from_millis(500))
            .map(|(_, r)| *r)
            .collect();
        let min = around.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "  throughput in 100 ms windows during the {label} swap: min {min:>7.0}/s (median over the run {median:.0}/s)"
        );
    }
    host.shutdown().await;
}
