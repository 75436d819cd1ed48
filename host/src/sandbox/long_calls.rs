//! Long guest calls step aside for everything else on the machine.
//!
//! Turns ([`super::cpu`]) share the guest CPU between plugins, but a guest
//! that computes for long runs on a worker thread the kernel sees as one
//! more busy thread. On a machine whose cores are all running such calls,
//! everything else that must run for another plugin's event (nats-server
//! storing a commit, the host reading its reply, the producer) waits for
//! the scheduler: measured, a neighbour's commit round trip went from
//! 0.3 ms to a 4 ms p99 next to 16 spinning calls, and its publish-to-ack
//! p99 to 7-10 ms (BENCHMARKS.md).
//!
//! So a call still running at its second epoch tick (it has computed for
//! at least one tick without returning) runs its guest code under a
//! [`LongCalls`] policy:
//! - `LongSlice` (the default) asks Linux's scheduler (EEVDF, 6.12 and
//!   later) for a 100 ms time slice: a thread that wakes with a shorter
//!   one may pre-empt it, and its weight, so its fair share of the CPU, is
//!   unchanged. It needs no privilege.
//! - `Idle` runs it at `SCHED_IDLE`, so any other thread that wakes takes
//!   the core at once; a much shorter tail for the neighbour, but the call
//!   only gets CPU nothing else wants (bounded, see [`rescue_starved`]),
//!   and going back needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20.
//!
//! The thread goes back to its normal setting whenever the guest stops
//! running on it: at every tick (so the host's own tasks are never set
//! apart), whenever the call waits (a state read, a WASI poll), and when
//! it ends. Calls that return within a tick, which is nearly all of them,
//! never make a system call. [`LongCalls::effective`] checks once that the
//! kernel and the process allow the asked-for policy, and falls back.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Context;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How the guest code of a call that computes for long is set apart
/// (`runtime.long-calls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LongCalls {
    /// Like any other thread.
    Normal,
    /// A long time slice: woken threads pre-empt it, its share is kept.
    #[default]
    LongSlice,
    /// `SCHED_IDLE`: it gets the CPU nothing else wants.
    Idle,
}

impl LongCalls {
    /// What this process can do of `self`: `Idle` without the privilege
    /// to come back from it, and `LongSlice` on a kernel without custom
    /// slices, fall back to the next weaker policy.
    pub fn effective(self) -> LongCalls {
        self.falling_back(probe)
    }

    /// The strongest policy, from `self` down, that `allowed` says works.
    fn falling_back(self, allowed: impl Fn(LongCalls) -> bool) -> LongCalls {
        match self {
            LongCalls::Idle if allowed(LongCalls::Idle) => LongCalls::Idle,
            LongCalls::Idle | LongCalls::LongSlice if allowed(LongCalls::LongSlice) => {
                LongCalls::LongSlice
            }
            _ => LongCalls::Normal,
        }
    }
}

/// Whether this process may switch a thread to `policy` and back: tried
/// once per policy, on a thread of its own.
fn probe(policy: LongCalls) -> bool {
    static IDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static LONG_SLICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let cell = match policy {
        LongCalls::Normal => return true,
        LongCalls::LongSlice => &LONG_SLICE,
        LongCalls::Idle => &IDLE,
    };
    *cell.get_or_init(|| {
        std::thread::spawn(move || try_policy(policy))
            .join()
            .unwrap_or(false)
    })
}

/// Whether the calling thread can be put under `policy` and back to
/// normal. When it cannot come back, it stays set apart: only call this
/// on a thread that ends afterwards.
fn try_policy(policy: LongCalls) -> bool {
    match os::set_apart(0, policy) {
        Ok(Some(saved)) => {
            let applied = policy != LongCalls::LongSlice || os::long_slice_kept();
            os::put_back(0, &saved).is_ok() && applied
        }
        // A thread the scheduler runs outside the normal classes is never
        // set apart, so the policy cannot be tried on it.
        Ok(None) | Err(_) => false,
    }
}

/// How long a thread stays at idle priority without reaching its next
/// tick before the epoch clock restores it: four ticks.
pub(crate) const STARVED_AFTER: Duration = Duration::from_millis(1);

/// Threads at idle priority now, by thread id: since when, and what to
/// put back.
static IDLE_THREADS: Mutex<Vec<(i32, Instant, os::Saved)>> = Mutex::new(Vec::new());
/// How many entries `IDLE_THREADS` has, readable without its lock.
static IDLE_COUNT: AtomicUsize = AtomicUsize::new(0);

fn idle_threads() -> std::sync::MutexGuard<'static, Vec<(i32, Instant, os::Saved)>> {
    // Pushes and removes cannot leave the list half-changed.
    IDLE_THREADS.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The policy this thread's guest code runs under now, and the
    /// thread's own scheduling attributes from before, to put back.
    static SET_APART: Cell<Option<(LongCalls, os::Saved)>> = const { Cell::new(None) };
}

