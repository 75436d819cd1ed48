//! Re-running history, against a real nats-server with real plugins and
//! hosts killed for real: `weir plugins reset` re-runs it with effects,
//! `weir replay` runs a candidate version over it with none. Needs `cargo
//! xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use weir_integration_tests::{
    TestEnv, count, dist, header, publish_all, read_stream, stream_state, tallies, wait_until,
    weir_cli,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const EVENTS: usize = 2_000;
const KEYS: usize = 10;
const WAIT: Duration = Duration::from_secs(180);

fn plugins(config: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let args: Vec<&str> = std::iter::once("plugins")
        .chain(args.iter().copied())
        .collect();
    weir_cli(config, &args, stdin)
}

/// How many outputs of `plugin` each event (by id) has.
async fn outputs_per_event(js: &jetstream::Context, plugin: &str) -> HashMap<Vec<u8>, usize> {
    let mut per_event = HashMap::new();
    for m in read_stream(js, "HOSTILE", "hostile.out").await {
        if header(&m, "Weir-Plugin") == Some(plugin) {
            *per_event.entry(m.payload.to_vec()).or_default() += 1;
        }
    }
    per_event
}

async fn consumer_exists(js: &jetstream::Context, name: &str) -> bool {
    let stream = js.get_stream("HOSTILE").await.unwrap();
    stream.consumer_info(name).await.is_ok()
}

/// Wait until `name` has nothing pending or unacknowledged.
async fn wait_consumer_idle(js: &jetstream::Context, name: &str) {
    wait_consumer_idle_on(js, "HOSTILE", name).await;
}

