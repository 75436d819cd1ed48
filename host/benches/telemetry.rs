//! Per-event cost of the tracing the pipeline does around each delivery:
//! the consumer span (trace parent from `traceparent`, messaging
//! attributes), the plugin-call span inside it, and the `traceparent`
//! written on outputs. Without a subscriber (a library embedding), with the
//! OpenTelemetry layer but no exporter (`weir run` by default), and with a
//! batch exporter that drops spans (`weir run` exporting, minus the
//! network). Run with `cargo bench -p weir --bench telemetry`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmarks fail by panicking

use criterion::{Criterion, criterion_group, criterion_main};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use weir::Event;
use weir::event::Header;
use weir::telemetry::{propagation, spans};

fn one_delivery(event: &Event) -> Vec<(String, String)> {
    let span = spans::consumer(
        "fraud",
        "0123456789ab",
        || "weir-fraud".to_owned(),
        event,
        "ORDERS",
    );
    let _entered = span.enter();
    {
        let call = spans::invoke(&span, "fraud");
        let _in_call = call.enter();
        call.record("outcome", "ok");
    }
    propagation::outgoing(&span, event)
}

fn telemetry(c: &mut Criterion) {
    let mut event = Event::new("order-1", "orders.placed", b"{}".to_vec());
    event.headers.push(Header::new(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    let mut group = c.benchmark_group("delivery_tracing");
    group.bench_function("no_subscriber", |b| b.iter(|| one_delivery(&event)));

    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("weir")));
    tracing::subscriber::with_default(subscriber, || {
        group.bench_function("opentelemetry_no_export", |b| {
            b.iter(|| one_delivery(&event))
        });
    });

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("weir")));
    tracing::subscriber::with_default(subscriber, || {
        group.bench_function("opentelemetry_batch_export", |b| {
            b.iter(|| {
                let headers = one_delivery(&event);
                exporter.reset();
                headers
            })
        });
    });
    group.finish();
}

criterion_group!(benches, telemetry);
criterion_main!(benches);
