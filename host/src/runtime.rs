//! The host: keeps the running plugins in step with the plugin directory.
//!
//! [`Host::reconcile`] compares the directory with what runs and acts on
//! the difference: a new `name.wasm` + `name.toml` starts a subscriber, a
//! changed one is loaded and swapped in, a removed one stops consuming (its
//! durable consumer is kept, so re-adding it resumes where it left off). It
//! runs at start-up, on every (debounced) change the watcher reports, and
//! every [`RESCAN_INTERVAL`] in case a change notification was missed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HostConfig;
use crate::manifest::Manifest;
use crate::pipeline::stats::{PluginStats, StatsSnapshot};
use crate::pipeline::{self, PipelineContext};
use crate::plugin::Plugin;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::scan::{Entry, Fingerprint, Found, Scanner};
use crate::store::PluginStore;
use crate::telemetry::Metrics;

/// How long to wait for JetStream to store a published output or dead letter.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A full rescan of the plugin directory this often, whatever the watcher says.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

/// First and longest wait before starting a plugin again whose start
/// failed for a reason outside its files (its stream does not exist yet,
/// NATS is unreachable).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A plugin the host serves.
struct Running {
    plugin: watch::Sender<Plugin>,
    stats: Arc<PluginStats>,
    task: JoinHandle<()>,
    lag_poller: JoinHandle<()>,
    /// Asks for a restart when the plugin moves to a newer generation.
    generation_watch: JoinHandle<()>,
    stop: CancellationToken,
    fingerprint: Fingerprint,
    generation: u64,
}

/// A plugin file the host could not serve, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadFailure {
    pub path: std::path::PathBuf,
    pub error: String,
    /// The files that failed; the same files are not loaded again...
    #[serde(skip)]
    fingerprint: Option<Fingerprint>,
    /// ...unless the failure was outside them, when they are tried again
    /// at this time, with a growing backoff.
    #[serde(skip)]
    retry: Option<(Instant, Duration)>,
}

impl LoadFailure {
    /// Whether `found` should be loaded despite this failure: its files
    /// changed, or a retry is due.
    fn allows(&self, found: &Found, now: Instant) -> bool {
        self.fingerprint.as_ref() != Some(&found.fingerprint)
            || self.retry.is_some_and(|(at, _)| at <= now)
    }
}

/// What `weir plugins list` and the admin `/plugins` show about a plugin.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PluginInfo {
    pub name: String,
    /// Empty for a plugin that never loaded.
    pub version: String,
    pub subjects: Vec<String>,
    pub stream: String,
    /// The generation it consumes in (see [`crate::generation`]).
    #[serde(default)]
    pub generation: u64,
    /// `running`; `stalled` when its stream or consumer is gone (it
    /// resumes when they are back); `failed` when no version of it could
    /// be loaded.
    pub status: String,
    #[serde(flatten)]
    pub counters: StatsSnapshot,
    /// Why the plugin's latest files were refused (a running plugin keeps
    /// serving its previous version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Default)]
struct Registry {
    running: BTreeMap<String, Running>,
    failures: BTreeMap<String, LoadFailure>,
}

struct Inner {
    config: HostConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    sandbox: Arc<Sandbox>,
    shutdown: CancellationToken,
    /// Held for a whole reconcile, so two never race to start the same
    /// plugin. The registry lock is only taken briefly inside, never
    /// across a compile or a NATS request, so `/readyz`, `/plugins` and
    /// control requests answer while a plugin compiles.
    scanner: Mutex<Scanner>,
    registry: Mutex<Registry>,
    metrics: Arc<Metrics>,
    /// Plugins to restart in a newer generation, with the generation they
    /// run in now.
    restarts: mpsc::UnboundedSender<(String, u64)>,
}

/// A running host.
pub struct Host {
    inner: Arc<Inner>,
    background: Vec<JoinHandle<()>>,
}

