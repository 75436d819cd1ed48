//! The JetStream pipeline against a real nats-server and the real `weir`
//! binary: acks only after success, retries, dead letters, shutdown and
//! faults. Needs `cargo xtask build` first (`cargo xtask test` does it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::HashSet;
use std::time::Duration;

use weir_integration_tests::{
    TestEnv, count, header, incarnation, publish_all, read_stream, wait_drained, wait_until,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const WAIT: Duration = Duration::from_secs(60);

fn env_with_hostile(edit: impl FnOnce(String) -> String) -> TestEnv {
    let env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "hostile", edit);
    env
}

fn commands(command: &str, n: usize) -> Vec<String> {
    vec![command.to_owned(); n]
}

/// The hostile.out payloads (input event ids), asserting none repeats.
async fn distinct_outputs(env: &TestEnv) -> HashSet<String> {
    let js = env.jetstream().await;
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    let ids: Vec<String> = outputs
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let distinct: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(distinct.len(), ids.len(), "an output was published twice");
    distinct
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_processes_everything_and_leaves_nothing_pending() {
    let mut env =
        env_with_hostile(|m| m.replace("start = \"all\"", "start = \"all\"\nconcurrency = 8"));
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("echo", 1000), None).await;
    wait_drained(&env.jetstream().await, "hostile", 1000, WAIT).await;
    let outputs = distinct_outputs(&env).await;
    assert_eq!(outputs.len(), 1000);
    // Each output names its input by id: "<stream>:<stream creation>:<sequence>".
    let incarnation = incarnation(&js, "HOSTILE").await;
    for input in read_stream(&js, "HOSTILE", "hostile.in").await {
        let seq = input.info().unwrap().stream_sequence;
        assert!(
            outputs.contains(&incarnation.event_id(seq)),
            "missing output for sequence {seq}"
        );
    }
    let one = &read_stream(&js, "HOSTILE", "hostile.out").await[0];
    assert_eq!(header(one, "Weir-Plugin"), Some("hostile"));
    assert!(header(one, "Weir-Plugin-Version").is_some());
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_attempt_is_retried_then_succeeds() {
    let mut env = env_with_hostile(|m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("retry-once", 20), None).await;
    wait_drained(&env.jetstream().await, "hostile", 20, WAIT).await;
    assert_eq!(distinct_outputs(&env).await.len(), 20);
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_event_is_dead_lettered_with_its_story() {
    let mut env = env_with_hostile(|m| m);
    env.start_host();
    let js = env.jetstream().await;
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload("reject".into())
        .header("Customer-Id", "c-9")
        .message_id("order-77");
    js.send_publish("hostile.in", publish)
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until(WAIT, "a dead letter", || async {
        count(&js, "WEIR_DLQ", ">").await == 1
    })
    .await;
    wait_drained(&env.jetstream().await, "hostile", 0, WAIT).await;
    let letters = read_stream(&js, "WEIR_DLQ", ">").await;
    let letter = &letters[0];
    assert_eq!(letter.subject.as_str(), "weir.dlq.hostile.hostile.in");
    assert_eq!(letter.payload.as_ref(), b"reject");
    assert_eq!(
        header(letter, "Customer-Id"),
        Some("c-9"),
        "original headers are kept"
    );
    assert_eq!(header(letter, "Weir-Dlq-Plugin"), Some("hostile"));
    assert_eq!(header(letter, "Weir-Dlq-Reason"), Some("reject"));
    assert_eq!(
        header(letter, "Weir-Dlq-Error"),
        Some("rejected: asked to reject")
    );
    assert_eq!(header(letter, "Weir-Dlq-Attempts"), Some("1"));
    assert_eq!(header(letter, "Weir-Dlq-Event-Id"), Some("order-77"));
    assert_eq!(header(letter, "Weir-Dlq-Subject"), Some("hostile.in"));
    assert_eq!(header(letter, "Weir-Dlq-Stream"), Some("HOSTILE"));
    assert_eq!(header(letter, "Weir-Dlq-Sequence"), Some("1"));
    assert!(header(letter, "Weir-Dlq-Time").is_some_and(|t| t.ends_with('Z')));
    assert!(header(letter, "Weir-Dlq-Plugin-Version").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_that_always_traps_is_dead_lettered_after_max_deliveries() {
    let mut env = env_with_hostile(|m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("panic", 3), None).await;
    publish_all(&js, "hostile.in", &commands("echo", 3), None).await;
    wait_until(WAIT, "three dead letters", || async {
        count(&js, "WEIR_DLQ", ">").await == 3
    })
    .await;
    wait_drained(&env.jetstream().await, "hostile", 3, WAIT).await;
    for letter in read_stream(&js, "WEIR_DLQ", ">").await {
        assert_eq!(header(&letter, "Weir-Dlq-Reason"), Some("trap"));
        assert_eq!(
            header(&letter, "Weir-Dlq-Attempts"),
            Some("3"),
            "max-deliveries = 3 in the manifest"
        );
        assert!(
            header(&letter, "Weir-Dlq-Error")
                .unwrap()
                .contains("hostile guest panics on purpose")
        );
    }
    assert_eq!(
        distinct_outputs(&env).await.len(),
        3,
        "healthy events were served meanwhile"
    );
}

/// Ctrl-C on `weir dev` reaches its private nats-server too, which may
/// be gone before the host shuts down: the shutdown's last flush then
/// waited for a reconnect that never came, and the host never exited.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_after_nats_is_gone_still_exits() {
    let mut env = env_with_hostile(|m| m);
    let host = env.start_host();
    env.server.kill();
    let status = env.host(host).terminate();
    assert!(
        status.success(),
        "graceful exit, got {status}; log:\n{}",
        env.host(host).log_text()
    );
    assert!(
        env.host(host).log_text().contains("NATS is unreachable"),
        "{}",
        env.host(host).log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_then_restart_loses_nothing() {
    let mut env =
        env_with_hostile(|m| m.replace("start = \"all\"", "start = \"all\"\nconcurrency = 4"));
    let host = env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("slow-echo", 600), None).await;
    wait_until(WAIT, "some progress", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 50
    })
    .await;
    let status = env.host(host).terminate();
    assert!(
        status.success(),
        "graceful exit, got {status}; log:\n{}",
        env.host(host).log_text()
    );
    let done = count(&js, "HOSTILE", "hostile.out").await;
    assert!(done < 600, "the test must stop the host mid-stream: {done}");

    env.start_host();
    wait_drained(&env.jetstream().await, "hostile", 600, WAIT).await;
    assert_eq!(distinct_outputs(&env).await.len(), 600);
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_server_restart_mid_stream_loses_nothing() {
    let mut env =
        env_with_hostile(|m| m.replace("start = \"all\"", "start = \"all\"\nconcurrency = 4"));
    env.start_host();
    {
        let js = env.jetstream().await;
        publish_all(&js, "hostile.in", &commands("slow-echo", 600), None).await;
        wait_until(WAIT, "some progress", || async {
            count(&js, "HOSTILE", "hostile.out").await >= 50
        })
        .await;
    }
    env.server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.server.restart().unwrap();
    assert!(
        env.host(0).is_running(),
        "the host survives the server going away"
    );
    wait_drained(&env.jetstream().await, "hostile", 600, WAIT).await;
    assert_eq!(distinct_outputs(&env).await.len(), 600);
    let js = env.jetstream().await;
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_plugins_are_reported_and_the_others_still_served() {
    let mut env = env_with_hostile(|m| m);
    std::fs::write(env.plugins_dir().join("garbage.wasm"), b"not wasm").unwrap();
    std::fs::write(
        env.plugins_dir().join("garbage.toml"),
        "subjects = [\"hostile.in\"]\nstream = \"HOSTILE\"\n",
    )
    .unwrap();
    env.install("test-guests/hostile", "typo", |m| {
        m.replace("[limits]", "[limits]\nmemory = 3")
    });
    env.install("test-guests/hostile", "nostream", |m| {
        m.replace("stream = \"HOSTILE\"", "stream = \"MISSING\"")
    });
    env.install("test-guests/notplugin", "command", |m| m);
    let host = env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("echo", 10), None).await;
    wait_drained(&env.jetstream().await, "hostile", 10, WAIT).await;
    let log = env.host(host).log_text();
    for needle in [
        "garbage.wasm is not a valid WebAssembly component",
        "typo.toml",
        "stream MISSING",
        "command.wasm does not fit",
    ] {
        assert!(
            log.contains(needle),
            "log should mention {needle:?}:\n{log}"
        );
    }
}
