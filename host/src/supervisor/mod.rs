//! The host: keeps the running plugins in step with the plugin directory.
//!
//! [`Supervisor::reconcile`] compares the directory with what runs and acts on
//! the difference: a new `name.wasm` + `name.toml` starts a subscriber, a
//! changed one is loaded and swapped in, a removed one stops consuming (its
//! durable consumer is kept, so re-adding it resumes where it left off). It
//! runs at start-up, on every (debounced) change the watcher reports, and
//! every [`watch::RESCAN_INTERVAL`] in case a change notification was missed.

#[cfg(feature = "admin")]
pub mod admin;
pub mod control;
mod handle;
mod reconcile;
mod registry;
pub mod scan;
mod signals;
pub mod watch;

use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HostConfig;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::telemetry::Metrics;
use crate::telemetry::plugin_stats::PluginStats;
pub(crate) use handle::Handle;
use reconcile::Core;
pub use registry::{LoadFailure, PluginInfo, PluginStatus};
use registry::{Registry, stop};
use scan::Scanner;
pub use signals::shutdown_signal;
use watch::RESCAN_INTERVAL;

/// How long shutdown waits for the last acks to leave for NATS.
const FLUSH_ON_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

/// A running host: its plugins, and the services that keep them in step.
pub struct Supervisor {
    inner: Arc<Core>,
    background: Vec<JoinHandle<()>>,
}

impl Supervisor {
    /// Connect, start every plugin of the plugin directory, and keep
    /// watching it. A plugin that fails to load is reported and skipped; the
    /// others run.
    pub async fn start(config: HostConfig) -> anyhow::Result<Self> {
        let client = crate::jetstream::connection::connect(&config).await?;
        Self::start_with_client(config, client).await
    }

