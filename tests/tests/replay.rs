//! Re-running history on purpose, against a real nats-server with real
//! plugins and hosts killed for real: `weir plugins reset`. Needs `cargo
//! xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use weir_integration_tests::{
    TestEnv, count, header, publish_all, read_stream, tallies, wait_until, weir_cli,
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
    wait_until(WAIT, &format!("consumer {name} idle"), || async {
        let stream = js.get_stream("HOSTILE").await.unwrap();
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
    let events: Vec<String> = (0..EVENTS).map(|i| format!("tally k{}", i % KEYS)).collect();
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
        assert_eq!(*n, 2 * (EVENTS / KEYS) as u64, "{key}: state kept and updated again");
    }
    for (key, n) in &tallies(&js, "bystander").await {
        assert_eq!(*n, (EVENTS / KEYS) as u64, "{key}");
    }
    assert!(!consumer_exists(&js, "weir-tally").await, "generation 0's consumer deleted");
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0, "nothing dead-lettered");

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
        stdout.contains(&format!("tally moved to generation 2 starting at sequence {from}")),
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
