//! The Prometheus metrics of one host, encoded by `prometheus-client` for
//! the admin endpoint's `/metrics`.
//!
//! Event counters are labelled by plugin and version so a bad deploy shows
//! up as the new version's failures; gauges that describe the consumer
//! (lag, in flight) are labelled by plugin only, since the consumer outlives
//! versions.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry, Unit};

use super::latency::{LatencyHistogram, LatencySnapshot};
use crate::labels::labelled;
use crate::outcome::{LimitHit, OutcomeKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    plugin: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    plugin: String,
    version: String,
    reason: String,
}

/// Event counters that carry only plugin and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Handled, committed, outputs published, acked.
    Processed,
    /// Sent back for another attempt after a retryable failure.
    Retried,
    /// The plugin rejected it (it is also counted as dead-lettered).
    Rejected,
    /// A redelivery of an event already committed, finished without a call.
    Duplicate,
    /// A host-side failure (publish, commit, ack) sent it back.
    HostError,
}

labelled! {
    /// Why an event may end neither processed nor dead-lettered.
    pub enum TerminationReason {
        /// A dead letter (an event on the dead-letter subjects) failed in a
        /// plugin consuming them; dead-lettering it again would loop, and it
        /// is in the dead-letter stream already.
        DeadLetterLoop => "dead_letter_loop",
        /// Its dead letter could not be stored on any of its allowed
        /// attempts; the event is still in its own stream.
        DeadLetterUnstorable => "dead_letter_unstorable",
    }
}

/// The series every event of one plugin version updates, resolved once:
/// the only place events are counted ([`super::PluginStats`] reads them).
#[derive(Debug, Clone)]
pub struct VersionSeries {
    version: Arc<str>,
    processed: Counter,
    retried: Counter,
    rejected: Counter,
    duplicates: Counter,
    host_errors: Counter,
    dead_lettered: Vec<(OutcomeKind, Counter)>,
    terminated: Vec<(TerminationReason, Counter)>,
    handler_duration: Histogram,
    publish_to_ack: LatencyHistogram,
    conflict_reruns: Counter,
}

/// What a version's counters say, summed over reasons.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// See [`Counted::Processed`].
    pub processed: u64,
    /// See [`Counted::Retried`].
    pub retried: u64,
    /// See [`Counted::Rejected`].
    pub rejected: u64,
    /// See [`Counted::Duplicate`].
    pub duplicates: u64,
    /// See [`Counted::HostError`].
    pub host_errors: u64,
    /// Dead letters, whatever the outcome that sent them.
    pub dead_lettered: u64,
    /// Events ended on purpose, whatever the reason.
    pub terminated: u64,
}

impl Totals {
    /// What was counted after `earlier`, totals of the same series.
    pub fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            processed: self.processed - earlier.processed,
            retried: self.retried - earlier.retried,
            rejected: self.rejected - earlier.rejected,
            duplicates: self.duplicates - earlier.duplicates,
            host_errors: self.host_errors - earlier.host_errors,
            dead_lettered: self.dead_lettered - earlier.dead_lettered,
            terminated: self.terminated - earlier.terminated,
        }
    }
}

impl VersionSeries {
    /// The plugin version these series count.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Count an event's fate.
    pub fn count(&self, what: Counted) {
        match what {
            Counted::Processed => &self.processed,
            Counted::Retried => &self.retried,
            Counted::Rejected => &self.rejected,
            Counted::Duplicate => &self.duplicates,
            Counted::HostError => &self.host_errors,
        }
        .inc();
    }

    /// Count a dead letter, by the outcome that sent it; a rejection is
    /// counted as such too.
    pub fn dead_lettered(&self, reason: OutcomeKind) {
        if let Some((_, counter)) = self.dead_lettered.iter().find(|(k, _)| *k == reason) {
            counter.inc();
        }
        if reason == OutcomeKind::Reject {
            self.rejected.inc();
        }
    }

    /// Count an event ended on purpose without processing or a dead letter.
    pub fn terminated(&self, reason: TerminationReason) {
        if let Some((_, counter)) = self.terminated.iter().find(|(r, _)| *r == reason) {
            counter.inc();
        }
    }

    /// Count an event run again because state it read changed before its
    /// commit (another host or a stale cache wrote the key meanwhile).
    pub fn conflict_rerun(&self) {
        self.conflict_reruns.inc();
    }

    /// Record how long a plugin call took.
    pub fn handler_duration(&self, took: Duration) {
        self.handler_duration.observe(took.as_secs_f64());
    }

    /// Record how long an event took from its stream to its ack.
    pub fn publish_to_ack(&self, took: Duration) {
        self.publish_to_ack.record(took);
    }

