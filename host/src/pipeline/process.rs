//! One event's path: invoke, then act on the outcome. Nothing is acked
//! before its effects are durable; on any host-side failure the event is
//! sent back to the stream instead.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dlq::{self, DeadLetter};
use crate::event::{Emitted, Event};
use crate::outcome::Outcome;
use crate::pipeline::PipelineContext;
use crate::plugin::Plugin;
use crate::source;
use crate::state::StateStore;
use crate::store::Commit;
use crate::telemetry::{Counted, propagation, spans};

/// Delay before redelivering an event whose failure was the host's
/// (publish or commit failed, NATS unreachable): short, the cause is
/// usually a blip, but not zero so a down server is not hammered.
const HOST_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Runs of one delivery when its commit keeps losing to concurrent writers
/// of the same state keys, before it goes back to the stream with backoff.
const MAX_CONFLICT_RERUNS: usize = 5;

/// What the pipeline decided for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Acked,
    Retried,
    /// Moved to the dead-letter stream; the outcome's kind says why.
    DeadLettered(&'static str),
    /// Handed back unprocessed (shutdown).
    Released,
    /// A host-side failure sent it back for another try.
    HostError,
    /// A redelivery of an event already committed: finished without
    /// running the plugin again.
    Skipped,
}

/// Process one delivered message. With `ordered`, a retryable failure is
/// retried here, holding the event's lane, so no later event of its key can
/// overtake it; otherwise it is handed back to the stream with a delay.
pub async fn process(
    ctx: Arc<PipelineContext>,
    plugin: Plugin,
    message: jetstream::Message,
    release: CancellationToken,
    ordered: bool,
) -> Disposition {
    let event = match source::to_event(&message) {
        Ok(event) => event,
        Err(e) => {
            // Without delivery info there is nothing to ack or retry.
            tracing::error!(
                plugin = plugin.name(),
                "dropping a message that is not a JetStream delivery: {e:#}"
            );
            return Disposition::HostError;
        }
    };
    let stream = message.info().map(|i| i.stream).unwrap_or_default();
    let span = spans::consumer(plugin.name(), plugin.version().as_str(), &event, stream);
    let disposition = tokio::select! {
        biased;
        d = handle(&ctx, &plugin, &message, event.clone(), ordered).instrument(span.clone()) => d,
        _ = release.cancelled() => {
            // Shutting down and out of grace: hand the event back now rather
            // than letting it sit until its ack wait expires.
            ack(&message, AckKind::Nak(None), &plugin, &event).await;
            Disposition::Released
        }
    };
    match disposition {
        Disposition::Acked => ctx.count(&plugin, Counted::Processed),
        Disposition::Retried => ctx.count(&plugin, Counted::Retried),
        Disposition::DeadLettered(reason) => {
            ctx.count_dead_letter(&plugin, reason);
            span.record("otel.status_code", "ERROR");
        }
        Disposition::HostError => ctx.count(&plugin, Counted::HostError),
        Disposition::Skipped => ctx.count(&plugin, Counted::Duplicate),
        Disposition::Released => {}
    }
    disposition
}

async fn handle(
    ctx: &PipelineContext,
    plugin: &Plugin,
    message: &jetstream::Message,
    mut event: Event,
    ordered: bool,
) -> Disposition {
    loop {
        match attempt(ctx, plugin, message, &event).await {
            Step::Done(disposition) => return disposition,
            Step::RetryAfter(delay) if ordered => {
                ctx.count(plugin, Counted::Retried);
                with_progress(message, ctx.ack_wait, tokio::time::sleep(delay)).await;
                event.attempt += 1;
            }
            Step::RetryAfter(delay) => {
                ack(message, AckKind::Nak(Some(delay)), plugin, &event).await;
                return Disposition::Retried;
            }
        }
    }
}

/// What one attempt at an event came to.
enum Step {
    Done(Disposition),
    /// A retryable failure, not the last allowed attempt.
    RetryAfter(Duration),
}

