//! Long guest calls run at the OS's idle priority between epoch ticks.
//!
//! Turns ([`super::cpu`]) share the guest CPU between plugins, but a guest
//! that computes for long runs on a worker thread the kernel sees as one
//! more busy thread. On a machine whose cores are all running such calls,
//! everything else that must run for another plugin's event (nats-server
//! storing a commit, the host reading its reply, the producer) waits out
//! the scheduler's slices: measured, a neighbour's commit round trip went
//! from 0.3 ms to a 4 ms p99 next to 16 spinning calls, and its
//! publish-to-ack p99 to 7-10 ms (BENCHMARKS.md).
//!
//! So a call still running at its second epoch tick (it has computed for
//! at least one tick without returning) runs its guest code at
//! `SCHED_IDLE`: any other thread that wakes up takes the core at once.
//! The thread goes back to its normal policy whenever the guest stops
//! running on it: at every tick (so the host's own tasks never run at idle
//! priority), whenever the call waits (a state read, a WASI poll), and
//! when it ends. Calls that return within a tick, which is nearly all of
//! them, never change their thread's policy.
//!
//! A thread at idle priority may not get a core for a long time (the
//! machine is busy with other work), and whatever it holds meanwhile waits
//! with it. So the epoch clock gives back its normal policy to a thread
//! that has been at idle priority for [`STARVED_AFTER`] without reaching
//! its next tick ([`rescue_starved`]): a long call is held back by at most
//! that much at a time, and it reaches its tick at normal priority.
//!
//! Going back from `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE`
//! of at least 20; [`available`] checks it once, and without it long calls
//! keep the normal policy.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Context;
use std::time::{Duration, Instant};

/// How long a thread stays at idle priority without reaching its next
/// tick before the epoch clock restores it: four ticks.
pub(crate) const STARVED_AFTER: Duration = Duration::from_millis(1);

/// Threads at idle priority now, by thread id, and since when.
static DEMOTED_THREADS: Mutex<Vec<(i32, Instant)>> = Mutex::new(Vec::new());
/// How many entries `DEMOTED_THREADS` has, readable without its lock.
static DEMOTED_COUNT: AtomicUsize = AtomicUsize::new(0);

fn demoted_threads() -> std::sync::MutexGuard<'static, Vec<(i32, Instant)>> {
    // Pushes and removes cannot leave the list half-changed.
    DEMOTED_THREADS.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// Whether this thread runs at idle priority now.
    static DEMOTED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this process may lower a thread to idle priority and raise it
/// back: tried once, on a thread of its own.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::thread::spawn(|| os::set_idle(0, true).is_ok() && os::set_idle(0, false).is_ok())
            .join()
            .unwrap_or(false)
    })
}

/// Run the calling thread at idle priority until [`restore`].
pub(crate) fn demote() {
    if !DEMOTED.get() && available() && os::set_idle(0, true).is_ok() {
        DEMOTED.set(true);
        let mut threads = demoted_threads();
        threads.push((os::thread_id(), Instant::now()));
        DEMOTED_COUNT.store(threads.len(), Ordering::Release);
    }
}

/// Undo [`demote`] on the calling thread, if it was demoted.
pub(crate) fn restore() {
    if DEMOTED.get() {
        if let Err(e) = os::set_idle(0, false) {
            // `available` tried this; failing now leaves a worker thread at
            // idle priority, which only slows it.
            tracing::error!("restoring a worker thread's scheduling policy: {e}");
        }
        DEMOTED.set(false);
        let id = os::thread_id();
        let mut threads = demoted_threads();
        threads.retain(|(thread, _)| *thread != id);
        DEMOTED_COUNT.store(threads.len(), Ordering::Release);
    }
}

