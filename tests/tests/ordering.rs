//! Per-key ordering, concurrency and backpressure against a real
//! nats-server and the real `weir` binary. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use weir_integration_tests::{TestEnv, count, read_stream, wait_drained, wait_until};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const WAIT: Duration = Duration::from_secs(180);
const EVENTS: usize = 10_000;
const KEYS: usize = 50;

fn keyed(m: String) -> String {
    m.replace(
        "subjects = [\"hostile.in\"]",
        "subjects = [\"hostile.ord.>\"]",
    )
    .replace(
        "start = \"all\"",
        "start = \"all\"\nconcurrency = 16\nordering-key = { subject-token = 3 }",
    )
}

/// 10,000 events over 50 keys with per-event delays of 0-2 ms that make
/// later events of a key finish faster than earlier ones unless ordered.
async fn publish_keyed(js: &jetstream::Context, command: &str) {
    for chunk in 0..EVENTS / 1000 {
        let mut acks = Vec::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            let subject = format!("hostile.ord.k{}", i % KEYS);
            let delay = (i * 7919) % 3;
            acks.push(
                js.publish(subject, format!("{command} {delay}").into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

/// Outputs in stream order as (key, input sequence).
async fn outputs(js: &jetstream::Context) -> Vec<(String, u64)> {
    read_stream(js, "HOSTILE", "hostile.out")
        .await
        .iter()
        .map(|m| {
            let text = String::from_utf8(m.payload.to_vec()).unwrap();
            let (subject, seq) = text.split_once(' ').unwrap();
            (
                subject.rsplit('.').next().unwrap().to_owned(),
                seq.parse().unwrap(),
            )
        })
        .collect()
}

fn assert_ordered_per_key_but_not_globally(outputs: &[(String, u64)]) {
    assert_eq!(outputs.len(), EVENTS);
    let mut per_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (key, seq) in outputs {
        per_key.entry(key).or_default().push(*seq);
    }
    assert_eq!(per_key.len(), KEYS);
    for (key, seqs) in &per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of stream order: {seqs:?}"
        );
    }
    // Keys ran concurrently: completion order is not stream order overall
    // (one event at a time would reproduce stream order exactly).
    let inversions = outputs.windows(2).filter(|w| w[0].1 > w[1].1).count();
    assert!(
        inversions > 0,
        "outputs came out in global stream order: events did not run concurrently"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_one_key_run_in_stream_order_and_keys_run_concurrently() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "ordered", keyed);
    env.start_host();
    let js = env.jetstream().await;
    publish_keyed(&js, "ordered").await;
    wait_drained(&js, "ordered", EVENTS as u64, WAIT).await;
    assert_ordered_per_key_but_not_globally(&outputs(&js).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_event_holds_its_key_so_order_survives_retries() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "flaky", keyed);
    env.start_host();
    let js = env.jetstream().await;
    publish_keyed(&js, "ordered-flaky").await;
    wait_drained(&js, "flaky", EVENTS as u64, WAIT).await;
    assert_ordered_per_key_but_not_globally(&outputs(&js).await);
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
    let log = env.host(0).log_text();
    assert!(
        log.contains("flaky on first attempt"),
        "some events were retried"
    );
}

/// Peak resident set of a process, from /proc.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_plugin_holds_bounded_work_and_does_not_slow_a_fast_one() {
    let mut env = TestEnv::new(STREAMS);
    // Slow: 50 ms per event, four at a time, at most eight held.
    env.install("test-guests/hostile", "slow", |m| {
        m.replace(
            "subjects = [\"hostile.in\"]",
            "subjects = [\"hostile.work\"]",
        )
        .replace(
            "start = \"all\"",
            "start = \"all\"\nconcurrency = 4\nmax-in-flight = 8",
        )
    });
    // Fast: another subject of the same stream, no work per event.
    env.install("test-guests/hostile", "fast", |m| {
        m.replace(
            "subjects = [\"hostile.in\"]",
            "subjects = [\"hostile.quick\"]",
        )
        .replace("start = \"all\"", "start = \"all\"\nconcurrency = 8")
    });
    let host = env.start_host();
    let pid = env.host(host).pid();
    let js = env.jetstream().await;
    let before = peak_rss_kib(pid);
    let backlog = vec!["sleep 50".to_owned(); 100_000];
    weir_integration_tests::publish_all(&js, "hostile.work", &backlog, None).await;
    let quick = vec!["echo".to_owned(); 5_000];
    let started = std::time::Instant::now();
    weir_integration_tests::publish_all(&js, "hostile.quick", &quick, None).await;
    let stream = js.get_stream("HOSTILE").await.unwrap();
    wait_until(WAIT, "the fast plugin's 5,000 events", || async {
        let slow = stream.consumer_info("weir-slow").await.unwrap();
        assert!(
            slow.num_ack_pending <= 8,
            "slow plugin holds at most max_ack_pending = 8: {}",
            slow.num_ack_pending
        );
        count(&js, "HOSTILE", "hostile.out").await == 5_000
    })
    .await;
    let fast_rate = 5_000.0 / started.elapsed().as_secs_f64();
    let slow = stream.consumer_info("weir-slow").await.unwrap();
    assert!(
        slow.num_pending > 90_000,
        "the slow plugin is still far behind: {}",
        slow.num_pending
    );
    let peak = peak_rss_kib(pid);
    println!(
        "host peak RSS {before} KiB before the backlog, {peak} KiB with {} events waiting; fast plugin {fast_rate:.0} events/s",
        slow.num_pending
    );
    assert!(
        peak < before + 100 * 1024,
        "host memory grew with the backlog: {before} -> {peak} KiB"
    );
}

/// Processed counts of plugin `name` per host, from `weir plugins list --json`.
fn processed_per_host(env: &TestEnv, name: &str) -> Vec<(String, u64)> {
    let (listed, stdout, stderr) =
        weir_integration_tests::weir_cli(&env.config_path(), &["plugins", "list", "--json"], "");
    assert!(listed, "{stderr}");
    stdout
        .lines()
        .map(|line| {
            let answer: serde_json::Value = serde_json::from_str(line).unwrap();
            let plugin = answer["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap();
            (
                answer["host"].as_str().unwrap().to_owned(),
                plugin["processed"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn exclusive_plugin_is_pulled_by_one_host_and_fails_over() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "pinned", |m| {
        keyed(m).replace("concurrency = 16", "concurrency = 16\nexclusive = true")
    });
    env.start_host();
    env.start_host();
    let js = env.jetstream().await;
    publish_keyed(&js, "ordered").await;
    wait_until(WAIT, "progress", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 1_000
    })
    .await;
    let counts = processed_per_host(&env, "pinned");
    assert_eq!(counts.len(), 2, "both hosts answer: {counts:?}");
    let working: Vec<&(String, u64)> = counts.iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        working.len(),
        1,
        "exactly one host pulls an exclusive plugin: {counts:?}"
    );
    // Kill the pinned host; the standby takes over after the pin timeout.
    let pinned_pid: u32 = working[0].0.rsplit(':').next().unwrap().parse().unwrap();
    let victim = (0..2)
        .find(|&i| env.host(i).pid() as u32 == pinned_pid)
        .expect("pinned host is one of ours");
    env.host(victim).kill();
    wait_drained(&js, "pinned", EVENTS as u64, WAIT).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        EVENTS as u64,
        "each event once"
    );
    let survivor = processed_per_host(&env, "pinned");
    assert_eq!(survivor.len(), 1);
    assert!(survivor[0].1 > 0, "the standby took over: {survivor:?}");
}
