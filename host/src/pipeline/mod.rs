//! The per-plugin pipeline: pull from the plugin's durable consumer, run
//! each event through the plugin with bounded concurrency, act on the
//! outcome, and shut down without losing anything.

mod process;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use process::Disposition;
use stats::PluginStats;

use crate::plugin::Plugin;
use crate::store::PluginStore;

/// What every event of one plugin shares.
pub struct PipelineContext {
    pub js: jetstream::Context,
    pub store: Arc<PluginStore>,
    /// Whether done records are written (see `StateConfig::idempotency`).
    pub idempotency: bool,
    pub dlq_prefix: String,
    pub publish_timeout: Duration,
    pub ack_wait: Duration,
    pub stats: Arc<PluginStats>,
}

/// How long to wait before re-opening the message stream after it failed.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// Pull and process events until `shutdown` fires, then finish in-flight
/// events within `grace` and hand the rest back to the stream.
///
/// The current plugin version is read from `plugin` for every event, so a
/// new version swapped in takes the next event while events in flight
/// finish on the version they started with.
pub async fn run(
    ctx: Arc<PipelineContext>,
    plugin: watch::Receiver<Plugin>,
    consumer: PullConsumer,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let manifest = plugin.borrow().manifest().clone();
    let name = plugin.borrow().name().to_owned();
    let (batch, _) = crate::source::flow_limits(&manifest);
    let slots = Arc::new(Semaphore::new(manifest.concurrency as usize));
    let release = CancellationToken::new();
    let mut tasks = JoinSet::new();

    'subscribe: while !shutdown.is_cancelled() {
        let stream = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match stream {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(plugin = %name, "cannot pull from the consumer, retrying: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'subscribe,
                    _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue 'subscribe,
                }
            }
        };
        loop {
            while tasks.try_join_next().is_some() {}
            // Take a slot before taking a message: the host never holds an
            // event it cannot start, so a slow plugin backs up into its own
            // consumer and nowhere else.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => {
                    release_buffered(&mut messages, &name).await;
                    break 'subscribe;
                }
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break 'subscribe,
                },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    release_buffered(&mut messages, &name).await;
                    break 'subscribe;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    let ctx = ctx.clone();
                    let current = plugin.borrow().clone();
                    let release = release.clone();
                    let stats = ctx.stats.clone();
                    stats
                        .in_flight
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tasks.spawn(async move {
                        let disposition = process::process(ctx, current, message, release).await;
                        stats
                            .in_flight
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        drop(permit);
                        disposition
                    });
                }
                Some(Err(e)) => {
                    // Missed heartbeats and failed pulls happen while NATS is
                    // away; the stream recovers once it is back.
                    tracing::warn!(plugin = %name, "pulling: {e}");
                    if matches!(
                        e.kind(),
                        jetstream::consumer::pull::MessagesErrorKind::ConsumerDeleted
                            | jetstream::consumer::pull::MessagesErrorKind::RequestLimitExceeded
                    ) {
                        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
                        continue 'subscribe;
                    }
                }
                None => continue 'subscribe,
            }
        }
    }

    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(plugin = %name, in_flight, "draining in-flight events (grace {grace:?})");
    }
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(plugin = %name, remaining = tasks.len(), "grace period over; releasing unfinished events");
        release.cancel();
        while tasks.join_next().await.is_some() {}
    }
    tracing::info!(plugin = %name, "pipeline stopped");
}

/// Nak what the client already pulled but the pipeline never started, so
/// it is redelivered at once instead of after its ack wait.
async fn release_buffered(messages: &mut jetstream::consumer::pull::Stream, plugin: &str) {
    let mut released = 0;
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        if message.ack_with(AckKind::Nak(None)).await.is_ok() {
            released += 1;
        }
    }
    if released > 0 {
        tracing::info!(plugin, released, "released buffered events");
    }
}