/// Run the calling thread under `policy` until [`restore`], where this
/// process may. A thread the operator put outside the fair scheduler's
/// normal classes (real-time, deadline, already idle) is left as it is.
pub(crate) fn set_apart(policy: LongCalls) {
    // The probe also guards against lowering a thread to idle priority
    // without being able to raise it back.
    if policy == LongCalls::Normal || SET_APART.get().is_some() || !probe(policy) {
        return;
    }
    let saved = match os::set_apart(0, policy) {
        Ok(Some(saved)) => saved,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!("setting a long call's thread apart: {e}");
            return;
        }
    };
    SET_APART.set(Some((policy, saved)));
    if policy == LongCalls::Idle {
        let mut threads = idle_threads();
        threads.push((os::thread_id(), Instant::now(), saved));
        IDLE_COUNT.store(threads.len(), Ordering::Release);
    }
}

/// Undo [`set_apart`] on the calling thread, if it was set apart: its
/// policy and nice value go back to what they were.
pub(crate) fn restore() {
    let Some((policy, saved)) = SET_APART.take() else {
        return;
    };
    if let Err(e) = os::put_back(0, &saved) {
        // The probe tried this; failing now leaves a worker thread set
        // apart, which only slows it.
        tracing::error!("restoring a worker thread's scheduling policy: {e}");
    }
    if policy == LongCalls::Idle {
        let id = os::thread_id();
        let mut threads = idle_threads();
        threads.retain(|(thread, _, _)| *thread != id);
        IDLE_COUNT.store(threads.len(), Ordering::Release);
    }
}

/// Give threads that have been at idle priority for longer than `limit`
/// their normal policy back; for the epoch clock, at every tick. The
/// thread itself still thinks it is set apart, so its next [`restore`] is
/// one redundant system call.
pub(crate) fn rescue_starved(limit: Duration) {
    if IDLE_COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut threads = idle_threads();
    threads.retain(|(thread, since, saved)| {
        if since.elapsed() < limit {
            return true;
        }
        if let Err(e) = os::put_back(*thread, saved) {
            // Gone already (a thread restores itself before it ends).
            tracing::debug!("restoring thread {thread}: {e}");
        }
        false
    });
    IDLE_COUNT.store(threads.len(), Ordering::Release);
}

/// The policy the calling thread's guest code runs under now.
#[cfg(test)]
pub(crate) fn current() -> LongCalls {
    SET_APART
        .get()
        .map_or(LongCalls::Normal, |(policy, _)| policy)
}

