//! Metrics, trace propagation and the admin endpoint, against a real
//! nats-server and the real `weir` binary. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::HeaderMap;
use weir_integration_tests::{
    OtlpReceiver, TestEnv, count, header, http_get, metric, publish_all, read_stream, wait_drained,
    wait_until,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "s3cret-admin-token";

fn commands(command: &str, n: usize) -> Vec<String> {
    vec![command.to_owned(); n]
}

async fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics", Some(TOKEN)).unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_mix_exactly_and_lag_falls_to_zero() {
    let mut env = TestEnv::with_config(STREAMS, &format!("token = \"{TOKEN}\""), "");
    env.install("test-guests/hostile", "hostile", |m| m);
    env.start_host();
    let admin = env.host(0).admin_addr();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("echo", 30), None).await;
    publish_all(&js, "hostile.in", &commands("retry-once", 10), None).await;
    publish_all(&js, "hostile.in", &commands("reject", 5), None).await;
    wait_drained(&js, "hostile", 40, WAIT).await;
    wait_until(WAIT, "lag gauges at zero", || async {
        let text = scrape(&admin).await;
        let lag = |name| metric(&text, name, &[("plugin", "hostile")]);
        text.contains("weir_consumer_pending_messages{")
            && lag("weir_consumer_pending_messages") == 0.0
            && lag("weir_consumer_ack_pending_messages") == 0.0
    })
    .await;
    let text = scrape(&admin).await;
    let value = |name: &str| metric(&text, name, &[("plugin", "hostile")]);
    assert_eq!(value("weir_events_processed_total"), 40.0, "{text}");
    assert_eq!(value("weir_events_retried_total"), 10.0);
    assert_eq!(value("weir_events_rejected_total"), 5.0);
    assert_eq!(
        metric(
            &text,
            "weir_events_dead_lettered_total",
            &[("plugin", "hostile"), ("reason", "reject")]
        ),
        5.0
    );
    assert_eq!(value("weir_events_dead_lettered_total"), 5.0);
    assert_eq!(value("weir_events_duplicate_total"), 0.0);
    assert_eq!(value("weir_events_host_errors_total"), 0.0);
    // 30 echo + 2 × 10 retry-once + 5 reject plugin calls.
    assert_eq!(value("weir_handler_duration_seconds_count"), 55.0);
    assert_eq!(value("weir_publish_to_ack_seconds_count"), 40.0);
    assert_eq!(value("weir_events_in_flight"), 0.0);
    // Every processed event was made durable by exactly one commit group.
    assert_eq!(value("weir_commit_group_events_sum"), 40.0, "{text}");
    let groups = value("weir_commit_group_events_count");
    assert!((1.0..=40.0).contains(&groups), "{groups} groups");
    assert_eq!(value("weir_limit_hits_total"), 0.0);
    assert_eq!(metric(&text, "weir_plugins_running", &[]), 1.0);
    assert_eq!(metric(&text, "weir_nats_connected", &[]), 1.0);
    assert_eq!(metric(&text, "weir_build_info", &[]), 1.0);
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 5);
    // The same counts as JSON, per plugin.
    let (status, body) = http_get(&admin, "/plugins", Some(TOKEN)).unwrap();
    assert_eq!(status, 200);
    let plugins: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hostile = &plugins[0];
    assert_eq!(hostile["name"], "hostile");
    assert_eq!(hostile["status"], "running");
    assert_eq!(hostile["subjects"][0], "hostile.in");
    for (key, expected) in [
        ("processed", 40),
        ("retried", 10),
        ("rejected", 5),
        ("dead_lettered", 5),
        ("pending", 0),
        ("ack_pending", 0),
    ] {
        assert_eq!(hostile[key], expected, "{key} in {body}");
    }

    // The token guards the data, not the probes.
    assert_eq!(http_get(&admin, "/metrics", None).unwrap().0, 401);
    assert_eq!(http_get(&admin, "/plugins", Some("wrong")).unwrap().0, 401);
    assert_eq!(http_get(&admin, "/healthz", None).unwrap().0, 200);
    assert_eq!(http_get(&admin, "/readyz", None).unwrap().0, 200);
    // Every metric the shipped Grafana dashboard queries is exported.
    let dashboard = std::fs::read_to_string(
        weir_integration_tests::workspace().join("examples/observability/grafana-dashboard.json"),
    )
    .unwrap();
    let queried: BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("weir_"))
        .collect();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        let family = ["_total", "_bucket", "_count", "_sum", "_info"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
}

