//! `weir dlq list / show / purge` against a real nats-server, on dead
//! letters made by real plugins. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use weir_integration_tests::{TestEnv, count, publish_all, wait_until, weir_binary};

const STREAMS: &[(&str, &[&str])] = &[("HOSTILE", &["hostile.>"])];

/// `weir dlq ARGS --config config`, with `stdin`: (success, stdout, stderr).
fn dlq(config: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(weir_binary())
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_shown_and_purged() {
    let mut env = TestEnv::new(STREAMS);
    for plugin in ["alpha", "beta"] {
        env.install("test-guests/hostile", plugin, |m| {
            m.replace("max-deliveries = 3", "max-deliveries = 1")
        });
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
