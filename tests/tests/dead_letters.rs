//! `weir dlq list / show / purge` against a real nats-server, on dead
//! letters made by real plugins. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::time::Duration;

use weir_integration_tests::{
    TestEnv, count, custom_section, dist, header, one_delivery, publish_all, read_stream, tallies,
    version_of, wait_until, weir_cli,
};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];

/// `weir dlq ARGS --config config`, with `stdin`: (success, stdout, stderr).
fn dlq(config: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let args: Vec<&str> = std::iter::once("dlq").chain(args.iter().copied()).collect();
    weir_cli(config, &args, stdin)
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_shown_and_purged() {
    let mut env = TestEnv::new(STREAMS);
    for plugin in ["alpha", "beta"] {
        env.install("test-guests/hostile", plugin, one_delivery);
    }
    env.start_host();
    let js = env.jetstream().await;
    publish_all(
        &js,
        "hostile.in",
        &["reject".to_owned(), "loop".to_owned()],
        None,
    )
    .await;
    wait_until(Duration::from_secs(60), "four dead letters", || async {
        count(&js, "WEIR_DLQ", ">").await == 4
    })
    .await;
    let config = env.config_path();

    let (ok, stdout, stderr) = dlq(&config, &["list"], "");
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    let (ok, stdout, _) = dlq(&config, &["list", "--plugin", "alpha"], "");
    assert!(ok);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.lines().all(|l| l.contains("alpha")), "{stdout}");

    let (ok, stdout, stderr) = dlq(&config, &["list", "--reason", "deadline", "--json"], "");
    assert!(ok, "{stderr}");
    let letters: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{stdout}");
    for letter in &letters {
        assert_eq!(letter["reason"], "deadline");
        assert_eq!(letter["attempts"], 1);
        assert_eq!(letter["subject"], "hostile.in");
        assert_eq!(letter["stream"], "HOSTILE");
        assert_eq!(letter["payload"], "loop");
    }

    let rejected = dlq(&config, &["list", "--reason", "reject", "--json"], "").1;
    let id =
        serde_json::from_str::<serde_json::Value>(rejected.lines().next().unwrap()).unwrap()["id"]
            .as_u64()
            .unwrap();
    let (ok, stdout, stderr) = dlq(&config, &["show", &id.to_string()], "");
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("dead letter {id}")), "{stdout}");
    assert!(stdout.contains("reason:   reject"), "{stdout}");
    assert!(stdout.contains("asked to reject"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("reject"),
        "the payload: {stdout}"
    );
    let (ok, _, stderr) = dlq(&config, &["show", "9999"], "");
    assert!(
        !ok && stderr.contains("no dead letter 9999 in WEIR_DLQ"),
        "{stderr}"
    );

    let future = "2999-01-01T00:00:00Z";
    let (ok, stdout, _) = dlq(&config, &["list", "--since", future], "");
    assert!(ok && stdout.is_empty(), "{stdout}");
    let (ok, _, stderr) = dlq(&config, &["list", "--since", "yesterday"], "");
    assert!(!ok && stderr.contains("RFC 3339"), "{stderr}");

    // Purging needs a selection or --all, and a yes.
    let (ok, _, stderr) = dlq(&config, &["purge"], "");
    assert!(!ok && stderr.contains("--all"), "{stderr}");
    let (ok, stdout, _) = dlq(&config, &["purge", "--all"], "n\n");
    assert!(!ok && stdout.contains("nothing deleted"), "{stdout}");
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 4);
    let (ok, stdout, stderr) = dlq(&config, &["purge", "--plugin", "alpha", "--yes"], "");
    assert!(
        ok && stdout.contains("deleted 2 dead letters"),
        "{stdout}{stderr}"
    );
    let (_, stdout, _) = dlq(&config, &["list"], "");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.lines().all(|l| l.contains("beta")), "{stdout}");
    let (ok, stdout, _) = dlq(&config, &["purge", "--all"], "y\n");
    assert!(ok && stdout.contains("deleted 2 dead letters"), "{stdout}");
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);

    // A dead-letter stream that does not exist is named.
    env.append_config("[dead-letter]\nstream = \"NOPE\"\n");
    let (ok, _, stderr) = dlq(&config, &["list"], "");
    assert!(
        !ok && stderr.contains("dead-letter stream NOPE"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_replayed_once_through_the_fixed_version_and_nowhere_else() {
    let mut env = TestEnv::new(STREAMS);
    // 600 ms of work: too long for fixable's 300 ms deadline, fine for
    // the bystander subscribed to the same subject.
    env.install("test-guests/hostile", "fixable", one_delivery);
    env.install("test-guests/hostile", "bystander", |m| {
        m.replace("timeout-ms = 300", "timeout-ms = 5000")
    });
    env.start_host();
    let js = env.jetstream().await;
    publish_all(&js, "hostile.in", &["ordered 600".to_owned()], None).await;
    wait_until(Duration::from_secs(60), "the dead letter", || async {
        count(&js, "WEIR_DLQ", ">").await == 1
    })
    .await;
    wait_until(
        Duration::from_secs(60),
        "the bystander's output",
        || async { count(&js, "HOSTILE", "hostile.out").await == 1 },
    )
    .await;
    let first = read_stream(&js, "WEIR_DLQ", ">").await.remove(0);
    let config = env.config_path();

    // Replayed before the fix, it fails again: a letter with the new
    // attempt and reason takes its place.
    let first_id = first.info().unwrap().stream_sequence;
    let (ok, stdout, _) = dlq(&config, &["replay", &first_id.to_string()], "");
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("failed again") && stdout.contains("replaces it with the new reason"),
        "{stdout}"
    );
    let (_, listed, _) = dlq(&config, &["list", "--json"], "");
    let letters: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 1, "{listed}");
    assert_ne!(letters[0]["id"], first_id, "{listed}");
    assert_eq!(letters[0]["reason"], "deadline", "{listed}");
    assert_eq!(letters[0]["attempts"], 2, "{listed}");
    let letter = read_stream(&js, "WEIR_DLQ", ">").await.remove(0);

    // The fix: a version with a longer deadline.
    env.deploy("test-guests/hostile", "fixable", Some("fixed"), |m| {
        m.replace("max-deliveries = 3", "max-deliveries = 1")
            .replace("timeout-ms = 300", "timeout-ms = 5000")
    });
    env.host(0).wait_for_log("plugin updated", 1);
    let fixed = {
        let mut wasm = std::fs::read(dist("test-guests/hostile.wasm")).unwrap();
        wasm.extend(custom_section("weir-test-version", b"fixed"));
        version_of(&wasm)
    };

    let id = letter.info().unwrap().stream_sequence.to_string();
    let (ok, stdout, _) = dlq(&config, &["replay", &id, "--dry-run"], "");
    assert!(
        ok && stdout.contains("1 dead letters would be replayed"),
        "{stdout}"
    );
    assert_eq!(
        count(&js, "WEIR_DLQ", ">").await,
        1,
        "a dry run changes nothing"
    );
    let (ok, stdout, stderr) = dlq(&config, &["replay", &id], "");
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("replayed 1, already done before 0, failed again 0"),
        "{stdout}"
    );
    assert_eq!(
        count(&js, "WEIR_DLQ", ">").await,
        0,
        "the replayed letter is gone"
    );

    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    let of = |plugin: &str| {
        outputs
            .iter()
            .filter(|m| header(m, "Weir-Plugin") == Some(plugin))
            .collect::<Vec<_>>()
    };
    assert_eq!(of("fixable").len(), 1, "one output from the replay");
    assert_eq!(
        header(of("fixable")[0], "Weir-Plugin-Version"),
        Some(fixed.as_str())
    );
    assert_eq!(
        of("fixable")[0].payload.as_ref(),
        b"hostile.in 1",
        "the original event"
    );
    assert_eq!(
        of("bystander").len(),
        1,
        "the other subscriber saw nothing again"
    );
    assert_eq!(env.plugin_counter(0, "bystander", "processed"), 1);

    // The same dead letter again (a replay interrupted before it removed
    // the letter looks like this): its effects are found committed, and
    // the plugin does not run again.
    // (Without its message id, or the stream's duplicate window drops it.)
    let restore = || async {
        let mut copy = async_nats::HeaderMap::new();
        for (k, values) in letter.headers.iter().flat_map(|h| h.iter()) {
            if k.to_string() != "Nats-Msg-Id" {
                for v in values {
                    copy.append(k.clone(), v.clone());
                }
            }
        }
        js.publish_with_headers(letter.subject.clone(), copy, letter.payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(count(&js, "WEIR_DLQ", ">").await, 1);
    };
    restore().await;
    let (ok, stdout, stderr) = dlq(&config, &["replay", "--plugin", "fixable"], "");
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("replayed 0, already done before 1"),
        "{stdout}"
    );
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);

    // A plugin that is not in the directory cannot be replayed into.
    std::fs::remove_file(env.plugins_dir().join("fixable.wasm")).unwrap();
    restore().await;
    let (ok, _, stderr) = dlq(&config, &["replay", "--all"], "");
    assert!(
        !ok && stderr.contains("not in the plugin directory"),
        "{stderr}"
    );
}

