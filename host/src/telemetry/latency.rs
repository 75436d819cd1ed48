//! Latency histograms with buckets fine enough for percentiles: the one
//! record of how long events took from their stream to their ack, read by
//! `PluginStats::ack_latency` and the benchmarks and exported to Prometheus.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Bucket upper bounds grow by this factor: percentiles are exact to
/// within 5%, with a fixed, small footprint and lock-free updates. (It was
/// 1.2: a ratio of two percentiles could then only be a power of 1.2, so a
/// p99 "within 3x" read 2.99x or 3.58x whatever the truth between them.)
const GROWTH: f64 = 1.05;
/// The first bucket holds everything up to 10 µs.
const FIRST_BOUND_US: f64 = 10.0;
/// 10 µs × 1.05^400 ≈ 50 minutes: anything slower lands in the last bucket.
const BUCKETS: usize = 400;
/// Prometheus gets every 14th bound (about 2x apart): 29 buckets per
/// series are plenty for dashboards, 400 would weigh on every scrape.
const EXPORTED_EVERY: usize = 14;

fn upper_bound_us(bucket: usize) -> f64 {
    FIRST_BOUND_US * GROWTH.powi(bucket as i32)
}

fn bucket_of(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    let bucket = if us <= FIRST_BOUND_US {
        0
    } else {
        ((us / FIRST_BOUND_US).ln() / GROWTH.ln()).ceil() as usize
    };
    bucket.min(BUCKETS - 1)
}

/// A histogram of durations with exponentially growing buckets. Clones
/// share the counts.
#[derive(Clone)]
pub struct LatencyHistogram(Arc<Counts>);

struct Counts {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(Arc::new(Counts {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }))
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.snapshot().count())
            .finish()
    }
}

impl LatencyHistogram {
    /// Count one duration.
    pub fn record(&self, d: Duration) {
        self.0.buckets[bucket_of(d)].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.0.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.snapshot().buckets;
        let mut exported = Vec::with_capacity(BUCKETS / EXPORTED_EVERY + 1);
        let mut group = 0;
        for (i, n) in counts.iter().enumerate() {
            group += n;
            // The last bucket also holds everything above its bound.
            if i + 1 == BUCKETS {
                exported.push((f64::INFINITY, group));
            } else if (i + 1) % EXPORTED_EVERY == 0 {
                exported.push((round_to_4_digits(upper_bound_us(i) / 1e6), group));
                group = 0;
            }
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let count = counts.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &exported, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Bucket bounds as dashboards show them: 0.0000358 s, not 0.0000358318079.
fn round_to_4_digits(x: f64) -> f64 {
    let scale = 10f64.powi(3 - x.log10().floor() as i32);
    (x * scale).round() / scale
}

/// The counts of a [`LatencyHistogram`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: [u64; BUCKETS],
}

impl Default for LatencySnapshot {
    fn default() -> Self {
        LatencySnapshot {
            buckets: [0; BUCKETS],
        }
    }
}

impl LatencySnapshot {
    /// Samples counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// What was counted after `earlier`, a snapshot of the same histogram.
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].saturating_sub(earlier.buckets[i])),
        }
    }

    /// Both snapshots' samples together.
    pub fn add(&mut self, other: &LatencySnapshot) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
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
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_secs_f64(upper_bound_us(i) / 1e6));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(h.snapshot().quantile(0.5), None);
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        let p50 = s.quantile(0.5).unwrap().as_secs_f64() * 1e3;
        let p99 = s.quantile(0.99).unwrap().as_secs_f64() * 1e3;
        assert!((50.0..=52.5).contains(&p50), "{p50}");
        assert!((99.0..=104.0).contains(&p99), "{p99}");
        h.record(Duration::from_secs(1_000_000));
        assert_eq!(h.snapshot().count(), 101);
        h.record(Duration::ZERO);
        assert!(h.snapshot().quantile(0.0).unwrap() <= Duration::from_micros(10));
    }

    #[test]
    fn a_later_snapshot_less_an_earlier_one_is_what_came_between() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_secs(1));
        let before = h.snapshot();
        for _ in 0..10 {
            h.record(Duration::from_millis(1));
        }
        let between = h.snapshot().since(&before);
        assert_eq!(between.count(), 10);
        assert!(between.quantile(1.0).unwrap() < Duration::from_millis(2));
    }

    #[test]
    fn prometheus_sees_cumulative_buckets_that_add_up() {
        let mut registry = prometheus_client::registry::Registry::default();
        let h = LatencyHistogram::default();
        registry.register("lat", "latency", h.clone());
        h.record(Duration::from_micros(5));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(100_000));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("lat_count 3"), "{text}");
        assert!(text.contains("lat_bucket{le=\"+Inf\"} 3"), "{text}");
        let buckets = text.matches("lat_bucket{").count();
        assert_eq!(buckets, BUCKETS / EXPORTED_EVERY + 1, "{text}");
        // 5 µs is in the first exported bucket (le 18.86 µs), 3 ms in the
        // one that ends at 4.453 ms.
        assert!(text.contains("lat_bucket{le=\"0.00001886\"} 1"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.002249\"} 1"), "{text}");
        assert!(text.contains("lat_bucket{le=\"0.004453\"} 2"), "{text}");
    }
}
