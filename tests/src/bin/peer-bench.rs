//! Weir plugins against the consumers a developer would write by hand, in
//! one run against one nats-server, on the same backlog of orders:
//!
//! - Weir with the loyalty plugin (Python, exactly-once: points in state,
//!   done marks, outputs) against a nats-py consumer doing the simpler
//!   at-least-once version of the same job (`tests/peers/loyalty_consumer.py`);
//! - Weir with the notify plugin (JavaScript) against a nats.js consumer
//!   formatting the same emails (`tests/peers/notify_consumer.mjs`).
//!
//! ```sh
//! cargo xtask peer-bench [EVENTS] [--rounds N]
//! ```
//!
//! (xtask installs nats-py and npm `nats` and passes `--python` and `--node`.)
//! One run of each consumer moves by up to a third on a shared 2-core
//! machine, so the benchmark runs `--rounds` rounds (3 by default), each
//! on a fresh nats-server and backlog, and reports the median of the
//! rounds' ratios.
//!
//! Every consumer is timed two ways, and each ratio compares like with
//! like: *with start-up*, from launching it (Weir's host, or the peer's
//! process) to the backlog drained; and *draining*, from when it is ready
//! to consume (Weir's host started, or the peer's first fetch, as the peer
//! times itself) to the last event done.
//!
//! Each drain also reports the CPU it cost per event: the consumer's (Weir's
//! host runs in this process; a peer is a child process, counted once it
//! ends) plus nats-server's, and how much of the machine sat idle
//! meanwhile. A rate says how fast; this says where the time went: the
//! host, the server, or cores left idle.
//! Weir's host takes the same runtime overrides as `pipeline-bench`'s
//! (`BENCH_RUNNING_GUEST_CALLS`, `BENCH_RUNNING_LONG_CALLS`, `BENCH_LONG_CALLS`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark fails by panicking

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use weir::config::HostConfig;
use weir::supervisor::Supervisor;
use weir_integration_tests::cpu::{self, PerEvent};
use weir_integration_tests::{command_line, dist, workspace};

// The allocator the `weir` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One loyalty counter per customer: the state a keyed plugin keeps.
const CUSTOMERS: usize = 1_000;

struct Args {
    events: usize,
    rounds: usize,
    python: PathBuf,
    node: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        events: 20_000,
        rounds: 3,
        python: "python3".into(),
        node: "node".into(),
    };
    const USAGE: &str =
        "peer-bench [EVENTS (20000)] [--rounds N (3)] [--python PYTHON] [--node NODE]";
    let mut it = command_line::args(USAGE).into_iter();
    let value = |flag: &str, it: &mut std::vec::IntoIter<String>| -> String {
        it.next()
            .unwrap_or_else(|| command_line::refuse(&format!("{flag} needs a value"), USAGE))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--python" => args.python = value("--python", &mut it).into(),
            "--node" => args.node = value("--node", &mut it).into(),
            "--rounds" => {
                args.rounds = command_line::parse_count(&value("--rounds", &mut it), USAGE)
            }
            flag if flag.starts_with('-') => {
                command_line::refuse(&format!("unknown option {flag}"), USAGE)
            }
            n => args.events = command_line::parse_count(n, USAGE),
        }
    }
    if args.rounds == 0 {
        command_line::refuse("--rounds must be at least 1", USAGE);
    }
    args
}

/// One consumer draining the backlog: its rates, and the CPU it and
/// nats-server spent per event.
struct Drain {
    rate: Rate,
    cpu: PerEvent,
}

/// Events/s of one drain, timed two ways.
#[derive(Clone, Copy)]
struct Rate {
    /// From launching the consumer to the backlog drained.
    with_start_up: f64,
    /// From the consumer ready to consume to the backlog drained.
    draining: f64,
}

/// The consumers, as the summary and each round name them, in the order
/// of [`Round::drains`].
const CONSUMERS: [(&str, &str); 4] = [
    (
        "weir + loyalty (Python plugin, exactly-once)",
        "weir + loyalty",
    ),
    ("nats-py consumer, same job, at-least-once", "nats-py"),
    (
        "weir + notify (JavaScript plugin, exactly-once)",
        "weir + notify",
    ),
    ("nats.js consumer, same job, at-least-once", "nats.js"),
];

/// One round's drains.
struct Round {
    weir_loyalty: Drain,
    python: Drain,
    weir_notify: Drain,
    node: Drain,
}

impl Round {
    fn drains(&self) -> [&Drain; 4] {
        [
            &self.weir_loyalty,
            &self.python,
            &self.weir_notify,
            &self.node,
        ]
    }

