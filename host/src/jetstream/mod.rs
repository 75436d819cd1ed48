//! Everything that talks to JetStream: the connection, the source of
//! events (a plugin's durable consumer), the plugin's state and done
//! records, the outbox of emitted events, dead letters, consumer
//! generations and the bucket plugins are deployed through.

pub mod connection;
pub mod dlq;
pub mod dlq_store;
pub mod generation;
pub mod outbox;
pub mod plugin_bucket;
pub mod source;
pub mod store;
