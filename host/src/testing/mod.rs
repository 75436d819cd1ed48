//! Run plugins with no broker: in `cargo test`, and behind `weir test`.
//!
//! [`TestPlugin`] loads a built `.wasm` and its manifest into the real
//! sandbox (same engine, limits and imports as production), keeps plugin
//! state in memory across events, and returns everything a call did.
//!
//! ```no_run
//! use weir::testing::{TestPlugin, json_event};
//!
//! let mut plugin = TestPlugin::load("../../dist/plugins/fraud.wasm").unwrap();
//! let report = plugin.handle(json_event("orders.placed", &serde_json::json!({
//!     "order_id": "o-1", "customer_id": "c-1", "amount_cents": 250000
//! })));
//! assert!(report.outcome.is_ok());
//! assert_eq!(report.emitted[0].subject, "orders.flagged");
//! ```

pub mod expect;
pub mod fixtures;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use serde::Serialize;

use crate::event::Event;
use crate::manifest::Manifest;
use crate::sandbox::plugin::Plugin;
use crate::sandbox::{Invocation, Sandbox, SandboxConfig};
use crate::state::{CommittedState, MemoryState};

fn shared_sandbox() -> anyhow::Result<&'static Sandbox> {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    if let Some(sandbox) = SANDBOX.get() {
        return Ok(sandbox);
    }
    let sandbox = Sandbox::new(SandboxConfig::with_default_cache())?;
    Ok(SANDBOX.get_or_init(|| sandbox))
}

/// A plugin under test, with in-memory state that persists across events.
pub struct TestPlugin {
    plugin: Plugin,
    state: MemoryState,
    runtime: tokio::runtime::Runtime,
    next_sequence: u64,
}

impl TestPlugin {
    /// Load `wasm` with the manifest beside it (`name.toml`).
    pub fn load(wasm: impl AsRef<Path>) -> anyhow::Result<Self> {
        let wasm = wasm.as_ref();
        check_built(wasm)?;
        let plugin = shared_sandbox()?.load(wasm)?;
        Self::from_plugin(plugin)
    }

    /// Load `wasm` with the manifest at `manifest`.
    pub fn load_with_manifest(
        wasm: impl AsRef<Path>,
        manifest: impl AsRef<Path>,
    ) -> anyhow::Result<Self> {
        let wasm = wasm.as_ref();
        check_built(wasm)?;
        let manifest = Manifest::load(manifest.as_ref())?;
        let plugin = shared_sandbox()?.load_with_manifest(wasm, manifest)?;
        Self::from_plugin(plugin)
    }

    /// Wrap an already loaded plugin.
    pub fn from_plugin(plugin: Plugin) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .context("starting the test runtime")?;
        Ok(TestPlugin {
            plugin,
            state: MemoryState::new(),
            runtime,
            next_sequence: 1,
        })
    }

    /// The plugin under test.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// The plugin's committed state.
    pub fn state(&self) -> &MemoryState {
        &self.state
    }

    /// Handle one event the way the pipeline would: on success the state
    /// changes are committed, on failure nothing is. Events without an id or
    /// sequence get the next one.
    pub fn handle(&mut self, event: Event) -> Invocation {
        let event = self.number(event);
        let state: Arc<dyn CommittedState> = Arc::new(self.state.clone());
        let invocation = self.runtime.block_on(self.plugin.invoke(&event, state));
        self.state.commit(&invocation.state_changes);
        invocation
    }

    /// Give `event` the id and sequence [`Self::handle`] would: events
    /// without a sequence get the next one, events without an id
    /// `<stream>:<sequence>`.
    pub fn number(&mut self, mut event: Event) -> Event {
        if event.sequence == 0 {
            event.sequence = self.next_sequence;
        }
        self.next_sequence = self.next_sequence.max(event.sequence) + 1;
        if event.id.is_empty() {
            event.id = format!("{}:{}", self.plugin.manifest().stream, event.sequence);
        }
        event
    }
}

fn check_built(wasm: &Path) -> anyhow::Result<()> {
    if !wasm.exists() {
        anyhow::bail!(
            "{} does not exist; build the plugins first with `cargo xtask build`",
            wasm.display()
        );
    }
    Ok(())
}

/// An event with a raw payload; id and sequence are filled in by
/// [`TestPlugin::handle`].
pub fn event(subject: &str, payload: impl Into<Vec<u8>>) -> Event {
    Event::new("", subject, payload)
}

/// An event whose payload is `value` as JSON.
pub fn json_event<T: Serialize + ?Sized>(subject: &str, value: &T) -> Event {
    // Serializing a `Serialize` value to a Vec only fails for maps with
    // non-string keys, which is a bug in the test itself.
    let payload =
        serde_json::to_vec(value).unwrap_or_else(|e| format!("<unencodable: {e}>").into_bytes());
    event(subject, payload)
}