    /// Weir + loyalty's rate over the nats-py peer's, timed as `timing`.
    fn loyalty_ratio(&self, timing: Timing) -> f64 {
        timing(self.weir_loyalty.rate) / timing(self.python.rate)
    }

    /// Weir + notify's rate over the nats.js peer's, timed as `timing`.
    fn notify_ratio(&self, timing: Timing) -> f64 {
        timing(self.weir_notify.rate) / timing(self.node.rate)
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let mut rounds: Vec<Round> = Vec::with_capacity(args.rounds);
    for i in 0..args.rounds {
        rounds.push(round(&args, i).await);
    }

    println!(
        "\n  {:<50} {:>9} {:>10} {:>8}",
        "(medians)", "events/s", "draining", "CPU"
    );
    for (i, (label, _)) in CONSUMERS.iter().enumerate() {
        let rate = |timing: Timing| median(rounds.iter().map(|r| timing(r.drains()[i].rate)));
        let cpu = median(rounds.iter().map(|r| r.drains()[i].cpu.total_us()));
        println!(
            "  {label:<50} {:>9.0} {:>10.0} {cpu:>5.0} µs per event",
            rate(|r| r.with_start_up),
            rate(|r| r.draining)
        );
    }
    println!();
    for (timing, how) in TIMINGS {
        let loyalty: Vec<f64> = rounds.iter().map(|r| r.loyalty_ratio(timing)).collect();
        let notify: Vec<f64> = rounds.iter().map(|r| r.notify_ratio(timing)).collect();
        println!(
            "  {how:<16} weir + loyalty / nats-py: {:.2}x    weir + notify / nats.js: {:.2}x",
            median(loyalty.iter().copied()),
            median(notify.iter().copied())
        );
        if rounds.len() > 1 {
            println!(
                "  {:<16} (medians of {} rounds' ratios; each round: loyalty {}, notify {})",
                "",
                rounds.len(),
                ratios(&loyalty),
                ratios(&notify)
            );
        }
    }
}

/// One way of timing a drain: which of its rates to read.
type Timing = fn(Rate) -> f64;

/// The two ways a drain is timed, as the summary names them.
const TIMINGS: [(Timing, &str); 2] = [
    (|r| r.with_start_up, "with start-up:"),
    (|r| r.draining, "draining:"),
];

/// One round on a fresh nats-server and backlog: every consumer drains the
/// same orders in turn. Who goes first alternates between rounds, so a
/// machine that slows down over a round does not always favour one side.
async fn round(args: &Args, index: usize) -> Round {
    let n = args.events;
    let (dir, server, client) = weir_integration_tests::bench_broker().await;
    let js = jetstream::new(client);
    for (name, subjects) in [
        ("ORDERS", vec!["orders.>"]),
        ("OUT", vec!["loyalty.>", "notifications.>", "peer.>"]),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: subjects.into_iter().map(String::from).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    publish_orders(&js, n).await;
    println!(
        "peer-bench round {}: a backlog of {n} orders, nats-server {}",
        index + 1,
        server.url()
    );
    let url = server.url();
    let weir_first = index.is_multiple_of(2);
    let server_pid = server.pid().unwrap();
    let (weir_loyalty, python) = pair(
        &url,
        dir.path(),
        server_pid,
        "loyalty",
        n,
        weir_first,
        || {
            peer(
                &args.python,
                "loyalty_consumer.py",
                &url,
                n,
                "peer.loyalty.awarded",
            )
        },
    )
    .await;
    let (weir_notify, node) = pair(
        &url,
        dir.path(),
        server_pid,
        "notify",
        n,
        weir_first,
        || {
            peer(
                &args.node,
                "notify_consumer.mjs",
                &url,
                n,
                "peer.notifications.email",
            )
        },
    )
    .await;
    let round = Round {
        weir_loyalty,
        python,
        weir_notify,
        node,
    };
    for (label, drain) in [("nats-py", &round.python), ("nats.js", &round.node)] {
        println!(
            "  {label}: {:.0} events/s with start-up, {:.0} draining",
            drain.rate.with_start_up, drain.rate.draining
        );
    }
    for (timing, how) in TIMINGS {
        println!(
            "  {how:<16} loyalty / nats-py {:.2}x, notify / nats.js {:.2}x",
            round.loyalty_ratio(timing),
            round.notify_ratio(timing)
        );
    }
    println!("  CPU per event, the consumer + nats-server (the machine idle meanwhile):");
    for ((_, label), drain) in CONSUMERS.iter().zip(round.drains()) {
        println!("    {label:<15} {}", drain.cpu);
    }
    round
}

/// Weir serving `plugin` and its hand-written peer on the same backlog,
/// in the order asked for: (Weir's drain, the peer's). nats-server
/// (`server_pid`) is charged to whichever drains.
async fn pair(
    url: &str,
    dir: &Path,
    server_pid: u32,
    plugin: &str,
    n: usize,
    weir_first: bool,
    peer: impl FnOnce() -> Rate,
) -> (Drain, Drain) {
    let weir = async || {
        let meter = cpu::Meter::start(server_pid);
        let rate = weir_drain(dir, url, plugin, n).await;
        Drain {
            rate,
            cpu: meter.per_event(n),
        }
    };
    let peer = || {
        let meter = cpu::Meter::start(server_pid);
        let rate = peer();
        Drain {
            rate,
            cpu: meter.per_event(n),
        }
    };
    if weir_first {
        let weir = weir().await;
        (weir, peer())
    } else {
        let peer = peer();
        (weir().await, peer)
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn ratios(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().map(|r| format!("{r:.2}x")).collect();
    shown.join(", ")
}

/// Orders over `CUSTOMERS` customers, with the Customer-Id header the
/// loyalty plugin keys by.
async fn publish_orders(js: &jetstream::Context, n: usize) {
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        let customer = format!("c{}", i % CUSTOMERS);
        let order = serde_json::json!({
            "order_id": format!("o{i}"), "customer_id": customer,
            "amount_cents": 1_000 + (i % 50) * 700, "country": "NL",
            "items": [{"sku": "mug", "qty": 1}],
        });
        let mut headers = HeaderMap::new();
        headers.insert("Customer-Id", customer.as_str());
        let payload = serde_json::to_vec(&order).unwrap().into();
        acks.push(
            js.publish_with_headers("orders.placed", headers, payload)
                .await
                .unwrap(),
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Serve `plugin` (its shipped manifest, on the whole backlog) in a host
/// and wait until it processed `n` events; events/s from calling the
/// host's start, and from its start returning (plugins loaded, consuming).
async fn weir_drain(dir: &Path, url: &str, plugin: &str, n: usize) -> Rate {
    let plugins = dir.join(format!("plugins-{plugin}"));
    std::fs::create_dir_all(&plugins).unwrap();
    let wasm = dist(&format!("plugins/{plugin}.wasm"));
    std::fs::copy(&wasm, plugins.join(format!("{plugin}.wasm"))).unwrap();
    std::fs::copy(
        wasm.with_extension("toml"),
        plugins.join(format!("{plugin}.toml")),
    )
    .unwrap();
    let mut config = HostConfig::parse("", dir).unwrap();
    config.nats.url = Some(url.to_owned());
    config.plugins.dir = plugins;
    config.admin.listen = "127.0.0.1:0".into();
    weir_integration_tests::bench::runtime_overrides(&mut config);
    let started = Instant::now();
    let host = Supervisor::start(config).await.unwrap();
    let ready = Instant::now();
    let stats = host.stats(plugin).await.unwrap();
    while stats.snapshot().processed < n as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{plugin} did not drain the backlog"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = Rate {
        with_start_up: n as f64 / started.elapsed().as_secs_f64(),
        draining: n as f64 / ready.elapsed().as_secs_f64(),
    };
    println!(
        "  weir + {plugin}: {:.0} events/s with start-up, {:.0} draining, mean plugin call {:.1} µs, start-up {:.0} ms",
        rate.with_start_up,
        rate.draining,
        mean_call_us(&host.metrics().encode()),
        (ready - started).as_secs_f64() * 1e3,
    );
    host.shutdown().await;
    rate
}

/// The mean time of a sandbox call, from the host's handler-duration
/// histogram: how much of an event's cost is the guest itself.
fn mean_call_us(metrics: &str) -> f64 {
    let total = |suffix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("weir_handler_duration_seconds_{suffix}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    total("sum") / total("count").max(1.0) * 1e6
}

/// Run a hand-written consumer (`script` in `tests/peers/`) to the end;
/// events/s from its launch to its exit, and as it reports them (from
/// its first fetch to its last ack).
fn peer(program: &Path, script: &str, url: &str, n: usize, output: &str) -> Rate {
    let script = workspace().join("tests/peers").join(script);
    let launched = Instant::now();
    let out = Command::new(program)
        .arg(&script)
        .args([url, "ORDERS", "orders.placed", &n.to_string(), output])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{} printed no report ({e}): {}",
            script.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(report["events"].as_u64(), Some(n as u64));
    Rate {
        with_start_up: n as f64 / launched.elapsed().as_secs_f64(),
        draining: n as f64 / report["seconds"].as_f64().unwrap(),
    }
}