async fn attempt(
    ctx: &PipelineContext,
    plugin: &Plugin,
    message: &jetstream::Message,
    event: &Event,
) -> Step {
    use Step::Done;
    // A redelivery may find the event already committed (the host died, or
    // an ack was lost, after the commit): finish it without running it again.
    if event.attempt > 1 && ctx.idempotency {
        match with_progress(message, ctx.ack_wait, ctx.store.done(&event.id)).await {
            Ok(Some(outbox)) => {
                return Done(publish_and_ack(ctx, plugin, message, event, &outbox, true).await);
            }
            Ok(None) => {}
            Err(e) => return Done(host_error(plugin, message, event, e).await),
        }
    }
    for _ in 0..MAX_CONFLICT_RERUNS {
        let state: Arc<dyn StateStore> = ctx.store.clone();
        let call = spans::invoke(plugin.name());
        let invocation = with_progress(message, ctx.ack_wait, plugin.invoke(event, state))
            .instrument(call.clone())
            .await;
        ctx.observe_call(plugin, &invocation, &call);
        tracing::trace!(outcome = %invocation.outcome, took = ?invocation.duration, "invoked");
        if !invocation.outcome.is_ok() {
            return failed(ctx, plugin, message, event, &invocation.outcome).await;
        }
        let commit = ctx.store.commit(
            &event.id,
            &invocation.state_changes,
            &invocation.state_reads,
            &invocation.emitted,
        );
        match with_progress(message, ctx.ack_wait, commit).await {
            Ok(Commit::Committed) => {
                return Done(
                    publish_and_ack(ctx, plugin, message, event, &invocation.emitted, false).await,
                );
            }
            Ok(Commit::AlreadyDone(outbox)) => {
                return Done(publish_and_ack(ctx, plugin, message, event, &outbox, true).await);
            }
            Ok(Commit::Conflict) => {
                tracing::debug!(plugin = plugin.name(), event_id = %event.id, "state changed under the call; running it again");
            }
            Err(e) => return Done(host_error(plugin, message, event, e).await),
        }
    }
    // Contention this persistent is better resolved by time than by spinning.
    let delay = backoff(plugin, event.attempt);
    tracing::warn!(plugin = plugin.name(), event_id = %event.id, "state kept changing under the call; retrying in {delay:?}");
    Step::RetryAfter(delay)
}

/// The effects are committed: publish the outbox and acknowledge.
async fn publish_and_ack(
    ctx: &PipelineContext,
    plugin: &Plugin,
    message: &jetstream::Message,
    event: &Event,
    outbox: &[Emitted],
    duplicate: bool,
) -> Disposition {
    tracing::trace!("committed");
    let version = plugin.version().as_str();
    let trace = propagation::outgoing(&tracing::Span::current(), event);
    let publish = crate::outbox::publish(
        &ctx.js,
        plugin.name(),
        version,
        event,
        outbox,
        &trace,
        ctx.publish_timeout,
    );
    if let Err(e) = with_progress(message, ctx.ack_wait, publish).await {
        return host_error(plugin, message, event, e.into()).await;
    }
    tracing::trace!(outputs = outbox.len(), "published");
    // With done records a lost ack is harmless (the redelivery is skipped),
    // so a plain ack suffices; without them, make sure it landed.
    let acked = if ctx.idempotency {
        message.ack().await
    } else {
        message.double_ack().await
    };
    if let Err(e) = acked {
        tracing::warn!(plugin = plugin.name(), event_id = %event.id, "ack not sent: {e}");
        return Disposition::HostError;
    }
    if let Ok(info) = message.info() {
        let latency = since(info.published);
        ctx.stats.ack_latency.record(latency);
        ctx.metrics.publish_to_ack(plugin.name(), version, latency);
    }
    if ctx.idempotency && !outbox.is_empty() {
        ctx.store.forget_outbox(&event.id).await;
    }
    if duplicate {
        Disposition::Skipped
    } else {
        Disposition::Acked
    }
}

