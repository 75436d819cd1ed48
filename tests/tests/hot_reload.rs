//! Hot reload and live deployment from the plugin directory, against a real
//! nats-server and the real `weir` binary. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use weir_integration_tests::{
    TestEnv, consumer_backlog, count, custom_section, dist, header, publish_all, read_stream,
    version_of, wait_drained, wait_until, weir_binary, weir_cli,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];
const WAIT: Duration = Duration::from_secs(90);

fn tagged_version(tag: &str) -> String {
    let mut wasm = std::fs::read(dist("test-guests/hostile.wasm")).unwrap();
    wasm.extend(custom_section("weir-test-version", tag.as_bytes()));
    version_of(&wasm)
}

/// Eight at a time, at most sixteen held: the window the swap test allows
/// an old version to keep taking events in.
fn concurrent(m: String) -> String {
    m.replace(
        "start = \"all\"",
        "start = \"all\"\nconcurrency = 8\nmax-in-flight = 16",
    )
}

/// Publish "echo" events at about `rate` per second for `duration`;
/// returns how many were published (all acknowledged by JetStream).
/// Publishes `rate` events a second until `stop` fires; returns how many
/// were acknowledged.
async fn publish_until(
    js: jetstream::Context,
    rate: usize,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> usize {
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
    let waiter = tokio::spawn(async move {
        let mut n = 0;
        while let Some(ack) = rx.recv().await {
            ack.await.unwrap();
            n += 1;
        }
        n
    });
    let per_tick = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut stop => break,
        }
        for _ in 0..per_tick {
            tx.send(js.publish("hostile.in", "echo".into()).await.unwrap())
                .unwrap();
        }
    }
    drop(tx);
    waiter.await.unwrap()
}

