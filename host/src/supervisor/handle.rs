//! What the supervisor's services (the watcher, the control responder,
//! the admin server) may do with it.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::reconcile::Core;
use super::registry::{PluginInfo, stop};
use crate::manifest::Manifest;

/// A plugin removed by [`Handle::remove`].
#[derive(Debug, Clone)]
pub(crate) struct Removed {
    /// The stream it consumed, when it was running (its consumer lives there).
    pub stream: Option<String>,
}

/// What the watcher and the control responder may do with the host.
#[derive(Clone)]
pub(crate) struct Handle(Arc<Core>);

impl Handle {
    pub(super) fn new(core: Arc<Core>) -> Self {
        Handle(core)
    }

    pub(crate) async fn reconcile(&self) -> anyhow::Result<()> {
        self.0.reconcile().await
    }

    pub(crate) async fn plugins(&self) -> Vec<PluginInfo> {
        self.0.plugins().await
    }

    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.0.client
    }

    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.0.shutdown.clone()
    }

    #[cfg(feature = "admin")]
    pub(crate) fn metrics(&self) -> &Arc<crate::telemetry::Metrics> {
        &self.0.metrics
    }

    /// Why the host is not ready to process events, if it is not: NATS is
    /// unreachable, or a plugin in the directory could not be loaded.
    #[cfg(feature = "admin")]
    pub(crate) async fn unready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        let state = self.0.client.connection_state();
        if state != async_nats::connection::State::Connected {
            reasons.push(format!("NATS is not connected ({state})"));
        }
        let registry = self.0.registry.lock().await;
        for (name, failure) in &registry.failures {
            reasons.push(format!("plugin {name} failed to load: {}", failure.error));
        }
        for (name, running) in &registry.running {
            if let Some(why) = running.stats.stalled() {
                reasons.push(format!("plugin {name} cannot pull events: {why}"));
            }
        }
        reasons
    }

    /// The next moment a reconcile has work to do without any file
    /// changing: a failed start to retry, a lone file to report.
    pub(crate) async fn next_wakeup(&self) -> Option<Instant> {
        let retries = self
            .0
            .registry
            .lock()
            .await
            .failures
            .values()
            .filter_map(|f| f.retry.map(|(at, _)| at))
            .min();
        let unpaired = self.0.scanner.lock().await.next_deadline();
        retries.into_iter().chain(unpaired).min()
    }

    /// Remove a plugin's files and stop it, whether it runs or failed to
    /// load; its consumer is kept unless the caller deletes it. Returns
    /// what was removed, or `None` if this host has no such plugin.
    pub(crate) async fn remove(&self, name: &str) -> anyhow::Result<Option<Removed>> {
        crate::names::validate_plugin_name(name).map_err(anyhow::Error::msg)?;
        let inner = &self.0;
        // No reconcile may restart it between the files going and the stop.
        let _scanning = inner.scanner.lock().await;
        let (running, failed) = {
            let mut registry = inner.registry.lock().await;
            let running = registry.running.remove(name);
            let failed = registry.failures.remove(name);
            inner.metrics.set_plugins_running(registry.running.len());
            (running, failed)
        };
        if running.is_none() && failed.is_none() {
            return Ok(None);
        }
        let stream = running
            .as_ref()
            .map(|r| r.plugin.borrow().manifest().stream.clone());
        let wasm = inner.config.plugins.dir.join(format!("{name}.wasm"));
        for path in [Manifest::path_for(&wasm), wasm] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        if let Some(running) = running {
            stop(name, running).await;
        }
        Ok(Some(Removed { stream }))
    }
}
