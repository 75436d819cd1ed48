//! The per-plugin pipeline: pull from the plugin's durable consumer, run
//! each event through the plugin with bounded concurrency, act on the
//! outcome, and shut down without losing anything.

mod contention;
mod lanes;
mod process;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use lanes::Lanes;
pub use process::Disposition;

use crate::jetstream::source::Incarnation;
use crate::jetstream::store::PluginStore;
use crate::outcome::OutcomeKind;
use crate::sandbox::plugin::Plugin;
use crate::telemetry::metrics::{TerminationReason, VersionSeries};
use crate::telemetry::{Counted, Metrics, PluginStats};

/// What every event of one plugin shares.
pub struct PipelineContext {
    /// JetStream, for publishing outputs and dead letters.
    pub js: jetstream::Context,
    /// The life of the stream the consumer reads; replaced when the stream
    /// is deleted and created again.
    pub incarnation: std::sync::RwLock<Arc<Incarnation>>,
    /// The plugin's state, done records and committer.
    pub store: Arc<PluginStore>,
    /// Whether done records are written (see `StateConfig::idempotency`).
    pub idempotency: bool,
    /// Publishes to these subjects are dead letters (`<prefix>.>`).
    pub dlq_prefix: String,
    /// How long to wait for JetStream to store an output or dead letter.
    pub publish_timeout: Duration,
    /// The consumer's ack wait: progress acks go out at a third of it.
    pub ack_wait: Duration,
    /// The plugin's counters as `/plugins` shows them.
    pub stats: Arc<PluginStats>,
    /// The host's metrics, which every event is counted into.
    pub metrics: Arc<Metrics>,
    /// One permit per event the plugin may run in the sandbox at once.
    executions: tokio::sync::Semaphore,
    contention: contention::Contention,
    /// The metric series of the version that ran last.
    /// Shared, not cloned per event: a series is a dozen counters (each an
    /// `Arc`) and two vectors, and cloning one three times per event was
    /// 3% of the host's own CPU in a profile of the loyalty drain.
    series: std::sync::Mutex<Option<(crate::sandbox::plugin::PluginVersion, Arc<VersionSeries>)>>,
    /// Payload and header bytes of the events this host holds for the
    /// plugin; pulling pauses above `max-in-flight-mb`.
    held: HeldBytes,
}

impl PipelineContext {
    /// Everything a plugin's pipeline shares, for `concurrency` sandbox
    /// calls at once.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        js: jetstream::Context,
        incarnation: Incarnation,
        dlq_prefix: String,
        store: Arc<PluginStore>,
        publish_timeout: Duration,
        ack_wait: Duration,
        concurrency: u32,
        metrics: Arc<Metrics>,
        stats: Arc<PluginStats>,
    ) -> Self {
        PipelineContext {
            incarnation: std::sync::RwLock::new(Arc::new(incarnation)),
            dlq_prefix,
            idempotency: store.idempotency(),
            store,
            publish_timeout,
            ack_wait,
            stats,
            metrics,
            executions: tokio::sync::Semaphore::new(concurrency as usize),
            contention: contention::Contention::default(),
            series: std::sync::Mutex::new(None),
            held: HeldBytes::default(),
            js,
        }
    }

    /// The stream incarnation events are delivered from now.
    pub fn incarnation(&self) -> Arc<Incarnation> {
        self.incarnation
            .read()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set_incarnation(&self, incarnation: Incarnation) {
        match self.incarnation.write() {
            Ok(mut current) => *current = Arc::new(incarnation),
            Err(p) => *p.into_inner() = Arc::new(incarnation),
        }
    }

    /// Count an event's fate: into its version's series, which the
    /// plugin's stats read.
    fn count(&self, plugin: &Plugin, what: Counted) {
        self.series(plugin).count(what);
    }

    /// The metric series of `plugin`'s version, resolved once per version.
    fn series(&self, plugin: &Plugin) -> Arc<VersionSeries> {
        let version = plugin.version();
        let mut cached = self.series.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some((of, series)) if of == version => series.clone(),
            _ => {
                let series = self.metrics.series(plugin.name(), version.as_str());
                self.stats.serve(&series);
                let series = Arc::new(series);
                *cached = Some((version.clone(), series.clone()));
                series
            }
        }
    }

    /// Record how long an event took from its arrival in the stream to its ack.
    fn publish_to_ack(&self, plugin: &Plugin, latency: Duration) {
        self.series(plugin).publish_to_ack(latency);
    }

    /// Count a dead letter, by the outcome kind that sent it.
    fn count_dead_letter(&self, plugin: &Plugin, reason: OutcomeKind) {
        self.series(plugin).dead_lettered(reason);
    }

    /// Count an event ended on purpose without processing or a dead letter.
    fn count_terminated(&self, plugin: &Plugin, reason: TerminationReason) {
        self.series(plugin).terminated(reason);
    }

    /// Record a plugin call on its span and in the metrics: its outcome,
    /// how long it took and which limit stopped it.
    fn observe_call(
        &self,
        plugin: &Plugin,
        invocation: &crate::sandbox::Invocation,
        span: &tracing::Span,
    ) {
        span.record("outcome", invocation.outcome.kind().as_str());
        if !invocation.outcome.is_ok() {
            span.record("otel.status_code", "ERROR");
        }
        self.series(plugin).handler_duration(invocation.duration);
        if let Some(limit) = invocation.outcome.limit_hit() {
            self.metrics
                .limit_hit(plugin.name(), plugin.version().as_str(), limit);
        }
    }
}