async fn wait_consumer_idle_on(js: &jetstream::Context, stream: &str, name: &str) {
    wait_until(WAIT, &format!("consumer {name} idle"), || async {
        let stream = js.get_stream(stream).await.unwrap();
        match stream.consumer_info(name).await {
            Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_reruns_history_once_with_effects_on_every_host() {
    let mut env = TestEnv::new(STREAMS);
    // Concurrency 4 so writers of the same key collide; enough deliveries
    // that the kill below never dead-letters anything.
    let tally = |m: String| {
        m.replace("start = \"all\"", "start = \"all\"\nconcurrency = 4")
            .replace("max-deliveries = 3", "max-deliveries = 50")
    };
    env.install("test-guests/hostile", "tally", tally);
    env.install("test-guests/hostile", "bystander", tally);
    env.start_host();
    env.start_host();
    let js = env.jetstream().await;
    let events: Vec<String> = (0..EVENTS)
        .map(|i| format!("tally k{}", i % KEYS))
        .collect();
    // Half carry producer ids, whose done records are kept by id.
    publish_all(&js, "hostile.in", &events[..EVENTS / 2], Some("order")).await;
    publish_all(&js, "hostile.in", &events[EVENTS / 2..], None).await;
    wait_until(WAIT, "both plugins' outputs", || async {
        count(&js, "HOSTILE", "hostile.out").await == 2 * EVENTS as u64
    })
    .await;
    let config = env.config_path();

    // Bad input is named, and changes nothing.
    let (ok, _, stderr) = plugins(&config, &["reset", "tally", "--to", "everything"], "");
    assert!(!ok && stderr.contains("expected `all`"), "{stderr}");
    let (ok, _, stderr) = plugins(&config, &["reset", "tally", "--to", "sequence", "0"], "");
    assert!(!ok && stderr.contains("from 1"), "{stderr}");
    let (ok, _, stderr) = plugins(&config, &["reset", "nosuch", "--to", "all", "--yes"], "");
    assert!(!ok && stderr.contains("never ran here"), "{stderr}");
    let (ok, stdout, _) = plugins(&config, &["reset", "tally", "--to", "all"], "n\n");
    assert!(!ok && stdout.contains("nothing changed"), "{stdout}");

    let (ok, stdout, stderr) = plugins(&config, &["reset", "tally", "--to", "all", "--yes"], "");
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("tally moved to generation 1 starting at all"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("tally runs in generation 1").count(),
        2,
        "both hosts switched: {stdout}"
    );

    // A host killed during the re-run, and started again.
    wait_until(WAIT, "the re-run under way", || async {
        count(&js, "HOSTILE", "hostile.out").await > 2 * EVENTS as u64 + EVENTS as u64 / 4
    })
    .await;
    env.host(1).kill();
    env.restart_host(1);
    wait_until(WAIT, "the re-run's outputs", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 3 * EVENTS as u64
    })
    .await;
    wait_consumer_idle(&js, "weir-tally@gen1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        3 * EVENTS as u64,
        "output messages"
    );
    let tally_outputs = outputs_per_event(&js, "tally").await;
    assert_eq!(tally_outputs.len(), EVENTS);
    assert!(
        tally_outputs.values().all(|n| *n == 2),
        "every event ran once per generation"
    );
    let bystander_outputs = outputs_per_event(&js, "bystander").await;
    assert_eq!(bystander_outputs.len(), EVENTS);
    assert!(
        bystander_outputs.values().all(|n| *n == 1),
        "the other subscriber saw nothing again"
    );
    let state = tallies(&js, "tally").await;
    assert_eq!(state.len(), KEYS);
    for (key, n) in &state {
        assert_eq!(
            *n,
            2 * (EVENTS / KEYS) as u64,
            "{key}: state kept and updated again"
        );
    }
    for (key, n) in &tallies(&js, "bystander").await {
        assert_eq!(*n, (EVENTS / KEYS) as u64, "{key}");
    }
    assert!(
        !consumer_exists(&js, "weir-tally").await,
        "generation 0's consumer deleted"
    );
    assert_eq!(
        count(&js, "WEIR_DLQ", ">").await,
        0,
        "nothing dead-lettered"
    );

    // From a sequence, only the events from there run again: the last 100
    // inputs (outputs share the stream, so its sequences interleave).
    let inputs = read_stream(&js, "HOSTILE", "hostile.in").await;
    let from = inputs[EVENTS - 100]
        .info()
        .unwrap()
        .stream_sequence
        .to_string();
    let (ok, stdout, stderr) = plugins(
        &config,
        &["reset", "tally", "--to", "sequence", &from, "--yes"],
        "",
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "tally moved to generation 2 starting at sequence {from}"
        )),
        "{stdout}"
    );
    wait_until(WAIT, "the last 100 events again", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 3 * EVENTS as u64 + 100
    })
    .await;
    wait_consumer_idle(&js, "weir-tally@gen2").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        3 * EVENTS as u64 + 100
    );
    for (key, n) in &tallies(&js, "tally").await {
        assert_eq!(*n, 2 * (EVENTS / KEYS) as u64 + 10, "{key}");
    }
    assert!(!consumer_exists(&js, "weir-tally@gen1").await);

    // A restart is not a reset: nothing runs again.
    env.host(0).terminate();
    env.restart_host(0);
    let (ok, stdout, _) = plugins(&config, &["list", "--json"], "");
    assert!(ok);
    for line in stdout.lines() {
        let answer: serde_json::Value = serde_json::from_str(line).unwrap();
        let plugin = answer["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "tally")
            .unwrap()
            .clone();
        assert_eq!(plugin["generation"], 2, "{line}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        3 * EVENTS as u64 + 100
    );
}

/// Orders of five kinds, by `i % 5`, scored by the fraud plugin's default
/// rules (high-risk countries XX and ZZ, large above 100,000 cents, more
/// than 20 units suspicious, flagged at 0.7):
/// 0: large, from ZZ: flagged (0.9);
/// 1: small: passes;
/// 2: large, 25 units: flagged (0.8);
/// 3: 90,000 cents from XX: flagged (0.84);
/// 4: large, from ZZ, 25 units: flagged (1.0).
fn orders(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (amount, country, qty) = match i % 5 {
                0 => (250_000, "ZZ", 1),
                1 => (4_599, "NL", 2),
                2 => (250_000, "NL", 25),
                3 => (90_000, "XX", 1),
                _ => (250_000, "ZZ", 25),
            };
            serde_json::json!({
                "order_id": i.to_string(),
                "customer_id": format!("c-{i}"),
                "amount_cents": amount,
                "country": country,
                "items": [{"sku": "thing", "qty": qty}],
            })
            .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_candidate_replays_history_with_no_effects_and_is_diffed_against_the_live_plugin() {
    const ORDERS: usize = 50;
    let mut env = TestEnv::new(&[("ORDERS", &["orders.>"])]);
    env.install("plugins/fraud", "fraud", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "orders.placed", &orders(ORDERS), Some("order")).await;
    let flagged = (ORDERS / 5 * 4) as u64;
    wait_until(WAIT, "the live plugin's flags", || async {
        count(&js, "ORDERS", "orders.flagged").await == flagged
    })
    .await;
    wait_consumer_idle_on(&js, "ORDERS", "weir-fraud").await;
    let config = env.config_path();
    let replay = |args: &[&str]| {
        let args: Vec<&str> = std::iter::once("replay")
            .chain(args.iter().copied())
            .collect();
        weir_cli(&config, &args, "")
    };
    let before = stream_state(&js, "ORDERS").await;

    // The same version: every event the same.
    let same = dist("plugins/fraud.wasm");
    let same = same.to_str().unwrap();
    let (ok, stdout, stderr) = replay(&[same, "--against", "fraud"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "against fraud: {ORDERS} same, 0 different, 0 only in candidate, 0 only in live"
        )),
        "{stdout}"
    );

    // A version with one rule changed: ZZ is no longer high-risk.
    let candidate_dir = env.dir.path().join("candidate");
    std::fs::create_dir_all(&candidate_dir).unwrap();
    std::fs::copy(dist("plugins/fraud.wasm"), candidate_dir.join("fraud.wasm")).unwrap();
    let manifest = std::fs::read_to_string(dist("plugins/fraud.toml")).unwrap();
    assert!(manifest.contains(r#"high-risk-countries = ["XX", "ZZ"]"#));
    std::fs::write(
        candidate_dir.join("fraud.toml"),
        manifest.replace(r#"["XX", "ZZ"]"#, r#"["XX"]"#),
    )
    .unwrap();
    let candidate = candidate_dir.join("fraud.wasm");
    let candidate = candidate.to_str().unwrap();
    let (ok, stdout, stderr) = replay(&[candidate, "--against", "fraud"]);
    assert!(!ok, "differences exit with status 1: {stdout}{stderr}");
    assert!(
        stdout
            .contains("against fraud: 30 same, 10 different, 0 only in candidate, 10 only in live"),
        "{stdout}"
    );
    let (_, stdout, _) = replay(&[candidate, "--against", "fraud", "--json"]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["different"], 10, "{summary}");
    assert_eq!(summary["events"], ORDERS, "{summary}");
    for line in &lines[..ORDERS] {
        let i: usize = line["id"]
            .as_str()
            .unwrap()
            .strip_prefix("order-")
            .unwrap()
            .parse()
            .unwrap();
        let expected = match i % 5 {
            0 => "only-in-live",
            4 => "different",
            _ => "same",
        };
        assert_eq!(line["verdict"], expected, "{line}");
        if expected == "different" {
            assert_eq!(line["emitted"][0]["payload"]["score"], 0.8, "{line}");
            assert_eq!(line["live"][0]["payload"]["score"], 1.0, "{line}");
        }
    }

    // A range: only those events run.
    let (ok, stdout, _) = replay(&[candidate, "--from", "1", "--to", "5", "--against", "fraud"]);
    assert!(!ok);
    assert!(
        stdout.contains("ran 5 events of ORDERS (sequences 1..=5)"),
        "{stdout}"
    );

    // Nothing was published, committed or acked.
    let after = stream_state(&js, "ORDERS").await;
    assert_eq!(after.messages, before.messages);
    assert_eq!(after.last_sequence, before.last_sequence);
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
    let live = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .consumer_info("weir-fraud")
        .await
        .unwrap()
        .clone();
    assert_eq!(
        live.delivered.stream_sequence,
        live.ack_floor.stream_sequence
    );

    // Bad input is named.
    let (ok, _, stderr) = replay(&["nothing.wasm"]);
    assert!(!ok && stderr.contains("does not exist"), "{stderr}");
    let notplugin = dist("test-guests/notplugin.wasm");
    let (ok, _, stderr) = replay(&[notplugin.to_str().unwrap()]);
    assert!(!ok && stderr.contains("is not a plugin"), "{stderr}");
    let (ok, _, stderr) = replay(&[same, "--stream", "NOPE"]);
    assert!(
        !ok && stderr.contains("stream NOPE does not exist"),
        "{stderr}"
    );
    let (ok, _, stderr) = replay(&[same, "--from", "yesterday"]);
    assert!(!ok && stderr.contains("RFC 3339"), "{stderr}");
}
