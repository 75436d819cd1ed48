//! Lanes: virtual partitions of one plugin's events, handed out in runs.
//!
//! With an ordering key, every event goes into the lane of its key. A key
//! belongs to at most one run at a time, and a run takes a key's events in
//! the order the consumer delivered them (stream order), so events of one
//! key never run concurrently or out of order. A run takes several ready
//! keys at once (a fair share of what waits), so a thousand keys with one
//! event each make a few large runs rather than a thousand small ones; a
//! run hands each key back as soon as that key's events are settled, and
//! keys take turns, so a busy key cannot starve the others.
//!
//! Without a key there is no order to keep: events wait in one shared queue
//! and each run takes a fair share of it, so a backlog is handled in large
//! runs and a trickle of live events one by one without delay.
//!
//! Runs that compute are kept to about what the host can execute: runs
//! beyond that only queue for the guest CPU, and measured, they slow
//! every call (BENCHMARKS.md, "runs in flight"). A run waiting on
//! something else (a state read from the server, a retry's backoff, its
//! guest asleep in a WASI poll) is *parked* and does not count, so a
//! plugin whose calls wait still keeps its whole concurrency busy.
//!
//! Lanes hold only what the server delivered, and the server delivers no
//! more than the consumer's `max_ack_pending`: memory stays bounded however
//! far behind the plugin is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;

use tokio_util::task::TaskTracker;

use super::lock;

/// How events are grouped into runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One lane per key; a key in one run at a time.
    Keyed,
    /// One shared queue.
    Shared,
}

struct State<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Keys with queued events and in no run, in turn order.
    ready: VecDeque<String>,
    /// Keys in a run.
    busy: HashSet<String>,
    /// Events queued, all lanes together.
    queued: usize,
    /// Runs going.
    runs: usize,
    /// Runs going that wait on something other than the CPU.
    parked: usize,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            busy: HashSet::new(),
            queued: 0,
            runs: 0,
            parked: 0,
        }
    }
}

/// The key of the shared queue.
const SHARED: &str = "";

/// Given to a run: hands a key back once the run is done with it, and
/// tells the lanes when the run waits on something other than the CPU.
#[derive(Clone)]
pub(crate) struct RunHandle {
    lanes: Weak<dyn LaneControl>,
    /// Keys the run still holds. A key handed back early may be in another
    /// run by the time this one ends, so the end hands back only these.
    held: Arc<Mutex<Vec<String>>>,
}

trait LaneControl: Send + Sync {
    fn release(&self, key: &str);
    /// A run parks (`true`) or goes on (`false`).
    fn park(&self, parked: bool);
}

impl RunHandle {
    /// The run has settled every event of `key` it had: other runs may
    /// take the key's later events now.
    pub(super) fn release(&self, key: &str) {
        let was_held = {
            let mut held = lock(&self.held);
            let at = held.iter().position(|k| k == key);
            at.map(|i| held.swap_remove(i)).is_some()
        };
        if was_held && let Some(lanes) = self.lanes.upgrade() {
            lanes.release(key);
        }
    }

    fn take_held(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.held))
    }

    /// Await `wait`, something other than the CPU (a read from the
    /// server, a backoff), with the run parked, so another run may start
    /// meanwhile. A wait that is over at once parks nothing.
    pub(super) async fn parked<F: Future>(&self, wait: F) -> F::Output {
        let mut wait = std::pin::pin!(wait);
        let first = std::future::poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await;
        if let Poll::Ready(out) = first {
            return out;
        }
        let _parked = self.park();
        wait.await
    }

    /// Park the run until the guard is dropped: for a wait the run does
    /// not await itself (its guest's, in a WASI poll).
    pub(super) fn park(&self) -> Parked {
        Parked::new(self.lanes.upgrade())
    }
}

/// A run parked until dropped (so also when its wait is cancelled).
pub(super) struct Parked(Option<Arc<dyn LaneControl>>);

impl Parked {
    fn new(lanes: Option<Arc<dyn LaneControl>>) -> Self {
        if let Some(lanes) = &lanes {
            lanes.park(true);
        }
        Parked(lanes)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(lanes) = &self.0 {
            lanes.park(false);
        }
    }
}

/// Hands the events to `work` in runs of `(lane key, event)`.
pub(crate) struct Lanes<T, W> {
    state: Mutex<State<T>>,
    shape: Shape,
    /// Runs going at most.
    max_runs: usize,
    /// Runs going at most, not counting parked ones.
    computing_runs: usize,
    /// Events in one run at most.
    max_run: usize,
    tasks: TaskTracker,
    work: W,
    this: Weak<Self>,
}

