//! W3C trace context across NATS: the `traceparent` (and `tracestate`) of
//! an incoming event become the parent of its consumer span, and every
//! event the plugin emits, and its dead letter, carries the consumer span's
//! own context, so one order can be followed across services.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::event::{Event, Header};

/// The W3C trace-context header that carries the trace and parent span.
pub const TRACEPARENT: &str = "traceparent";
/// Its companion carrying vendor-specific state.
pub const TRACESTATE: &str = "tracestate";

/// Whether `key` is a trace-context header.
pub fn is_trace_header(key: &str) -> bool {
    key.eq_ignore_ascii_case(TRACEPARENT) || key.eq_ignore_ascii_case(TRACESTATE)
}

/// The `headers` a published message carries over (from what the plugin
/// emitted, or from the event being dead-lettered) when the host adds its
/// own `trace` headers: the host's trace context, when it has one, is the
/// only one, so a copied `traceparent` or `tracestate` gives way to it.
pub fn carried<'a>(
    headers: &'a [Header],
    trace: &'a [(String, String)],
) -> impl Iterator<Item = &'a Header> {
    headers
        .iter()
        .filter(move |h| trace.is_empty() || !is_trace_header(&h.key))
}

struct EventHeaders<'a>(&'a Event);

impl Extractor for EventHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.iter().map(|h| h.key.as_str()).collect()
    }
}

/// The remote parent an incoming event names, or an empty context (the
/// consumer span then starts a new trace).
pub fn parent_of(event: &Event) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&EventHeaders(event))
}

/// Attach `event`'s remote parent to `span`, which must not have been
/// entered yet.
pub fn continue_trace(span: &tracing::Span, event: &Event) {
    // Fails only without the OpenTelemetry layer (a library user who did
    // not install it); then `outgoing` passes the incoming context through.
    let _ = span.set_parent(parent_of(event));
}

/// The trace headers to put on what `span` publishes for `event`: the
/// span's own context when OpenTelemetry is active, else the incoming
/// context unchanged, so a trace is never cut where this host is not
/// instrumented.
pub fn outgoing(span: &tracing::Span, event: &Event) -> Vec<(String, String)> {
    let context = span.context();
    if context.span().span_context().is_valid() {
        let mut carrier = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
        let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
        headers.sort();
        return headers;
    }
    [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|key| event.header(key).map(|v| (key.to_owned(), v.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Header;
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traced_event() -> Event {
        let mut event = Event::new("e1", "orders.created", b"{}".to_vec());
        event.headers.push(Header::new("TraceParent", PARENT));
        event
    }

    #[test]
    fn incoming_context_passes_through_without_opentelemetry() {
        let event = traced_event();
        let span = tracing::info_span!("event");
        continue_trace(&span, &event);
        assert_eq!(
            outgoing(&span, &event),
            vec![(TRACEPARENT.to_owned(), PARENT.to_owned())]
        );
        assert!(outgoing(&span, &Event::new("e2", "s", vec![])).is_empty());
    }

    #[test]
    fn outputs_continue_the_trace_under_the_consumer_span() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let event = traced_event();
            let span = tracing::info_span!("event");
            continue_trace(&span, &event);
            let headers = outgoing(&span, &event);
            let traceparent = &headers
                .iter()
                .find(|(k, _)| k == TRACEPARENT)
                .expect("a traceparent")
                .1;
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
            assert_ne!(parts[2], "00f067aa0ba902b7", "a new parent span");
            assert_eq!(parts[3], "01", "still sampled");
        });
    }

    #[test]
    fn trace_headers_are_recognised_in_any_case() {
        assert!(is_trace_header("Traceparent"));
        assert!(is_trace_header("TRACESTATE"));
        assert!(!is_trace_header("trace"));
    }

    #[test]
    fn copied_trace_headers_give_way_to_the_hosts() {
        let header = |key: &str, value: &str| Header {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        let copied = [
            header("TraceParent", "theirs"),
            header("Customer-Id", "c-1"),
        ];
        let ours = vec![(TRACEPARENT.to_owned(), PARENT.to_owned())];
        let keys = |trace| {
            carried(&copied, trace)
                .map(|h| h.key.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&ours), ["Customer-Id"]);
        assert_eq!(
            keys(&[]),
            ["TraceParent", "Customer-Id"],
            "with no trace of the host's own, the copied context stays"
        );
    }
}