/// Input stream sequence → version of the plugin that handled it.
async fn versions_by_sequence(js: &jetstream::Context) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for message in read_stream(js, "HOSTILE", "hostile.out").await {
        let id = String::from_utf8(message.payload.to_vec()).unwrap();
        // "<stream>:<stream creation>:<sequence>"
        let seq: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
        let version = header(&message, "Weir-Plugin-Version").unwrap().to_owned();
        assert!(
            out.insert(seq, version).is_none(),
            "event {seq} has two outputs"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_swapped_under_load_process_every_event_exactly_once() {
    let mut env = TestEnv::new(STREAMS);
    env.deploy("test-guests/hostile", "swap", Some("v1"), concurrent);
    env.start_host();
    let js = env.jetstream().await;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let publisher = tokio::spawn(publish_until(js.clone(), 2_000, stopped));
    let tags = ["v2", "v3", "v4"];
    for (i, tag) in tags.iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        env.deploy("test-guests/hostile", "swap", Some(tag), concurrent);
        env.host(0).wait_for_log("plugin updated", i + 1);
    }
    // Load goes on past the last swap, however long the swaps took, so
    // the last version serves events too (a fixed publishing time could
    // end before a slow swap under CI load, leaving v4 nothing to do).
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(()).unwrap();
    let published = publisher.await.unwrap();
    assert!(
        published >= 15_000,
        "load was too light: {published} events"
    );
    wait_drained(&js, "swap", published as u64, WAIT).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        published as u64,
        "one output per event"
    );
    let by_seq = versions_by_sequence(&js).await;
    assert_eq!(by_seq.len(), published);
    // JetStream drops re-published outputs, so the outputs alone cannot
    // show an event handled twice across a swap; the host's count can.
    assert_eq!(
        env.plugin_counter(0, "swap", "processed"),
        published as u64,
        "each event processed once across the swaps"
    );

    // Every version served, in order: once version k has taken an event,
    // no event more than the in-flight window (max-in-flight = 16) later
    // runs on an older version.
    let order: Vec<String> = std::iter::once("v1")
        .chain(tags)
        .map(tagged_version)
        .collect();
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_str(), i))
        .collect();
    let mut first_seq_of = vec![u64::MAX; order.len()];
    for (seq, version) in &by_seq {
        let r = *rank
            .get(version.as_str())
            .unwrap_or_else(|| panic!("unknown version {version}"));
        first_seq_of[r] = first_seq_of[r].min(*seq);
    }
    assert!(
        first_seq_of.iter().all(|s| *s != u64::MAX),
        "every version served events: {first_seq_of:?}"
    );
    // Input sequences interleave with outputs in one stream, so allow the
    // window in *input* events: count inputs after the switch point.
    let inputs: Vec<u64> = by_seq.keys().copied().collect();
    for (k, first) in first_seq_of.iter().enumerate().skip(1) {
        let start = inputs.partition_point(|s| s <= first);
        for seq in inputs.iter().skip(start + 16) {
            let r = rank[by_seq[seq].as_str()];
            assert!(
                r >= k,
                "event {seq} ran on {} after {} took over at {first}",
                by_seq[seq],
                order[k]
            );
        }
    }
    let log = env.host(0).log_text();
    assert_eq!(log.matches("plugin updated").count(), 3, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_version_is_rejected_and_the_old_one_keeps_serving() {
    let mut env = TestEnv::new(STREAMS);
    env.deploy("test-guests/hostile", "steady", Some("good"), |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 20], None).await;
    wait_until(WAIT, "the first events", || async {
        count(&js, "HOSTILE", "hostile.out").await == 20
    })
    .await;

    // Not a component at all.
    let tmp = env.plugins_dir().join(".steady.wasm.tmp");
    std::fs::write(&tmp, b"\0asm garbage").unwrap();
    std::fs::rename(&tmp, env.plugins_dir().join("steady.wasm")).unwrap();
    env.host(0)
        .wait_for_log("new version rejected, the running version keeps serving", 1);
    // A valid component with a manifest error.
    env.deploy("test-guests/hostile", "steady", Some("typo"), |m| {
        m.replace("[limits]", "[limits]\nmemroy-mb = 3")
    });
    env.host(0)
        .wait_for_log("new version rejected, the running version keeps serving", 2);
    // Another world entirely.
    env.deploy("test-guests/notplugin", "steady", None, |m| m);
    env.host(0)
        .wait_for_log("new version rejected, the running version keeps serving", 3);

    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 20], None).await;
    wait_drained(&js, "steady", 40, WAIT).await;
    let good = tagged_version("good");
    assert!(
        versions_by_sequence(&js).await.values().all(|v| *v == good),
        "all served by the good version"
    );
    let log = env.host(0).log_text();
    assert!(
        log.contains("memroy-mb"),
        "the manifest error names the key:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_added_at_runtime_backfills_history_then_keeps_up() {
    let mut env = TestEnv::new(STREAMS);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 500], None).await;
    env.deploy("test-guests/hostile", "late", None, concurrent);
    env.host(0).wait_for_log("plugin started", 1);
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 100], None).await;
    wait_drained(&js, "late", 600, WAIT).await;
    assert_eq!(versions_by_sequence(&js).await.len(), 600);
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_removed_and_readded_resumes_without_reprocessing() {
    let mut env = TestEnv::new(STREAMS);
    env.deploy("test-guests/hostile", "again", None, |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 100], None).await;
    wait_until(WAIT, "the first 100", || async {
        count(&js, "HOSTILE", "hostile.out").await == 100
    })
    .await;

    std::fs::remove_file(env.plugins_dir().join("again.wasm")).unwrap();
    std::fs::remove_file(env.plugins_dir().join("again.toml")).unwrap();
    env.host(0).wait_for_log("plugin removed", 1);
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 100], None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(&js, "HOSTILE", "hostile.out").await,
        100,
        "a removed plugin consumes nothing"
    );
    let (pending, _) = consumer_backlog(&js, "HOSTILE", "again").await;
    assert_eq!(
        pending, 100,
        "its consumer is kept, with the new events waiting"
    );

    env.deploy("test-guests/hostile", "again", None, |m| m);
    wait_drained(&js, "again", 200, WAIT).await;
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    let distinct: HashSet<&[u8]> = outputs.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(distinct.len(), 200);
    // Outputs would look the same if the first 100 ran again (JetStream
    // drops the re-published duplicates); the re-added plugin's own count
    // (it starts at zero) would not: it handled only the 100 new events.
    assert_eq!(
        env.plugin_counter(0, "again", "processed"),
        100,
        "nothing reprocessed"
    );
    assert_eq!(env.plugin_counter(0, "again", "duplicates"), 0);
}

