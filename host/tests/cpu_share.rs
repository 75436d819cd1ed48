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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use weir::manifest::Manifest;
use weir::sandbox::LongCalls;
use weir::state::{CommittedState, MemoryState, StateReadError, Versioned, WaitGuard};
use weir::testing::event;
use weir::{Outcome, Plugin, Sandbox, SandboxConfig};

const HOSTILE: &str = "../dist/test-guests/hostile.wasm";
const FRAUD: &str = "../dist/plugins/fraud.wasm";

/// Held by the tests that make calls compute for long or look at how
/// threads are scheduled: the scheduling is the whole process's, so a
/// test looking for threads set apart must not see another test's.
async fn scheduling_alone() -> tokio::sync::MutexGuard<'static, ()> {
    static SCHEDULING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SCHEDULING.lock().await
}

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

/// Run order `i` through the fraud plugin, which passes it.
async fn place_order(fraud: &Plugin, i: usize) {
    let order = format!(
        r#"{{"order_id":"{i}","customer_id":"c-1","amount_cents":4599,"country":"NL","items":[]}}"#
    );
    let invocation = fraud
        .invoke(&event("orders.placed", order), memory_state())
        .await;
    assert_eq!(invocation.outcome, Outcome::Ok, "{:?}", invocation.logs);
}

