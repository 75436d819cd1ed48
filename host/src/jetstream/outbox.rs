//! Publishing what a plugin emitted, once its call succeeded.
//!
//! Every emitted event carries a `Nats-Msg-Id` derived from (plugin and
//! its [generation](crate::jetstream::generation), input event id, index). If the host dies after publishing but before the input
//! is acknowledged, the re-run publishes the same ids and JetStream drops
//! them as duplicates within the target stream's duplicate window.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};

use crate::event::{Emitted, Event};
use crate::telemetry::propagation;

/// Headers the host puts on every emitted event.
pub mod headers {
    /// The plugin that emitted the event.
    pub const PLUGIN: &str = "Weir-Plugin";
    /// The plugin version (content digest) that emitted it.
    pub const PLUGIN_VERSION: &str = "Weir-Plugin-Version";
    /// The id of the event that caused it.
    pub const CAUSE_ID: &str = "Weir-Cause-Id";
}

/// The deterministic message id of output `index` of `event` by `plugin`
/// in generation `generation`.
pub fn message_id(plugin: &str, generation: u64, event_id: &str, index: usize) -> String {
    let plugin = crate::jetstream::generation::Tagged(plugin, generation);
    format!("weir:{plugin}:{event_id}:{index}")
}

/// Why the outbox could not be published. The input event is not acked;
/// it is retried and the outputs published again under the same ids.
#[derive(Debug, thiserror::Error)]
#[error("publishing output {index} to {subject}: {message}")]
pub struct PublishError {
    /// Which of the event's outputs.
    pub index: usize,
    /// The subject it was published to.
    pub subject: String,
    /// What went wrong.
    pub message: String,
}

/// What one event emitted, to publish under its trace context.
pub struct Outgoing<'a> {
    /// The event that emitted them.
    pub event: &'a Event,
    /// Its outputs, in the order emitted.
    pub emitted: &'a [Emitted],
    /// Trace-context headers continuing the event's trace.
    pub trace: &'a [(String, String)],
}

/// Publish everything `outgoing` holds and wait until JetStream stored each
/// one. The publishes are pipelined: all are sent before the first ack is
/// awaited.
pub async fn publish(
    js: &jetstream::Context,
    plugin: &str,
    version: &str,
    generation: u64,
    outgoing: &[Outgoing<'_>],
    timeout: Duration,
) -> Result<(), PublishError> {
    let mut pending = Vec::new();
    for out in outgoing {
        let (event, trace) = (out.event, out.trace);
        for (index, emitted) in out.emitted.iter().enumerate() {
            let mut headers = HeaderMap::new();
            for h in propagation::carried(&emitted.headers, trace) {
                headers.append(h.key.as_str(), h.value.as_str());
            }
            for (k, v) in trace {
                headers.insert(k.as_str(), v.as_str());
            }
            headers.insert(headers::PLUGIN, plugin);
            headers.insert(headers::PLUGIN_VERSION, version);
            headers.insert(headers::CAUSE_ID, event.id.as_str());
            let publish = PublishMessage::build()
                .headers(headers)
                .payload(emitted.payload.clone().into())
                .message_id(message_id(plugin, generation, &event.id, index));
            let error = |message: String| PublishError {
                index,
                subject: emitted.subject.clone(),
                message,
            };
            let ack = js
                .send_publish(emitted.subject.clone(), publish)
                .await
                .map_err(|e| error(e.to_string()))?;
            pending.push((index, &emitted.subject, ack));
        }
    }
    for (index, subject, ack) in pending {
        await_stored(ack, timeout)
            .await
            .map_err(|message| PublishError {
                index,
                subject: subject.clone(),
                message,
            })?;
    }
    Ok(())
}

/// Wait for JetStream to confirm it stored a publish, up to `timeout`.
/// Returns the stream sequence it was stored at.
pub(crate) async fn await_stored(
    ack: jetstream::context::PublishAckFuture,
    timeout: Duration,
) -> Result<u64, String> {
    match tokio::time::timeout(timeout, ack).await {
        Ok(Ok(ack)) => Ok(ack.sequence),
        Ok(Err(e)) => Err(describe_publish_error(&e)),
        Err(_) => Err(format!("no acknowledgement within {timeout:?}")),
    }
}

fn describe_publish_error(e: &jetstream::context::PublishError) -> String {
    if matches!(
        e.kind(),
        jetstream::context::PublishErrorKind::StreamNotFound
    ) {
        "no stream captures this subject".into()
    } else {
        e.to_string()
    }
}