/// Lock a pipeline mutex. Every critical section of the pipeline leaves its
/// state consistent before it can panic, so a poisoned lock is still usable.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of the events a pipeline holds, and a wake-up when they drop.
#[derive(Default)]
struct HeldBytes {
    bytes: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

impl HeldBytes {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    fn over(&self, limit: usize) -> bool {
        self.bytes.load(Ordering::Relaxed) > limit
    }

    /// Wait until at most `limit` bytes are held.
    async fn below(&self, limit: usize) {
        loop {
            let freed = self.freed.notified();
            if !self.over(limit) {
                return;
            }
            freed.await;
        }
    }
}

/// Bytes one pull request may bring: a bound on what the client buffers
/// beyond the events the pipeline holds.
const PULL_MAX_BYTES: usize = 4 << 20;

/// How long a pull request stays open on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Pull requests of an exclusive plugin must come well inside the pin
/// timeout, or the pin is lost.
const PINNED_PULL_EXPIRES: Duration = Duration::from_secs(3);

/// Events handed back at shutdown are redelivered after this. The server
/// keeps a stopped pipeline's last pull request open until it expires and
/// would deliver into it: an event released at once would be lost there
/// until its ack wait runs out. After the delay it goes to a live puller
/// (another host, or this one restarted).
pub(crate) const RELEASE_DELAY: Duration = Duration::from_secs(PULL_EXPIRES.as_secs() + 1);

/// How long to wait before re-opening the message stream after it failed.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// Longest wait between attempts to recreate a consumer whose stream is gone.
const RECREATE_MAX_DELAY: Duration = Duration::from_secs(10);

/// Pull and process events until `shutdown` fires, then finish in-flight
/// events within `grace` and hand the rest back to the stream.
///
/// The current plugin version is read from `plugin` for every event, so a
/// new version swapped in takes the next event while events in flight
/// finish on the version they started with.
pub async fn run(
    ctx: Arc<PipelineContext>,
    plugin: watch::Receiver<Plugin>,
    mut consumer: PullConsumer,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let manifest = plugin.borrow().manifest().clone();
    let name = plugin.borrow().name().to_owned();
    let ordered = manifest.ordering_key.is_some();
    let batch = crate::jetstream::source::FlowLimits::of(&manifest).batch;
    let max_held = (manifest.max_in_flight_mb as usize) << 20;
    let release = CancellationToken::new();
    // Keyed runs are bounded by what the server delivers (max-in-flight),
    // sandbox calls by the execution permits: a run waiting for its commit
    // holds no permit. Events are taken by twice as many runs as may
    // execute, so some run while others commit; and of the runs not
    // parked on a read or a backoff, by no more than twice what the host's
    // guest CPU executes at once (BENCHMARKS.md, "runs in flight").
    let shape = if ordered || manifest.concurrency == 1 {
        lanes::Shape::Keyed
    } else {
        lanes::Shape::Shared
    };
    let computing_runs =
        2 * (manifest.concurrency as usize).min(plugin.borrow().guest_call_slots());
    let lanes = {
        let (ctx, plugin, release) = (ctx.clone(), plugin.clone(), release.clone());
        let stopping = shutdown.clone();
        Lanes::new(
            shape,
            2 * manifest.concurrency as usize,
            computing_runs,
            crate::jetstream::source::MAX_RUN,
            move |run: Vec<(String, jetstream::Message)>, handle: lanes::RunHandle| {
                let (ctx, release, stopping) = (ctx.clone(), release.clone(), stopping.clone());
                let current = plugin.borrow().clone();
                async move {
                    let bytes: usize = run.iter().map(|(_, m)| m.length).sum();
                    let n = run.len() as u64;
                    ctx.stats.in_flight().inc_by(n as i64);
                    let ends = process::Ends { stopping, release };
                    process::process_run(ctx.clone(), current, run, ends, shape, handle).await;
                    ctx.stats.in_flight().dec_by(n as i64);
                    ctx.held.release(bytes);
                }
            },
        )
    };
    // Queued events are not being worked on yet; tell the server they are
    // still ours so their ack wait does not expire behind a busy lane.
    let period = ctx.ack_wait / 3;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);

