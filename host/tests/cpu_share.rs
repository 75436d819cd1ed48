//! Fair shares of the guest CPU (ARCHITECTURE.md, "Sharing the host"):
//! calls that spin until their deadline on every core cannot keep another
//! plugin's events, or their own plugin's other events, waiting until they
//! end. Needs `cargo xtask build` first.
//!
//! These tests assert order, not speed: the healthy calls must all finish
//! while the spinning ones are still spinning. Before turns were shared,
//! each healthy call waited behind a 5 ms slice of every spinning call, so
//! these ran for seconds and the spinners hit their deadlines first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use weir::manifest::Manifest;
use weir::state::{CommittedState, MemoryState};
use weir::testing::event;
use weir::{Outcome, Plugin, Sandbox, SandboxConfig};

const HOSTILE: &str = "../dist/test-guests/hostile.wasm";
const FRAUD: &str = "../dist/plugins/fraud.wasm";

/// A sandbox whose guest calls share `turns` turns.
fn sandbox(turns: usize) -> Sandbox {
    let mut config = SandboxConfig::with_default_cache();
    config.running_guest_calls = turns;
    Sandbox::new(config).unwrap()
}

/// The hostile guest with a deadline long enough to outlast the test.
fn spinner(sandbox: &Sandbox) -> Plugin {
    let mut manifest = Manifest::load(&Manifest::path_for(Path::new(HOSTILE))).unwrap();
    manifest.limits.timeout_ms = 3_000;
    sandbox
        .load_with_manifest(Path::new(HOSTILE), manifest)
        .expect("load the hostile test guest (run `cargo xtask build` first)")
}

fn memory_state() -> Arc<dyn CommittedState> {
    Arc::new(MemoryState::new())
}

/// Start `n` calls of `plugin` that spin until their deadline, and give
/// them time to take the turns.
async fn spin(plugin: &Plugin, n: usize) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let calls = (0..n)
        .map(|_| {
            let plugin = plugin.clone();
            tokio::spawn(async move {
                plugin
                    .invoke(&event("hostile.in", "loop"), memory_state())
                    .await
                    .outcome
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    calls
}

async fn all_hit_their_deadline(spinning: Vec<tokio::task::JoinHandle<Outcome>>) {
    assert!(
        spinning.iter().all(|call| !call.is_finished()),
        "a spinning call ended before the healthy calls were all served"
    );
    for call in spinning {
        let outcome = call.await.unwrap();
        assert!(matches!(outcome, Outcome::Deadline { .. }), "{outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_plugin_is_served_while_sixteen_calls_spin_on_every_core() {
    let sandbox = sandbox(2);
    let spinner = spinner(&sandbox);
    let fraud = sandbox.load(Path::new(FRAUD)).unwrap();
    let spinning = spin(&spinner, 16).await;
    // On a worker thread, as the pipeline's tasks are (the test's own
    // thread is not one), yielding between events as the pipeline does
    // when it awaits the broker.
    tokio::spawn(async move {
        for i in 0..200 {
            let order = format!(
                r#"{{"order_id":"{i}","customer_id":"c-1","amount_cents":4599,"country":"NL","items":[]}}"#
            );
            let invocation = fraud
                .invoke(&event("orders.placed", order), memory_state())
                .await;
            assert_eq!(invocation.outcome, Outcome::Ok, "{:?}", invocation.logs);
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    all_hit_their_deadline(spinning).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_event_does_not_stall_its_own_plugin() {
    let sandbox = sandbox(1);
    let plugin = spinner(&sandbox);
    let spinning = spin(&plugin, 1).await;
    tokio::spawn(async move {
        for _ in 0..20 {
            let invocation = plugin
                .invoke(&event("hostile.in", "ok"), memory_state())
                .await;
            assert_eq!(invocation.outcome, Outcome::Ok);
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    all_hit_their_deadline(spinning).await;
}

/// The scheduling policy of every thread of this process, from
/// /proc/self/task/<tid>/stat (field 41).
#[cfg(target_os = "linux")]
fn thread_policies() -> Vec<i32> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        // A thread may end between listing and reading.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may
        // hold spaces; the state is field 3.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        policies.push(rest.split(' ').nth(41 - 3).unwrap().parse().unwrap());
    }
    policies
}

/// Whether some thread runs at `SCHED_IDLE`, looked for over `window`.
#[cfg(target_os = "linux")]
async fn some_thread_idle_within(window: Duration) -> bool {
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        if thread_policies().contains(&libc::SCHED_IDLE) {
            return true;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    false
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_compute_at_idle_priority_and_give_their_threads_back() {
    let mut config = SandboxConfig::with_default_cache();
    config.running_guest_calls = 1;
    config.idle_long_calls = true;
    let sandbox = Sandbox::new(config).unwrap();
    if !sandbox.idle_long_calls() {
        eprintln!("skipped: this process may not switch threads back from SCHED_IDLE");
        return;
    }
    // Short calls never change their thread's policy.
    let fraud = sandbox.load(Path::new(FRAUD)).unwrap();
    let serving = tokio::spawn(async move {
        for i in 0..2_000 {
            let order = format!(
                r#"{{"order_id":"{i}","customer_id":"c-1","amount_cents":4599,"country":"NL","items":[]}}"#
            );
            fraud
                .invoke(&event("orders.placed", order), memory_state())
                .await;
        }
    });
    assert!(!some_thread_idle_within(Duration::from_millis(300)).await);
    serving.await.unwrap();
    // A call that computes past its first tick does, while its guest runs.
    let mut manifest = Manifest::load(&Manifest::path_for(Path::new(HOSTILE))).unwrap();
    manifest.limits.timeout_ms = 600;
    let spinner = sandbox
        .load_with_manifest(Path::new(HOSTILE), manifest)
        .unwrap();
    let spinning = tokio::spawn(async move {
        spinner
            .invoke(&event("hostile.in", "loop"), memory_state())
            .await
            .outcome
    });
    assert!(some_thread_idle_within(Duration::from_millis(400)).await);
    let outcome = spinning.await.unwrap();
    assert!(matches!(outcome, Outcome::Deadline { .. }), "{outcome:?}");
    // Ended by its deadline, it left no thread at idle priority.
    assert!(
        !thread_policies().contains(&libc::SCHED_IDLE),
        "{:?}",
        thread_policies()
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_keep_normal_priority_by_default() {
    let sandbox = sandbox(2);
    assert!(!sandbox.idle_long_calls());
    let spinning = spin(&spinner(&sandbox), 2).await;
    assert!(!some_thread_idle_within(Duration::from_millis(300)).await);
    for call in spinning {
        call.abort();
    }
}
