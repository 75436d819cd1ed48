//! Lanes: virtual partitions of one plugin's events.
//!
//! Every event goes into the lane of its key. A lane runs its events in the
//! order the consumer delivered them (stream order), one *run* at a time: a
//! run is every event the lane holds when it gets its turn (up to a bound),
//! handled in order and committed together. Up to `concurrency` lanes run at
//! once, taking turns so a busy key cannot starve the others. Events of a
//! plugin without an ordering key each get a lane of their own, which makes
//! this plain bounded concurrency.
//!
//! Lanes hold only what the server delivered, and the server delivers no
//! more than the consumer's `max_ack_pending`: memory stays bounded however
//! far behind the plugin is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::task::TaskTracker;

struct State<T> {
    queues: HashMap<String, VecDeque<T>>,
    /// Keys with queued events and no event running, in turn order.
    ready: VecDeque<String>,
    /// Keys with an event running.
    busy: HashSet<String>,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            busy: HashSet::new(),
        }
    }
}

/// Runs the events of each key with `work`, one run at a time per key.
pub(crate) struct Lanes<T, W> {
    state: Mutex<State<T>>,
    concurrency: usize,
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
    pub fn new(concurrency: usize, max_run: usize, work: W) -> Arc<Self> {
        Arc::new(Lanes {
            state: Mutex::new(State::default()),
            concurrency: concurrency.max(1),
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

    /// Queue `message` in the lane of `key`.
    pub fn push(self: &Arc<Self>, key: String, message: T) {
        {
            let mut state = self.lock();
            let queue = state.queues.entry(key.clone()).or_default();
            queue.push_back(message);
            let newly_waiting = queue.len() == 1;
            if newly_waiting && !state.busy.contains(&key) {
                state.ready.push_back(key);
            }
        }
        self.fill();
    }

    /// Start runs until `concurrency` run or no lane is ready.
    fn fill(self: &Arc<Self>) {
        let mut state = self.lock();
        while state.busy.len() < self.concurrency {
            let Some(key) = state.ready.pop_front() else {
                break;
            };
            let Some(queue) = state.queues.get_mut(&key) else {
                continue;
            };
            let run: Vec<T> = queue.drain(..queue.len().min(self.max_run)).collect();
            if run.is_empty() {
                continue;
            }
            state.busy.insert(key.clone());
            let lanes = self.clone();
            let work = (self.work)(run);
            self.tasks.spawn(async move {
                work.await;
                lanes.finish(key);
            });
        }
    }

    fn finish(self: &Arc<Self>, key: String) {
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

    /// Events delivered and not finished: running plus queued.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        let state = self.lock();
        state.busy.len() + state.queues.values().map(VecDeque::len).sum::<usize>()
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

    pub fn running(&self) -> usize {
        self.lock().busy.len()
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
            Lanes::new(4, 3, move |run: Vec<(String, u32, u64)>| {
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
            peak > 1 && peak <= 4,
            "lanes run in parallel up to the concurrency: {peak}"
        );
    }

    #[tokio::test]
    async fn queued_events_can_be_taken_back() {
        let lanes = Lanes::new(1, 8, |_: Vec<u32>| {
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
