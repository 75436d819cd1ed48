//! The running set: the plugins this host serves, the plugin files it
//! could not serve and why, and what it reports about both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::scan::{Fingerprint, Found};
use crate::labels::labelled;
use crate::sandbox::plugin::Plugin;
use crate::telemetry::plugin_stats::{PluginStats, StatsSnapshot};

/// A plugin the host serves.
pub(super) struct Running {
    pub(super) plugin: watch::Sender<Plugin>,
    pub(super) stats: Arc<PluginStats>,
    pub(super) task: JoinHandle<()>,
    pub(super) lag_poller: JoinHandle<()>,
    /// Asks for a restart when the plugin moves to a newer generation.
    pub(super) generation_watch: JoinHandle<()>,
    pub(super) stop: CancellationToken,
    pub(super) fingerprint: Fingerprint,
    pub(super) generation: u64,
}

/// A plugin file the host could not serve, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadFailure {
    /// The component file.
    pub path: std::path::PathBuf,
    /// Why it could not be served.
    pub error: String,
    /// The files that failed; the same files are not loaded again...
    #[serde(skip)]
    pub(super) fingerprint: Option<Fingerprint>,
    /// ...unless the failure was outside them, when they are tried again
    /// at this time, with a growing backoff.
    #[serde(skip)]
    pub(super) retry: Option<(Instant, Duration)>,
}

impl LoadFailure {
    /// Whether `found` should be loaded despite this failure: its files
    /// changed, or a retry is due.
    pub(super) fn allows(&self, found: &Found, now: Instant) -> bool {
        self.fingerprint.as_ref() != Some(&found.fingerprint)
            || self.retry.is_some_and(|(at, _)| at <= now)
    }
}

labelled! {
    /// Whether a plugin is serving events.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum PluginStatus {
        /// Serving events.
        Running => "running",
        /// Its stream or consumer is gone; it resumes when they are back.
        Stalled => "stalled",
        /// No version of it could be loaded.
        Failed => "failed",
    }
}

/// What `weir plugins list` and the admin `/plugins` show about a plugin.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PluginInfo {
    /// The plugin's name.
    pub name: String,
    /// Empty for a plugin that never loaded.
    pub version: String,
    /// The subjects it consumes.
    pub subjects: Vec<String>,
    /// The stream it consumes from.
    pub stream: String,
    /// The generation it consumes in (see [`crate::jetstream::generation`]).
    #[serde(default)]
    pub generation: u64,
    /// Whether it is serving events.
    pub status: PluginStatus,
    /// What happened to its events since its pipeline started.
    #[serde(flatten)]
    pub counters: StatsSnapshot,
    /// Why the plugin's latest files were refused (a running plugin keeps
    /// serving its previous version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) running: BTreeMap<String, Running>,
    pub(super) failures: BTreeMap<String, LoadFailure>,
}

impl Registry {
    /// What the plugins list shows, by name.
    pub(super) fn infos(&self) -> Vec<PluginInfo> {
        let registry = self;
        let error = |name: &str| registry.failures.get(name).map(|f| f.error.clone());
        let running = registry.running.iter().map(|(name, r)| {
            let plugin = r.plugin.borrow();
            let stalled = r.stats.stalled();
            PluginInfo {
                name: name.clone(),
                version: plugin.version().to_string(),
                subjects: plugin.manifest().subjects.clone(),
                stream: plugin.manifest().stream.clone(),
                generation: r.generation,
                status: if stalled.is_some() {
                    PluginStatus::Stalled
                } else {
                    PluginStatus::Running
                },
                counters: r.stats.snapshot(),
                error: stalled.or_else(|| error(name)),
            }
        });
        let failed = registry
            .failures
            .iter()
            .filter(|(name, _)| !registry.running.contains_key(*name))
            .map(|(name, failure)| PluginInfo {
                name: name.clone(),
                version: String::new(),
                subjects: Vec::new(),
                stream: String::new(),
                generation: 0,
                status: PluginStatus::Failed,
                counters: StatsSnapshot::default(),
                error: Some(failure.error.clone()),
            });
        let mut all: Vec<PluginInfo> = running.chain(failed).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// Stop one plugin's pipeline: in-flight events finish (or are released
/// after the grace period); its durable consumer stays.
pub(super) async fn stop(name: &str, running: Running) {
    running.stop.cancel();
    if let Err(e) = running.task.await {
        tracing::error!(plugin = %name, "pipeline task failed: {e}");
    }
    let _ = running.lag_poller.await;
    let _ = running.generation_watch.await;
}

#[cfg(test)]
mod tests {
    use super::PluginStatus;

    #[test]
    fn a_status_is_sent_as_it_is_shown() {
        for status in PluginStatus::ALL {
            let sent = serde_json::to_value(status).unwrap();
            assert_eq!(sent, status.as_str());
            assert_eq!(
                serde_json::from_value::<PluginStatus>(sent).unwrap(),
                *status
            );
        }
    }
}
