//! A hostile guest in the real sandbox: every misbehaviour ends its own
//! event with a specific outcome, and the same loaded plugin serves the
//! next event normally. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::time::Duration;

use weir::Outcome;
use weir::testing::{TestPlugin, event};

fn hostile() -> TestPlugin {
    TestPlugin::load("../dist/test-guests/hostile.wasm").expect("load the hostile test guest")
}

/// Run `command`, then prove the plugin still serves an ordinary event.
fn run_then_recover(command: &str) -> weir::Invocation {
    let mut plugin = hostile();
    let report = plugin.handle(event("hostile.in", command));
    let next = plugin.handle(event("hostile.in", "count"));
    assert_eq!(
        next.outcome,
        Outcome::Ok,
        "after {command:?} the next event must be served"
    );
    assert_eq!(next.emitted.len(), 1);
    report
}

#[test]
fn infinite_loop_hits_the_deadline() {
    let report = run_then_recover("loop");
    assert_eq!(
        report.outcome,
        Outcome::Deadline {
            limit: Duration::from_millis(300)
        }
    );
    assert!(
        report.duration < Duration::from_secs(2),
        "interrupted promptly: {:?}",
        report.duration
    );
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    let report = run_then_recover("alloc");
    assert_eq!(
        report.outcome,
        Outcome::OutOfMemory {
            limit_bytes: 16 << 20
        }
    );
}

#[test]
fn stack_overflow_is_a_trap_naming_the_stack() {
    let report = run_then_recover("stack");
    match report.outcome {
        Outcome::Trap { message } => assert!(message.contains("call stack exhausted"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn shadow_stack_overflow_is_an_out_of_bounds_trap() {
    // What a real Rust guest's runaway recursion looks like: its stack lives
    // in linear memory, below the data, and overflowing it walks off the start.
    let report = run_then_recover("shadow-stack");
    match report.outcome {
        Outcome::Trap { message } => {
            assert!(message.contains("out of bounds memory access"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn panic_is_a_trap_carrying_the_panic_message() {
    let report = run_then_recover("panic");
    match report.outcome {
        Outcome::Trap { message } => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(
                message.contains("hostile guest panics on purpose"),
                "{message}"
            );
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn file_access_is_denied() {
    let report = run_then_recover("read-file");
    match report.outcome {
        Outcome::Reject { reason } => assert!(reason.starts_with("file access denied"), "{reason}"),
        other => panic!("expected the guest to report denied access, got {other:?}"),
    }
}

#[test]
fn network_access_is_denied() {
    let report = run_then_recover("socket");
    match report.outcome {
        Outcome::Reject { reason } => {
            assert!(reason.starts_with("network access denied"), "{reason}")
        }
        other => panic!("expected the guest to report denied access, got {other:?}"),
    }
}

#[test]
fn host_environment_is_invisible() {
    let report = run_then_recover("env");
    assert_eq!(
        report.outcome,
        Outcome::Ok,
        "the guest must see no environment variables"
    );
}

#[test]
fn huge_emit_is_refused_by_the_outbox_limit() {
    let report = run_then_recover("huge-emit");
    match report.outcome {
        Outcome::Reject { reason } => {
            assert!(
                reason.contains("larger than the plugin's limit of 1044480 bytes"),
                "{reason}"
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(report.emitted.is_empty());
}

#[test]
fn too_many_emits_are_refused() {
    let report = run_then_recover("many-emits");
    match report.outcome {
        Outcome::Reject { reason } => {
            assert!(reason.contains("limit of 1000 per event"), "{reason}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn failed_event_leaves_no_output_and_no_state() {
    let mut plugin = hostile();
    let report = plugin.handle(event("hostile.in", "emit-then-fail"));
    assert!(
        matches!(report.outcome, Outcome::Retry { .. }),
        "{:?}",
        report.outcome
    );
    assert!(report.emitted.is_empty());
    assert!(report.state_changes.is_empty());
    assert!(plugin.state().snapshot().is_empty());
}

#[test]
fn retry_and_reject_are_reported_as_asked() {
    let mut plugin = hostile();
    let report = plugin.handle(event("hostile.in", "retry"));
    assert_eq!(
        report.outcome,
        Outcome::Retry {
            reason: "asked to retry".into(),
            delay: Some(Duration::from_millis(50))
        }
    );
    let report = plugin.handle(event("hostile.in", "reject"));
    assert_eq!(
        report.outcome,
        Outcome::Reject {
            reason: "asked to reject".into()
        }
    );
}

#[test]
fn state_persists_across_events_only_on_success() {
    let mut plugin = hostile();
    for expected in 1..=3u64 {
        let report = plugin.handle(event("hostile.in", "count"));
        assert_eq!(report.emitted[0].payload, expected.to_string().as_bytes());
    }
    assert_eq!(plugin.state().snapshot()["count"], b"3");
}

#[test]
fn many_bad_events_in_a_row_do_not_wear_the_host_down() {
    let mut plugin = hostile();
    for command in [
        "panic",
        "alloc",
        "stack",
        "shadow-stack",
        "loop",
        "panic",
        "alloc",
        "stack",
    ] {
        let report = plugin.handle(event("hostile.in", command));
        assert!(!report.outcome.is_ok(), "{command}");
    }
    assert_eq!(
        plugin.handle(event("hostile.in", "ok")).outcome,
        Outcome::Ok
    );
}
