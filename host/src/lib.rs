//! Weir: a WebAssembly plugin stream processor for NATS JetStream.
//!
//! Start with [`sandbox::Sandbox`] (compile and run plugins) and
//! [`testing`] (run a plugin against events with no broker). ARCHITECTURE.md
//! follows one event through the modules.

// A `pub` item must be reachable from outside, or be `pub(crate)`: the
// public API is what an embedder sees, nothing more, and all of it is
// documented.
#![warn(unreachable_pub, missing_docs)]

pub mod bindings;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
mod digest;
pub mod event;
pub mod jetstream;
mod labels;
pub mod manifest;
pub mod names;
pub mod outcome;
pub mod pipeline;
pub mod replay;
pub mod sandbox;
pub mod secret;
pub mod state;
pub mod supervisor;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod testing;

pub use event::{Emitted, Event, Header};
pub use manifest::Manifest;
pub use outcome::Outcome;
pub use sandbox::plugin::{Plugin, PluginVersion};
pub use sandbox::{Invocation, Sandbox, SandboxConfig};
