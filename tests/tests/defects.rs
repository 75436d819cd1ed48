//! Every delivered message ends, in bounded time, as processed,
//! dead-lettered or deliberately terminated, each counted; and no message,
//! file or stream event wedges a host. One test per way this was found
//! broken (issue 13), against a real nats-server and the real `weir`
//! binary. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine;
use weir_integration_tests::{
    TestEnv, consumer_backlog, count, header, http_get, metric, publish_all, publish_raw,
    read_stream, wait_until,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const WAIT: Duration = Duration::from_secs(60);

fn hostile(env: &TestEnv, name: &str, edit: impl FnOnce(String) -> String) {
    env.install("test-guests/hostile", name, edit);
}

/// A host serving the hostile guest as it ships, on [`STREAMS`].
async fn hostile_host() -> (TestEnv, jetstream::Context) {
    let mut env = TestEnv::new(STREAMS);
    hostile(&env, "hostile", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    (env, js)
}

async fn drained(js: &jetstream::Context, stream: &str, plugin: &str) {
    wait_until(WAIT, &format!("{plugin} to settle everything"), || async {
        consumer_backlog(js, stream, plugin).await == (0, 0)
    })
    .await;
}

fn metrics(env: &mut TestEnv) -> String {
    let admin = env.host(0).admin_addr();
    http_get(&admin, "/metrics", None).unwrap().1
}

/// The host errors counted for the hostile plugin.
fn host_errors(env: &mut TestEnv) -> f64 {
    metric(
        &metrics(env),
        "weir_events_host_errors_total",
        &[("plugin", "hostile")],
    )
}

/// The one dead letter there is.
async fn only_dead_letter(js: &jetstream::Context) -> jetstream::Message {
    let mut letters = read_stream(js, "WEIR_DLQ", ">").await;
    assert_eq!(letters.len(), 1);
    letters.remove(0)
}

fn readyz(env: &mut TestEnv) -> (u16, String) {
    let admin = env.host(0).admin_addr();
    http_get(&admin, "/readyz", None).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_headers_are_dead_lettered_raw_and_the_connection_survives() {
    let (mut env, js) = hostile_host().await;
    let url = env.server.url();
    let malformed: [&[u8]; 3] = [
        b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n",
        b"NATS/1.0\r\nBad Name: v\r\n\r\n",
        b"NATS/1.0\r\nno colon at all\r\n\r\n",
    ];
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 10], None).await;
    for block in malformed {
        publish_raw(&url, "hostile.in", block, b"echo");
    }
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 10], None).await;
    drained(&js, "HOSTILE", "hostile").await;

    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        20,
        "good events"
    );
    let letters = read_stream(&js, "WEIR_DLQ", ">").await;
    assert_eq!(letters.len(), 3);
    let mut raw: Vec<Vec<u8>> = letters
        .iter()
        .map(|letter| {
            assert_eq!(header(letter, "Weir-Dlq-Reason"), Some("malformed"));
            base64::engine::general_purpose::STANDARD
                .decode(header(letter, "Weir-Dlq-Raw-Headers").unwrap())
                .unwrap()
        })
        .collect();
    raw.sort();
    let mut expected: Vec<Vec<u8>> = malformed.iter().map(|b| b.to_vec()).collect();
    expected.sort();
    assert_eq!(raw, expected, "the raw header blocks are kept");
    let log = env.host(0).log_text();
    assert!(
        !log.contains("disconnected from NATS"),
        "the host's connection dropped:\n{log}"
    );
    let exposition = metrics(&mut env);
    assert_eq!(
        metric(
            &exposition,
            "weir_events_dead_lettered_total",
            &[("plugin", "hostile"), ("reason", "malformed")]
        ),
        3.0
    );
    assert_eq!(readyz(&mut env).0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_too_large_for_the_server_is_cut_to_fit() {
    let (mut env, js) = hostile_host().await;
    // An unknown command is rejected with its text in the reason.
    let huge = "x".repeat(1_048_000);
    publish_all(&js, "hostile.in", &[huge, "echo".to_owned()], None).await;
    drained(&js, "HOSTILE", "hostile").await;

    let letters = read_stream(&js, "WEIR_DLQ", ">").await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(header(letter, "Weir-Dlq-Truncated"), Some("1048000"));
    assert!(letter.payload.len() < 1_048_000);
    assert_eq!(header(letter, "Weir-Dlq-Reason"), Some("reject"));
    assert_eq!(header(letter, "Weir-Dlq-Stream"), Some("HOSTILE"));
    assert_eq!(header(letter, "Weir-Dlq-Sequence"), Some("1"));
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        1,
        "the next event ran"
    );
    assert!(
        !env.host(0).log_text().contains("dead letter not stored"),
        "stored at the first attempt"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_too_large_for_one_message_is_dead_lettered() {
    let (mut env, js) = hostile_host().await;
    // Each emit is within max-emit-bytes; both together cannot be committed.
    publish_all(
        &js,
        "hostile.in",
        &["emit-twice 600000".to_owned(), "echo".to_owned()],
        None,
    )
    .await;
    drained(&js, "HOSTILE", "hostile").await;

    let letters = read_stream(&js, "WEIR_DLQ", ">").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "Weir-Dlq-Reason"), Some("too_large"));
    assert_eq!(header(&letters[0], "Weir-Dlq-Attempts"), Some("1"));
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    assert_eq!(
        outputs.len(),
        1,
        "only the echo's output, none of the big ones"
    );
    assert!(
        !env.host(0).log_text().contains("effects not durable"),
        "never retried"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_error_that_repeats_ends_in_a_dead_letter() {
    // The plugin emits on hostile.out, which no stream captures here.
    let mut env = TestEnv::new(&[("HOSTILE", &["hostile.in"])]);
    hostile(&env, "hostile", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &["echo".to_owned()], None).await;
    drained(&js, "HOSTILE", "hostile").await;

    let letter = &only_dead_letter(&js).await;
    assert_eq!(header(letter, "Weir-Dlq-Reason"), Some("host_error"));
    assert_eq!(
        header(letter, "Weir-Dlq-Attempts"),
        Some("3"),
        "max-deliveries"
    );
    assert!(
        header(letter, "Weir-Dlq-Error")
            .unwrap()
            .contains("no stream captures"),
        "{:?}",
        header(letter, "Weir-Dlq-Error")
    );
    assert_eq!(
        host_errors(&mut env),
        2.0,
        "two host errors before the dead letter"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_stream_is_detected_and_its_events_processed_exactly_once() {
    let mut env = TestEnv::new(&[]);
    let js = env.jetstream().await;
    let input = jetstream::stream::Config {
        name: "IN".into(),
        subjects: vec!["hostile.in".into()],
        ..Default::default()
    };
    js.create_stream(input.clone()).await.unwrap();
    js.create_stream(jetstream::stream::Config {
        name: "OUT".into(),
        subjects: vec!["hostile.out".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    hostile(&env, "hostile", |m| {
        m.replace("stream = \"HOSTILE\"", "stream = \"IN\"")
    });
    env.start_host();
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 10], None).await;
    wait_until(WAIT, "the first life's outputs", || async {
        count(&js, "OUT", "hostile.out").await == 10
    })
    .await;

    js.delete_stream("IN").await.unwrap();
    let admin = env.host(0).admin_addr();
    wait_until(WAIT, "/readyz to report the plugin stalled", || async {
        let (status, body) = http_get(&admin, "/readyz", None).unwrap();
        status == 503 && body.contains("hostile") && body.contains("consumer")
    })
    .await;
    let plugins = http_get(&admin, "/plugins", None).unwrap().1;
    assert!(plugins.contains("\"stalled\""), "{plugins}");

    js.create_stream(input).await.unwrap();
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 10], None).await;
    wait_until(WAIT, "the second life's outputs", || async {
        count(&js, "OUT", "hostile.out").await == 20
    })
    .await;
    drained(&js, "IN", "hostile").await;
    assert_eq!(readyz(&mut env).0, 200);
    let ids: std::collections::BTreeSet<Vec<u8>> = read_stream(&js, "OUT", "hostile.out")
        .await
        .into_iter()
        .map(|m| m.payload.to_vec())
        .collect();
    assert_eq!(ids.len(), 20, "the new stream's sequence 1 is a new event");
    let exposition = metrics(&mut env);
    assert_eq!(
        metric(
            &exposition,
            "weir_events_duplicate_total",
            &[("plugin", "hostile")]
        ),
        0.0,
        "nothing of the new stream was taken for the old"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_consuming_dead_letters_never_makes_dead_letters_of_them() {
    let mut env = TestEnv::new(STREAMS);
    hostile(&env, "first", |m| m);
    hostile(&env, "auditor", |m| {
        m.replace("subjects = [\"hostile.in\"]", "subjects = [\"weir.dlq.>\"]")
            .replace("stream = \"HOSTILE\"", "stream = \"WEIR_DLQ\"")
    });
    env.start_host();
    let js = env.jetstream().await;
    // `first` rejects it; `auditor` receives the dead letter (payload
    // "reject") and rejects it too.
    publish_all(&js, "hostile.in", &["reject".to_owned()], None).await;
    drained(&js, "HOSTILE", "first").await;
    drained(&js, "WEIR_DLQ", "auditor").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&js, "WEIR_DLQ", ">").await,
        1,
        "one dead letter, no more"
    );
    let exposition = metrics(&mut env);
    assert_eq!(
        metric(
            &exposition,
            "weir_events_terminated_total",
            &[("plugin", "auditor"), ("reason", "dead_letter_loop")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_whose_stream_appears_later_starts_by_itself() {
    let mut env = TestEnv::new(&[]);
    hostile(&env, "late", |m| {
        m.replace("stream = \"HOSTILE\"", "stream = \"LATER\"")
    });
    env.start_host();
    let (status, body) = readyz(&mut env);
    assert_eq!(status, 503);
    assert!(body.contains("LATER"), "{body}");
    let js = env.jetstream().await;
    js.create_stream(jetstream::stream::Config {
        name: "LATER".into(),
        subjects: vec!["hostile.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 5], None).await;
    wait_until(WAIT, "the late plugin to run", || async {
        count(&js, "LATER", "hostile.out").await == 5
    })
    .await;
    assert_eq!(readyz(&mut env).0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_plugin_names_are_refused_before_nats_is_touched() {
    let mut env = TestEnv::new(STREAMS);
    for name in ["a b", "x*", "ünï"] {
        hostile(&env, name, |m| m);
    }
    hostile(&env, "fine", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    let stream = js.get_stream("HOSTILE").await.unwrap();
    let consumers: Vec<String> = futures::StreamExt::collect::<Vec<_>>(stream.consumer_names())
        .await
        .into_iter()
        .map(|n| n.unwrap())
        .collect();
    assert_eq!(consumers, vec!["weir-fine".to_owned()]);
    let (status, body) = readyz(&mut env);
    assert_eq!(status, 503);
    for name in ["a b", "x*", "ünï"] {
        assert!(body.contains(&format!("{name:?}")), "{name}: {body}");
    }
    assert!(body.contains("letters, digits"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_list_ignores_replies_that_are_not_a_hosts() {
    let mut env = TestEnv::new(STREAMS);
    hostile(&env, "hostile", |m| m);
    let js = env.jetstream().await;
    // A catch-all audit stream acknowledges every control request.
    js.create_stream(jetstream::stream::Config {
        name: "AUDIT".into(),
        subjects: vec!["weir.control.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    env.start_host();
    let (listed, stdout, stderr) =
        weir_integration_tests::weir_cli(&env.config_path(), &["plugins", "list", "--json"], "");
    assert!(listed, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one host answered: {stdout}");
    assert!(stdout.contains("\"hostile\""), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_endpoint_answers_while_a_plugin_compiles() {
    let mut env = TestEnv::new(&[("ORDERS", &["orders.>", "loyalty.>"])]);
    // An empty compile cache: loading the Python plugin takes seconds.
    let cache = env.dir.path().join("cache");
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        config.replace(
            "[runtime]\n",
            &format!("[runtime]\ncache-dir = \"{}\"\n", cache.display()),
        ),
    )
    .unwrap();
    env.start_host();
    let admin = env.host(0).admin_addr();
    env.deploy("plugins/loyalty", "loyalty", None, |m| m);
    // Count the answers that came back while the plugin was compiling:
    // between the host's "loading" and "started" lines. Before the fix
    // every request waited for the compile, so there were none.
    let mut answered_while_compiling = 0;
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "loyalty never started");
        let loading_before = env
            .host(0)
            .log_text()
            .contains("loading plugin plugin=loyalty");
        let (ready, _) = http_get(&admin, "/readyz", None).unwrap();
        let (listed, _) = http_get(&admin, "/plugins", None).unwrap();
        assert!(ready == 200 || ready == 503);
        assert_eq!(listed, 200);
        let log = env.host(0).log_text();
        if log.contains("plugin started plugin=loyalty") {
            break;
        }
        if loading_before {
            answered_while_compiling += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        env.host(0).log_text().contains("compile_cache=miss"),
        "the plugin was compiled, not loaded from a cache"
    );
    assert!(
        answered_while_compiling > 0,
        "no admin request was answered during the compile"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_done_block_that_cannot_be_read_ends_its_redelivered_event_in_a_dead_letter() {
    let (mut env, js) = hostile_host().await;
    // A committed event leaves a done block behind.
    publish_all(&js, "hostile.in", &["ok".to_owned()], None).await;
    drained(&js, "HOSTILE", "hostile").await;
    let bucket = js.get_key_value("weir_state_hostile").await.unwrap();
    let keys: Vec<String> = futures::StreamExt::collect::<Vec<_>>(bucket.keys().await.unwrap())
        .await
        .into_iter()
        .map(Result::unwrap)
        .filter(|k| k.starts_with("d."))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    bucket
        .put(&keys[0], b"\xff\xff\xff not a done block".to_vec().into())
        .await
        .unwrap();

    // Redelivered, the next event of the block must learn whether it was
    // done already; nothing can tell, so it is neither run again nor lost.
    publish_all(&js, "hostile.in", &["retry".to_owned()], None).await;
    drained(&js, "HOSTILE", "hostile").await;
    let letter = &only_dead_letter(&js).await;
    assert_eq!(header(letter, "Weir-Dlq-Reason"), Some("host_error"));
    let error = header(letter, "Weir-Dlq-Error").unwrap();
    assert!(
        error.contains("reading done marks") && error.contains("decoding"),
        "{error}"
    );
    assert_eq!(letter.payload.as_ref(), b"retry");
    assert_eq!(
        host_errors(&mut env),
        1.0,
        "the second attempt's failed read; the third is the dead letter"
    );
}