/// Give threads that have been at idle priority for longer than `limit`
/// their normal policy back; for the epoch clock, at every tick. The
/// thread itself still thinks it is demoted, so its next [`restore`] is
/// one redundant system call.
pub(crate) fn rescue_starved(limit: Duration) {
    if DEMOTED_COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut threads = demoted_threads();
    threads.retain(|(thread, since)| {
        if since.elapsed() < limit {
            return true;
        }
        if let Err(e) = os::set_idle(*thread, false) {
            // Gone already (a thread restores itself before it ends).
            tracing::debug!("restoring thread {thread}: {e}");
        }
        false
    });
    DEMOTED_COUNT.store(threads.len(), Ordering::Release);
}

/// Whether the calling thread is demoted now.
#[cfg(test)]
pub(crate) fn demoted() -> bool {
    DEMOTED.get()
}

/// `future`, with the thread restored whenever it stops running guest code
/// to wait: the thread then runs other tasks, which must not be at idle
/// priority.
pub(crate) async fn restoring<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx: &mut Context<'_>| {
        let poll = future.as_mut().poll(cx);
        if poll.is_pending() {
            restore();
        }
        poll
    })
    .await
}

#[cfg(target_os = "linux")]
mod os {
    /// The calling thread's kernel id.
    pub(super) fn thread_id() -> i32 {
        // SAFETY: gettid takes no arguments and cannot fail.
        #[allow(unsafe_code)]
        unsafe {
            libc::gettid()
        }
    }

    /// Switch thread `thread` (0: the calling one) between `SCHED_IDLE`
    /// and `SCHED_OTHER`.
    pub(super) fn set_idle(thread: i32, idle: bool) -> std::io::Result<()> {
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `thread` is a thread id (0: the calling thread), and
        // `param` is a valid, initialised sched_param that outlives the call.
        #[allow(unsafe_code)]
        let result = unsafe { libc::sched_setscheduler(thread, policy, &param) };
        match result {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    pub(super) fn thread_id() -> i32 {
        0
    }

    pub(super) fn set_idle(_thread: i32, _idle: bool) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn policy() -> i32 {
        // SAFETY: reads the calling thread's policy; no memory is passed.
        #[allow(unsafe_code)]
        unsafe {
            libc::sched_getscheduler(0)
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_demoted_thread_runs_at_idle_priority_until_restored() {
        std::thread::spawn(|| {
            if !available() {
                // Without the privilege nothing changes.
                demote();
                assert!(!demoted());
                assert_eq!(policy(), libc::SCHED_OTHER);
                return;
            }
            demote();
            assert!(demoted());
            assert_eq!(policy(), libc::SCHED_IDLE);
            restore();
            assert!(!demoted());
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_starved_at_idle_priority_is_restored_by_another() {
        if !available() {
            return;
        }
        let (demoted_tx, demoted_rx) = std::sync::mpsc::channel();
        let (rescued_tx, rescued_rx) = std::sync::mpsc::channel::<()>();
        let starving = std::thread::spawn(move || {
            demote();
            demoted_tx.send(os::thread_id()).unwrap();
            rescued_rx.recv().unwrap();
            let policy = policy();
            // Still thinks it is demoted: restoring again is harmless.
            restore();
            policy
        });
        let thread = demoted_rx.recv().unwrap();
        let listed = || demoted_threads().iter().any(|(t, _)| *t == thread);
        rescue_starved(Duration::from_secs(3600));
        assert!(listed(), "demoted only just now");
        rescue_starved(Duration::ZERO);
        assert!(!listed());
        rescued_tx.send(()).unwrap();
        assert_eq!(starving.join().unwrap(), libc::SCHED_OTHER);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiting_future_gives_its_thread_back_at_normal_priority() {
        if !available() {
            return;
        }
        restoring(async {
            demote();
            tokio::task::yield_now().await;
            // Polled again after waiting: demoted only if demoted again.
            assert!(!demoted());
            demote();
        })
        .await;
        // Ready while demoted: the caller restores (as `finish` does).
        assert!(demoted());
        restore();
        assert!(!demoted());
    }
}