impl<T, W, F> Lanes<T, W>
where
    T: Clone + Send + 'static,
    W: Fn(Vec<(String, T)>, RunHandle) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    /// Lanes of `shape` with at most `max_runs` runs going, of which at
    /// most `computing_runs` not parked, and at most `max_run` events in
    /// a run.
    pub(super) fn new(
        shape: Shape,
        max_runs: usize,
        computing_runs: usize,
        max_run: usize,
        work: W,
    ) -> Arc<Self> {
        let max_runs = max_runs.max(1);
        Arc::new_cyclic(|this| Lanes {
            state: Mutex::new(State::default()),
            shape,
            max_runs,
            computing_runs: computing_runs.clamp(1, max_runs),
            max_run: max_run.max(1),
            tasks: TaskTracker::new(),
            work,
            this: this.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        lock(&self.state)
    }

    /// Queue `message` in the lane of `key` (ignored for a shared queue).
    #[cfg(test)]
    pub(crate) fn push(self: &Arc<Self>, key: String, message: T) {
        self.push_all([(key, message)]);
    }

    /// Queue every `(key, message)`, then start runs: messages that arrive
    /// together are shared out together.
    pub(super) fn push_all(self: &Arc<Self>, messages: impl IntoIterator<Item = (String, T)>) {
        {
            let mut state = self.lock();
            for (key, message) in messages {
                let key = match self.shape {
                    Shape::Keyed => key,
                    Shape::Shared => SHARED.to_owned(),
                };
                state.queued += 1;
                let queue = state.queues.entry(key.clone()).or_default();
                queue.push_back(message);
                let newly_waiting = queue.len() == 1;
                if newly_waiting && !state.busy.contains(&key) {
                    state.ready.push_back(key);
                }
            }
        }
        self.fill();
    }

    /// Start runs while there is work and room for it.
    fn fill(self: &Arc<Self>) {
        let mut state = self.lock();
        while state.runs < self.max_runs
            && state.runs - state.parked < self.computing_runs
            && !state.ready.is_empty()
        {
            // A fair share of what waits, so a backlog keeps every run busy.
            let share = state
                .queued
                .div_ceil(self.computing_runs)
                .clamp(1, self.max_run);
            let mut run: Vec<(String, T)> = Vec::with_capacity(share);
            while run.len() < share
                && let Some(key) = state.ready.pop_front()
            {
                let room = share - run.len();
                let Some(queue) = state.queues.get_mut(&key) else {
                    continue;
                };
                let taken: Vec<T> = queue.drain(..queue.len().min(room)).collect();
                let left = queue.len();
                state.queued -= taken.len();
                run.extend(taken.into_iter().map(|m| (key.clone(), m)));
                match self.shape {
                    // The key stays with this run until it hands it back.
                    Shape::Keyed => {
                        state.busy.insert(key);
                    }
                    // The shared queue stays ready for the next run.
                    Shape::Shared if left > 0 => state.ready.push_front(key),
                    Shape::Shared => {}
                }
            }
            if run.is_empty() {
                break;
            }
            state.runs += 1;
            self.start(run);
        }
    }

    fn start(self: &Arc<Self>, run: Vec<(String, T)>) {
        let keys: Vec<String> = match self.shape {
            Shape::Keyed => {
                let mut keys: Vec<String> = run.iter().map(|(k, _)| k.clone()).collect();
                keys.dedup();
                keys
            }
            Shape::Shared => Vec::new(),
        };
        let release = RunHandle {
            lanes: self.this.clone() as Weak<dyn LaneControl>,
            held: Arc::new(Mutex::new(keys)),
        };
        let work = (self.work)(run, release.clone());
        let lanes = self.clone();
        self.tasks.spawn(async move {
            work.await;
            lanes.finish(release.take_held());
        });
    }

    /// A run ended: hand back the keys it did not hand back itself.
    fn finish(self: &Arc<Self>, keys: Vec<String>) {
        {
            let mut state = self.lock();
            state.runs -= 1;
            for key in keys {
                Self::free(&mut state, &key);
            }
        }
        self.fill();
    }

    /// `key` is in no run now: back of the line if it has more events.
    fn free(state: &mut State<T>, key: &str) {
        if !state.busy.remove(key) {
            return;
        }
        match state.queues.get(key) {
            Some(queue) if !queue.is_empty() => state.ready.push_back(key.to_owned()),
            _ => {
                state.queues.remove(key);
            }
        }
    }

    /// Events waiting in a lane (delivered, not started).
    pub(super) fn queued(&self) -> Vec<T> {
        self.lock()
            .queues
            .values()
            .flat_map(|q| q.iter().cloned())
            .collect()
    }

    /// Runs going plus events queued.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        let state = self.lock();
        state.runs + state.queued
    }

    /// Take every queued event out (shutdown: they go back to the stream).
    pub(super) fn take_queued(&self) -> Vec<T> {
        let mut state = self.lock();
        state.ready.clear();
        state.queued = 0;
        let mut out = Vec::new();
        for queue in state.queues.values_mut() {
            out.extend(queue.drain(..));
        }
        out
    }

    /// Wait until every started run has finished.
    pub(super) async fn wait_running(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs going.
    pub(super) fn running(&self) -> usize {
        self.lock().runs
    }
}

impl<T, W, F> LaneControl for Lanes<T, W>
where
    T: Clone + Send + 'static,
    W: Fn(Vec<(String, T)>, RunHandle) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    fn release(&self, key: &str) {
        if let Some(this) = self.this.upgrade() {
            {
                let mut state = this.lock();
                Self::free(&mut state, key);
            }
            this.fill();
        }
    }

    fn park(&self, parked: bool) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        {
            let mut state = this.lock();
            match parked {
                true => state.parked += 1,
                false => state.parked -= 1,
            }
        }
        if parked {
            this.fill();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use super::*;
    use crate::test_support::until;

    /// Each item is (key, index, delay ms); work records start and end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_run_in_order_one_run_at_a_time_and_in_parallel() {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let running: Arc<StdMutex<HashSet<String>>> = Arc::default();
        let lanes = {
            let (log, running) = (log.clone(), running.clone());
            Lanes::new(
                Shape::Keyed,
                4,
                4,
                3,
                move |run: Vec<(String, (String, u32, u64))>, _| {
                    let (log, running) = (log.clone(), running.clone());
                    async move {
                        assert!(run.len() <= 3, "runs are bounded");
                        for (key, _) in &run {
                            assert!(
                                !running.lock().unwrap().contains(key),
                                "key {key} in two runs at once"
                            );
                        }
                        running
                            .lock()
                            .unwrap()
                            .extend(run.iter().map(|(k, _)| k.clone()));
                        for (_, (key, i, delay)) in &run {
                            tokio::time::sleep(Duration::from_millis(*delay)).await;
                            log.lock().unwrap().push((key.clone(), *i));
                        }
                        let mut r = running.lock().unwrap();
                        for (key, _) in &run {
                            r.remove(key);
                        }
                    }
                },
            )
        };
        for i in 0..40u32 {
            let key = format!("k{}", i % 8);
            // Later events of a key are faster: only the lane keeps them in order.
            lanes.push(key.clone(), (key, i, u64::from(40 - i) / 4));
        }
        while lanes.held() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lanes.wait_running().await;
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 40);
        for k in 0..8 {
            let seen: Vec<u32> = log
                .iter()
                .filter(|(key, _)| *key == format!("k{k}"))
                .map(|(_, i)| *i)
                .collect();
            assert!(
                seen.windows(2).all(|w| w[0] < w[1]),
                "key k{k} out of order: {seen:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_run_takes_several_keys_and_hands_them_back_early() {
        let runs = Arc::new(StdMutex::new(Vec::new()));
        let lanes = {
            let runs = runs.clone();
            Lanes::new(
                Shape::Keyed,
                1,
                1,
                100,
                move |run: Vec<(String, u32)>, release: RunHandle| {
                    runs.lock().unwrap().push(run.clone());
                    async move {
                        // Done with "a" at once; the rest takes a while.
                        release.release("a");
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                },
            )
        };
        // The first push starts a run of its own; then "a" and "b" queue.
        lanes.push("first".into(), 0);
        for (key, i) in [("a", 1), ("b", 2), ("a", 3)] {
            lanes.push(key.into(), i);
        }
        while lanes.held() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lanes.wait_running().await;
        let runs = runs.lock().unwrap();
        assert_eq!(runs[0], vec![("first".to_owned(), 0)]);
        assert_eq!(
            runs[1],
            vec![("a".into(), 1), ("a".into(), 3), ("b".into(), 2)],
            "one run takes both keys, each key's events in order"
        );
        assert_eq!(runs.len(), 2);
    }

    #[tokio::test]
    async fn a_key_handed_back_early_is_not_freed_again_when_its_run_ends() {
        let overlaps = Arc::new(StdMutex::new(0));
        let running: Arc<StdMutex<HashSet<String>>> = Arc::default();
        let lanes = {
            let (overlaps, running) = (overlaps.clone(), running.clone());
            Lanes::new(
                Shape::Keyed,
                4,
                4,
                1,
                move |run: Vec<(String, u64)>, release: RunHandle| {
                    let (overlaps, running) = (overlaps.clone(), running.clone());
                    async move {
                        let (key, hold_ms) = run[0].clone();
                        if !running.lock().unwrap().insert(key.clone()) {
                            *overlaps.lock().unwrap() += 1;
                        }
                        if hold_ms == 0 {
                            // Settled at once, but the run goes on a while.
                            running.lock().unwrap().remove(&key);
                            release.release(&key);
                            tokio::time::sleep(Duration::from_millis(40)).await;
                        } else {
                            tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                            running.lock().unwrap().remove(&key);
                        }
                    }
                },
            )
        };
        lanes.push("a".into(), 0);
        // Taken by a second run as soon as the first hands "a" back.
        lanes.push("a".into(), 120);
        tokio::time::sleep(Duration::from_millis(70)).await;
        // The first run has ended; the second still holds "a".
        lanes.push("a".into(), 1);
        while lanes.held() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lanes.wait_running().await;
        assert_eq!(
            *overlaps.lock().unwrap(),
            0,
            "\"a\" ran in two runs at once"
        );
    }

    #[tokio::test]
    async fn a_shared_queue_is_split_fairly_between_its_runs() {
        let sizes = Arc::new(StdMutex::new(Vec::new()));
        let lanes = {
            let sizes = sizes.clone();
            Lanes::new(
                Shape::Shared,
                4,
                4,
                100,
                move |run: Vec<(String, u32)>, _| {
                    sizes.lock().unwrap().push(run.len());
                    tokio::time::sleep(Duration::from_millis(20))
                },
            )
        };
        // The first events start runs at once; the rest are shared.
        for i in 0..41 {
            lanes.push(format!("ignored-{i}"), i);
        }
        assert_eq!(lanes.running(), 4);
        while lanes.held() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lanes.wait_running().await;
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 41);
        assert!(sizes.iter().all(|s| *s <= 14), "{sizes:?}");
    }

    #[tokio::test]
    async fn queued_events_can_be_taken_back() {
        let lanes = Lanes::new(Shape::Keyed, 1, 1, 8, |_: Vec<(String, u32)>, _| {
            tokio::time::sleep(Duration::from_millis(50))
        });
        for i in 0..5 {
            lanes.push("same".into(), i);
        }
        assert_eq!(lanes.running(), 1);
        assert_eq!(
            lanes.queued().len(),
            4,
            "the first run took one, the rest queued behind it"
        );
        assert_eq!(lanes.take_queued(), vec![1, 2, 3, 4]);
        lanes.wait_running().await;
        assert_eq!(lanes.held(), 0);
    }

    /// A run's work in the parking test: wait for `go`, parked or not,
    /// then log `name`.
    #[derive(Clone)]
    struct Step {
        name: &'static str,
        parked: bool,
        go: Arc<tokio::sync::Notify>,
    }

    fn step(name: &'static str, parked: bool) -> Step {
        Step {
            name,
            parked,
            go: Arc::default(),
        }
    }

    #[tokio::test]
    async fn runs_that_compute_are_capped_and_parked_ones_do_not_count() {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let lanes = {
            let log = log.clone();
            Lanes::new(
                Shape::Keyed,
                4,
                1,
                1,
                move |run: Vec<(String, Step)>, handle: RunHandle| {
                    let log = log.clone();
                    async move {
                        let step = run[0].1.clone();
                        let go = step.go.notified();
                        match step.parked {
                            // Waits on the server, say.
                            true => handle.parked(go).await,
                            // Computes (or queues for the CPU).
                            false => go.await,
                        }
                        log.lock().unwrap().push(step.name);
                    }
                },
            )
        };
        let (waits, first, second) = (
            step("waits", true),
            step("first", false),
            step("second", false),
        );
        lanes.push("waits".into(), waits.clone());
        lanes.push("first".into(), first.clone());
        lanes.push("second".into(), second.clone());
        assert_eq!(lanes.running(), 1, "one computing run at most");
        // "waits" parks, so "first" starts; "second" does not.
        until("a parked run makes room", || lanes.running() == 2).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(lanes.running(), 2, "one more run, not two");
        assert_eq!(lanes.queued().len(), 1);
        waits.go.notify_one();
        until("the parked run ended", || lanes.running() == 1).await;
        assert_eq!(lanes.queued().len(), 1, "\"first\" still computes");
        first.go.notify_one();
        until("\"second\" started", || lanes.queued().is_empty()).await;
        second.go.notify_one();
        until("all ran", || log.lock().unwrap().len() == 3).await;
        assert_eq!(*log.lock().unwrap(), ["waits", "first", "second"]);
        lanes.wait_running().await;
        assert_eq!(lanes.lock().parked, 0);
    }
}
