//! The process-wide tracing subscriber: logs on stderr (human or JSON,
//! filtered by `WEIR_LOG`) and, for the long-running commands, the
//! OpenTelemetry layer that turns the host's spans into trace spans.
//!
//! The OpenTelemetry layer is installed even when nothing is exported:
//! span ids are what the host writes into the `traceparent` of every
//! output, so a trace continues through a host that does not export.

use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{OtlpProtocol, TelemetryConfig};

/// How often finished spans are sent: often enough that a trace shows up
/// while someone is looking for it, rarely enough to batch.
const EXPORT_DELAY: Duration = Duration::from_secs(2);

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes spans not
/// exported yet.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is buffered and stop. Blocks: call it outside the async
    /// runtime.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("weir: flushing trace spans: {e}");
        }
    }
}

/// Install the subscriber. `traces` adds OpenTelemetry (and OTLP export if
/// it names an endpoint). Must run before the async runtime starts: the
/// exporter's blocking HTTP client cannot be built inside it.
pub fn init(
    default_filter: &str,
    json: bool,
    traces: Option<&TelemetryConfig>,
) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let logs = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let provider = traces.map(tracer_provider).transpose()?;
    // The span filter is independent of the log level: quieter logs must
    // not cut traces.
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("weir"))
            .with_filter(Targets::new().with_target("weir", LevelFilter::INFO))
    });
    // A second init (tests calling `main` twice) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init();
    Ok(Telemetry { provider })
}

fn tracer_provider(config: &TelemetryConfig) -> anyhow::Result<SdkTracerProvider> {
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &config.otlp_endpoint {
        let protocol = match config.otlp_protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .with_protocol(protocol)
            .with_headers(config.otlp_headers.clone().into_iter().collect())
            .with_timeout(Duration::from_secs(10))
            .build()
            .with_context(|| format!("setting up OTLP export to {endpoint}"))?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(EXPORT_DELAY)
            .build();
        builder = builder.with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        );
    }
    Ok(builder.build())
}
