//! The least-privilege NATS permissions of `docs/deployment.md`, taken
//! from the guide itself: a nats-server started with exactly that
//! `authorization` block runs a host that serves a plugin from the plugin
//! bucket, an operator who deploys, lists, resets and removes it, and a
//! producer whose orders come out flagged. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use weir::dev::NatsServer;
use weir_integration_tests::{
    WeirProcess, count, dist, publish_all, wait_until, weir_cli, workspace,
};

/// The guide's `authorization` block, passwords filled in, and a user for
/// the test's own checks.
fn server_conf() -> String {
    let guide = std::fs::read_to_string(workspace().join("docs/deployment.md")).unwrap();
    let block = guide
        .split("```nats-conf\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the guide has a ```nats-conf block");
    let block = block
        .replace("$HOST_PASSWORD", "h0st")
        .replace("$OPERATOR_PASSWORD", "0perator")
        .replace("$PRODUCER_PASSWORD", "pr0ducer");
    // The test's own view of the server: everything.
    block.replacen(
        "users = [",
        "users = [\n    { user: checker, password: ch3ck }",
        1,
    )
}

fn config(dir: &Path, url: &str, user: &str, password: &str, plugins: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{user}.toml"));
    std::fs::create_dir_all(dir.join(plugins)).unwrap();
    std::fs::write(
        &path,
        format!(
            "[nats]\nurl = \"{url}\"\nuser = \"{user}\"\npassword = \"{password}\"\n\
             [plugins]\ndir = \"{plugins}\"\nbucket = \"weir_plugins\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[control]\ntoken = \"c0ntrol\"\n\
             [[streams]]\nname = \"ORDERS\"\nsubjects = [\"orders.>\"]\n"
        ),
    )
    .unwrap();
    path
}

async fn connect(url: &str, user: &str, password: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(url)
        .await
        .unwrap();
    jetstream::new(client)
}

/// Orders the fraud plugin flags (large, from a high-risk country) and
/// ones it passes, alternately.
fn orders(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (amount, country) = if i % 2 == 0 { (250_000, "ZZ") } else { (100, "NL") };
            format!(
                r#"{{"order_id":"{i}","customer_id":"c-{i}","amount_cents":{amount},"country":"{country}","items":[]}}"#
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guides_least_privilege_users_run_deploy_reset_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start_on_free_port(&dir.path().join("nats"), &server_conf()).unwrap();
    let url = server.url();
    let host_config = config(dir.path(), &url, "weir-host", "h0st", "plugins");
    let operator = config(dir.path(), &url, "weir-operator", "0perator", "ops-plugins");
    let mut host = WeirProcess::start(&host_config, &dir.path().join("weir.log"));
    host.wait_ready();

    let plugins = |args: &[&str]| {
        let args: Vec<&str> = std::iter::once("plugins")
            .chain(args.iter().copied())
            .collect();
        weir_cli(&operator, &args, "")
    };
    let fraud = dist("plugins/fraud.wasm");
    let (ok, stdout, stderr) = plugins(&["deploy", fraud.to_str().unwrap()]);
    assert!(ok, "the operator deploys: {stdout}{stderr}");
    assert!(stdout.contains("fraud runs in generation 0"), "{stdout}");

    let producer = connect(&url, "producer", "pr0ducer").await;
    publish_all(&producer, "orders.placed", &orders(100), None).await;
    let checker = connect(&url, "checker", "ch3ck").await;
    wait_until(Duration::from_secs(60), "50 flagged orders", || async {
        count(&checker, "ORDERS", "orders.flagged").await == 50
    })
    .await;

    let (ok, stdout, stderr) = plugins(&["list"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("served by 1 of 1 hosts"), "{stdout}");

    let (ok, stdout, stderr) = plugins(&["reset", "fraud", "--to", "all", "--yes"]);
    assert!(ok, "the operator resets: {stdout}{stderr}");
    wait_until(
        Duration::from_secs(60),
        "the orders flagged again",
        || async { count(&checker, "ORDERS", "orders.flagged").await == 100 },
    )
    .await;

    let (ok, stdout, stderr) = plugins(&["remove", "fraud"]);
    assert!(ok, "the operator removes: {stdout}{stderr}");
    let wasm = dir.path().join("plugins/fraud.wasm");
    wait_until(
        Duration::from_secs(30),
        "the plugin's files gone",
        || async { !wasm.exists() },
    )
    .await;
    assert!(
        !host.log_text().contains("Permissions Violation"),
        "{}",
        host.log_text()
    );
}
