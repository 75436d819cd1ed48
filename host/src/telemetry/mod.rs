//! What operators see: Prometheus metrics, trace-context propagation and
//! the tracing subscriber (logs and OpenTelemetry export).

pub mod lag;
pub mod metrics;
pub mod propagation;
pub mod spans;
pub mod subscriber;

pub use metrics::{ConsumerLag, Counted, Metrics};