    'subscribe: while !shutdown.is_cancelled() {
        let stream = if manifest.exclusive {
            // Pulls must come well inside the pin timeout, or the pin is lost.
            consumer
                .stream()
                .group(crate::jetstream::source::PRIORITY_GROUP)
                .max_messages_per_batch(batch)
                .max_bytes_per_batch(PULL_MAX_BYTES)
                .heartbeat(Duration::from_secs(1))
                .expires(PINNED_PULL_EXPIRES)
                .messages()
                .await
        } else {
            consumer
                .stream()
                .max_messages_per_batch(batch)
                .max_bytes_per_batch(PULL_MAX_BYTES)
                .heartbeat(Duration::from_secs(2))
                .expires(PULL_EXPIRES)
                .messages()
                .await
        };
        let mut messages = match stream {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(plugin = %name, "cannot pull from the consumer, retrying: {e}");
                if !recover(&ctx, &name, &manifest, &mut consumer, &shutdown).await {
                    break 'subscribe;
                }
                continue 'subscribe;
            }
        };
        loop {
            // No slot is taken here: the consumer's max_ack_pending bounds
            // how many events the server delivers, and the lanes bound what
            // runs; this bounds their bytes.
            if ctx.held.over(max_held) {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        release_buffered(&mut messages, &name).await;
                        break 'subscribe;
                    }
                    _ = keepalive.tick() => still_ours(lanes.queued()).await,
                    () = ctx.held.below(max_held) => {}
                }
                continue;
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    release_buffered(&mut messages, &name).await;
                    break 'subscribe;
                }
                _ = keepalive.tick() => {
                    still_ours(lanes.queued()).await;
                    continue;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    // Take whatever else has arrived too, so it is shared
                    // out in runs rather than one run per message.
                    let mut arrived = vec![message];
                    while arrived.len() < batch
                        && let Some(Some(Ok(more))) = messages.next().now_or_never()
                    {
                        arrived.push(more);
                    }
                    let keyed = arrived.into_iter().map(|message| {
                        ctx.held.add(message.length);
                        let lane = match shape {
                            lanes::Shape::Keyed => {
                                crate::jetstream::source::lane_of(&message, &manifest)
                            }
                            lanes::Shape::Shared => String::new(),
                        };
                        (lane, message)
                    });
                    lanes.push_all(keyed);
                }
                Some(Err(e)) => {
                    // Missed heartbeats and failed pulls happen while NATS is
                    // away; the stream recovers once it is back. A deleted
                    // consumer (its stream deleted, say) does not come back
                    // by itself.
                    tracing::warn!(plugin = %name, "pulling: {e}");
                    use jetstream::consumer::pull::MessagesErrorKind as Kind;
                    if matches!(
                        e.kind(),
                        Kind::ConsumerDeleted
                            | Kind::RequestLimitExceeded
                            | Kind::NoResponders
                            | Kind::MissingHeartbeat
                    ) {
                        if !recover(&ctx, &name, &manifest, &mut consumer, &shutdown).await {
                            break 'subscribe;
                        }
                        continue 'subscribe;
                    }
                }
                None => continue 'subscribe,
            }
        }
    }

    // Events that never started go straight back, in order.
    let queued = lanes.take_queued();
    for message in &queued {
        if let Err(e) = message.ack_with(AckKind::Nak(Some(RELEASE_DELAY))).await {
            // It comes back after its ack wait instead of at once.
            tracing::debug!(plugin = %name, "releasing a queued event: {e}");
        }
    }
    let running = lanes.running();
    if running > 0 || !queued.is_empty() {
        tracing::info!(plugin = %name, running, released = queued.len(), "draining in-flight events (grace {grace:?})");
    }
    if tokio::time::timeout(grace, lanes.wait_running())
        .await
        .is_err()
    {
        tracing::warn!(plugin = %name, remaining = lanes.running(), "grace period over; releasing unfinished events");
        release.cancel();
        lanes.wait_running().await;
    }
    tracing::info!(plugin = %name, "pipeline stopped");
}

