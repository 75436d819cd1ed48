//! Bringing the running set in line with the plugin directory: start what
//! is new, swap in what changed, stop what went, and restart a plugin in
//! a newer consumer generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::registry::{LoadFailure, PluginInfo, Registry, Running, stop};
use super::scan::{Entry, Fingerprint, Found, Scanner};
use crate::config::HostConfig;
use crate::jetstream::store::PluginStore;
use crate::manifest::Manifest;
use crate::pipeline::{self, PipelineContext};
use crate::sandbox::Sandbox;
use crate::sandbox::plugin::Plugin;
use crate::telemetry::{Metrics, PluginStats};

/// How long to wait for JetStream to store a published output or dead letter.
pub(super) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// First and longest wait before starting a plugin again whose start
/// failed for a reason outside its files (its stream does not exist yet,
/// NATS is unreachable).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What the supervisor and its services share.
pub(super) struct Core {
    pub(super) config: HostConfig,
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) shutdown: CancellationToken,
    /// Held for a whole reconcile, so two never race to start the same
    /// plugin. The registry lock is only taken briefly inside, never
    /// across a compile or a NATS request, so `/readyz`, `/plugins` and
    /// control requests answer while a plugin compiles.
    pub(super) scanner: Mutex<Scanner>,
    pub(super) registry: Mutex<Registry>,
    pub(super) metrics: Arc<Metrics>,
    /// Plugins to restart in a newer generation, with the generation they
    /// run in now.
    pub(super) restarts: mpsc::UnboundedSender<(String, u64)>,
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

impl Core {
    pub(super) async fn plugins(&self) -> Vec<PluginInfo> {
        self.registry.lock().await.infos()
    }

    pub(super) async fn reconcile(&self) -> anyhow::Result<()> {
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
        let (name, path, digest) = (
            name.to_owned(),
            found.wasm_path.clone(),
            found.fingerprint.wasm,
        );
        Ok(
            tokio::task::spawn_blocking(move || sandbox.load_file(name, &path, &digest, manifest))
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
        let generation =
            crate::jetstream::generation::of_plugin(&self.js, &config.state, &name).await?;
        let (consumer, incarnation) = crate::jetstream::source::ensure_consumer(
            &self.js,
            &name,
            plugin.manifest(),
            &generation,
            config.ack_wait(),
        )
        .await?;
        let groups = self.metrics.commit_groups(&name);
        let store = Arc::new(PluginStore::open(&self.js, &config.state, &name, groups).await?);
        let ctx = Arc::new(PipelineContext::new(
            self.js.clone(),
            incarnation,
            config.dead_letter.subject_prefix.clone(),
            store.clone(),
            PUBLISH_TIMEOUT,
            config.ack_wait(),
            plugin.manifest().concurrency,
            self.metrics.clone(),
            Arc::new(PluginStats::of(&self.metrics, &name)),
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
                    crate::jetstream::generation::newer_than(store.bucket(), ours, &stop).await
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
    pub(super) async fn restart(&self, name: &str, from: u64) {
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
