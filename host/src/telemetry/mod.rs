//! What operators see: Prometheus metrics, trace-context propagation and
//! the tracing subscriber (logs and OpenTelemetry export).

pub mod lag;
pub mod latency;
pub mod metrics;
pub mod plugin_stats;
pub mod propagation;
pub mod spans;
#[cfg(feature = "subscriber")]
pub mod subscriber;

pub use metrics::{ConsumerLag, Counted, Metrics};
pub use plugin_stats::{PluginStats, StatsSnapshot};
