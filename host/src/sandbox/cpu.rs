//! Fair shares of the host's CPU between plugins.
//!
//! Guest code runs on the async runtime's worker threads, beside the tasks
//! that pull, commit and ack. Left alone, sixteen calls of one plugin that
//! spin until their deadline take those threads in turn, and another
//! plugin's events (and the host's own I/O) wait behind every one of them.
//!
//! So guest code runs only while its call holds a *turn*:
//!
//! - At most `slots` turns are out at once (`runtime.max-running-guest-calls`,
//!   the number of cores by default).
//! - A freed turn goes to the waiting plugin whose turns have used the
//!   least guest CPU time (as Linux's fair scheduler picks the task with
//!   the least virtual runtime); within a plugin, to its oldest waiter. A
//!   plugin's share does not grow with the number of calls it has waiting,
//!   and a plugin whose calls take microseconds is served ahead of one
//!   whose calls spin.
//! - A call holds its turn while its guest code runs. It gives the turn
//!   back when it ends, whenever it waits for the host (a state read, a
//!   WASI poll such as a sleep), at every epoch
//!   tick at which a call of another plugin is waiting, and after
//!   [`SLICE`] when only its own plugin's calls wait.
//! - A call granted a turn after waiting first yields to the runtime once,
//!   so the tasks that became ready while it waited (acks, pulls) run
//!   before it takes the thread.
//! - A call still computing at its second epoch tick is *long*, and goes
//!   on only while it also holds one of `long_slots` permits
//!   (`runtime.max-running-long-calls`, one fewer than `slots` by
//!   default). So on a machine whose cores could all be running guests
//!   that compute for long, one stays free for what every other plugin's
//!   events need besides guest code: nats-server storing a commit, the
//!   host's socket reads, the committer. A long call gives its permit up
//!   with its turn, and after a [`SLICE`] when another long call waits for
//!   one; it takes a turn back only once it holds a permit again.
//!
//! When nobody waits, taking and giving back a turn is one uncontended
//! lock each, and a running guest is never interrupted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::long_calls::LongCalls;

/// How long a call keeps its turn while only calls of its own plugin wait.
/// Passing a turn costs a switch between instances (and their caches), so
/// a plugin's own calls take turns at this coarser slice; one event that
/// spins until its deadline still cannot stall its plugin's other events.
pub(crate) const SLICE: Duration = Duration::from_millis(10);
const SLICE_NS: u64 = SLICE.as_nanos() as u64;

/// The host's guest-CPU turns, shared by every plugin.
#[derive(Debug)]
pub struct CpuShare {
    /// Turns, all told.
    slots: usize,
    /// Origin of the nanosecond clock turns are timed with.
    origin: Instant,
    /// Calls waiting for a turn, readable without the lock by the epoch
    /// callback of every running call.
    waiting: AtomicUsize,
    turns: Mutex<Turns>,
    /// How long calls run their guest code ([`super::long_calls`]).
    long_calls: LongCalls,
    /// Permits for long calls, or none when they may take every turn.
    long_permits: Option<Arc<tokio::sync::Semaphore>>,
    /// Long calls waiting for a permit.
    long_waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Turns {
    free: usize,
    next_ticket: u64,
    /// Plugins holding or waiting for a turn; an idle plugin is forgotten.
    plugins: HashMap<Arc<str>, PluginTurns>,
}

#[derive(Debug, Default)]
struct PluginTurns {
    held: usize,
    /// Guest CPU its turns have taken, in nanoseconds (relative: see
    /// [`Turns::plugin`]).
    used: u64,
    waiting: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    grant: oneshot::Sender<()>,
}

impl Turns {
    /// `plugin`'s entry. A plugin becoming busy starts level with the busy
    /// plugin that has used least: it is neither owed for an idle spell
    /// nor made to repay the others'.
    fn plugin(&mut self, plugin: &Arc<str>) -> &mut PluginTurns {
        // Only a plugin not yet busy needs the level; every call asks.
        let level = if self.plugins.contains_key(plugin) {
            0
        } else {
            self.plugins.values().map(|p| p.used).min().unwrap_or(0)
        };
        self.plugins
            .entry(plugin.clone())
            .or_insert_with(|| PluginTurns {
                used: level,
                ..PluginTurns::default()
            })
    }
}

impl Turns {
    fn forget_idle(&mut self) {
        self.plugins
            .retain(|_, p| p.held > 0 || !p.waiting.is_empty());
    }
}

impl CpuShare {
    /// `slots` guest calls may run at once, at least one, and of them
    /// `long_slots` calls that compute for long, at least one. Long calls
    /// run their guest code under `long_calls`, or what this process can
    /// do of it ([`super::long_calls`]).
    pub fn new(slots: usize, long_slots: usize, long_calls: LongCalls) -> Arc<Self> {
        let slots = slots.max(1);
        let long_slots = long_slots.max(1);
        Arc::new(CpuShare {
            slots,
            origin: Instant::now(),
            waiting: AtomicUsize::new(0),
            turns: Mutex::new(Turns {
                free: slots,
                ..Turns::default()
            }),
            long_calls: long_calls.effective(),
            long_permits: (long_slots < slots)
                .then(|| Arc::new(tokio::sync::Semaphore::new(long_slots))),
            long_waiting: AtomicUsize::new(0),
        })
    }