/// `future`, with the thread restored whenever it stops running guest code
/// to wait: the thread then runs other tasks, which must not be set apart.
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
    use super::LongCalls;

    /// The time slice asked for a long call: the most Linux grants.
    const LONG_SLICE_NS: u64 = 100_000_000;
    /// `sched_attr.sched_flags`' bit that `sched_getattr` may report and
    /// `sched_setattr` must be given back to keep.
    const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

    /// The kernel's `struct sched_attr` (linux/sched/types.h, version 1);
    /// libc does not bind it.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }

    /// The calling thread's kernel id.
    pub(super) fn thread_id() -> i32 {
        // SAFETY: gettid takes no arguments and cannot fail.
        #[allow(unsafe_code)]
        unsafe {
            libc::gettid()
        }
    }

    /// Thread `thread`'s (0: the calling one) scheduling attributes.
    fn read(thread: i32) -> std::io::Result<SchedAttr> {
        let mut attr = SchedAttr::default();
        let size = std::mem::size_of::<SchedAttr>() as u32;
        // SAFETY: `attr` is a valid, writable sched_attr of `size` bytes
        // that outlives the call; `thread` is a thread id or 0.
        #[allow(unsafe_code)]
        let read =
            unsafe { libc::syscall(libc::SYS_sched_getattr, thread, &raw mut attr, size, 0) };
        match read {
            0 => Ok(attr),
            _ => Err(std::io::Error::last_os_error()),
        }
    }

    /// What a thread's scheduling was before it was set apart.
    pub(super) type Saved = SchedAttr;

    /// Put thread `thread` (0: the calling one) under `policy`, keeping
    /// its nice value, and return what to put back; `None`, changing
    /// nothing, when the thread is not under `SCHED_OTHER` or
    /// `SCHED_BATCH`. A long slice keeps the thread's policy.
    pub(super) fn set_apart(thread: i32, policy: LongCalls) -> std::io::Result<Option<Saved>> {
        let saved = read(thread)?;
        let fair = [libc::SCHED_OTHER as u32, libc::SCHED_BATCH as u32];
        if !fair.contains(&saved.policy) {
            return Ok(None);
        }
        let mut attr = saved;
        (attr.policy, attr.runtime) = match policy {
            LongCalls::Normal => return Ok(None),
            LongCalls::LongSlice => (saved.policy, LONG_SLICE_NS),
            LongCalls::Idle => (libc::SCHED_IDLE as u32, 0),
        };
        write(thread, &attr)?;
        Ok(Some(saved))
    }

    /// Give thread `thread` (0: the calling one) back its policy, nice
    /// value and flags, with the default slice: `sched_getattr` reports
    /// the slice in force, default or not, and writing that value back
    /// would pin it as a custom one.
    pub(super) fn put_back(thread: i32, saved: &Saved) -> std::io::Result<()> {
        write(
            thread,
            &SchedAttr {
                runtime: 0,
                ..*saved
            },
        )
    }

    fn write(thread: i32, attr: &SchedAttr) -> std::io::Result<()> {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            // Only reset-on-fork is a setting; the other bits `read` may
            // report are not accepted back.
            flags: attr.flags & SCHED_FLAG_RESET_ON_FORK,
            ..*attr
        };
        // SAFETY: `attr` is a valid, initialised sched_attr that outlives
        // the call, and the kernel only reads it; `thread` is a thread id
        // or 0.
        #[allow(unsafe_code)]
        let written = unsafe { libc::syscall(libc::SYS_sched_setattr, thread, &raw const attr, 0) };
        if written != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the calling thread runs with a long slice: kernels before
    /// 6.12 accept a slice for `SCHED_OTHER` and ignore it.
    pub(super) fn long_slice_kept() -> bool {
        read(0).is_ok_and(|attr| attr.runtime == LONG_SLICE_NS)
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    use super::LongCalls;

    pub(super) fn thread_id() -> i32 {
        0
    }

    #[derive(Debug, Clone, Copy)]
    pub(super) struct Saved;

    pub(super) fn set_apart(_thread: i32, _policy: LongCalls) -> std::io::Result<Option<Saved>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    pub(super) fn put_back(_thread: i32, _saved: &Saved) -> std::io::Result<()> {
        Ok(())
    }

    pub(super) fn long_slice_kept() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's policy, time slice (not shown for
    /// `SCHED_IDLE`) and priority (120 plus its nice value), from
    /// /proc/thread-self/sched.
    #[cfg(target_os = "linux")]
    fn scheduling() -> (i32, Option<u64>, u64) {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap();
        let field = |name: &str| {
            sched.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().parse::<u64>().ok())?
            })
        };
        (
            field("policy").unwrap() as i32,
            field("se.slice"),
            field("prio").unwrap(),
        )
    }

    /// Put the calling thread under `policy` at `nice`, as an operator
    /// could with `chrt` and `renice`; false where this process may not.
    #[cfg(target_os = "linux")]
    fn run_as(policy: i32, priority: i32, nice: i32) -> bool {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: plain values and a valid sched_param that outlives the
        // call; both change only the calling thread.
        #[allow(unsafe_code)]
        unsafe {
            libc::sched_setscheduler(0, policy, &param) == 0
                && libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) == 0
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_set_apart_gets_its_own_setting_back_on_restore() {
        let settings = [(libc::SCHED_OTHER, 0), (libc::SCHED_BATCH, 5)];
        for (policy, nice) in settings {
            for long_calls in [LongCalls::LongSlice, LongCalls::Idle] {
                std::thread::spawn(move || {
                    assert!(run_as(policy, 0, nice));
                    let own = scheduling();
                    assert_eq!((own.0, own.2), (policy, 120 + nice as u64));
                    let effective = long_calls.effective();
                    set_apart(effective);
                    assert_eq!(current(), effective);
                    let apart = scheduling();
                    match effective {
                        LongCalls::Normal => assert_eq!(apart, own),
                        // The slice is the only change.
                        LongCalls::LongSlice => {
                            assert_eq!(apart, (policy, Some(100_000_000), own.2));
                        }
                        LongCalls::Idle => assert_eq!(apart.0, libc::SCHED_IDLE),
                    }
                    restore();
                    assert_eq!(current(), LongCalls::Normal);
                    assert_eq!(scheduling(), own, "{long_calls:?} from {policy}");
                })
                .join()
                .unwrap();
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_outside_the_normal_classes_is_left_alone() {
        // Real-time needs a privilege this process may not have.
        let settings = [(libc::SCHED_IDLE, 0), (libc::SCHED_FIFO, 1)];
        for (policy, priority) in settings {
            for long_calls in [LongCalls::LongSlice, LongCalls::Idle] {
                std::thread::spawn(move || {
                    if !run_as(policy, priority, 0) {
                        return;
                    }
                    let own = scheduling();
                    set_apart(long_calls.effective());
                    assert_eq!(current(), LongCalls::Normal);
                    assert_eq!(scheduling(), own, "{long_calls:?} from {policy}");
                    restore();
                    assert_eq!(scheduling(), own);
                })
                .join()
                .unwrap();
            }
        }
    }

    #[test]
    fn a_policy_falls_back_to_the_strongest_one_allowed() {
        use LongCalls::*;
        let everything = |_| true;
        let no_idle = |p| p != Idle;
        let nothing = |p| p == Normal;
        for (asked, allowed, expected) in [
            (Idle, &everything as &dyn Fn(LongCalls) -> bool, Idle),
            (Idle, &no_idle, LongSlice),
            (Idle, &nothing, Normal),
            (LongSlice, &everything, LongSlice),
            (LongSlice, &nothing, Normal),
            (Normal, &everything, Normal),
        ] {
            assert_eq!(asked.falling_back(allowed), expected, "{asked:?}");
        }
    }

    /// Run `probe` on a new thread without root's privileges: only that
    /// thread's ids change (the raw system call, unlike libc's wrapper,
    /// is per thread), so the rest of the test process keeps them.
    #[cfg(target_os = "linux")]
    fn unprivileged<T: Send + 'static>(probe: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // SAFETY: geteuid cannot fail; setresuid is given plain ids and
            // changes only the calling thread, which ends after `probe`.
            #[allow(unsafe_code)]
            unsafe {
                if libc::geteuid() == 0 {
                    let nobody = 65534;
                    let dropped = libc::syscall(libc::SYS_setresuid, nobody, nobody, nobody);
                    assert_eq!(dropped, 0, "{}", std::io::Error::last_os_error());
                }
            }
            probe()
        })
        .join()
        .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn without_privilege_idle_falls_back_to_the_long_slice() {
        // Leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE that
        // covers the thread's nice value (sched(7)).
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit the call writes; getpriority
        // reads the calling process's nice value.
        #[allow(unsafe_code)]
        let (read, nice) = unsafe {
            (
                libc::getrlimit(libc::RLIMIT_NICE, &mut limit),
                libc::getpriority(libc::PRIO_PROCESS, 0),
            )
        };
        assert_eq!(read, 0);
        let may_come_back = limit.rlim_cur >= (20 - nice) as libc::rlim_t;

        assert_eq!(unprivileged(|| try_policy(LongCalls::Idle)), may_come_back);
        // The long slice needs no privilege: an unprivileged thread gets
        // what a privileged one got.
        let slice = unprivileged(|| try_policy(LongCalls::LongSlice));
        assert_eq!(slice, probe(LongCalls::LongSlice));
    }

    #[test]
    fn a_policy_falls_back_to_what_the_process_may_do() {
        assert_eq!(LongCalls::Normal.effective(), LongCalls::Normal);
        let slice = LongCalls::LongSlice.effective();
        assert!(matches!(slice, LongCalls::LongSlice | LongCalls::Normal));
        // Idle falls back to the long slice, where that works.
        let idle = LongCalls::Idle.effective();
        assert!(idle == LongCalls::Idle || idle == slice, "{idle:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_starved_at_idle_priority_is_restored_by_another() {
        if LongCalls::Idle.effective() != LongCalls::Idle {
            return;
        }
        let (apart_tx, apart_rx) = std::sync::mpsc::channel();
        let (rescued_tx, rescued_rx) = std::sync::mpsc::channel::<()>();
        let starving = std::thread::spawn(move || {
            set_apart(LongCalls::Idle);
            apart_tx.send(os::thread_id()).unwrap();
            rescued_rx.recv().unwrap();
            let policy = scheduling().0;
            // Still thinks it is set apart: restoring again is harmless.
            restore();
            policy
        });
        let thread = apart_rx.recv().unwrap();
        let listed = || idle_threads().iter().any(|(t, _, _)| *t == thread);
        rescue_starved(Duration::from_secs(3600));
        assert!(listed(), "set apart only just now");
        rescue_starved(Duration::ZERO);
        assert!(!listed());
        rescued_tx.send(()).unwrap();
        assert_eq!(starving.join().unwrap(), libc::SCHED_OTHER);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiting_future_gives_its_thread_back() {
        let policy = LongCalls::LongSlice.effective();
        if policy == LongCalls::Normal {
            return;
        }
        restoring(async {
            set_apart(policy);
            tokio::task::yield_now().await;
            // Polled again after waiting: set apart only if set apart again.
            assert_eq!(current(), LongCalls::Normal);
            set_apart(policy);
        })
        .await;
        // Ready while set apart: the caller restores (as `finish` does).
        assert_eq!(current(), policy);
        restore();
        assert_eq!(current(), LongCalls::Normal);
    }
}
