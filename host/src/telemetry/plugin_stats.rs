//! One plugin's counters as `/plugins`, `weir plugins list`, the demo and
//! the benchmarks see them: a view of the Prometheus series its pipeline
//! counts into, from the moment the pipeline started.

use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;

use super::latency::LatencySnapshot;
use super::metrics::{ConsumerLag, LagGauges, Metrics, Totals, VersionSeries};

/// What happened to the events one pipeline of a plugin received.
#[derive(Debug)]
pub struct PluginStats {
    /// Each version the pipeline ran, with its counts when it started here.
    versions: Mutex<Vec<Served>>,
    in_flight: Gauge,
    lag: LagGauges,
    /// Why the plugin cannot pull events right now (its stream or consumer
    /// is gone), if it cannot.
    stalled: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Served {
    series: VersionSeries,
    /// The series are the host's, counting since it started; this
    /// pipeline's share is what came after these.
    totals_before: Totals,
    latency_before: LatencySnapshot,
}

impl Served {
    /// Ack latencies of this version since the pipeline started.
    fn latency(&self) -> LatencySnapshot {
        self.series.latency().since(&self.latency_before)
    }
}

/// A copy of [`PluginStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Handled, committed, outputs published, acked.
    pub processed: u64,
    /// Sent back for another attempt after a retryable failure.
    pub retried: u64,
    /// Rejected by the plugin (these are dead-lettered too).
    #[serde(default)]
    pub rejected: u64,
    /// Moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Redeliveries of events already committed, finished without a call.
    /// Older hosts call it `skipped_duplicates`.
    #[serde(default, alias = "skipped_duplicates")]
    pub duplicates: u64,
    /// Host-side failures (publish, commit, ack) that sent an event back.
    pub host_errors: u64,
    /// Ended on purpose without processing or a dead letter (see
    /// [`super::metrics::TerminationReason`]).
    #[serde(default)]
    pub terminated: u64,
    /// Being handled now.
    pub in_flight: u64,
    /// The consumer's lag at the last poll.
    #[serde(flatten)]
    pub lag: ConsumerLag,
    /// Median time from an event's arrival in its stream to its confirmed
    /// ack, over the events processed since the pipeline started, in
    /// microseconds (within 5%); absent until one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_p50_us: Option<u64>,
    /// The same, 99th percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_p99_us: Option<u64>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update leaves the value whole before it could panic.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn gauge_value(gauge: &Gauge) -> u64 {
    u64::try_from(gauge.get()).unwrap_or(0)
}

impl PluginStats {
    /// The view of `plugin`'s counters that `/plugins` shows, and the
    /// gauges its pipeline updates, all in `metrics`.
    pub fn of(metrics: &Metrics, plugin: &str) -> Self {
        let (in_flight, lag) = metrics.plugin_gauges(plugin);
        PluginStats {
            versions: Mutex::new(Vec::new()),
            in_flight,
            lag,
            stalled: Mutex::new(None),
        }
    }

    /// Count into `series` from now on, if they are not counted already.
    pub(crate) fn serve(&self, series: &VersionSeries) {
        let mut versions = lock(&self.versions);
        if versions
            .iter()
            .all(|v| v.series.version() != series.version())
        {
            versions.push(Served {
                series: series.clone(),
                totals_before: series.totals(),
                latency_before: series.latency(),
            });
        }
    }

    /// Events being handled now, as a gauge to update.
    pub(crate) fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Record the consumer's lag as the server reported it.
    pub(crate) fn set_lag(&self, lag: ConsumerLag) {
        let set = |gauge: &Gauge, v: u64| gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
        set(&self.lag.pending, lag.pending);
        set(&self.lag.ack_pending, lag.ack_pending);
        set(&self.lag.redelivered, lag.redelivered);
    }

    /// Why the plugin is stalled, if it is.
    pub fn stalled(&self) -> Option<String> {
        lock(&self.stalled).clone()
    }

    /// Say why the plugin cannot pull events, or that it can again.
    pub fn set_stalled(&self, why: Option<String>) {
        *lock(&self.stalled) = why;
    }

    /// The counts since the pipeline started.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut snapshot = StatsSnapshot {
            in_flight: gauge_value(&self.in_flight),
            lag: ConsumerLag {
                pending: gauge_value(&self.lag.pending),
                ack_pending: gauge_value(&self.lag.ack_pending),
                redelivered: gauge_value(&self.lag.redelivered),
            },
            ..StatsSnapshot::default()
        };
        let mut latency = LatencySnapshot::default();
        for served in lock(&self.versions).iter() {
            latency.add(&served.latency());
            let t = served.series.totals().since(&served.totals_before);
            snapshot.processed += t.processed;
            snapshot.retried += t.retried;
            snapshot.rejected += t.rejected;
            snapshot.dead_lettered += t.dead_lettered;
            snapshot.duplicates += t.duplicates;
            snapshot.host_errors += t.host_errors;
            snapshot.terminated += t.terminated;
        }
        let micros = |q| latency.quantile(q).map(|d| d.as_micros() as u64);
        snapshot.ack_p50_us = micros(0.5);
        snapshot.ack_p99_us = micros(0.99);
        snapshot
    }

    /// From the events' arrival in their stream to their confirmed ack,
    /// since the pipeline started.
    pub fn ack_latency(&self) -> LatencySnapshot {
        let mut all = LatencySnapshot::default();
        for served in lock(&self.versions).iter() {
            all.add(&served.latency());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::PluginStats;
    use crate::outcome::OutcomeKind;
    use crate::telemetry::metrics::{Counted, Metrics, TerminationReason};

    #[test]
    fn a_pipeline_sees_what_it_counted_in_every_version_and_nothing_before() {
        let metrics = Metrics::new();
        let v1 = metrics.series("p", "v1");
        v1.count(Counted::Processed);
        // A pipeline started after that event does not report it...
        let stats = PluginStats::of(&metrics, "p");
        stats.serve(&v1);
        v1.count(Counted::Processed);
        v1.dead_lettered(OutcomeKind::Reject);
        v1.publish_to_ack(Duration::from_millis(1));
        // ...and counts every version it runs, however often it is told.
        let v2 = metrics.series("p", "v2");
        stats.serve(&v2);
        stats.serve(&v2);
        v2.count(Counted::Duplicate);
        v2.terminated(TerminationReason::DeadLetterLoop);
        v2.publish_to_ack(Duration::from_millis(2));
        let s = stats.snapshot();
        assert_eq!(
            (
                s.processed,
                s.rejected,
                s.dead_lettered,
                s.duplicates,
                s.terminated
            ),
            (1, 1, 1, 1, 1)
        );
        assert_eq!(stats.ack_latency().count(), 2);
        let within_5_percent =
            |us: Option<u64>, of: u64| us.is_some_and(|us| us >= of && us <= of + of / 20);
        assert!(within_5_percent(s.ack_p50_us, 1_000), "{s:?}");
        assert!(within_5_percent(s.ack_p99_us, 2_000), "{s:?}");
        // The Prometheus view counts since the host started.
        assert_eq!(v1.totals().processed, 2);
    }
}