    /// How long calls run their guest code.
    pub fn long_calls(&self) -> LongCalls {
        self.long_calls
    }

    /// How many guest calls may run at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The default number of turns: one per core.
    pub fn default_slots() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Whether some call is waiting for a turn.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Wait for a turn for a call of `plugin`.
    pub async fn turn(self: &Arc<Self>, plugin: &Arc<str>) -> Turn {
        let inner = Arc::new(TurnInner {
            share: self.clone(),
            plugin: plugin.clone(),
            held: AtomicBool::new(false),
            ticking: AtomicBool::new(false),
            since: AtomicU64::new(0),
            long: Mutex::new(None),
            proven_long: AtomicBool::new(false),
        });
        inner.take().await;
        Turn(inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Turns> {
        // Every update under this lock leaves the counts consistent, so a
        // lock poisoned by a panic elsewhere is still usable.
        self.turns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call of a plugin other than `plugin` waits for a turn.
    fn wanted_by_others(&self, plugin: &Arc<str>) -> bool {
        self.lock()
            .plugins
            .iter()
            .any(|(name, p)| name != plugin && !p.waiting.is_empty())
    }

    /// Take a free turn for `plugin`, or queue for one.
    fn take_or_queue(&self, plugin: &Arc<str>) -> Result<(), Queued<'_>> {
        let mut turns = self.lock();
        if turns.free > 0 {
            turns.free -= 1;
            turns.plugin(plugin).held += 1;
            return Ok(());
        }
        let ticket = turns.next_ticket;
        turns.next_ticket += 1;
        let (grant, granted) = oneshot::channel();
        turns
            .plugin(plugin)
            .waiting
            .push_back(Waiter { ticket, grant });
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Err(Queued {
            share: self,
            plugin: plugin.clone(),
            ticket,
            granted: Some(granted),
        })
    }

    /// Give back a turn of `plugin`'s that ran guest code for `used` ns.
    fn give_back(&self, plugin: &Arc<str>, used: u64) {
        self.return_turn(&mut self.lock(), plugin, used);
    }

    /// A turn of `plugin`'s that ran guest code for `used` ns is free:
    /// count it, pass it on, and forget plugins gone idle.
    fn return_turn(&self, turns: &mut Turns, plugin: &Arc<str>, used: u64) {
        if let Some(p) = turns.plugins.get_mut(plugin) {
            p.held -= 1;
            p.used = p.used.saturating_add(used);
        }
        turns.free += 1;
        self.hand_on(turns);
        turns.forget_idle();
    }

    /// Grant free turns to waiters: each to the waiting plugin that has
    /// used the least guest CPU (then the one holding fewer turns, then the
    /// oldest waiter).
    fn hand_on(&self, turns: &mut Turns) {
        while turns.free > 0 {
            let next = turns
                .plugins
                .values_mut()
                .filter_map(|p| {
                    let key = (p.used, p.held, p.waiting.front()?.ticket);
                    Some((key, p))
                })
                .min_by_key(|(key, _)| *key)
                .map(|(_, p)| p);
            let Some((plugin, waiter)) = next.and_then(|p| p.waiting.pop_front().map(|w| (p, w)))
            else {
                return;
            };
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            // A waiter that went away before its grant cannot take it.
            if waiter.grant.send(()).is_ok() {
                plugin.held += 1;
                turns.free -= 1;
            }
        }
    }
}

/// One call's claim on the guest CPU, given back when dropped.
#[derive(Debug)]
pub struct Turn(Arc<TurnInner>);

impl Turn {
    /// What the call's store keeps to give the turn up and take it back
    /// while the call runs.
    pub fn handle(&self) -> TurnHandle {
        TurnHandle(self.0.clone())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.give_up();
    }
}

/// Gives up and retakes a running call's turn; see [`Turn::handle`].
#[derive(Debug, Clone)]
pub struct TurnHandle(Arc<TurnInner>);

impl TurnHandle {
    /// At an epoch tick: whether this call should pass its turn on,
    /// because a call of another plugin waits, or a call of its own
    /// plugin waits and this one has held the turn for a whole [`SLICE`].
    pub fn wanted(&self) -> bool {
        let inner = &self.0;
        let share = &inner.share;
        if !share.contended() {
            return false;
        }
        inner.held_for() >= SLICE_NS || share.wanted_by_others(&inner.plugin)
    }

    /// How this call's guest code runs once it proves long (see
    /// [`super::long_calls`]).
    pub fn long_calls(&self) -> LongCalls {
        self.0.share.long_calls
    }

    /// What a call stopped at an epoch tick waits for before its guest
    /// goes on. `long` says it was still computing at its second tick.
    ///
    /// - A call passes its turn on when [`Self::wanted`].
    /// - A long call also needs a long-call permit, while permits are
    ///   fewer than turns. It passes the permit on with its turn, and
    ///   after a [`SLICE`] when another long call waits for one, and it
    ///   takes a turn back only once it holds a permit again (after a
    ///   tick, and after a wait for the host). Retaking the turn first
    ///   would let a long call that passed compute without a permit until
    ///   its next tick whenever a turn comes free, on the core the
    ///   permits keep from long calls.
    /// - Otherwise it yields anyway, so the host's own tasks queued on
    ///   this thread (acks, pulls) are not held up behind a guest that
    ///   never calls the host. Tokio's `yield_now` goes to the back of
    ///   the queue; the plain `Yield` wakes the task at once, and tokio
    ///   may poll it again before anything else.
    pub fn after_tick(&self, long: bool) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        if long {
            self.0.proven_long.store(true, Ordering::Release);
        }
        let go_on = match self.0.share.long_permits.as_ref().filter(|_| long) {
            Some(permits) => self.long_goes_on(permits),
            None => !self.wanted(),
        };
        if go_on {
            Box::pin(tokio::task::yield_now())
        } else {
            self.pass()
        }
    }

    /// Whether a long call may go on at once: it holds a permit, or takes
    /// a free one, and neither its turn nor its permit is wanted.
    fn long_goes_on(&self, permits: &Arc<tokio::sync::Semaphore>) -> bool {
        let mut held = self.0.long_permit();
        if held.is_none()
            && let Ok(permit) = permits.clone().try_acquire_owned()
        {
            *held = Some(permit);
        }
        held.is_some() && !self.wanted() && !self.permit_wanted()
    }

    /// Whether this call has held its turn for a whole [`SLICE`] while
    /// another long call waits for a permit.
    fn permit_wanted(&self) -> bool {
        self.0.share.long_waiting.load(Ordering::Acquire) > 0 && self.0.held_for() >= SLICE_NS
    }

    /// `wait`, the future an epoch tick makes the guest await: the call
    /// stops there for the tick's own sake, and keeps or passes its turn
    /// as `wait` decides (see [`Self::computing`]).
    pub fn at_tick(
        &self,
        wait: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let inner = self.0.clone();
        inner.ticking.store(true, Ordering::Release);
        Box::pin(async move {
            wait.await;
            inner.ticking.store(false, Ordering::Release);
        })
    }

    /// Run the guest call `call`. Whenever it stops to wait for the host
    /// (a state read from the server, a WASI poll: a sleep, a timer) while
    /// holding its turn, other than at its own epoch tick, the turn is
    /// given up: a guest that waits is not computing, and a turn held
    /// through a 50 ms sleep is a core's worth of guest CPU no other call
    /// may use. A host call that is ready at once (a read served from
    /// memory) never stops the call, so it keeps the turn. The turn is
    /// taken back before the guest goes on, by a long call only once it
    /// holds a long-call permit again. `waiting` is called as the wait begins,
    /// and what it returns is dropped once the call is woken.
    pub async fn computing<F: Future, G>(&self, call: F, waiting: impl Fn() -> G) -> F::Output {
        let inner = &self.0;
        let mut call = std::pin::pin!(call);
        let mut retaking: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        let mut waited: Option<G> = None;
        std::future::poll_fn(|cx| {
            // Woken: no longer waiting, though maybe queued for the CPU.
            waited = None;
            if let Some(take) = &mut retaking {
                std::task::ready!(take.as_mut().poll(cx));
                retaking = None;
            }
            let poll = call.as_mut().poll(cx);
            // A call waiting without its turn (passing it at a tick, or
            // waiting for a long-call permit) takes it back itself.
            if poll.is_pending()
                && !inner.ticking.load(Ordering::Acquire)
                && inner.held.load(Ordering::Acquire)
            {
                inner.give_up();
                waited = Some(waiting());
                let inner = inner.clone();
                retaking = Some(Box::pin(async move { inner.take_back().await }));
            }
            poll
        })
        .await
    }

    /// Give the turn (and permit) up and wait to take it back.
    fn pass(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let inner = self.0.clone();
        Box::pin(async move {
            inner.give_up();
            inner.take_back().await;
        })
    }
}

#[derive(Debug)]
struct TurnInner {
    share: Arc<CpuShare>,
    plugin: Arc<str>,
    /// Whether this call holds a turn now; the call is suspended while it
    /// waits, so only one of its futures ever touches these at a time.
    held: AtomicBool,
    /// Whether the call is stopped at an epoch tick, whose own future
    /// decides what becomes of the turn.
    ticking: AtomicBool,
    /// When the turn held now was taken, on the share's clock.
    since: AtomicU64,
    /// The long-call permit held with the turn, if any.
    long: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// Whether the call has proven long: it needs a permit to go on.
    proven_long: AtomicBool,
}

impl TurnInner {
    async fn take(&self) {
        debug_assert!(!self.held.load(Ordering::Acquire));
        let queued = self.share.take_or_queue(&self.plugin);
        let waited = queued.is_err();
        if let Err(mut queued) = queued {
            queued.granted().await;
        }
        self.held.store(true, Ordering::Release);
        if waited {
            tokio::task::yield_now().await;
        }
        self.since.store(self.share.now(), Ordering::Release);
    }