/// `weir` with `args` and `--config config`: (success, stdout, stderr).
fn weir(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    weir_cli(config, args, "")
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_lists_and_removes_plugins_of_a_running_host() {
    let mut env = TestEnv::new(STREAMS);
    std::fs::write(env.dir.path().join("control-token"), "c0ntrol\n").unwrap();
    env.append_config("[control]\ntoken-file = \"control-token\"\n");
    env.deploy("test-guests/hostile", "listed", Some("v7"), |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 5], None).await;
    wait_until(WAIT, "five events", || async {
        count(&js, "HOSTILE", "hostile.out").await == 5
    })
    .await;

    // The operator's config names the same control token file.
    let config = env.config_path();
    let (ok, stdout, stderr) = weir(&config, &["plugins", "list"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("listed") && stdout.contains(&tagged_version("v7")),
        "{stdout}"
    );
    assert!(stdout.contains("hostile.in"), "{stdout}");
    assert!(stdout.contains("p99 ms"), "{stdout}");
    let (ok, stdout, stderr) = weir(&config, &["plugins", "list", "--json"]);
    assert!(ok, "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(answer["plugins"][0]["processed"], 5);
    // Five events acked, so their latency percentiles are there too.
    let (p50, p99) = (
        answer["plugins"][0]["ack_p50_us"].as_u64().unwrap(),
        answer["plugins"][0]["ack_p99_us"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99, "p50 {p50} µs, p99 {p99} µs");
    // Each answer says where that host's admin endpoint listens.
    assert_eq!(answer["admin"], env.host(0).admin_addr());

    let (ok, stdout, stderr) = weir(
        &config,
        &["plugins", "remove", "listed", "--delete-consumer"],
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("removed listed") && stdout.contains("deleted consumer weir-listed"),
        "{stdout}"
    );
    assert!(!env.plugins_dir().join("listed.wasm").exists());
    let stream = js.get_stream("HOSTILE").await.unwrap();
    assert!(
        stream.consumer_info("weir-listed").await.is_err(),
        "consumer deleted"
    );
    let (ok, _, stderr) = weir(&config, &["plugins", "remove", "listed"]);
    assert!(
        !ok && stderr.contains("no running host serves a plugin named listed"),
        "{stderr}"
    );

    // Added back, it runs its history again, with effects: the deleted
    // consumer started its next generation.
    assert!(stdout.contains("listed moved to generation 1"), "{stdout}");
    env.deploy("test-guests/hostile", "listed", Some("v7"), |m| m);
    wait_until(WAIT, "the five events again", || async {
        count(&js, "HOSTILE", "hostile.out").await == 10
    })
    .await;
    assert!(stream.consumer_info("weir-listed@gen1").await.is_ok());
}

/// Control requests over NATS change nothing without the control token,
/// list no more than `/plugins` would, and reach only the hosts of their
/// own deployment's subject prefix.
#[tokio::test(flavor = "multi_thread")]
async fn control_requests_need_the_token_and_reach_only_their_deployment() {
    let mut env = TestEnv::with_config(STREAMS, "token = \"adm1n\"", "");
    env.append_config("[control]\nsubject-prefix = \"acme.weir\"\ntoken = \"c0ntrol\"\n");
    env.deploy("test-guests/hostile", "guarded", None, |m| m);
    env.start_host();
    let wasm = env.plugins_dir().join("guarded.wasm");

    // An operator who can reach NATS but holds no token.
    let bare = env.dir.path().join("bare.toml");
    std::fs::write(
        &bare,
        format!(
            "[nats]\nurl = \"{}\"\n[control]\nsubject-prefix = \"acme.weir\"\n",
            env.server.url()
        ),
    )
    .unwrap();
    let (ok, _, stderr) = weir(&bare, &["plugins", "remove", "guarded"]);
    assert!(
        !ok && stderr.contains("needs the control token"),
        "{stderr}"
    );
    assert!(wasm.exists(), "a refused removal deleted nothing");
    let (ok, stdout, stderr) = weir(&bare, &["plugins", "list"]);
    assert!(!ok && stderr.contains("not authorised"), "{stderr}");
    assert!(!stdout.contains("guarded"), "{stdout}");

    // The admin token may list (as on /plugins) but not remove.
    let admin_token = env.dir.path().join("admin-token");
    std::fs::write(&admin_token, "adm1n").unwrap();
    let admin_token = admin_token.to_str().unwrap();
    let (ok, stdout, stderr) = weir(&bare, &["plugins", "list", "--token-file", admin_token]);
    assert!(ok && stdout.contains("guarded"), "{stdout}{stderr}");
    let (ok, _, stderr) = weir(
        &bare,
        &["plugins", "remove", "guarded", "--token-file", admin_token],
    );
    assert!(
        !ok && stderr.contains("needs the control token"),
        "{stderr}"
    );
    assert!(wasm.exists());

    // A raw request with no token, as any client could send it.
    let client = async_nats::connect(env.server.url()).await.unwrap();
    let reply = client
        .request(
            "acme.weir.plugins",
            r#"{"op":"remove","name":"guarded"}"#.into(),
        )
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        answer["error"].as_str().unwrap().contains("not authorised"),
        "{answer}"
    );
    assert!(wasm.exists());

    // Another deployment's prefix (here the default) reaches no host.
    let other = env.dir.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "[nats]\nurl = \"{}\"\n[control]\ntoken = \"c0ntrol\"\n",
            env.server.url()
        ),
    )
    .unwrap();
    let (ok, _, stderr) = weir(&other, &["plugins", "remove", "guarded"]);
    assert!(!ok && stderr.contains("no running host serves"), "{stderr}");
    assert!(wasm.exists());

    // The control token, from the environment, removes it.
    let out = Command::new(weir_binary())
        .args(["plugins", "remove", "guarded", "--config"])
        .arg(&bare)
        .env("WEIR_CONTROL_TOKEN", "c0ntrol")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!wasm.exists(), "removed with the control token");
    let refusals = env
        .host(0)
        .log_text()
        .matches("control request refused")
        .count();
    assert!(refusals >= 4, "refusals are logged: {refusals}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_version_that_changes_the_subjects_keeps_the_consumers_position() {
    let mut env = TestEnv::new(STREAMS);
    env.deploy("test-guests/hostile", "widening", None, |m| m);
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 50], None).await;
    wait_until(WAIT, "the first 50", || async {
        count(&js, "HOSTILE", "hostile.out").await == 50
    })
    .await;

    // The consumer's shape changes (a second subject): the pipeline is
    // rebuilt and the durable consumer updated in place.
    env.deploy("test-guests/hostile", "widening", None, |m| {
        m.replace(
            "subjects = [\"hostile.in\"]",
            "subjects = [\"hostile.in\", \"hostile.extra\"]",
        )
    });
    env.host(0).wait_for_log("plugin updated", 1);
    publish_all(&js, "hostile.extra", &vec!["echo".to_owned(); 20], None).await;
    publish_all(&js, "hostile.in", &vec!["echo".to_owned(); 30], None).await;
    wait_until(WAIT, "all 100", || async {
        count(&js, "HOSTILE", "hostile.out").await == 100
    })
    .await;
    let stream = js.get_stream("HOSTILE").await.unwrap();
    let info = stream.consumer_info("weir-widening").await.unwrap();
    assert_eq!(
        info.config.filter_subjects,
        vec!["hostile.in".to_owned(), "hostile.extra".to_owned()]
    );
    // Each of the 100 inputs delivered once: the update did not rewind.
    assert_eq!(info.delivered.consumer_sequence, 100, "{info:?}");
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_pending, 0);
}