const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const INCOMING_SPAN: &str = "00f067aa0ba902b7";
const REJECTED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const REJECTED_SPAN: &str = "b7ad6b7169203331";

async fn publish_traced(
    js: &async_nats::jetstream::Context,
    payload: &str,
    trace: &str,
    span: &str,
) {
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace}-{span}-01").as_str());
    js.publish_with_headers("hostile.in", headers, payload.to_owned().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// `(trace id, parent span id)` of a `traceparent` header.
fn trace_of(message: &async_nats::jetstream::Message) -> (String, String) {
    let traceparent = header(message, "traceparent").expect("a traceparent header");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn span_with<'a>(
    spans: &'a [serde_json::Value],
    trace: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    spans
        .iter()
        .find(|s| s["traceId"] == trace && s["name"] == name)
}

/// A host running the hostile guest that exports its spans to a receiver,
/// with `telemetry` added to its `[telemetry]` table.
fn exporting_host(telemetry: &str) -> (OtlpReceiver, TestEnv) {
    let otlp = OtlpReceiver::start();
    let telemetry = format!("otlp-endpoint = \"{}\"\n{telemetry}", otlp.url);
    let mut env = TestEnv::with_config(STREAMS, "", &telemetry);
    env.install("test-guests/hostile", "hostile", |m| m);
    env.start_host();
    (otlp, env)
}

#[tokio::test(flavor = "multi_thread")]
async fn traceparent_flows_into_outputs_and_dead_letters_and_spans_are_exported() {
    let (otlp, env) = exporting_host("otlp-protocol = \"http/json\"\nservice-name = \"weir-test\"");
    let js = env.jetstream().await;
    publish_traced(&js, "echo", INCOMING_TRACE, INCOMING_SPAN).await;
    publish_traced(&js, "reject", REJECTED_TRACE, REJECTED_SPAN).await;
    publish_all(&js, "hostile.in", &commands("echo", 1), None).await;
    wait_drained(&js, "hostile", 2, WAIT).await;

    // The output continues the incoming trace under a new parent span.
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    let traced_output = outputs
        .iter()
        .find(|m| trace_of(m).0 == INCOMING_TRACE)
        .expect("an output in the incoming trace");
    let (_, output_parent) = trace_of(traced_output);
    assert_ne!(output_parent, INCOMING_SPAN);
    // An event that came without a trace starts one.
    let untraced_output = outputs
        .iter()
        .find(|m| trace_of(m).0 != INCOMING_TRACE)
        .expect("the untraced event's output");
    assert_ne!(trace_of(untraced_output).0, "0".repeat(32));

    // So does the dead letter of the rejected event, replacing its header.
    let letters = read_stream(&js, "WEIR_DLQ", ">").await;
    assert_eq!(letters.len(), 1);
    let (letter_trace, letter_parent) = trace_of(&letters[0]);
    assert_eq!(letter_trace, REJECTED_TRACE);
    assert_ne!(letter_parent, REJECTED_SPAN);
    assert_eq!(
        letters[0]
            .headers
            .as_ref()
            .unwrap()
            .get_all("traceparent")
            .count(),
        1
    );

    // The spans reach the collector: the consumer span is the output's
    // parent and a child of the incoming span; the plugin call is its child.
    wait_until(WAIT, "spans exported", || async {
        let spans = otlp.spans();
        span_with(&spans, INCOMING_TRACE, "invoke hostile").is_some()
            && span_with(&spans, REJECTED_TRACE, "process hostile.in").is_some()
    })
    .await;
    let spans = otlp.spans();
    let consumer = span_with(&spans, INCOMING_TRACE, "process hostile.in").unwrap();
    assert_eq!(consumer["spanId"], output_parent.as_str());
    assert_eq!(consumer["parentSpanId"], INCOMING_SPAN);
    assert_eq!(consumer["kind"], 5, "SPAN_KIND_CONSUMER: {consumer}");
    let attribute = |span: &serde_json::Value, key: &str| {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| a["value"].clone())
    };
    assert_eq!(
        attribute(consumer, "messaging.system").unwrap()["stringValue"],
        "nats"
    );
    assert_eq!(
        attribute(consumer, "messaging.destination.name").unwrap()["stringValue"],
        "hostile.in"
    );
    assert_eq!(
        attribute(consumer, "messaging.consumer.group.name").unwrap()["stringValue"],
        weir::jetstream::generation::durable_name("hostile", 0)
    );
    let call = span_with(&spans, INCOMING_TRACE, "invoke hostile").unwrap();
    assert_eq!(call["parentSpanId"], consumer["spanId"]);

    let rejected = span_with(&spans, REJECTED_TRACE, "process hostile.in").unwrap();
    assert_eq!(rejected["spanId"], letter_parent.as_str());
    assert_eq!(
        rejected["status"]["code"], 2,
        "STATUS_CODE_ERROR: {rejected}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_nats_connection_and_plugin_loading() {
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "hostile", |m| m);
    env.start_host();
    let admin = env.host(0).admin_addr();
    let readyz = || http_get(&admin, "/readyz", None).unwrap();
    assert_eq!(readyz().0, 200);

    env.server.kill();
    wait_until(WAIT, "/readyz to report NATS down", || async {
        let (status, body) = readyz();
        status == 503 && body.contains("NATS")
    })
    .await;
    assert_eq!(http_get(&admin, "/healthz", None).unwrap().0, 200, "alive");
    env.server.restart().unwrap();
    wait_until(WAIT, "/readyz to recover", || async { readyz().0 == 200 }).await;

    // A plugin that cannot load makes the host unready until it is fixed.
    let plugins = env.plugins_dir();
    std::fs::write(
        plugins.join("broken.toml"),
        "subjects = [\"hostile.x\"]\nstream = \"HOSTILE\"\n",
    )
    .unwrap();
    std::fs::write(plugins.join("broken.wasm"), b"not a component").unwrap();
    wait_until(WAIT, "/readyz to report the broken plugin", || async {
        let (status, body) = readyz();
        status == 503 && body.contains("plugin broken")
    })
    .await;
    let (_, body) = http_get(&admin, "/plugins", None).unwrap();
    let plugins_json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let broken = plugins_json
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "broken")
        .expect("the broken plugin is listed");
    assert_eq!(broken["status"], "failed");
    assert!(broken["error"].as_str().unwrap().contains("broken.wasm"));
    std::fs::remove_file(plugins.join("broken.wasm")).unwrap();
    std::fs::remove_file(plugins.join("broken.toml")).unwrap();
    wait_until(WAIT, "/readyz after the broken plugin is gone", || async {
        readyz().0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_collector_does_not_hold_up_events() {
    // Nothing listens on this port: every export fails.
    let dead = weir::dev::free_port().unwrap();
    let telemetry = format!("otlp-endpoint = \"http://127.0.0.1:{dead}/v1/traces\"");
    let mut env = TestEnv::with_config(STREAMS, "", &telemetry);
    env.install("test-guests/hostile", "hostile", |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &commands("echo", 500), None).await;
    wait_drained(&js, "hostile", 500, WAIT).await;
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_address_in_use_stops_start_up_with_the_reason() {
    let env = TestEnv::new(STREAMS);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = std::fs::read_to_string(env.config_path())
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    std::fs::write(env.config_path(), config).unwrap();
    let log = env.dir.path().join("host.log");
    let mut host = weir_integration_tests::WeirProcess::start(&env.config_path(), &log);
    let deadline = std::time::Instant::now() + WAIT;
    while host.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the host kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = host.log_text();
    assert!(
        text.contains(&format!("admin endpoint cannot listen on {addr}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_otlp_protobuf_by_default() {
    // No protocol given: http/protobuf, the default.
    let (otlp, env) = exporting_host("service-name = \"weir-proto-test\"");
    let js = env.jetstream().await;
    publish_traced(&js, "echo", INCOMING_TRACE, INCOMING_SPAN).await;
    wait_drained(&js, "hostile", 1, WAIT).await;
    // Protobuf carries the trace id as 16 raw bytes and strings as UTF-8.
    let trace_id: Vec<u8> = (0..INCOMING_TRACE.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&INCOMING_TRACE[i..i + 2], 16).unwrap())
        .collect();
    let contains = |body: &[u8], needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    wait_until(WAIT, "a protobuf export of the event's spans", || async {
        otlp.requests().iter().any(|(content_type, body)| {
            content_type == "application/x-protobuf"
                && contains(body, &trace_id)
                && contains(body, b"process hostile.in")
                && contains(body, b"weir-proto-test")
        })
    })
    .await;
    assert!(otlp.spans().is_empty(), "nothing was sent as JSON");
}
