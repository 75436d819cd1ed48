//! What the README promises about delivery, each against a real
//! nats-server and the real `weir` binary: start positions, progress acks
//! for handlers slower than the ack wait, retry delays from the guest and
//! from the backoff, dead letters for the deadline and the memory cap,
//! idempotency off, and done marks that expire. Needs `cargo xtask build`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use weir_integration_tests::{
    TestEnv, count, header, hostile_stream_with_short_dedup, http_get, metric, one_delivery,
    publish_all, read_stream, wait_until,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const WAIT: Duration = Duration::from_secs(60);

fn echoes(n: usize) -> Vec<String> {
    vec!["echo".to_owned(); n]
}

/// The hostile guest's manifest with `start` replaced.
fn starting(start: &str) -> impl FnOnce(String) -> String {
    let start = start.to_owned();
    move |m: String| m.replace("start = \"all\"", &format!("start = {start}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn start_positions_new_sequence_and_time() {
    let mut env = TestEnv::new(STREAMS);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &echoes(5), None).await;
    // Stream times have nanoseconds; a whole second apart keeps the time
    // start between the two batches whatever the clocks' rounding.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_all(&js, "hostile.in", &echoes(5), None).await;

    let time = between
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    env.deploy("test-guests/hostile", "from-new", None, starting("\"new\""));
    env.deploy(
        "test-guests/hostile",
        "from-seq",
        None,
        starting("{ sequence = 4 }"),
    );
    env.deploy(
        "test-guests/hostile",
        "from-time",
        None,
        starting(&format!("{{ time = {time} }}")),
    );
    env.host(0).wait_for_log("plugin started", 3);
    publish_all(&js, "hostile.in", &echoes(3), None).await;

    // Inputs are sequences 1-5, 6-10 and 11-13 (outputs go to hostile.out,
    // in the same stream, so later sequences are not all inputs).
    wait_until(WAIT, "every plugin caught up", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 3 + 10 + 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let by_plugin = |plugin: &'static str| {
        let js = js.clone();
        async move {
            read_stream(&js, "HOSTILE", "hostile.out")
                .await
                .iter()
                .filter(|m| header(m, "Weir-Plugin") == Some(plugin))
                .count()
        }
    };
    assert_eq!(
        by_plugin("from-new").await,
        3,
        "new: only what came after it"
    );
    assert_eq!(by_plugin("from-seq").await, 10, "sequence 4: inputs 4-13");
    assert_eq!(by_plugin("from-time").await, 8, "time: the second batch on");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_slower_than_the_ack_wait_is_not_redelivered() {
    // The environment's ack wait is 5 s; this event takes 8.
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "slow", |m| {
        m.replace("timeout-ms = 300", "timeout-ms = 20000")
    });
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &["ordered 8000".to_owned()], None).await;
    // While it runs, the lag gauges show it held and unacknowledged.
    let admin = env.host(0).admin_addr();
    wait_until(
        Duration::from_secs(5),
        "the lag gauge to show it",
        || async {
            let text = http_get(&admin, "/metrics", None).unwrap().1;
            metric(
                &text,
                "weir_consumer_ack_pending_messages",
                &[("plugin", "slow")],
            ) == 1.0
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "the slow event", || async {
        count(&js, "HOSTILE", "hostile.out").await == 1
    })
    .await;
    let stream = js.get_stream("HOSTILE").await.unwrap();
    let info = stream.consumer_info("weir-slow").await.unwrap().clone();
    assert_eq!(info.num_redelivered, 0, "progress acks kept it ours");
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(env.plugin_counter(0, "slow", "processed"), 1);
    assert_eq!(env.plugin_counter(0, "slow", "duplicates"), 0);
}

/// How long after `published` the first dead letter arrived, and the
/// attempts it records.
async fn dead_letter_after(js: &jetstream::Context, published: Instant) -> (Duration, String) {
    let mut letters = js
        .get_stream("WEIR_DLQ")
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(30), letters.next())
        .await
        .expect("a dead letter within 30 s")
        .unwrap()
        .unwrap();
    let attempts = header(&letter, "Weir-Dlq-Attempts").unwrap().to_owned();
    (published.elapsed(), attempts)
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_wait_for_the_guests_delay_and_the_backoff() {
    let mut env = TestEnv::new(STREAMS);
    // Three attempts; backoff 400 ms then 800 ms, no jitter.
    env.install("test-guests/hostile", "patient", |m| {
        m.replace(
            "backoff-initial-ms = 50",
            "backoff-initial-ms = 400\njitter = 0.0",
        )
        .replace("backoff-max-ms = 200", "backoff-max-ms = 5000")
    });
    env.start_host();
    let js = env.jetstream().await;

    let published = Instant::now();
    publish_all(&js, "hostile.in", &["retry-after 0".to_owned()], None).await;
    let (took, attempts) = dead_letter_after(&js, published).await;
    assert_eq!(attempts, "3");
    assert!(
        took >= Duration::from_millis(1200),
        "two backoff waits (400 + 800 ms) before the last attempt, took {took:?}"
    );

    // The guest's own delay wins over the backoff.
    js.delete_stream("WEIR_DLQ").await.unwrap();
    env.host(0).terminate();
    env.restart_host(0);
    let published = Instant::now();
    publish_all(&js, "hostile.in", &["retry-after 1500".to_owned()], None).await;
    let (took, attempts) = dead_letter_after(&js, published).await;
    assert_eq!(attempts, "3");
    assert!(
        took >= Duration::from_millis(3000),
        "two waits of the guest's 1.5 s, took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deadline_and_memory_cap_end_in_dead_letters() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "bomb", one_delivery);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(
        &js,
        "hostile.in",
        &["loop".to_owned(), "alloc".to_owned(), "echo".to_owned()],
        None,
    )
    .await;
    wait_until(WAIT, "two dead letters", || async {
        count(&js, "WEIR_DLQ", ">").await == 2
    })
    .await;
    let reasons: Vec<String> = read_stream(&js, "WEIR_DLQ", ">")
        .await
        .iter()
        .map(|m| header(m, "Weir-Dlq-Reason").unwrap().to_owned())
        .collect();
    assert!(reasons.contains(&"deadline".to_owned()), "{reasons:?}");
    assert!(reasons.contains(&"out_of_memory".to_owned()), "{reasons:?}");
    wait_until(WAIT, "the good event", || async {
        count(&js, "HOSTILE", "hostile.out").await == 1
    })
    .await;
    let admin = env.host(0).admin_addr();
    let metrics = http_get(&admin, "/metrics", None).unwrap().1;
    for (limit, reason) in [("deadline", "deadline"), ("memory", "out_of_memory")] {
        assert_eq!(
            metric(
                &metrics,
                "weir_limit_hits_total",
                &[("plugin", "bomb"), ("reason", limit)]
            ),
            1.0,
            "{limit}"
        );
        assert_eq!(
            metric(
                &metrics,
                "weir_events_dead_lettered_total",
                &[("plugin", "bomb"), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_off_still_commits_state_and_keeps_no_done_marks() {
    let mut env = TestEnv::new(STREAMS);
    env.append_config("[state]\nidempotency = false\n");
    env.install("test-guests/hostile", "loose", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    let events: Vec<String> = (0..200).map(|i| format!("tally k{}", i % 4)).collect();
    publish_all(&js, "hostile.in", &events, None).await;
    wait_until(WAIT, "200 outputs", || async {
        count(&js, "HOSTILE", "hostile.out").await == 200
    })
    .await;
    let kv = js.get_key_value("weir_state_loose").await.unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().map(|k| k.unwrap()).collect().await;
    for k in 0..4 {
        let value = kv.get(format!("s.tally.k{k}")).await.unwrap().unwrap();
        assert_eq!(value.as_ref(), b"50", "k{k}");
    }
    assert!(
        keys.iter().all(|k| k.starts_with("s.")),
        "no done marks without idempotency: {keys:?}"
    );
    assert_eq!(env.plugin_counter(0, "loose", "processed"), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_done_mark_expires_after_done_ttl() {
    let mut env = TestEnv::new(&[]);
    env.append_config("[state]\ndone-ttl-s = 2\n");
    env.install("test-guests/hostile", "brief", |m| m);
    // A one-second duplicate window, so a re-publish of the same
    // Nats-Msg-Id is stored again and only the done mark recognises it.
    let js = env.jetstream().await;
    hostile_stream_with_short_dedup(&js).await;
    env.start_host();
    let send = || async {
        let message = jetstream::message::PublishMessage::build()
            .payload("echo".into())
            .message_id("order-42");
        js.send_publish("hostile.in", message)
            .await
            .unwrap()
            .await
            .unwrap();
    };
    send().await;
    wait_until(WAIT, "the first run", || async {
        count(&js, "HOSTILE", "hostile.out").await == 1
    })
    .await;
    // Within the done TTL, past the duplicate window: recognised.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    send().await;
    wait_until(WAIT, "the re-publish recognised", || async {
        acked(&js).await >= 2
    })
    .await;
    assert_eq!(count(&js, "HOSTILE", "hostile.out").await, 1);
    // Past the done TTL: the same id is a new event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    send().await;
    wait_until(WAIT, "the id treated as new", || async {
        count(&js, "HOSTILE", "hostile.out").await == 2
    })
    .await;
    assert_eq!(env.plugin_counter(0, "brief", "processed"), 2);
    assert_eq!(env.plugin_counter(0, "brief", "duplicates"), 1);
    let admin = env.host(0).admin_addr();
    let metrics = http_get(&admin, "/metrics", None).unwrap().1;
    assert_eq!(
        metric(
            &metrics,
            "weir_events_duplicate_total",
            &[("plugin", "brief")]
        ),
        1.0
    );
}

/// Events the brief plugin's consumer has acknowledged.
async fn acked(js: &jetstream::Context) -> u64 {
    let stream = js.get_stream("HOSTILE").await.unwrap();
    stream
        .consumer_info("weir-brief")
        .await
        .map(|i| i.ack_floor.consumer_sequence)
        .unwrap_or(0)
}
