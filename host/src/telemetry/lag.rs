//! Consumer lag, read from the server: how far each plugin's durable
//! consumer is behind its stream and how much it holds unacknowledged.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use tokio_util::sync::CancellationToken;

use super::metrics::{ConsumerLag, Metrics};
use super::plugin_stats::PluginStats;

/// Poll `consumer`'s info every `every` until `stop`, publishing the lag to
/// the plugin's stats and the metrics. While the server is unreachable the
/// last values stay; the `weir_nats_connected` gauge says they are stale.
pub async fn poll(
    consumer: PullConsumer,
    plugin: String,
    stats: Arc<PluginStats>,
    metrics: Arc<Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let info = tokio::select! {
            _ = stop.cancelled() => break,
            info = consumer.get_info() => info,
        };
        match info {
            Ok(info) => {
                let lag = ConsumerLag {
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                };
                stats.set_lag(lag);
            }
            Err(e) => tracing::debug!(plugin, "reading consumer info: {e}"),
        }
    }
    metrics.forget_consumer(&plugin);
}
