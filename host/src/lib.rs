//! Weir: a WebAssembly plugin stream processor for NATS JetStream.
//!
//! Start with [`sandbox::Sandbox`] (compile and run plugins) and
//! [`testing`] (run a plugin against events with no broker). ARCHITECTURE.md
//! follows one event through the modules.

pub mod bindings;
pub mod cli;
pub mod compile_cache;
pub mod event;
pub mod manifest;
pub mod outcome;
pub mod plugin;
pub mod sandbox;
pub mod state;
pub mod testing;

pub use event::{Emitted, Event, Header};
pub use manifest::Manifest;
pub use outcome::Outcome;
pub use plugin::{Plugin, PluginVersion};
pub use sandbox::{Invocation, Sandbox, SandboxConfig};
