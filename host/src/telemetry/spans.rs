//! The spans of one delivery: the consumer span (OpenTelemetry kind
//! CONSUMER, child of the trace the event came with) and the plugin call
//! inside it.

use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::propagation;
use crate::event::Event;

/// The consumer span of `event` delivered to `plugin` from `stream`. Its
/// `plugin`, `version` and `event_id` fields also tag every log line
/// written while handling the event, the plugin's own included. Record
/// `otel.status_code = "ERROR"` on it when the event fails for good.
/// `consumer_group` names the durable consumer; it is only asked for when
/// the span is recorded.
pub fn consumer(
    plugin: &str,
    version: &str,
    consumer_group: impl FnOnce() -> String,
    event: &Event,
    stream: &str,
) -> tracing::Span {
    let span = tracing::info_span!(
        "event",
        otel.name = %format_args!("process {}", event.subject),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        plugin,
        version,
        event_id = %event.id,
        subject = %event.subject,
        attempt = event.attempt,
    );
    if span.is_disabled() {
        return span;
    }
    propagation::continue_trace(&span, event);
    // Semantic-convention attributes go to the trace only, keeping log
    // lines short.
    for (key, value) in [
        ("messaging.system", "nats".to_owned()),
        ("messaging.operation.type", "process".to_owned()),
        ("messaging.operation.name", "process".to_owned()),
        ("messaging.destination.name", event.subject.clone()),
        ("messaging.consumer.group.name", consumer_group()),
        ("messaging.message.id", event.id.clone()),
        ("weir.stream", stream.to_owned()),
    ] {
        span.set_attribute(key, value);
    }
    span.set_attribute("messaging.message.body.size", event.payload.len() as i64);
    span.set_attribute("weir.delivery.attempt", i64::from(event.attempt));
    span
}

/// The span of one plugin call, inside the event's consumer span; record
/// `outcome` (and `otel.status_code = "ERROR"` when it is not ok) on it.
pub fn invoke(consumer: &tracing::Span, plugin: &str) -> tracing::Span {
    tracing::info_span!(
        parent: consumer,
        "invoke",
        otel.name = %format_args!("invoke {plugin}"),
        otel.status_code = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}
