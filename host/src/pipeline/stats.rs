//! Per-plugin counters, shared by the pipeline, the CLI and the demo.

use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to the events a plugin received.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub processed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub skipped_duplicates: AtomicU64,
    /// Host-side failures (publish, commit, ack) that sent an event back.
    pub host_errors: AtomicU64,
    pub in_flight: AtomicU64,
}

/// A copy of [`PluginStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub processed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub skipped_duplicates: u64,
    pub host_errors: u64,
    pub in_flight: u64,
}

impl PluginStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            processed: get(&self.processed),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            skipped_duplicates: get(&self.skipped_duplicates),
            host_errors: get(&self.host_errors),
            in_flight: get(&self.in_flight),
        }
    }
}