/// Whether two manifests ask for the same consumer and pipeline shape, so a
/// new version can be swapped in without restarting the pipeline.
fn same_pipeline(a: &Manifest, b: &Manifest) -> bool {
    a.subjects == b.subjects
        && a.stream == b.stream
        && a.concurrency == b.concurrency
        && a.ordering_key == b.ordering_key
        && a.exclusive == b.exclusive
}

impl Host {
    /// Connect, start every plugin of the plugin directory, and keep
    /// watching it. A plugin that fails to load is reported and skipped; the
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
        let mut sandbox_config = SandboxConfig::with_default_cache();
        if let Some(dir) = &config.runtime.cache_dir {
            sandbox_config.cache_dir = Some(dir.clone());
        }
        sandbox_config.memory_budget_bytes = config.runtime.max_guest_memory_mb << 20;
        sandbox_config.running_guest_calls = config.runtime.max_running_guest_calls.unwrap_or(0);
        let sandbox = Arc::new(Sandbox::new(sandbox_config)?);
        let scanner = Scanner::new(config.plugins.dir.clone(), config.plugins.max_wasm_mb << 20);
        // Read before any plugin starts, so a missing token file stops
        // start-up instead of leaving a host that cannot be controlled.
        let authority = crate::control::Authority {
            control: config.control.token()?,
            admin: config.admin.bearer_token()?,
        };
        let (restarts, mut restart_requests) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
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
        let bucket =
            crate::plugin_bucket::PluginBucket::open(&inner.js, &inner.config.plugins, true)
                .await?;
        if let Some(bucket) = &bucket {
            // Before the first reconcile, so a new host starts with what is deployed.
            crate::plugin_bucket::materialize(bucket, &inner.config.plugins.dir)
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
        let mut background = vec![
            restarter,
            crate::control::spawn_responder(
                inner.handle(),
                inner.config.control.subject(),
                authority,
            )
            .await?,
        ];
        if inner.config.admin.enabled {
            background.push(crate::admin::spawn(&inner.config.admin, inner.handle()).await?);
        }
        if let Some(bucket) = bucket {
            let handle = inner.handle();
            background.push(crate::plugin_bucket::spawn_sync(
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
            background.push(crate::watch::spawn(
                inner.config.plugins.dir.clone(),
                inner.handle(),
            )?);
        }
        let host = Host { inner, background };
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
        // Make sure the last acks have left the process.
        if let Err(e) = self.inner.client.flush().await {
            tracing::warn!("flushing NATS on shutdown: {e}");
        }
    }
}

/// A plugin removed by [`HostHandle::remove`].
#[derive(Debug, Clone)]
pub struct Removed {
    /// The stream it consumed, when it was running (its consumer lives there).
    pub stream: Option<String>,
}

/// What the watcher and the control responder may do with the host.
#[derive(Clone)]
pub(crate) struct HostHandle(Arc<Inner>);

impl HostHandle {
    pub async fn reconcile(&self) -> anyhow::Result<()> {
        self.0.reconcile().await
    }

    pub async fn plugins(&self) -> Vec<PluginInfo> {
        self.0.plugins().await
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.0.client
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.0.shutdown.clone()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Why the host is not ready to process events, if it is not: NATS is
    /// unreachable, or a plugin in the directory could not be loaded.
    pub async fn unready_reasons(&self) -> Vec<String> {
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
    pub async fn next_wakeup(&self) -> Option<Instant> {
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
    pub async fn remove(&self, name: &str) -> anyhow::Result<Option<Removed>> {
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

impl Inner {
    fn handle(self: &Arc<Self>) -> HostHandle {
        HostHandle(self.clone())
    }

    async fn plugins(&self) -> Vec<PluginInfo> {
        let registry = self.registry.lock().await;
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
                    "stalled"
                } else {
                    "running"
                }
                .into(),
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
                status: "failed".into(),
                counters: StatsSnapshot::default(),
                error: Some(failure.error.clone()),
            });
        let mut all: Vec<PluginInfo> = running.chain(failed).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    async fn reconcile(&self) -> anyhow::Result<()> {
        let mut scanner = self.scanner.lock().await;
        // Reads changed files only: small, except for a new component.
        let entries = scanner.scan()?;
        let now = Instant::now();
        // Decide under the registry lock; act outside it.
        let (gone, todo) = {
            let mut registry = self.registry.lock().await;
            let found = |name: &str| matches!(entries.get(name), Some(Entry::Found(_)));
            let refused = |name: &str| matches!(entries.get(name), Some(Entry::Refused { .. }));
            let gone: Vec<String> = registry
                .running
                .keys()
                .filter(|n| !found(n) && !refused(n))
                .cloned()
                .collect();
            let gone: Vec<(String, Running)> = gone
                .into_iter()
                .filter_map(|n| registry.running.remove(&n).map(|r| (n, r)))
                .collect();
            registry
                .failures
                .retain(|name, _| entries.contains_key(name));
            let mut todo = Vec::new();
            for (name, entry) in entries {
                match entry {
                    Entry::Found(found) => {
                        let serving = registry
                            .running
                            .get(&name)
                            .is_some_and(|r| r.fingerprint == found.fingerprint);
                        if serving {
                            // Back to the version that runs: an earlier
                            // rejection of other files no longer applies.
                            registry.failures.remove(&name);
                        } else if registry
                            .failures
                            .get(&name)
                            .is_none_or(|f| f.allows(&found, now))
                        {
                            todo.push((name, found));
                        }
                    }
                    Entry::Refused { path, reason } => {
                        if registry.failures.get(&name).map(|f| &f.error) != Some(&reason) {
                            tracing::error!(path = %path.display(), "plugin not loaded: {reason}");
                            self.metrics.load_failure(&name);
                        }
                        registry.failures.insert(
                            name,
                            LoadFailure {
                                path,
                                error: reason,
                                fingerprint: None,
                                retry: None,
                            },
                        );
                    }
                }
            }
            self.metrics.set_plugins_running(registry.running.len());
            (gone, todo)
        };
        for (name, running) in gone {
            stop(&name, running).await;
            tracing::info!(plugin = %name, "plugin removed; its consumer is kept, re-adding it resumes where it stopped");
        }
        for (name, found) in todo {
            self.bring_up(&name, found).await;
        }
        let registry = self.registry.lock().await;
        self.metrics.set_plugins_running(registry.running.len());
        Ok(())
    }

    /// Load `found` and start it, or swap it in for the running version.
    async fn bring_up(&self, name: &str, found: Found) {
        let landed = Instant::now();
        let loaded = self.load(name, &found).await;
        let result = match loaded {
            // A bad component or manifest stays bad until its files change.
            Err(e) => Err((e, false)),
            // Starting can fail on NATS (stream missing, server away): retried.
            Ok(plugin) => self
                .apply(name, plugin, found.fingerprint.clone(), landed)
                .await
                .map_err(|e| (e, true)),
        };
        let mut registry = self.registry.lock().await;
        match result {
            Ok(()) => {
                registry.failures.remove(name);
            }
            Err((e, retryable)) => {
                self.metrics.load_failure(name);
                let retry = retryable.then(|| {
                    let backoff = match registry.failures.get(name).and_then(|f| f.retry) {
                        Some((_, last)) => (last * 2).min(RETRY_MAX),
                        None => RETRY_FIRST,
                    };
                    (Instant::now() + backoff, backoff)
                });
                if registry.running.contains_key(name) {
                    tracing::error!(plugin = %name, "new version rejected, the running version keeps serving: {e:#}");
                } else if let Some((_, backoff)) = retry {
                    tracing::error!(path = %found.wasm_path.display(), "plugin not started, retrying in {backoff:?}: {e:#}");
                } else {
                    tracing::error!(path = %found.wasm_path.display(), "plugin not started: {e:#}");
                }
                registry.failures.insert(
                    name.to_owned(),
                    LoadFailure {
                        path: found.wasm_path,
                        error: format!("{e:#}"),
                        fingerprint: Some(found.fingerprint),
                        retry,
                    },
                );
            }
        }
    }

    /// Validate and compile off the async workers (seconds on a cache miss).
    async fn load(&self, name: &str, found: &Found) -> anyhow::Result<Plugin> {
        tracing::info!(plugin = %name, path = %found.wasm_path.display(), "loading plugin");
        let manifest = Manifest::parse(&found.manifest_text).map_err(|message| {
            crate::manifest::ManifestError::Invalid {
                path: Manifest::path_for(&found.wasm_path),
                message,
            }
        })?;
        let max_payload = self.client.server_info().max_payload;
        manifest.limits.check_fits(max_payload).map_err(|message| {
            crate::manifest::ManifestError::Invalid {
                path: Manifest::path_for(&found.wasm_path),
                message,
            }
        })?;
        let sandbox = self.sandbox.clone();
        let wasm = found.bytes()?;
        let (name, path) = (name.to_owned(), found.wasm_path.clone());
        Ok(
            tokio::task::spawn_blocking(move || sandbox.load_bytes(name, &path, &wasm, manifest))
                .await??,
        )
    }

    /// Start `plugin`, or swap it in for the running version of `name`.
    async fn apply(
        &self,
        name: &str,
        plugin: Plugin,
        fingerprint: Fingerprint,
        landed: Instant,
    ) -> anyhow::Result<()> {
        let replaced = {
            let mut registry = self.registry.lock().await;
            match registry.running.get_mut(name) {
                Some(running) => {
                    let old = running.plugin.borrow().clone();
                    if same_pipeline(old.manifest(), plugin.manifest()) {
                        tracing::info!(
                            plugin = %name,
                            from = %old.version(),
                            to = %plugin.version(),
                            compile_cache = %plugin.cache_status(),
                            swap_ms = landed.elapsed().as_millis() as u64,
                            "plugin updated; events in flight finish on the old version"
                        );
                        // Later events take the new version; in-flight ones keep theirs.
                        self.metrics.start_version(name, plugin.version().as_str());
                        running.plugin.send_replace(plugin);
                        running.fingerprint = fingerprint;
                        return Ok(());
                    }
                    // Subjects, stream or concurrency changed: the consumer
                    // and the pipeline are rebuilt (the consumer keeps its
                    // position).
                    tracing::info!(plugin = %name, from = %old.version(), to = %plugin.version(), "new consumer shape; restarting the plugin's pipeline");
                    registry.running.remove(name)
                }
                None => None,
            }
        };
        let reshaped = replaced.is_some();
        if let Some(running) = replaced {
            stop(name, running).await;
        }
        let running = self.serve(plugin, fingerprint).await?;
        if reshaped {
            // Only now: events published from here reach the new shape.
            tracing::info!(plugin = %name, "plugin updated with a new consumer shape");
        }
        self.registry
            .lock()
            .await
            .running
            .insert(name.to_owned(), running);
        Ok(())
    }

    async fn serve(&self, plugin: Plugin, fingerprint: Fingerprint) -> anyhow::Result<Running> {
        let config = &self.config;
        let name = plugin.name().to_owned();
        // The consumer first: a changed filter takes effect as soon as it can,
        // since events on a new subject published before it do not reach it.
        let generation = crate::generation::of_plugin(&self.js, &config.state, &name).await?;
        let (consumer, incarnation) = crate::source::ensure_consumer(
            &self.js,
            &name,
            plugin.manifest(),
            &generation,
            config.ack_wait(),
        )
        .await?;
        let store = Arc::new(PluginStore::open(&self.js, &config.state, &name).await?);
        let ctx = Arc::new(PipelineContext::new(
            self.js.clone(),
            incarnation,
            config.dead_letter.subject_prefix.clone(),
            store.clone(),
            PUBLISH_TIMEOUT,
            config.ack_wait(),
            plugin.manifest().concurrency,
            self.metrics.clone(),
        ));
        let stats = ctx.stats.clone();
        tracing::info!(
            plugin = %name,
            version = %plugin.version(),
            subjects = ?plugin.manifest().subjects,
            stream = %plugin.manifest().stream,
            start = %generation.start.as_ref().map_or_else(|| plugin.manifest().start.to_string(), |s| s.to_string()),
            generation = generation.number,
            compile_cache = %plugin.cache_status(),
            "plugin started"
        );
        self.metrics.start_version(&name, plugin.version().as_str());
        let stop = self.shutdown.child_token();
        let lag_poller = tokio::spawn(crate::telemetry::lag::poll(
            consumer.clone(),
            name.clone(),
            stats.clone(),
            self.metrics.clone(),
            Duration::from_millis(config.telemetry.lag_poll_ms),
            stop.clone(),
        ));
        let generation_watch = {
            let (store, stop, restarts) = (store.clone(), stop.clone(), self.restarts.clone());
            let (name, ours) = (name.clone(), generation.number);
            tokio::spawn(async move {
                if let Some(newer) =
                    crate::generation::newer_than(store.bucket(), ours, &stop).await
                {
                    tracing::info!(plugin = %name, from = ours, to = newer.number, why = %newer.why, "plugin moved to a new generation; restarting its pipeline");
                    let _ = restarts.send((name, ours));
                }
            })
        };
        let (sender, receiver) = watch::channel(plugin);
        let task = tokio::spawn(pipeline::run(
            ctx,
            receiver,
            consumer,
            stop.clone(),
            config.shutdown_grace(),
        ));
        Ok(Running {
            plugin: sender,
            stats,
            task,
            lag_poller,
            generation_watch,
            stop,
            fingerprint,
            generation: generation.number,
        })
    }

    /// Restart `name`'s pipeline in its newest generation, if it still
    /// runs in generation `from`: in-flight events finish first, as when
    /// it is removed.
    async fn restart(&self, name: &str, from: u64) {
        // No reconcile may start or swap it meanwhile.
        let _scanning = self.scanner.lock().await;
        let running = {
            let mut registry = self.registry.lock().await;
            match registry.running.get(name) {
                Some(r) if r.generation == from => registry.running.remove(name),
                _ => None,
            }
        };
        let Some(running) = running else { return };
        let plugin = running.plugin.borrow().clone();
        let fingerprint = running.fingerprint.clone();
        stop(name, running).await;
        let served = self.serve(plugin, fingerprint.clone()).await;
        let mut registry = self.registry.lock().await;
        match served {
            Ok(running) => {
                registry.running.insert(name.to_owned(), running);
            }
            Err(e) => {
                // Tried again by the reconcile's retries, as a failed start is.
                tracing::error!(plugin = %name, "plugin not restarted in its new generation, retrying in {RETRY_FIRST:?}: {e:#}");
                self.metrics.load_failure(name);
                registry.failures.insert(
                    name.to_owned(),
                    LoadFailure {
                        path: self.config.plugins.dir.join(format!("{name}.wasm")),
                        error: format!("{e:#}"),
                        fingerprint: Some(fingerprint),
                        retry: Some((Instant::now() + RETRY_FIRST, RETRY_FIRST)),
                    },
                );
            }
        }
        self.metrics.set_plugins_running(registry.running.len());
    }
}

/// Stop one plugin's pipeline: in-flight events finish (or are released
/// after the grace period); its durable consumer stays.
async fn stop(name: &str, running: Running) {
    running.stop.cancel();
    if let Err(e) = running.task.await {
        tracing::error!(plugin = %name, "pipeline task failed: {e}");
    }
    let _ = running.lag_poller.await;
    let _ = running.generation_watch.await;
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