/// Start `n` calls of the hostile `plugin` running `command`, and give
/// them time to take the turns.
async fn start_calls(
    plugin: &Plugin,
    n: usize,
    command: &'static str,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    let calls = (0..n)
        .map(|_| {
            let plugin = plugin.clone();
            tokio::spawn(async move {
                plugin
                    .invoke(&event("hostile.in", command), memory_state())
                    .await
                    .outcome
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    calls
}

/// Start `n` calls of `plugin` that spin until their deadline.
async fn spin(plugin: &Plugin, n: usize) -> Vec<tokio::task::JoinHandle<Outcome>> {
    start_calls(plugin, n, "loop").await
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
    let _alone = scheduling_alone().await;
    let sandbox = sandbox(2);
    let spinner = spinner(&sandbox);
    let fraud = sandbox.load(Path::new(FRAUD)).unwrap();
    let spinning = spin(&spinner, 16).await;
    // On a worker thread, as the pipeline's tasks are (the test's own
    // thread is not one), yielding between events as the pipeline does
    // when it awaits the broker.
    tokio::spawn(async move {
        for i in 0..200 {
            place_order(&fraud, i).await;
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    all_hit_their_deadline(spinning).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_event_does_not_stall_its_own_plugin() {
    let _alone = scheduling_alone().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_asleep_hold_no_turn() {
    let sandbox = sandbox(1);
    let sleeper = spinner(&sandbox);
    let fraud = sandbox.load(Path::new(FRAUD)).unwrap();
    // Four calls asleep in a WASI poll for 2 s each, on a host with one turn.
    let sleeping = start_calls(&sleeper, 4, "sleep 2000").await;
    tokio::spawn(async move {
        for i in 0..50 {
            place_order(&fraud, i).await;
        }
    })
    .await
    .unwrap();
    assert!(
        sleeping.iter().all(|call| !call.is_finished()),
        "a sleeping call ended before the other plugin's calls were served"
    );
    for call in sleeping {
        assert_eq!(call.await.unwrap(), Outcome::Ok);
    }
}

/// Empty state that counts the calls reading it which wait for the host,
/// and takes `read` to answer each read, as a store going to the server.
struct CountingWaits(MemoryState, Arc<AtomicUsize>, Duration);

struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CommittedState for CountingWaits {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, StateReadError>> {
        Box::pin(async move {
            tokio::time::sleep(self.2).await;
            self.0.get(key).await
        })
    }

    fn waiting(&self) -> Option<WaitGuard> {
        self.1.fetch_add(1, Ordering::AcqRel);
        Some(Box::new(Waiting(self.1.clone())))
    }
}

/// Start a call of the hostile `plugin` running `command` against state
/// whose reads take `read`, and return once it is reported waiting for
/// the host, with the count of calls so reported.
async fn start_reported_waiting(
    plugin: &Plugin,
    command: &'static str,
    read: Duration,
) -> (tokio::task::JoinHandle<Outcome>, Arc<AtomicUsize>) {
    let waiting = Arc::new(AtomicUsize::new(0));
    let state = Arc::new(CountingWaits(MemoryState::new(), waiting.clone(), read));
    let plugin = plugin.clone();
    let call = tokio::spawn(async move {
        plugin
            .invoke(&event("hostile.in", command), state)
            .await
            .outcome
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while waiting.load(Ordering::Acquire) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{command:?} was never reported waiting for the host"));
    (call, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_asleep_is_reported_as_waiting_until_it_wakes() {
    let sandbox = sandbox(1);
    let sleeper = spinner(&sandbox);
    let (call, waiting) = start_reported_waiting(&sleeper, "sleep 500", Duration::ZERO).await;
    assert_eq!(call.await.unwrap(), Outcome::Ok);
    assert_eq!(waiting.load(Ordering::Acquire), 0, "still reported waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_read_that_waits_gives_the_turn_up_and_is_reported_waiting() {
    let sandbox = sandbox(1);
    let reader = spinner(&sandbox);
    let fraud = sandbox.load(Path::new(FRAUD)).unwrap();
    // Reads "count" from a store that answers after 2 s.
    let (call, waiting) = start_reported_waiting(&reader, "count", Duration::from_secs(2)).await;
    // The only turn is free for another plugin meanwhile.
    tokio::spawn(async move {
        for i in 0..50 {
            place_order(&fraud, i).await;
        }
    })
    .await
    .unwrap();
    assert!(!call.is_finished(), "the read ended before the others ran");
    assert_eq!(call.await.unwrap(), Outcome::Ok);
    assert_eq!(waiting.load(Ordering::Acquire), 0, "still reported waiting");
}

/// Each thread's scheduling policy and time slice, from
/// /proc/self/task/<tid>/sched.
#[cfg(target_os = "linux")]
fn thread_scheduling() -> Vec<(i32, Option<u64>)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        // A thread may end between listing and reading.
        let Ok(sched) = std::fs::read_to_string(task.path().join("sched")) else {
            continue;
        };
        let field = |name: &str| {
            sched.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().parse::<u64>().ok())?
            })
        };
        // The slice is not shown for SCHED_IDLE.
        if let Some(policy) = field("policy") {
            threads.push((policy as i32, field("se.slice")));
        }
    }
    threads
}

/// Whether some thread is set apart as `policy` (idle priority, or a long
/// slice), looked for over `window`. It looks from a thread of its own: a
/// task on the runtime could be queued on the very worker that runs the
/// guest, and then only ever look while that worker has restored itself
/// at a tick.
#[cfg(target_os = "linux")]
async fn some_thread_set_apart_within(policy: LongCalls, window: Duration) -> bool {
    tokio::task::spawn_blocking(move || {
        let until = std::time::Instant::now() + window;
        while std::time::Instant::now() < until {
            if thread_scheduling()
                .into_iter()
                .any(|t| set_apart(t, policy))
            {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    })
    .await
    .unwrap()
}

#[cfg(target_os = "linux")]
fn set_apart((policy, slice): (i32, Option<u64>), as_: LongCalls) -> bool {
    match as_ {
        LongCalls::Idle => policy == libc::SCHED_IDLE,
        LongCalls::LongSlice => policy == libc::SCHED_OTHER && slice == Some(100_000_000),
        LongCalls::Normal => false,
    }
}

#[cfg(target_os = "linux")]
async fn long_calls_are_set_apart_while_they_compute(policy: LongCalls) {
    let _alone = scheduling_alone().await;
    let mut config = SandboxConfig::with_default_cache();
    config.running_guest_calls = 1;
    config.long_calls = policy;
    let sandbox = Sandbox::new(config).unwrap();
    if sandbox.long_calls() != policy {
        eprintln!("skipped: this kernel or process cannot run long calls as {policy:?}");
        return;
    }
    // Short calls leave every thread as it was. (Whether they were set
    // apart meanwhile depends on the machine: a call the OS pre-empts for
    // two ticks counts as long.)
    let fraud = sandbox.load(Path::new(FRAUD)).unwrap();
    for i in 0..500 {
        place_order(&fraud, i).await;
    }
    let threads = thread_scheduling();
    assert!(
        !threads.iter().any(|t| set_apart(*t, policy)),
        "{threads:?}"
    );
    // A call that computes past its first tick is, while its guest runs.
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
    let seen = some_thread_set_apart_within(policy, Duration::from_millis(400)).await;
    let outcome = spinning.await.unwrap();
    assert!(seen, "never seen set apart; it ended {outcome:?}");
    assert!(matches!(outcome, Outcome::Deadline { .. }), "{outcome:?}");
    // Ended by its deadline, it left no thread set apart.
    let threads = thread_scheduling();
    assert!(
        !threads.iter().any(|t| set_apart(*t, policy)),
        "{threads:?}"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_compute_with_a_long_slice_and_give_their_threads_back() {
    long_calls_are_set_apart_while_they_compute(LongCalls::LongSlice).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_compute_at_idle_priority_when_asked_and_give_their_threads_back() {
    long_calls_are_set_apart_while_they_compute(LongCalls::Idle).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_calls_run_like_any_thread_when_asked() {
    let _alone = scheduling_alone().await;
    let mut config = SandboxConfig::with_default_cache();
    config.running_guest_calls = 2;
    config.long_calls = LongCalls::Normal;
    let sandbox = Sandbox::new(config).unwrap();
    assert_eq!(sandbox.long_calls(), LongCalls::Normal);
    let spinning = spin(&spinner(&sandbox), 2).await;
    for policy in [LongCalls::Idle, LongCalls::LongSlice] {
        assert!(!some_thread_set_apart_within(policy, Duration::from_millis(300)).await);
    }
    for call in spinning {
        call.abort();
    }
}