/// A thousand dead letters replayed by a fixed version, the replaying
/// process killed partway: replaying again finishes the rest, and every
/// event has one output and one state update.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_replay_of_many_dead_letters_has_each_effect_once() {
    const LETTERS: usize = 1_000;
    const KEYS: usize = 5;
    let mut env = TestEnv::new(STREAMS);
    env.install("test-guests/hostile", "gate", |m| {
        format!("{}\n[config]\nblocked = true\n", one_delivery(m))
    });
    env.start_host();
    let js = env.jetstream().await;
    let events: Vec<String> = (0..LETTERS)
        .map(|i| format!("gated-tally k{}", i % KEYS))
        .collect();
    publish_all(&js, "hostile.in", &events, None).await;
    wait_until(
        Duration::from_secs(60),
        "every event dead-lettered",
        || async { count(&js, "WEIR_DLQ", ">").await == LETTERS as u64 },
    )
    .await;
    env.deploy("test-guests/hostile", "gate", Some("fixed"), one_delivery);
    env.host(0).wait_for_log("plugin updated", 1);

    let config = env.config_path();
    let mut replaying = std::process::Command::new(weir_integration_tests::weir_binary())
        .args(["dlq", "replay", "--plugin", "gate", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "the replay under way", || async {
        count(&js, "HOSTILE", "hostile.out").await >= 100
    })
    .await;
    replaying.kill().unwrap();
    replaying.wait().unwrap();
    let before = count(&js, "HOSTILE", "hostile.out").await;
    assert!(
        before < LETTERS as u64,
        "the replay was killed partway ({before} outputs)"
    );

    let (ok, stdout, stderr) = dlq(&config, &["replay", "--plugin", "gate"], "");
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("failed again 0"), "{stdout}");
    assert_eq!(count(&js, "WEIR_DLQ", ">").await, 0);
    let outputs = read_stream(&js, "HOSTILE", "hostile.out").await;
    assert_eq!(outputs.len(), LETTERS, "one output per event");
    let distinct: std::collections::HashSet<&[u8]> =
        outputs.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(distinct.len(), LETTERS);
    let state = tallies(&js, "gate").await;
    assert_eq!(state.len(), KEYS);
    for (key, n) in &state {
        assert_eq!(*n, (LETTERS / KEYS) as u64, "{key}: state applied once");
    }
}