/// After pulling failed: if the consumer (or its stream) no longer exists,
/// report the plugin stalled and create the consumer again as soon as the
/// stream is back; otherwise wait a moment before pulling again. Returns
/// false when shutdown came first.
async fn recover(
    ctx: &PipelineContext,
    name: &str,
    manifest: &crate::manifest::Manifest,
    consumer: &mut PullConsumer,
    shutdown: &CancellationToken,
) -> bool {
    let pause = |delay| async move {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    };
    let generation = ctx.incarnation().generation.clone();
    let durable = generation.durable_name(name);
    if !crate::jetstream::source::consumer_gone(&ctx.js, &manifest.stream, &durable).await {
        return pause(RESUBSCRIBE_DELAY).await;
    }
    let mut delay = RESUBSCRIBE_DELAY;
    loop {
        // A consumer deleted because the plugin moved to a newer generation
        // stays deleted: the host restarts the pipeline in the new one.
        if let Ok((newest, _)) = crate::jetstream::generation::read(ctx.store.bucket()).await
            && newest.number > generation.number
        {
            tracing::info!(plugin = %name, "consumer of generation {} deleted by generation {}", generation.number, newest.number);
            shutdown.cancelled().await;
            return false;
        }
        match crate::jetstream::source::ensure_consumer(
            &ctx.js,
            name,
            manifest,
            &generation,
            ctx.ack_wait,
        )
        .await
        {
            Ok((recreated, incarnation)) => {
                let new_life = *ctx.incarnation() != incarnation;
                tracing::warn!(plugin = %name, stream = %manifest.stream, new_stream = new_life, "consumer was gone; created it again");
                ctx.set_incarnation(incarnation);
                *consumer = recreated;
                ctx.stats.set_stalled(None);
                return true;
            }
            Err(e) => {
                let why = format!("its consumer is gone and cannot be created again: {e:#}");
                if ctx.stats.stalled().as_deref() != Some(why.as_str()) {
                    tracing::error!(plugin = %name, "{why}");
                }
                ctx.stats.set_stalled(Some(why));
            }
        }
        if !pause(delay).await {
            return false;
        }
        delay = (delay * 2).min(RECREATE_MAX_DELAY);
    }
}

/// Progress-ack events waiting in the lanes, so their ack wait does not
/// expire behind a busy lane. A lost one is sent again at the next tick.
async fn still_ours(queued: Vec<jetstream::Message>) {
    for message in queued {
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            tracing::debug!("progress ack for a queued event: {e}; sent again at the next tick");
        }
    }
}

/// Nak what the client already pulled but the pipeline never started, so
/// it is redelivered at once instead of after its ack wait.
async fn release_buffered(messages: &mut jetstream::consumer::pull::Stream, plugin: &str) {
    let mut released = 0;
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        if message
            .ack_with(AckKind::Nak(Some(RELEASE_DELAY)))
            .await
            .is_ok()
        {
            released += 1;
        }
    }
    if released > 0 {
        tracing::info!(plugin, released, "released buffered events");
    }
}
