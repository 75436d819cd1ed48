//! Exactly-once effects, proven by killing hosts: outputs and state
//! changes happen once per event however often the host dies, and however
//! many hosts share the work. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use weir_integration_tests::{
    TestEnv, consumer_backlog, count, header, hostile_stream_with_short_dedup, http_get, metric,
    publish_all, read_stream, tallies, wait_drained, wait_until,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const EVENTS: usize = 20_000;
const KEYS: usize = 20;

/// The hostile guest as a counting plugin: concurrency 4 so writers of the
/// same key collide, and enough deliveries that repeated kills never
/// dead-letter anything.
fn tally_plugin(manifest: String) -> String {
    manifest
        .replace("start = \"all\"", "start = \"all\"\nconcurrency = 4")
        .replace("max-deliveries = 3", "max-deliveries = 50")
}

fn tally_events(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tally k{}", i % KEYS)).collect()
}

/// Kill host `victim` with SIGKILL each time the output count passes one of
/// `thresholds`, restarting it right away; returns how many kills happened
/// with work still left.
async fn kill_repeatedly(env: &mut TestEnv, victim: usize, thresholds: &[u64]) -> usize {
    let js = env.jetstream().await;
    let mut kills = 0;
    for &at in thresholds {
        wait_until(Duration::from_secs(300), "progress", || async {
            count(&js, "HOSTILE", "hostile.out").await >= at
        })
        .await;
        env.host(victim).kill();
        if count(&js, "HOSTILE", "hostile.out").await < EVENTS as u64 {
            kills += 1;
        }
        env.restart_host(victim);
    }
    kills
}

async fn assert_exactly_once(env: &mut TestEnv) {
    let js = env.jetstream().await;
    wait_drained(&js, "hostile", EVENTS as u64, Duration::from_secs(300)).await;
    // Messages, not distinct ids: a duplicate would show up here.
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        EVENTS as u64,
        "output messages"
    );
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    let distinct: HashSet<&[u8]> = outputs.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(distinct.len(), EVENTS, "distinct outputs");
    // The guest also counts, in a global, the events its instance handled,
    // and puts the count on its output. Instances were reused (counts above
    // one) and killed with the host; a run that did not commit may have
    // counted an event its replacement counted again. None of that shows
    // in the effects: only committed state and outboxes count.
    let reused = outputs
        .iter()
        .filter_map(|m| header(m, "Instance-Count")?.parse::<u64>().ok())
        .any(|n| n > 1);
    assert!(reused, "instances were reused across events");
    let tallies = tallies(&js, "hostile").await;
    assert_eq!(tallies.len(), KEYS);
    assert_eq!(
        tallies.values().sum::<u64>(),
        EVENTS as u64,
        "state counters: {tallies:?}"
    );
    for (key, n) in &tallies {
        assert_eq!(*n, (EVENTS / KEYS) as u64, "{key}");
    }
    assert_eq!(
        count(&js, "WEIR_DLQ", ">").await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn host_killed_repeatedly_yields_each_effect_once() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "hostile", tally_plugin);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &tally_events(EVENTS), None).await;
    let kills = kill_repeatedly(&mut env, 0, &[1_500, 4_500, 7_500, 10_500, 13_500, 16_500]).await;
    assert!(kills >= 5, "only {kills} kills landed mid-stream");
    assert_exactly_once(&mut env).await;
}

/// Keyed by subject token: every key's events run in order as runs, each
/// run's state changes, done marks and outboxes committed together with
/// other keys' runs in one atomic group commit, so a kill almost always
/// lands while a group commit is in flight.
fn keyed_tally_plugin(manifest: String) -> String {
    tally_plugin(manifest)
        .replace(
            "subjects = [\"hostile.in\"]",
            "subjects = [\"hostile.in.>\"]",
        )
        .replace(
            "concurrency = 4",
            "concurrency = 4\nordering-key = { subject-token = 3 }",
        )
}

