//! Instance reuse (ARCHITECTURE.md, "The call"): an instance serves one
//! event at a time and is reused for the next, until a trap or limit hit
//! discards it or a recycle rule replaces it; `isolation = "event"` gives
//! every event a fresh one. The hostile test guest counts, in a global,
//! the events its instance has handled. Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;

use weir::manifest::{Isolation, Manifest};
use weir::testing::{TestPlugin, event};
use weir::{Outcome, Sandbox, SandboxConfig};

const HOSTILE: &str = "../dist/test-guests/hostile.wasm";

fn hostile_with(edit: impl FnOnce(&mut Manifest)) -> TestPlugin {
    let mut manifest = Manifest::load(&Manifest::path_for(Path::new(HOSTILE))).unwrap();
    edit(&mut manifest);
    let sandbox = Sandbox::new(SandboxConfig::with_default_cache()).unwrap();
    let plugin = sandbox
        .load_with_manifest(Path::new(HOSTILE), manifest)
        .expect("load the hostile test guest (run `cargo xtask build` first)");
    TestPlugin::from_plugin(plugin).unwrap()
}

/// What the instance that handled this event had seen, itself included.
fn instance_count(plugin: &mut TestPlugin) -> u64 {
    let report = plugin.handle(event("hostile.in", "instance-count"));
    assert_eq!(report.outcome, Outcome::Ok);
    String::from_utf8(report.emitted[0].payload.clone())
        .unwrap()
        .parse()
        .unwrap()
}

fn counts(plugin: &mut TestPlugin, n: usize) -> Vec<u64> {
    (0..n).map(|_| instance_count(plugin)).collect()
}

#[test]
fn instances_are_reused_by_default() {
    let mut plugin = hostile_with(|_| {});
    assert_eq!(counts(&mut plugin, 4), [1, 2, 3, 4]);
    assert_eq!(plugin.plugin().instance_stats().created, 1);
}

#[test]
fn guest_level_failures_keep_the_instance() {
    let mut plugin = hostile_with(|_| {});
    assert_eq!(instance_count(&mut plugin), 1);
    for command in ["reject", "retry"] {
        let report = plugin.handle(event("hostile.in", command));
        assert!(!report.outcome.is_ok(), "{command}");
    }
    assert_eq!(instance_count(&mut plugin), 4);
}

#[test]
fn a_trap_discards_the_instance_and_its_corrupted_globals() {
    let mut plugin = hostile_with(|_| {});
    assert_eq!(counts(&mut plugin, 2), [1, 2]);
    let report = plugin.handle(event("hostile.in", "corrupt-then-trap"));
    match report.outcome {
        Outcome::Trap { message } => assert!(message.contains("scribbled"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    // The next event runs in a new instance that never saw the poison.
    let next = plugin.handle(event("hostile.in", "check-globals"));
    assert_eq!(next.outcome, Outcome::Ok, "{:?}", next.outcome);
    assert_eq!(next.emitted[0].payload, b"pristine");
    assert_eq!(instance_count(&mut plugin), 2);
    assert_eq!(plugin.plugin().instance_stats().created, 2);
}

#[test]
fn limit_hits_discard_the_instance() {
    for command in ["loop", "alloc", "stack"] {
        let mut plugin = hostile_with(|_| {});
        assert_eq!(instance_count(&mut plugin), 1);
        let report = plugin.handle(event("hostile.in", command));
        assert!(!report.outcome.is_ok(), "{command}");
        assert_eq!(instance_count(&mut plugin), 1, "after {command}");
    }
}

#[test]
fn instances_are_recycled_after_a_number_of_events() {
    let mut plugin = hostile_with(|m| m.instances.recycle_after_events = 2);
    assert_eq!(counts(&mut plugin, 5), [1, 2, 1, 2, 1]);
}

#[test]
fn instances_are_recycled_when_their_memory_grew_past_the_bound() {
    // Any instance holds more than 1 MiB of linear memory.
    let mut plugin = hostile_with(|m| m.instances.recycle_above_memory_mb = Some(1));
    assert_eq!(counts(&mut plugin, 3), [1, 1, 1]);
    assert_eq!(plugin.plugin().instance_stats().created, 3);
}

#[test]
fn event_isolation_gives_every_event_a_fresh_instance() {
    let mut plugin = hostile_with(|m| m.instances.isolation = Isolation::Event);
    assert_eq!(counts(&mut plugin, 3), [1, 1, 1]);
    assert_eq!(plugin.plugin().instance_stats().idle, 0);
}

#[test]
fn the_host_memory_budget_ends_a_call_as_a_host_error_and_is_given_back() {
    // Two plugins under one 48 MiB budget, each allowed 64 MiB on its own.
    let sandbox = Sandbox::new(SandboxConfig {
        memory_budget_bytes: 48 << 20,
        ..SandboxConfig::with_default_cache()
    })
    .unwrap();
    let load = |name: &str| {
        let mut manifest = Manifest::load(&Manifest::path_for(Path::new(HOSTILE))).unwrap();
        manifest.limits.memory_mb = 64;
        let copy = std::env::temp_dir().join(format!("{name}-{}.wasm", std::process::id()));
        std::fs::copy(HOSTILE, &copy).unwrap();
        let plugin = sandbox.load_with_manifest(&copy, manifest).unwrap();
        std::fs::remove_file(&copy).unwrap();
        TestPlugin::from_plugin(plugin).unwrap()
    };
    let mut quiet = load("quiet");
    let mut bomb = load("bomb");
    assert_eq!(quiet.handle(event("hostile.in", "ok")).outcome, Outcome::Ok);
    let baseline = sandbox.guest_memory();
    assert!(baseline > 0, "a live instance holds memory");

    let report = bomb.handle(event("hostile.in", "alloc"));
    match &report.outcome {
        Outcome::HostError { message } => {
            assert!(message.contains("max-guest-memory-mb"), "{message}")
        }
        other => panic!("expected a host error, got {other:?}"),
    }
    // The bomb's instance was discarded and its memory given back: the
    // other plugin, and the bomb itself, serve again.
    assert_eq!(sandbox.guest_memory(), baseline);
    assert_eq!(quiet.handle(event("hostile.in", "ok")).outcome, Outcome::Ok);
    assert_eq!(bomb.handle(event("hostile.in", "ok")).outcome, Outcome::Ok);
    assert!(sandbox.guest_memory() <= 48 << 20);
}

/// Committed state that cannot be read, as when the bucket is out of reach.
struct Unreachable;

impl weir::state::CommittedState for Unreachable {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<weir::state::Versioned, weir::state::StateReadError>>
    {
        Box::pin(async move {
            Err(weir::state::StateReadError::new(
                key,
                "no responders available for request",
            ))
        })
    }
}

#[test]
fn a_state_read_that_fails_ends_the_call_as_a_host_error_and_discards_the_instance() {
    let plugin = hostile_with(|_| {}).plugin().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let invocation = runtime.block_on(plugin.invoke(
        &event("hostile.in", "count"),
        std::sync::Arc::new(Unreachable),
    ));
    match &invocation.outcome {
        Outcome::HostError { message } => assert_eq!(
            message,
            "state store unavailable: reading state key count: no responders available for request"
        ),
        other => panic!("expected a host error, got {other:?}"),
    }
    assert!(invocation.emitted.is_empty() && invocation.state_changes.is_empty());
    // A host failure may have left the guest anywhere: its instance goes.
    assert_eq!(plugin.instance_stats().idle, 0);
}