    /// How long the turn held now has been held, in nanoseconds.
    fn held_for(&self) -> u64 {
        self.share
            .now()
            .saturating_sub(self.since.load(Ordering::Acquire))
    }

    /// Take the turn back after giving it up; a call proven long first
    /// waits for a long-call permit (see [`TurnHandle::after_tick`]).
    async fn take_back(&self) {
        if self.proven_long.load(Ordering::Acquire)
            && let Some(permits) = &self.share.long_permits
        {
            let waiting = LongWaiter::new(&self.share);
            // Never closed: the share owns it.
            if let Ok(permit) = permits.clone().acquire_owned().await {
                *self.long_permit() = Some(permit);
            }
            drop(waiting);
        }
        self.take().await;
    }

    fn long_permit(&self) -> MutexGuard<'_, Option<tokio::sync::OwnedSemaphorePermit>> {
        // Only ever replaced whole, so a poisoned lock holds a valid value.
        self.long.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn give_up(&self) {
        // The permit goes with the turn: a long call waiting for its turn
        // back must not keep another from running.
        self.long_permit().take();
        if self.held.swap(false, Ordering::AcqRel) {
            self.share.give_back(&self.plugin, self.held_for());
        }
    }
}

/// A long call counted in [`CpuShare::long_waiting`] while it exists.
struct LongWaiter(Arc<CpuShare>);

impl LongWaiter {
    fn new(share: &Arc<CpuShare>) -> Self {
        share.long_waiting.fetch_add(1, Ordering::AcqRel);
        LongWaiter(share.clone())
    }
}

impl Drop for LongWaiter {
    fn drop(&mut self) {
        self.0.long_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in the queue; leaving it (a call cancelled while waiting)
/// passes on a turn granted but never used.
struct Queued<'a> {
    share: &'a CpuShare,
    plugin: Arc<str>,
    ticket: u64,
    granted: Option<oneshot::Receiver<()>>,
}

impl Queued<'_> {
    async fn granted(&mut self) {
        if let Some(granted) = &mut self.granted {
            // The sender lives in the queue until it is used, and the
            // share outlives every queued call.
            let _ = granted.await;
        }
        self.granted = None;
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(mut granted) = self.granted.take() else {
            return;
        };
        let mut turns = self.share.lock();
        if let Some(p) = turns.plugins.get_mut(&self.plugin)
            && let Some(i) = p.waiting.iter().position(|w| w.ticket == self.ticket)
        {
            p.waiting.remove(i);
            self.share.waiting.fetch_sub(1, Ordering::AcqRel);
            turns.forget_idle();
            return;
        }
        // Not in the queue, so it was granted under this lock's watch, and
        // the turn is this waiter's to pass on.
        if granted.try_recv().is_ok() {
            self.share.return_turn(&mut turns, &self.plugin, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{CpuShare, LongCalls};
    use crate::test_support::until;

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// A call of `plugin` waiting for a turn in a task of its own.
    fn queue(share: &Arc<CpuShare>, plugin: &Arc<str>) -> tokio::task::JoinHandle<super::Turn> {
        let (share, plugin) = (share.clone(), plugin.clone());
        tokio::spawn(async move { share.turn(&plugin).await })
    }

    #[tokio::test]
    async fn a_freed_turn_goes_to_the_plugin_that_used_least() {
        let share = CpuShare::new(2, 2, LongCalls::Normal);
        let (spin, fraud) = (name("spin"), name("fraud"));
        let a = share.turn(&spin).await;
        let b = share.turn(&spin).await;
        // Sixteen more spinning calls queue first, then one fraud call.
        let mut spinners = Vec::new();
        for _ in 0..16 {
            spinners.push(queue(&share, &spin));
        }
        let fraud_call = queue(&share, &fraud);
        until("all seventeen queue", || {
            share.waiting.load(std::sync::atomic::Ordering::Acquire) >= 17
        })
        .await;
        assert!(share.contended());
        drop(a);
        // The first freed turn goes to fraud, which has used none, even
        // though sixteen spinning calls asked before it.
        let fraud_turn = fraud_call.await.unwrap();
        assert_eq!(share.lock().plugins[&fraud].held, 1);
        assert_eq!(share.lock().plugins[&spin].held, 1);
        drop(fraud_turn);
        drop(b);
        let mut turns = Vec::new();
        for s in spinners {
            let t = s.await.unwrap();
            turns.push(t);
            if turns.len() == 2 {
                // Two running; the rest wait for these.
                turns.clear();
            }
        }
        drop(turns);
        assert!(!share.contended());
        assert_eq!(share.lock().free, 2);
        assert!(share.lock().plugins.is_empty());
    }

    #[tokio::test]
    async fn one_turn_alternates_between_plugins() {
        let share = CpuShare::new(1, 1, LongCalls::Normal);
        let (spin, fraud) = (name("spin"), name("fraud"));
        let running = share.turn(&spin).await;
        let mut spinners = Vec::new();
        for _ in 0..4 {
            spinners.push(queue(&share, &spin));
        }
        let fraud_call = queue(&share, &fraud);
        until("all five queue", || {
            share.waiting.load(std::sync::atomic::Ordering::Acquire) >= 5
        })
        .await;
        // The running spinner passes its turn at a tick: fraud, which has
        // used no CPU, goes before the spinners that queued first.
        let handle = running.handle();
        let pass = tokio::spawn(handle.pass());
        let fraud_turn = fraud_call.await.unwrap();
        assert_eq!(share.lock().plugins[&fraud].held, 1);
        drop(fraud_turn);
        for s in spinners {
            drop(s.await.unwrap());
        }
        pass.await.unwrap();
        drop(running);
        assert_eq!(share.lock().free, 1);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_loses_no_turn() {
        let share = CpuShare::new(1, 1, LongCalls::Normal);
        let p = name("p");
        let held = share.turn(&p).await;
        let waiter = queue(&share, &p);
        until("the waiter queues", || share.contended()).await;
        waiter.abort();
        let _ = waiter.await;
        assert!(!share.contended());
        drop(held);
        // The only turn is free again, so this does not wait.
        let again = share.turn(&p).await;
        drop(again);
        assert_eq!(share.lock().free, 1);
    }

    #[tokio::test]
    async fn passing_hands_the_turn_to_a_waiting_plugin() {
        let share = CpuShare::new(1, 1, LongCalls::Normal);
        let (spin, other) = (name("spin"), name("other"));
        let spinning = share.turn(&spin).await;
        let handle = spinning.handle();
        let other_call = queue(&share, &other);
        until("the turn is wanted", || handle.wanted()).await;
        let pass = tokio::spawn(handle.pass());
        let other_turn = other_call.await.unwrap();
        assert!(!pass.is_finished());
        drop(other_turn);
        pass.await.unwrap();
        assert_eq!(share.lock().plugins[&spin].held, 1);
        drop(spinning);
        assert_eq!(share.lock().free, 1);
    }

    /// Whether `turn`'s call, stopped at a tick as a long call, goes on.
    fn long_goes_on(share: &Arc<CpuShare>, turn: &super::Turn) -> bool {
        turn.0
            .proven_long
            .store(true, std::sync::atomic::Ordering::Release);
        turn.handle()
            .long_goes_on(share.long_permits.as_ref().expect("permits"))
    }

    /// `turn`'s call at a tick as a long call that does not go on: what it
    /// waits for, in a task of its own.
    fn pass_long(share: &Arc<CpuShare>, turn: &super::Turn) -> tokio::task::JoinHandle<()> {
        assert!(!long_goes_on(share, turn));
        tokio::spawn(turn.handle().after_tick(true))
    }

    /// A host of two turns and one long-call permit, with a long call of
    /// plugin `a` holding the permit and one of `b` waiting for it, its
    /// turn given up.
    async fn long_call_waiting_for_the_permit() -> (
        Arc<CpuShare>,
        super::Turn,
        super::Turn,
        tokio::task::JoinHandle<()>,
    ) {
        let share = CpuShare::new(2, 1, LongCalls::Normal);
        let long_a = share.turn(&name("a")).await;
        let long_b = share.turn(&name("b")).await;
        assert!(long_goes_on(&share, &long_a));
        let b_waits = pass_long(&share, &long_b);
        until("b waits for the permit", || {
            share
                .long_waiting
                .load(std::sync::atomic::Ordering::Acquire)
                == 1
        })
        .await;
        (share, long_a, long_b, b_waits)
    }

    #[tokio::test]
    async fn long_calls_leave_a_turn_for_everything_else() {
        let share = CpuShare::new(2, 1, LongCalls::Normal);
        let (spin, fraud) = (name("spin"), name("fraud"));
        let first = share.turn(&spin).await;
        let second = share.turn(&spin).await;
        // The first long call takes the only long-call permit and goes on.
        assert!(long_goes_on(&share, &first));
        assert!(long_goes_on(&share, &first), "held until given up");
        // The second must wait, and gives its turn up while it does.
        let waiting = pass_long(&share, &second);
        until("b gives its turn up", || share.lock().free == 1).await;
        // So a short call of another plugin runs at once.
        let fraud_turn = share.turn(&fraud).await;
        assert!(!waiting.is_finished());
        // Another waits: passing the turn passes the permit, and the long
        // call waiting takes it, then a turn.
        let other = queue(&share, &fraud);
        until("another call queues", || share.contended()).await;
        let pass = pass_long(&share, &first);
        drop(other.await.unwrap());
        drop(fraud_turn);
        waiting.await.unwrap();
        assert!(long_goes_on(&share, &second));
        drop(second);
        pass.await.unwrap();
        drop(first);
        assert_eq!(share.lock().free, 2);
        assert_eq!(share.long_permits.as_ref().unwrap().available_permits(), 1);
    }

    #[tokio::test]
    async fn a_long_call_that_passed_its_turn_runs_again_only_with_a_permit() {
        let (share, long_a, long_b, b_waits) = long_call_waiting_for_the_permit().await;
        let (c, fraud) = (name("c"), name("fraud"));
        // A new call of a third plugin takes the free turn, and a short
        // call queues behind it.
        let new_c = share.turn(&c).await;
        let fraud_call = queue(&share, &fraud);
        until("fraud queues", || share.contended()).await;
        // The long call holding the permit passes both at its tick.
        let a_waits = pass_long(&share, &long_a);
        drop(fraud_call.await.unwrap());
        // The freed turn goes to the long call now holding the permit.
        b_waits.await.unwrap();
        // A turn comes free, but the long call that passed has no permit,
        // so it does not run on it.
        drop(new_c);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!a_waits.is_finished(), "a long call ran without a permit");
        assert_eq!(share.lock().free, 1);
        drop(long_b);
        a_waits.await.unwrap();
        assert!(long_goes_on(&share, &long_a));
        drop(long_a);
        assert_eq!(share.lock().free, 2);
    }

    #[tokio::test]
    async fn a_long_call_hands_its_permit_on_after_a_slice() {
        let (share, long_a, long_b, b_waits) = long_call_waiting_for_the_permit().await;
        // Within its slice the permit's holder goes on; nobody waits for a turn.
        assert!(long_goes_on(&share, &long_a));
        // A slice later it hands the permit to the long call waiting.
        long_a
            .0
            .since
            .store(0, std::sync::atomic::Ordering::Release);
        until("a slice passes", || share.now() >= super::SLICE_NS).await;
        let a_waits = pass_long(&share, &long_a);
        b_waits.await.unwrap();
        assert!(!a_waits.is_finished());
        drop(long_b);
        a_waits.await.unwrap();
        drop(long_a);
        assert_eq!(share.lock().free, 2);
        assert_eq!(share.long_permits.as_ref().unwrap().available_permits(), 1);
    }

    #[tokio::test]
    async fn a_long_call_back_from_the_host_waits_for_a_permit() {
        let (share, long_a, long_b, b_waits) = long_call_waiting_for_the_permit().await;
        // The permit's holder waits for the host: turn and permit go to b.
        let (wake, woken) = tokio::sync::oneshot::channel::<()>();
        let handle = long_a.handle();
        let a_call = tokio::spawn(async move { handle.computing(woken, || ()).await });
        b_waits.await.unwrap();
        wake.send(()).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // A turn is free, but not a permit.
        assert_eq!(share.lock().free, 1);
        assert!(!a_call.is_finished(), "a long call ran without a permit");
        drop(long_b);
        a_call.await.unwrap().unwrap();
        assert!(long_goes_on(&share, &long_a));
        drop(long_a);
        assert_eq!(share.lock().free, 2);
    }

    #[tokio::test]
    async fn long_calls_may_take_every_turn_when_asked() {
        let share = CpuShare::new(2, 2, LongCalls::Normal);
        let p = name("p");
        let (a, b) = (share.turn(&p).await, share.turn(&p).await);
        assert!(share.long_permits.is_none());
        // With nobody waiting, both go on at their ticks.
        assert!(!a.handle().wanted() && !b.handle().wanted());
    }

    #[tokio::test]
    async fn a_call_waiting_for_the_host_gives_its_turn_up() {
        let share = CpuShare::new(1, 1, LongCalls::Normal);
        let (sleepy, other) = (name("sleepy"), name("other"));
        let turn = share.turn(&sleepy).await;
        let (wake, woken) = tokio::sync::oneshot::channel::<()>();
        let handle = turn.handle();
        // A guest asleep in a WASI poll: pending until the host wakes it.
        let call = tokio::spawn(async move { handle.computing(woken, || ()).await });
        until("a call waiting for the host gives its turn up", || {
            share.lock().free > 0
        })
        .await;
        // So another plugin's call runs on the only turn meanwhile.
        let other_turn = share.turn(&other).await;
        wake.send(()).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!call.is_finished(), "the guest went on without a turn");
        drop(other_turn);
        call.await.unwrap().unwrap();
        assert_eq!(share.lock().plugins[&sleepy].held, 1, "taken back");
        drop(turn);
        assert_eq!(share.lock().free, 1);
    }

    #[tokio::test]
    async fn a_call_stopped_at_its_tick_keeps_its_turn() {
        let share = CpuShare::new(1, 1, LongCalls::Normal);
        let p = name("p");
        let turn = share.turn(&p).await;
        let (go_on, tick_over) = tokio::sync::oneshot::channel::<()>();
        let (handle, ticking) = (turn.handle(), turn.handle());
        let call = tokio::spawn(async move {
            handle
                .computing(
                    async move {
                        let wait = Box::pin(async move {
                            let _ = tick_over.await;
                        });
                        ticking.at_tick(wait).await;
                    },
                    || (),
                )
                .await
        });
        let waiter = queue(&share, &name("other"));
        until("the other call queues", || share.contended()).await;
        assert!(!call.is_finished());
        assert_eq!(
            share.lock().free,
            0,
            "the tick's future decides, not the wait"
        );
        go_on.send(()).unwrap();
        call.await.unwrap();
        assert_eq!(share.lock().plugins[&p].held, 1);
        drop(turn);
        drop(waiter.await.unwrap());
        assert_eq!(share.lock().free, 1);
    }
}