#[tokio::test(flavor = "multi_thread")]
async fn host_killed_during_group_commits_yields_each_effect_once() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "hostile", keyed_tally_plugin);
    env.start_host();
    let js = env.jetstream().await;
    for (i, command) in tally_events(EVENTS).into_iter().enumerate() {
        // Pipelined in chunks, one subject per key.
        let subject = format!("hostile.in.k{}", i % KEYS);
        let ack = js.publish(subject, command.into()).await.unwrap();
        if i % 1000 == 999 {
            ack.await.unwrap();
        }
    }
    let kills = kill_repeatedly(&mut env, 0, &[2_000, 6_000, 10_000, 14_000, 18_000]).await;
    assert!(kills >= 4, "only {kills} kills landed mid-stream");
    assert_exactly_once(&mut env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_one_killed_repeatedly_yield_each_effect_once() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "hostile", tally_plugin);
    env.start_host();
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &tally_events(EVENTS), None).await;
    let kills = kill_repeatedly(&mut env, 1, &[1_500, 4_500, 7_500, 10_500, 13_500, 16_500]).await;
    assert!(kills >= 5, "only {kills} kills landed mid-stream");
    assert_exactly_once(&mut env).await;
    // The surviving host took part but did not do everything: the work was
    // shared, and what the killed host committed was not run again here.
    let survivor = env.plugin_counter(0, "hostile", "processed");
    assert!(
        survivor > 0 && survivor < EVENTS as u64,
        "the surviving host processed {survivor} of {EVENTS}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_publish_of_one_input_yields_one_effect() {
    let mut env = TestEnv::new(&[]);
    env.install("test-guests/hostile", "hostile", |m| m);
    // A one-second duplicate window, so the second publish of the same
    // Nats-Msg-Id is stored again and only Weir's done record stops it.
    let js = env.jetstream().await;
    hostile_stream_with_short_dedup(&js).await;
    env.start_host();
    let send = |id: &'static str| {
        let js = js.clone();
        async move {
            let message = jetstream::message::PublishMessage::build()
                .payload("tally dup".into())
                .message_id(id);
            js.send_publish("hostile.in", message)
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let first = send("order-1").await;
    let within_window = send("order-1").await;
    assert!(
        within_window.duplicate,
        "JetStream drops it within its window"
    );
    assert_eq!(first.sequence, within_window.sequence);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_window = send("order-1").await;
    assert!(!after_window.duplicate, "stored again after the window");
    wait_until(
        Duration::from_secs(60),
        "both deliveries to be settled",
        || async {
            consumer_backlog(&js, "HOSTILE", "hostile").await == (0, 0)
                && count(&js, "HOSTILE", "hostile.in").await == 2
        },
    )
    .await;
    assert_eq!(count(&js, "HOSTILE", "hostile.out").await, 1, "one output");
    assert_eq!(
        tallies(&js, "hostile").await.get("s.tally.dup"),
        Some(&1),
        "one state change"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_cannot_see_each_others_state() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "alpha", |m| m);
    env.install("test-guests/hostile", "beta", |m| {
        m.replace(
            "subjects = [\"hostile.in\"]",
            "subjects = [\"hostile.beta\"]",
        )
    });
    env.start_host();
    let js = env.jetstream().await;
    publish_all(
        &js,
        "hostile.in",
        &tally_events(3)
            .iter()
            .map(|_| "tally x".to_owned())
            .collect::<Vec<_>>(),
        None,
    )
    .await;
    wait_until(Duration::from_secs(60), "alpha's three events", || async {
        count(&js, "HOSTILE", "hostile.out").await == 3
    })
    .await;
    publish_all(&js, "hostile.beta", &["tally x".to_owned()], None).await;
    wait_until(Duration::from_secs(60), "beta's event", || async {
        count(&js, "HOSTILE", "hostile.out").await == 4
    })
    .await;
    assert_eq!(tallies(&js, "alpha").await.get("s.tally.x"), Some(&3));
    assert_eq!(
        tallies(&js, "beta").await.get("s.tally.x"),
        Some(&1),
        "beta counted from zero: it never saw alpha's 3"
    );
}

/// A key written behind the host's back, as another host would: the
/// host's cached read of it is refused at commit, the event runs again on
/// the fresh value, and the rerun is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_written_elsewhere_is_read_again_and_the_rerun_counted() {
    let mut env = TestEnv::with_config(STREAMS, "", "");
    env.install("test-guests/hostile", "hostile", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    let outputs = |n: u64| {
        let js = js.clone();
        async move { count(&js, "HOSTILE", "hostile.out").await == n }
    };
    publish_all(&js, "hostile.in", &["tally x".to_owned()], None).await;
    wait_until(Duration::from_secs(60), "the first event", || outputs(1)).await;
    // The host now holds tally.x = 1 in its cache.
    let bucket = js.get_key_value("weir_state_hostile").await.unwrap();
    bucket.put("s.tally.x", "100".into()).await.unwrap();
    publish_all(&js, "hostile.in", &["tally x".to_owned()], None).await;
    wait_until(Duration::from_secs(60), "the second event", || outputs(2)).await;
    assert_eq!(
        tallies(&js, "hostile").await.get("s.tally.x"),
        Some(&101),
        "the second event counted on from the value written elsewhere"
    );
    let (status, text) = http_get(&env.host(0).admin_addr(), "/metrics", None).unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        metric(
            &text,
            "weir_events_conflict_reruns_total",
            &[("plugin", "hostile")]
        ),
        1.0,
        "{text}"
    );
}
