//! `weir test` as a plugin author runs it. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::process::Command;

fn weir_test(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("test")
        .args(args)
        .current_dir("..")
        .output()
        .unwrap()
}

const FRAUD: &str = "dist/plugins/fraud.wasm";
const EVENTS: &str = "plugins/fraud/tests/orders.events.jsonl";

#[test]
fn shipped_sample_passes_and_prints_one_result_per_event() {
    let out = weir_test(&[
        FRAUD,
        "--events",
        EVENTS,
        "--expect",
        "plugins/fraud/tests/orders.expected.jsonl",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("5 passed, 0 failed"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let results: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 5);
    assert_eq!(results[1]["emitted"][0]["subject"], "orders.flagged");
}

#[test]
fn wrong_expectation_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let expect = dir.path().join("wrong.jsonl");
    let mut lines: Vec<String> =
        std::fs::read_to_string("../plugins/fraud/tests/orders.expected.jsonl")
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
    lines[0] = r#"{"outcome": "ok", "emitted": [{"subject": "orders.flagged"}]}"#.into();
    std::fs::write(&expect, lines.join("\n")).unwrap();
    let out = weir_test(&[
        FRAUD,
        "--events",
        EVENTS,
        "--expect",
        expect.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("FAIL event 1"), "{stderr}");
    assert!(
        stderr.contains(".emitted: expected 1 items, got 0"),
        "{stderr}"
    );
    assert!(stderr.contains("4 passed, 1 failed"), "{stderr}");
}

#[test]
fn malformed_events_file_is_an_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("bad.jsonl");
    std::fs::write(
        &events,
        "{\"subject\": \"orders.placed\", \"payload\": {}}\n{oops\n",
    )
    .unwrap();
    let out = weir_test(&[FRAUD, "--events", events.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.jsonl:2"), "{stderr}");
}

#[test]
fn expectation_count_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let expect = dir.path().join("short.jsonl");
    std::fs::write(&expect, "{\"outcome\": \"ok\"}\n{\"outcome\": \"ok\"}\n").unwrap();
    let out = weir_test(&[
        FRAUD,
        "--events",
        EVENTS,
        "--expect",
        expect.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("has 2 expectations for 5 events"),
        "{stderr}"
    );
}

#[test]
fn missing_plugin_says_how_to_build_it() {
    let out = weir_test(&["dist/plugins/nope.wasm", "--events", EVENTS]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cargo xtask build"), "{stderr}");
}