/// The plugin did not succeed: retry, or dead-letter.
async fn failed(
    ctx: &PipelineContext,
    plugin: &Plugin,
    message: &jetstream::Message,
    event: &Event,
    outcome: &Outcome,
) -> Step {
    match outcome {
        Outcome::Reject { .. } => {
            Step::Done(dead_letter(ctx, plugin, message, event, outcome).await)
        }
        _ if event.attempt >= plugin.manifest().retry.max_deliveries => {
            Step::Done(dead_letter(ctx, plugin, message, event, outcome).await)
        }
        _ => {
            let delay = match outcome {
                Outcome::Retry {
                    delay: Some(delay), ..
                } => *delay,
                _ => backoff(plugin, event.attempt),
            };
            tracing::info!(plugin = plugin.name(), event_id = %event.id, attempt = event.attempt, "{outcome}; retrying in {delay:?}");
            Step::RetryAfter(delay)
        }
    }
}

/// The host could not make the effects durable: send the event back.
async fn host_error(
    plugin: &Plugin,
    message: &jetstream::Message,
    event: &Event,
    e: anyhow::Error,
) -> Disposition {
    tracing::warn!(plugin = plugin.name(), event_id = %event.id, "effects not durable, retrying: {e:#}");
    ack(message, AckKind::Nak(Some(HOST_RETRY_DELAY)), plugin, event).await;
    Disposition::HostError
}

/// Time since the stream stored a message (zero if clocks disagree).
fn since(published: time::OffsetDateTime) -> Duration {
    Duration::try_from(time::OffsetDateTime::now_utc() - published).unwrap_or_default()
}

fn backoff(plugin: &Plugin, attempt: u32) -> Duration {
    plugin
        .manifest()
        .retry
        .backoff_with_jitter(attempt, rand::random::<f64>())
}

async fn dead_letter(
    ctx: &PipelineContext,
    plugin: &Plugin,
    message: &jetstream::Message,
    event: &Event,
    outcome: &Outcome,
) -> Disposition {
    let stream = message
        .info()
        .map(|i| i.stream.to_owned())
        .unwrap_or_default();
    let letter = DeadLetter {
        plugin: plugin.name(),
        version: plugin.version().as_str(),
        stream: &stream,
        event,
        outcome,
        trace: propagation::outgoing(&tracing::Span::current(), event),
    };
    let published = with_progress(
        message,
        ctx.ack_wait,
        dlq::publish(&ctx.js, &ctx.dlq_prefix, &letter, ctx.publish_timeout),
    )
    .await;
    if let Err(e) = published {
        tracing::warn!(plugin = plugin.name(), event_id = %event.id, "dead letter not stored, retrying: {e:#}");
        ack(message, AckKind::Nak(Some(HOST_RETRY_DELAY)), plugin, event).await;
        return Disposition::HostError;
    }
    tracing::warn!(plugin = plugin.name(), event_id = %event.id, attempts = event.attempt, "dead-lettered: {outcome}");
    match message.double_ack_with(AckKind::Term).await {
        Ok(()) => Disposition::DeadLettered(outcome.kind()),
        Err(e) => {
            // Redelivered later; the dead letter's message id keeps it single.
            tracing::warn!(plugin = plugin.name(), event_id = %event.id, "terminate not confirmed: {e}");
            Disposition::HostError
        }
    }
}

async fn ack(message: &jetstream::Message, kind: AckKind, plugin: &Plugin, event: &Event) {
    if let Err(e) = message.ack_with(kind).await {
        // The server redelivers after the ack wait anyway.
        tracing::warn!(plugin = plugin.name(), event_id = %event.id, "sending {kind:?} failed: {e}");
    }
}

/// Run `work`, telling the server every third of the ack wait that the
/// event is still being worked on, so it is not redelivered under us.
async fn with_progress<F: std::future::Future>(
    message: &jetstream::Message,
    ack_wait: Duration,
    work: F,
) -> F::Output {
    let period = ack_wait / 3;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => {
                if let Err(e) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!("progress ack failed: {e}");
                }
            }
        }
    }
}
