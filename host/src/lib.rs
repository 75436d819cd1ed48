//! Weir: a WebAssembly plugin stream processor for NATS JetStream.
//!
//! Start with [`sandbox::Sandbox`] (compile and run plugins) and
//! [`testing`] (run a plugin against events with no broker). ARCHITECTURE.md
//! follows one event through the modules.

pub mod admin;
pub mod bindings;
pub mod candidate;
pub mod cli;
pub mod compile_cache;
pub mod config;
pub mod control;
pub mod dev;
pub mod dlq;
pub mod dlq_replay;
pub mod dlq_store;
pub mod event;
pub mod generation;
pub mod manifest;
pub mod names;
pub mod nats;
pub mod outbox;
pub mod outcome;
pub mod pipeline;
pub mod plugin;
pub mod plugin_bucket;
pub mod runtime;
pub mod sandbox;
pub mod scan;
pub mod secret;
pub mod source;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod watch;

pub use event::{Emitted, Event, Header};
pub use manifest::Manifest;
pub use outcome::Outcome;
pub use plugin::{Plugin, PluginVersion};
pub use sandbox::{Invocation, Sandbox, SandboxConfig};