    /// The counters now.
    pub fn totals(&self) -> Totals {
        let sum = |counters: &mut dyn Iterator<Item = &Counter>| counters.map(Counter::get).sum();
        Totals {
            processed: self.processed.get(),
            retried: self.retried.get(),
            rejected: self.rejected.get(),
            duplicates: self.duplicates.get(),
            host_errors: self.host_errors.get(),
            dead_lettered: sum(&mut self.dead_lettered.iter().map(|(_, c)| c)),
            terminated: sum(&mut self.terminated.iter().map(|(_, c)| c)),
        }
    }

    /// The publish-to-ack latencies now.
    pub fn latency(&self) -> LatencySnapshot {
        self.publish_to_ack.snapshot()
    }
}

/// A served plugin's consumer-lag gauges, set from [`ConsumerLag`].
#[derive(Debug)]
pub(crate) struct LagGauges {
    pub(crate) pending: Gauge,
    pub(crate) ack_pending: Gauge,
    pub(crate) redelivered: Gauge,
}

/// A plugin's consumer as the server reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsumerLag {
    /// Messages in the stream the consumer has not been given yet.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
    /// Delivered more than once and not yet acknowledged.
    pub redelivered: u64,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~52 s: a warm call at the bottom, a long retry chain at the top.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Events per commit group: 1 to 4,096, a power of two per bucket.
fn group_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

type Counters = Family<VersionLabels, Counter>;
type GroupSizes = Family<PluginLabels, Histogram, fn() -> Histogram>;
type Latencies = Family<VersionLabels, Histogram, fn() -> Histogram>;
type AckLatencies = Family<VersionLabels, LatencyHistogram>;

