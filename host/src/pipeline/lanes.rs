//! Lanes: virtual partitions of one plugin's events.
//!
//! With an ordering key, every event goes into the lane of its key. A lane
//! runs its events in the order the consumer delivered them (stream order),
//! one *run* at a time: a run is every event the lane holds when it gets its
//! turn (up to a bound), handled in order and committed together. Lanes take
//! turns so a busy key cannot starve the others.
//!
//! Without a key there is no order to keep: events wait in one shared queue
//! and up to a fixed number of runs take them, each a fair share of what is
//! waiting, so a backlog is handled in large runs and a trickle of live
//! events one by one without delay.
//!
//! Lanes hold only what the server delivered, and the server delivers no
//! more than the consumer's `max_ack_pending`: memory stays bounded however
//! far behind the plugin is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::task::TaskTracker;

/// How events are grouped into runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One lane per key; one run per lane at a time.
    Keyed,
    /// One shared queue, taken by up to this many runs at once.
    Shared(usize),
}

struct State<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Keys with queued events and no run, in turn order.
    ready: VecDeque<String>,
    /// Keys with a run going.
    busy: HashSet<String>,
    /// Runs going from the shared queue.
    shared_runs: usize,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            busy: HashSet::new(),
            shared_runs: 0,
        }
    }
}

/// The key of the shared queue.
const SHARED: &str = "";

/// Hands the events to `work` in runs.
pub(crate) struct Lanes<T, W> {
    state: Mutex<State<T>>,
    shape: Shape,
    max_run: usize,
    tasks: TaskTracker,
    work: W,
}

impl<T, W, F> Lanes<T, W>
where
    T: Clone + Send + 'static,
    W: Fn(Vec<T>) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    pub fn new(shape: Shape, max_run: usize, work: W) -> Arc<Self> {
        let shape = match shape {
            Shape::Shared(runs) => Shape::Shared(runs.max(1)),
            keyed => keyed,
        };
        Arc::new(Lanes {
            state: Mutex::new(State::default()),
            shape,
            max_run: max_run.max(1),
            tasks: TaskTracker::new(),
            work,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state consistent before it can
        // panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `message` in the lane of `key` (ignored for a shared queue).
    #[cfg(test)]
    pub fn push(self: &Arc<Self>, key: String, message: T) {
        self.push_all([(key, message)]);
    }

    /// Queue every `(key, message)`, then start runs: messages that arrive
    /// together are shared out together.
    pub fn push_all(self: &Arc<Self>, messages: impl IntoIterator<Item = (String, T)>) {
        {
            let mut state = self.lock();
            for (key, message) in messages {
                let key = match self.shape {
                    Shape::Keyed => key,
                    Shape::Shared(_) => SHARED.to_owned(),
                };
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
        match self.shape {
            Shape::Keyed => {
                while let Some(key) = state.ready.pop_front() {
                    let Some(queue) = state.queues.get_mut(&key) else {
                        continue;
                    };
                    let run: Vec<T> = queue.drain(..queue.len().min(self.max_run)).collect();
                    if run.is_empty() {
                        continue;
                    }
                    state.busy.insert(key.clone());
                    self.start(key, run);
                }
            }
            Shape::Shared(runs) => {
                while state.shared_runs < runs {
                    let Some(queue) = state.queues.get_mut(SHARED) else {
                        break;
                    };
                    // A fair share, so a backlog keeps every run busy.
                    let take = queue.len().div_ceil(runs).min(self.max_run);
                    if take == 0 {
                        break;
                    }
                    let run: Vec<T> = queue.drain(..take).collect();
                    state.shared_runs += 1;
                    self.start(SHARED.to_owned(), run);
                }
            }
        }
    }

    fn start(self: &Arc<Self>, key: String, run: Vec<T>) {
        let lanes = self.clone();
        let work = (self.work)(run);
        self.tasks.spawn(async move {
            work.await;
            lanes.finish(key);
        });
    }

    fn finish(self: &Arc<Self>, key: String) {
        if let Shape::Shared(_) = self.shape {
            self.lock().shared_runs -= 1;
            self.fill();
            return;
        }
        {
            let mut state = self.lock();
            state.busy.remove(&key);
            match state.queues.get(&key) {
                // Back of the line: other keys get their turn first.
                Some(queue) if !queue.is_empty() => state.ready.push_back(key),
                _ => {
                    state.queues.remove(&key);
                }
            }
        }
        self.fill();
    }

    /// Events waiting in a lane (delivered, not started).
    pub fn queued(&self) -> Vec<T> {
        self.lock()
            .queues
            .values()
            .flat_map(|q| q.iter().cloned())
            .collect()
    }

    /// Runs going plus events queued.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        let state = self.lock();
        state.busy.len()
            + state.shared_runs
            + state.queues.values().map(VecDeque::len).sum::<usize>()
    }

    /// Take every queued event out (shutdown: they go back to the stream).
    pub fn take_queued(&self) -> Vec<T> {
        let mut state = self.lock();
        state.ready.clear();
        let mut out = Vec::new();
        for queue in state.queues.values_mut() {
            out.extend(queue.drain(..));
        }
        out
    }

    /// Wait until every started event has finished.
    pub async fn wait_running(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs going.
    pub fn running(&self) -> usize {
        let state = self.lock();
        state.busy.len() + state.shared_runs
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use super::*;

    /// Each item is (key, index, delay ms); work records start and end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_at_a_time_per_key_in_order_and_keys_in_parallel() {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let lanes = {
            let (log, running, peak) = (log.clone(), running.clone(), peak.clone());
            Lanes::new(Shape::Keyed, 3, move |run: Vec<(String, u32, u64)>| {
                let (log, running, peak) = (log.clone(), running.clone(), peak.clone());
                async move {
                    assert!(run.len() <= 3, "runs are bounded");
                    let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    for (key, i, delay) in run {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        log.lock().unwrap().push((key, i));
                    }
                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
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
        let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            peak > 1 && peak <= 8,
            "keys run in parallel, one run each: {peak}"
        );
    }

    #[tokio::test]
    async fn a_shared_queue_is_split_fairly_between_its_runs() {
        let sizes = Arc::new(StdMutex::new(Vec::new()));
        let lanes = {
            let sizes = sizes.clone();
            Lanes::new(Shape::Shared(4), 100, move |run: Vec<u32>| {
                sizes.lock().unwrap().push(run.len());
                tokio::time::sleep(Duration::from_millis(20))
            })
        };
        // The first event starts a run at once; the 40 behind it are shared.
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
        assert!(
            sizes.len() >= 4 && *sizes.iter().max().unwrap() <= 14,
            "{sizes:?}"
        );
    }

    #[tokio::test]
    async fn queued_events_can_be_taken_back() {
        let lanes = Lanes::new(Shape::Keyed, 8, |_: Vec<u32>| {
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
}