    /// [`Supervisor::start`] with a connection the caller made.
    pub async fn start_with_client(
        config: HostConfig,
        client: async_nats::Client,
    ) -> anyhow::Result<Self> {
        let js = jetstream::new(client.clone());
        crate::jetstream::connection::ensure_streams(&js, &config).await?;
        let mut sandbox_config = SandboxConfig::with_default_cache();
        if let Some(dir) = &config.runtime.cache_dir {
            sandbox_config.cache_dir = Some(dir.clone());
        }
        sandbox_config.memory_budget_bytes = config.runtime.max_guest_memory_mb << 20;
        sandbox_config.running_guest_calls = config.runtime.max_running_guest_calls.unwrap_or(0);
        sandbox_config.running_long_calls = config.runtime.max_running_long_calls.unwrap_or(0);
        sandbox_config.long_calls = config.runtime.long_calls;
        let sandbox = Arc::new(Sandbox::new(sandbox_config)?);
        if config.runtime.long_calls != sandbox.long_calls() {
            tracing::warn!(
                asked = ?config.runtime.long_calls,
                running = ?sandbox.long_calls(),
                "long guest calls cannot run as configured: `idle` needs CAP_SYS_NICE or \
                 RLIMIT_NICE 20 (e.g. systemd's LimitNICE=20) to switch a thread back from \
                 SCHED_IDLE, and `long-slice` needs Linux 6.12 or later"
            );
        }
        let scanner = Scanner::new(config.plugins.dir.clone(), config.plugins.max_wasm_mb << 20);
        // Read before any plugin starts, so a missing token file stops
        // start-up instead of leaving a host that cannot be controlled.
        let authority = control::Authority {
            control: config.control.token()?,
            admin: config.admin.bearer_token()?,
        };
        let (restarts, mut restart_requests) = mpsc::unbounded_channel();
        let inner = Arc::new(Core {
            config,
            client,
            js,
            sandbox,
            shutdown: CancellationToken::new(),
            scanner: Mutex::new(scanner),
            registry: Mutex::new(Registry::default()),
            metrics: Arc::new(Metrics::new()),
            restarts,
        });
        let bucket = crate::jetstream::plugin_bucket::PluginBucket::open(
            &inner.js,
            &inner.config.plugins,
            true,
        )
        .await?;
        if let Some(bucket) = &bucket {
            // Before the first reconcile, so a new host starts with what is deployed.
            crate::jetstream::plugin_bucket::materialize(bucket, &inner.config.plugins.dir)
                .await
                .with_context(|| format!("writing the plugins deployed in {}", bucket.name()))?;
        }
        inner.reconcile().await?;
        let restarter = {
            // Weak: the channel's sender lives in `inner`, so a strong
            // reference here would keep both alive forever.
            let (weak, shutdown) = (Arc::downgrade(&inner), inner.shutdown.clone());
            tokio::spawn(async move {
                loop {
                    let (name, from) = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = restart_requests.recv() => match next {
                            Some(request) => request,
                            None => return,
                        },
                    };
                    let Some(inner) = weak.upgrade() else { return };
                    inner.restart(&name, from).await;
                }
            })
        };
        let mut background = vec![restarter];
        let admin_addr = match inner.config.admin.enabled {
            false => None,
            #[cfg(feature = "admin")]
            true => {
                let (task, addr) =
                    admin::spawn(&inner.config.admin, Handle::new(inner.clone())).await?;
                background.push(task);
                Some(addr)
            }
            #[cfg(not(feature = "admin"))]
            true => anyhow::bail!(
                "admin.enabled is set, but this build of weir has no admin endpoint \
                 (the `admin` feature is off)"
            ),
        };
        background.push(
            control::spawn_responder(
                Handle::new(inner.clone()),
                inner.config.control.subject(),
                authority,
                admin_addr,
            )
            .await?,
        );
        if let Some(bucket) = bucket {
            let handle = Handle::new(inner.clone());
            background.push(crate::jetstream::plugin_bucket::spawn_sync(
                bucket,
                inner.config.plugins.dir.clone(),
                RESCAN_INTERVAL,
                inner.shutdown.clone(),
                move || {
                    let handle = handle.clone();
                    async move {
                        if let Err(e) = handle.reconcile().await {
                            tracing::error!("reconciling plugins after a bucket change: {e:#}");
                        }
                    }
                },
            ));
        }
        if inner.config.plugins.watch {
            background.push(watch::spawn(
                inner.config.plugins.dir.clone(),
                Handle::new(inner.clone()),
            )?);
        }
        let host = Supervisor { inner, background };
        if host.plugins().await.is_empty() {
            tracing::warn!(dir = %host.inner.config.plugins.dir.display(), "no plugin is running");
        }
        Ok(host)
    }

    /// Bring the running plugins in line with the plugin directory now.
    pub async fn reconcile(&self) -> anyhow::Result<()> {
        self.inner.reconcile().await
    }

    /// Names, versions and counters of the running plugins.
    pub async fn plugins(&self) -> Vec<PluginInfo> {
        self.inner.plugins().await
    }

    /// The host's Prometheus metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The live counters of one plugin.
    pub async fn stats(&self, plugin: &str) -> Option<Arc<PluginStats>> {
        self.inner
            .registry
            .lock()
            .await
            .running
            .get(plugin)
            .map(|r| r.stats.clone())
    }

    /// Plugin files that could not be served.
    pub async fn failures(&self) -> Vec<LoadFailure> {
        self.inner
            .registry
            .lock()
            .await
            .failures
            .values()
            .cloned()
            .collect()
    }

    /// The host's NATS connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Stop pulling, finish or release in-flight events, and return when
    /// every pipeline has stopped.
    pub async fn shutdown(self) {
        self.inner.shutdown.cancel();
        for task in self.background {
            let _ = task.await;
        }
        let running = std::mem::take(&mut self.inner.registry.lock().await.running);
        for (name, running) in running {
            stop(&name, running).await;
        }
        // Make sure the last acks have left the process. A flush waits for
        // a reconnect, so with the server gone too (Ctrl-C on `weir dev`
        // stops its private server first) it is bounded: an ack that never
        // left means a redelivery, which the done marks finish.
        match tokio::time::timeout(FLUSH_ON_SHUTDOWN, self.inner.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("flushing NATS on shutdown: {e}"),
            Err(_) => tracing::warn!(
                "NATS is unreachable: acks not sent within {FLUSH_ON_SHUTDOWN:?} of shutdown are redelivered later"
            ),
        }
    }
}