/// Every metric the host exports.
pub struct Metrics {
    registry: Registry,
    processed: Counters,
    retried: Counters,
    rejected: Counters,
    duplicates: Counters,
    host_errors: Counters,
    dead_lettered: Family<ReasonLabels, Counter>,
    terminated: Family<ReasonLabels, Counter>,
    limit_hits: Family<ReasonLabels, Counter>,
    handler_duration: Latencies,
    publish_to_ack: AckLatencies,
    conflict_reruns: Counters,
    in_flight: Family<PluginLabels, Gauge>,
    pending: Family<PluginLabels, Gauge>,
    ack_pending: Family<PluginLabels, Gauge>,
    redelivered: Family<PluginLabels, Gauge>,
    load_failures: Family<PluginLabels, Counter>,
    commit_groups: GroupSizes,
    plugins_running: Gauge,
    nats_connected: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered, with no series yet.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir");
        let r = &mut registry;
        let processed = register(
            r,
            "events_processed",
            "Events handled successfully and acknowledged",
            Counters::default(),
        );
        let retried = register(
            r,
            "events_retried",
            "Retryable failures sent back for another attempt",
            Counters::default(),
        );
        let rejected = register(
            r,
            "events_rejected",
            "Events the plugin rejected (also counted as dead-lettered)",
            Counters::default(),
        );
        let duplicates = register(
            r,
            "events_duplicate",
            "Redeliveries of committed events, finished without running the plugin",
            Counters::default(),
        );
        let host_errors = register(
            r,
            "events_host_errors",
            "Events sent back because the host could not publish, commit or ack",
            Counters::default(),
        );
        let dead_lettered = register(
            r,
            "events_dead_lettered",
            "Events moved to the dead-letter stream, by the outcome that sent them",
            Family::default(),
        );
        let terminated = register(
            r,
            "events_terminated",
            "Events ended without processing or a dead letter, on purpose (reason: dead_letter_loop, dead_letter_unstorable)",
            Family::default(),
        );
        let limit_hits = register(
            r,
            "limit_hits",
            "Plugin calls stopped by a sandbox limit (reason: deadline, memory)",
            Family::default(),
        );
        let handler_duration = register_seconds(
            r,
            "handler_duration",
            "Time in the plugin call, per attempt",
        );
        let publish_to_ack = AckLatencies::default();
        r.register_with_unit(
            "publish_to_ack",
            "From the event's arrival in its stream to its acknowledgement",
            Unit::Seconds,
            publish_to_ack.clone(),
        );
        let conflict_reruns = register(
            r,
            "events_conflict_reruns",
            "Plugin calls run again because state they read was written by \
             someone else before their commit (several hosts on one key, say)",
            Counters::default(),
        );
        let in_flight = register(
            r,
            "events_in_flight",
            "Events being handled now",
            Family::default(),
        );
        let pending = register(
            r,
            "consumer_pending_messages",
            "Consumer lag: messages in the stream not yet delivered (num_pending)",
            Family::default(),
        );
        let ack_pending = register(
            r,
            "consumer_ack_pending_messages",
            "Messages delivered and not yet acknowledged (num_ack_pending)",
            Family::default(),
        );
        let redelivered = register(
            r,
            "consumer_redelivered_messages",
            "Unacknowledged messages delivered more than once (num_redelivered)",
            Family::default(),
        );
        let load_failures = register(
            r,
            "plugin_load_failures",
            "Plugin files or versions that could not be loaded",
            Family::default(),
        );
        let commit_groups = register(
            r,
            "commit_group_events",
            "Events made durable by each commit of a plugin's group committer: \
             one JetStream write (an atomic batch) per group, so larger groups \
             cost the server less per event",
            GroupSizes::new_with_constructor(group_histogram as fn() -> Histogram),
        );
        let plugins_running = register(
            r,
            "plugins_running",
            "Plugins being served",
            Gauge::default(),
        );
        let nats_connected = register(
            r,
            "nats_connected",
            "1 while the host is connected to NATS",
            Gauge::default(),
        );
        registry.register(
            "build",
            "The host's build",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("wasmtime", crate::sandbox::WASMTIME_VERSION),
            ]),
        );
        Metrics {
            registry,
            processed,
            retried,
            rejected,
            duplicates,
            host_errors,
            dead_lettered,
            terminated,
            limit_hits,
            handler_duration,
            publish_to_ack,
            conflict_reruns,
            in_flight,
            pending,
            ack_pending,
            redelivered,
            load_failures,
            commit_groups,
            plugins_running,
            nats_connected,
        }
    }

    /// Create every series of a newly served version at zero, so rates
    /// and alerts see it from its first scrape rather than from its first
    /// failure.
    pub fn start_version(&self, plugin: &str, version: &str) {
        // Resolving the per-event series creates them.
        let _ = self.series(plugin, version);
        for limit in LimitHit::ALL {
            let _ = self
                .limit_hits
                .get_or_create(&reason_labels(plugin, version, limit.as_str()));
        }
        let _ = self.in_flight.get_or_create(&plugin_labels(plugin));
        let _ = self.load_failures.get_or_create(&plugin_labels(plugin));
    }

    /// The per-event series of one version, resolved once, to update
    /// without label lookups.
    pub fn series(&self, plugin: &str, version: &str) -> VersionSeries {
        let labels = version_labels(plugin, version);
        VersionSeries {
            version: Arc::from(version),
            dead_lettered: OutcomeKind::failures()
                .map(|k| {
                    let labels = reason_labels(plugin, version, k.as_str());
                    (k, self.dead_lettered.get_or_create_owned(&labels))
                })
                .collect(),
            terminated: TerminationReason::ALL
                .iter()
                .map(|r| {
                    let labels = reason_labels(plugin, version, r.as_str());
                    (*r, self.terminated.get_or_create_owned(&labels))
                })
                .collect(),
            processed: self.processed.get_or_create_owned(&labels),
            retried: self.retried.get_or_create_owned(&labels),
            rejected: self.rejected.get_or_create_owned(&labels),
            duplicates: self.duplicates.get_or_create_owned(&labels),
            host_errors: self.host_errors.get_or_create_owned(&labels),
            handler_duration: self.handler_duration.get_or_create_owned(&labels),
            publish_to_ack: self.publish_to_ack.get_or_create_owned(&labels),
            conflict_reruns: self.conflict_reruns.get_or_create_owned(&labels),
        }
    }

    /// Count a call stopped by one of its plugin's limits.
    pub fn limit_hit(&self, plugin: &str, version: &str, limit: LimitHit) {
        self.limit_hits
            .get_or_create(&reason_labels(plugin, version, limit.as_str()))
            .inc();
    }

    /// The gauges one served plugin updates: events in flight, and its
    /// consumer's lag.
    pub(crate) fn plugin_gauges(&self, plugin: &str) -> (Gauge, LagGauges) {
        let labels = plugin_labels(plugin);
        (
            self.in_flight.get_or_create_owned(&labels),
            LagGauges {
                pending: self.pending.get_or_create_owned(&labels),
                ack_pending: self.ack_pending.get_or_create_owned(&labels),
                redelivered: self.redelivered.get_or_create_owned(&labels),
            },
        )
    }

    /// A plugin stopped: its consumer gauges no longer describe anything
    /// this host does. Counters stay, as Prometheus expects of counters.
    pub fn forget_consumer(&self, plugin: &str) {
        let labels = plugin_labels(plugin);
        for family in [
            &self.in_flight,
            &self.pending,
            &self.ack_pending,
            &self.redelivered,
        ] {
            family.remove(&labels);
        }
    }

    /// The histogram of a plugin's commit groups, by events per group.
    pub fn commit_groups(&self, plugin: &str) -> Histogram {
        self.commit_groups
            .get_or_create_owned(&plugin_labels(plugin))
    }

    /// Count a plugin version that could not be loaded.
    pub fn load_failure(&self, plugin: &str) {
        self.load_failures
            .get_or_create(&plugin_labels(plugin))
            .inc();
    }

    /// Set how many plugins this host serves.
    pub fn set_plugins_running(&self, n: usize) {
        self.plugins_running.set(n as i64);
    }

    /// Set whether the host is connected to NATS.
    pub fn set_nats_connected(&self, connected: bool) {
        self.nats_connected.set(i64::from(connected));
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Register `metric` and keep a handle to it (metrics share their state
/// between clones).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Register a latency histogram family, in seconds.
fn register_seconds(registry: &mut Registry, name: &str, help: &str) -> Latencies {
    let family = Latencies::new_with_constructor(latency_histogram as fn() -> Histogram);
    registry.register_with_unit(name, help, Unit::Seconds, family.clone());
    family
}

fn version_labels(plugin: &str, version: &str) -> VersionLabels {
    VersionLabels {
        plugin: plugin.to_owned(),
        version: version.to_owned(),
    }
}

fn plugin_labels(plugin: &str) -> PluginLabels {
    PluginLabels {
        plugin: plugin.to_owned(),
    }
}

fn reason_labels(plugin: &str, version: &str, reason: &str) -> ReasonLabels {
    ReasonLabels {
        plugin: plugin.to_owned(),
        version: version.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_version_exports_every_series_at_zero() {
        let m = Metrics::new();
        m.start_version("fraud", "abc");
        let text = m.encode();
        for line in [
            r#"weir_events_processed_total{plugin="fraud",version="abc"} 0"#,
            r#"weir_events_dead_lettered_total{plugin="fraud",version="abc",reason="trap"} 0"#,
            r#"weir_events_terminated_total{plugin="fraud",version="abc",reason="dead_letter_loop"} 0"#,
            r#"weir_limit_hits_total{plugin="fraud",version="abc",reason="memory"} 0"#,
            r#"weir_publish_to_ack_seconds_count{plugin="fraud",version="abc"} 0"#,
            r#"weir_handler_duration_seconds_count{plugin="fraud",version="abc"} 0"#,
            r#"weir_events_conflict_reruns_total{plugin="fraud",version="abc"} 0"#,
            r#"weir_events_in_flight{plugin="fraud"} 0"#,
            r#"weir_plugin_load_failures_total{plugin="fraud"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn counts_are_labelled_by_plugin_and_version() {
        let m = Metrics::new();
        let series = m.series("fraud", "abc");
        series.count(Counted::Processed);
        series.count(Counted::Processed);
        series.dead_lettered(OutcomeKind::Reject);
        series.handler_duration(Duration::from_millis(3));
        series.publish_to_ack(Duration::from_millis(4));
        let (_, lag) = m.plugin_gauges("fraud");
        lag.pending.set(7);
        let text = m.encode();
        assert!(
            text.contains(r#"weir_events_processed_total{plugin="fraud",version="abc"} 2"#),
            "{text}"
        );
        assert!(text.contains(
            r#"weir_events_dead_lettered_total{plugin="fraud",version="abc",reason="reject"} 1"#
        ));
        assert!(text.contains(r#"weir_consumer_pending_messages{plugin="fraud"} 7"#));
        assert!(text.contains("weir_handler_duration_seconds_count"));
        assert!(
            text.contains(r#"weir_publish_to_ack_seconds_count{plugin="fraud",version="abc"} 1"#)
        );
        assert!(text.contains("weir_build_info{"));
        m.forget_consumer("fraud");
        assert!(!m.encode().contains("weir_consumer_pending_messages{"));
    }

    #[test]
    fn commit_groups_are_counted_by_their_events() {
        let m = Metrics::new();
        let groups = m.commit_groups("loyalty");
        groups.observe(3.0);
        groups.observe(127.0);
        m.commit_groups("loyalty").observe(1.0);
        let text = m.encode();
        for line in [
            r#"weir_commit_group_events_sum{plugin="loyalty"} 131.0"#,
            r#"weir_commit_group_events_count{plugin="loyalty"} 3"#,
            r#"weir_commit_group_events_bucket{le="4.0",plugin="loyalty"} 2"#,
            r#"weir_commit_group_events_bucket{le="128.0",plugin="loyalty"} 3"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
