//! Per-plugin counters and latencies, shared by the pipeline, the CLI, the
//! demo and the benchmark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::telemetry::ConsumerLag;

/// What happened to the events a plugin received.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub processed: AtomicU64,
    pub retried: AtomicU64,
    /// Rejected by the plugin (these are dead-lettered too).
    pub rejected: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Redeliveries of events already committed, finished without a call.
    pub duplicates: AtomicU64,
    /// Host-side failures (publish, commit, ack) that sent an event back.
    pub host_errors: AtomicU64,
    /// Ended on purpose without processing or a dead letter (see
    /// [`crate::telemetry::metrics::TerminationReason`]).
    pub terminated: AtomicU64,
    pub in_flight: AtomicU64,
    /// The consumer's lag at the last poll.
    pub lag: std::sync::Mutex<ConsumerLag>,
    /// Why the plugin cannot pull events right now (its stream or consumer
    /// is gone), if it cannot.
    pub stalled: std::sync::Mutex<Option<String>>,
    /// From the event's arrival in its stream to its confirmed ack.
    pub ack_latency: LatencyHistogram,
}

/// A copy of [`PluginStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub processed: u64,
    pub retried: u64,
    #[serde(default)]
    pub rejected: u64,
    pub dead_lettered: u64,
    /// Older hosts call it `skipped_duplicates`.
    #[serde(default, alias = "skipped_duplicates")]
    pub duplicates: u64,
    pub host_errors: u64,
    #[serde(default)]
    pub terminated: u64,
    pub in_flight: u64,
    #[serde(flatten)]
    pub lag: ConsumerLag,
}

impl PluginStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Why the plugin is stalled, if it is.
    pub fn stalled(&self) -> Option<String> {
        self.stalled.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn set_stalled(&self, why: Option<String>) {
        if let Ok(mut stalled) = self.stalled.lock() {
            *stalled = why;
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            processed: get(&self.processed),
            retried: get(&self.retried),
            rejected: get(&self.rejected),
            dead_lettered: get(&self.dead_lettered),
            duplicates: get(&self.duplicates),
            host_errors: get(&self.host_errors),
            terminated: get(&self.terminated),
            in_flight: get(&self.in_flight),
            lag: self.lag.lock().map(|l| *l).unwrap_or_default(),
        }
    }
}

/// Bucket upper bounds grow by this factor: percentiles are exact to
/// within about 10%, with a fixed, small footprint and lock-free updates.
const GROWTH: f64 = 1.2;
/// The first bucket holds everything up to 10 µs.
const FIRST_BOUND_US: f64 = 10.0;
/// 10 µs × 1.2^90 ≈ 37 minutes: anything slower lands in the last bucket.
const BUCKETS: usize = 90;

/// A histogram of durations with exponentially growing buckets.
pub struct LatencyHistogram {
    counts: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish()
    }
}

fn upper_bound_us(bucket: usize) -> f64 {
    FIRST_BOUND_US * GROWTH.powi(bucket as i32)
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let bucket = if us <= FIRST_BOUND_US {
            0
        } else {
            ((us / FIRST_BOUND_US).ln() / GROWTH.ln()).ceil() as usize
        };
        self.counts[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The duration below which a fraction `q` (0..=1) of the samples fall,
    /// as the upper bound of the bucket holding that rank.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(Duration::from_secs_f64(upper_bound_us(i) / 1e6));
            }
        }
        None
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64() * 1e3;
        let p99 = h.quantile(0.99).unwrap().as_secs_f64() * 1e3;
        assert!((50.0..=60.0).contains(&p50), "{p50}");
        assert!((99.0..=119.0).contains(&p99), "{p99}");
        h.record(Duration::from_secs(1_000_000));
        assert_eq!(h.count(), 101);
        h.record(Duration::ZERO);
        assert!(h.quantile(0.0).unwrap() <= Duration::from_micros(10));
    }
}
