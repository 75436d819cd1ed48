//! The host: plugins from a directory, each with its own pipeline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HostConfig;
use crate::pipeline::stats::{PluginStats, StatsSnapshot};
use crate::pipeline::{self, PipelineContext};
use crate::plugin::Plugin;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::store::PluginStore;

/// How long to wait for JetStream to store a published output or dead letter.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A plugin the host serves.
struct Running {
    plugin: watch::Sender<Plugin>,
    stats: Arc<PluginStats>,
    task: JoinHandle<()>,
}

/// A plugin file the host could not serve, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub error: String,
}

/// A running host.
pub struct Host {
    client: async_nats::Client,
    running: BTreeMap<String, Running>,
    failures: Vec<LoadFailure>,
    shutdown: CancellationToken,
}

/// The `*.wasm` files of `dir`, sorted by name.
pub fn plugin_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading plugin directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

impl Host {
    /// Connect, load every plugin of the plugin directory and start its
    /// pipeline. A plugin that fails to load is reported and skipped; the
    /// others run.
    pub async fn start(config: HostConfig) -> anyhow::Result<Self> {
        let client = crate::nats::connect(&config).await?;
        Self::start_with_client(config, client).await
    }

    pub async fn start_with_client(
        config: HostConfig,
        client: async_nats::Client,
    ) -> anyhow::Result<Self> {
        let js = jetstream::new(client.clone());
        crate::nats::ensure_streams(&js, &config).await?;
        let sandbox_config = match &config.runtime.cache_dir {
            Some(dir) => SandboxConfig {
                cache_dir: Some(dir.clone()),
            },
            None => SandboxConfig::with_default_cache(),
        };
        let sandbox = Arc::new(Sandbox::new(sandbox_config)?);
        let shutdown = CancellationToken::new();
        let mut host = Host {
            client,
            running: BTreeMap::new(),
            failures: Vec::new(),
            shutdown,
        };
        for path in plugin_files(&config.plugins.dir)? {
            let loaded = {
                let sandbox = sandbox.clone();
                let path = path.clone();
                // Compiling is CPU-bound (seconds on a cache miss).
                tokio::task::spawn_blocking(move || sandbox.load(&path)).await?
            };
            let result = match loaded {
                Ok(plugin) => host.serve(&config, &js, plugin).await,
                Err(e) => Err(anyhow::Error::from(e)),
            };
            if let Err(e) = result {
                tracing::error!(path = %path.display(), "plugin not started: {e:#}");
                host.failures.push(LoadFailure {
                    path,
                    error: format!("{e:#}"),
                });
            }
        }
        if host.running.is_empty() {
            tracing::warn!(dir = %config.plugins.dir.display(), "no plugin is running");
        }
        Ok(host)
    }

    async fn serve(
        &mut self,
        config: &HostConfig,
        js: &jetstream::Context,
        plugin: Plugin,
    ) -> anyhow::Result<()> {
        let name = plugin.name().to_owned();
        anyhow::ensure!(
            !self.running.contains_key(&name),
            "a plugin named {name} is already running"
        );
        let consumer =
            crate::source::ensure_consumer(js, &name, plugin.manifest(), config.ack_wait()).await?;
        let store = Arc::new(PluginStore::open(js, &config.state, &name).await?);
        let stats = Arc::new(PluginStats::default());
        let ctx = Arc::new(PipelineContext {
            js: js.clone(),
            store,
            idempotency: config.state.idempotency,
            dlq_prefix: config.dead_letter.subject_prefix.clone(),
            publish_timeout: PUBLISH_TIMEOUT,
            ack_wait: config.ack_wait(),
            stats: stats.clone(),
        });
        tracing::info!(
            plugin = %name,
            version = %plugin.version(),
            subjects = ?plugin.manifest().subjects,
            stream = %plugin.manifest().stream,
            compile_cache = %plugin.cache_status(),
            "plugin started"
        );
        let (sender, receiver) = watch::channel(plugin);
        let task = tokio::spawn(pipeline::run(
            ctx,
            receiver,
            consumer,
            self.shutdown.child_token(),
            config.shutdown_grace(),
        ));
        self.running.insert(
            name,
            Running {
                plugin: sender,
                stats,
                task,
            },
        );
        Ok(())
    }

    /// Names, versions and counters of the running plugins.
    pub fn plugins(&self) -> Vec<(String, String, StatsSnapshot)> {
        self.running
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    r.plugin.borrow().version().to_string(),
                    r.stats.snapshot(),
                )
            })
            .collect()
    }

    /// The live counters of one plugin.
    pub fn stats(&self, plugin: &str) -> Option<Arc<PluginStats>> {
        self.running.get(plugin).map(|r| r.stats.clone())
    }

    /// Plugin files that could not be served.
    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Stop pulling, finish or release in-flight events, and return when
    /// every pipeline has stopped.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for (name, running) in self.running {
            if let Err(e) = running.task.await {
                tracing::error!(plugin = %name, "pipeline task failed: {e}");
            }
        }
        // Make sure the last acks have left the process.
        if let Err(e) = self.client.flush().await {
            tracing::warn!("flushing NATS on shutdown: {e}");
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
