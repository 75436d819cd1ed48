//! The host side of the plugin's imports: outbox, state, log and config.
//!
//! Everything a call produces is buffered in [`CallContext`]; nothing leaves
//! the sandbox until the pipeline has seen the call succeed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::weir::plugin::{config, emit, log, state, types};
use crate::bindings::{LimitError, WitHeader};
use crate::event::{Emitted, Header};
use crate::manifest::Limits;
use crate::names::validate_publish_subject;
use crate::sandbox::cpu::TurnHandle;
use crate::sandbox::limits::Limiter;
use crate::sandbox::stdio::Capture;
use crate::state::{CommittedState, PendingState};

/// What every call of one plugin version shares.
#[derive(Debug)]
pub struct PluginContext {
    /// The plugin's name.
    pub name: String,
    /// The version's id (see `PluginVersion`).
    pub version: String,
    /// The manifest's `[limits]`.
    pub limits: Limits,
    /// The manifest's `[config]`, already rendered as strings, sorted.
    pub config: Vec<(String, String)>,
    /// The host-wide budget its instances' memory is reserved from.
    pub budget: Arc<super::budget::MemoryBudget>,
    /// The host-wide guest-CPU turns its calls take.
    pub cpu: Arc<super::cpu::CpuShare>,
    /// Whose turns these are: the plugin's name, so every version of a
    /// plugin shares one fair share.
    pub cpu_key: Arc<str>,
}

/// A guest log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// How severe.
    pub level: LogLevel,
    /// What the guest logged.
    pub message: String,
}

/// The level of a guest log line, as the WIT `log` import names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Finest detail.
    Trace,
    /// Detail for debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something the plugin could not handle.
    Error,
}

/// Headers the host sets on emitted events; a plugin may not forge them.
const RESERVED_HEADER_PREFIXES: [&str; 2] = ["nats-", "weir-"];

/// The store data of one plugin instance. An instance may serve many
/// calls, one at a time; `CallContext::begin` starts each.
pub struct CallContext {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) ctx: Arc<PluginContext>,
    /// Committed state, as the current call's pipeline sees it.
    pub(crate) committed: Arc<dyn CommittedState>,
    pub(crate) event_id: String,
    pub(crate) deadline: Instant,
    /// The running call's turn on the guest CPU.
    pub(crate) turn: Option<TurnHandle>,
    /// Epoch ticks the current call has reached while running guest code.
    pub(crate) ticks: u32,
    pub(crate) outbox: Vec<Emitted>,
    pub(crate) pending: PendingState,
    /// Revision of each key when this call first read it from the store.
    pub(crate) reads: BTreeMap<String, u64>,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) stderr: Capture,
    pub(crate) stdout: Capture,
}

impl CallContext {
    /// The context of a new instance of the plugin `ctx`, reading `committed`.
    pub fn new(ctx: Arc<PluginContext>, committed: Arc<dyn CommittedState>) -> Self {
        let stderr = Capture::default();
        let stdout = Capture::default();
        // No preopened directories, no environment, no arguments, no
        // sockets: a plugin reaches the world only through its imports.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        CallContext {
            wasi,
            table: ResourceTable::new(),
            ticks: 0,
            limiter: Limiter::new(ctx.limits.memory_bytes(), ctx.budget.clone()),
            ctx,
            committed,
            event_id: String::new(),
            deadline: Instant::now(),
            turn: None,
            outbox: Vec::new(),
            pending: PendingState::default(),
            reads: BTreeMap::new(),
            logs: Vec::new(),
            stderr,
            stdout,
        }
    }

    /// Start a new call on this instance: forget what the previous one
    /// buffered, including output it printed after its result was taken.
    pub(crate) fn begin(
        &mut self,
        event_id: &str,
        deadline: Instant,
        turn: TurnHandle,
        committed: Arc<dyn CommittedState>,
    ) {
        self.event_id.clear();
        self.event_id.push_str(event_id);
        self.deadline = deadline;
        self.turn = Some(turn);
        self.ticks = 0;
        self.committed = committed;
        self.outbox.clear();
        self.pending = PendingState::default();
        self.reads.clear();
        self.logs.clear();
        self.stdout.take();
        self.stderr.take();
    }
}

impl WasiView for CallContext {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The state store failed under a call. Raised as a trap so the call ends
/// and is retried; the guest is never told a read succeeded when it did not.
#[derive(Debug, thiserror::Error)]
#[error("state store unavailable: {0}")]
pub struct StateUnavailable(pub String);

fn validate_header(h: &WitHeader) -> Result<(), String> {
    let key = h.key.as_str();
    if key.is_empty()
        || key
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
    {
        return Err(format!(
            "header name {key:?} is not a valid NATS header name"
        ));
    }
    let lower = key.to_ascii_lowercase();
    if RESERVED_HEADER_PREFIXES
        .iter()
        .any(|p| lower.starts_with(p))
    {
        return Err(format!(
            "header {key:?} is set by the host; plugins may not set Nats-* or Weir-* headers"
        ));
    }
    if h.value.chars().any(|c| c == '\r' || c == '\n') {
        return Err(format!("header {key:?} has a line break in its value"));
    }
    Ok(())
}

/// JetStream KV keys: letters, digits and `-/_=.`, not starting or ending with `.`.
fn validate_state_key(key: &str) -> Result<(), LimitError> {
    let ok_chars = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'));
    if key.is_empty()
        || !ok_chars
        || key.starts_with('.')
        || key.ends_with('.')
        || key.contains("..")
    {
        return Err(LimitError::Invalid(format!(
            "state key {key:?} must be letters, digits and -/_=. without empty dot-separated parts"
        )));
    }
    Ok(())
}

impl CallContext {
    fn check_state_write(&self, key: &str) -> Result<(), LimitError> {
        validate_state_key(key)?;
        let max = self.ctx.limits.max_state_writes;
        if !self.pending.contains(key) && self.pending.len() >= max as usize {
            return Err(LimitError::TooMany(max));
        }
        Ok(())
    }
}

impl types::Host for CallContext {}

impl emit::Host for CallContext {
    async fn publish(
        &mut self,
        subject: String,
        headers: Vec<WitHeader>,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), LimitError>> {
        let limits = &self.ctx.limits;
        if let Err(why) = validate_publish_subject(&subject) {
            return Ok(Err(LimitError::Invalid(format!(
                "subject {subject:?} {why}"
            ))));
        }
        if let Some(why) = headers.iter().find_map(|h| validate_header(h).err()) {
            return Ok(Err(LimitError::Invalid(why)));
        }
        let header_bytes: usize = headers
            .iter()
            .map(|h| h.key.len() + h.value.len() + 4)
            .sum();
        if (payload.len() + header_bytes) as u64 > limits.max_emit_bytes {
            return Ok(Err(LimitError::TooLarge(limits.max_emit_bytes)));
        }
        if self.outbox.len() >= limits.max_emits as usize {
            return Ok(Err(LimitError::TooMany(limits.max_emits)));
        }
        self.outbox.push(Emitted {
            subject,
            headers: headers.into_iter().map(Header::from_wit).collect(),
            payload,
        });
        Ok(Ok(()))
    }
}

impl state::Host for CallContext {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(pending) = self.pending.get(&key) {
            return Ok(pending);
        }
        // The store may go to the server: the call then gives its turn up
        // and reports itself waiting (`TurnHandle::computing`).
        match self.committed.get(&key).await {
            Ok(versioned) => {
                self.reads.entry(key).or_insert(versioned.revision);
                Ok(versioned.value)
            }
            Err(e) => Err(wasmtime::Error::new(StateUnavailable(format!("{e:#}")))),
        }
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), LimitError>> {
        if let Err(e) = self.check_state_write(&key) {
            return Ok(Err(e));
        }
        let max = self.ctx.limits.max_state_value_bytes;
        if value.len() as u64 > max {
            return Ok(Err(LimitError::TooLarge(max)));
        }
        self.pending.set(key, value);
        Ok(Ok(()))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), LimitError>> {
        if let Err(e) = self.check_state_write(&key) {
            return Ok(Err(e));
        }
        self.pending.delete(key);
        Ok(Ok(()))
    }
}

impl log::Host for CallContext {
    async fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let ctx = &self.ctx;
        let (plugin, version, event_id) = (
            ctx.name.as_str(),
            ctx.version.as_str(),
            self.event_id.as_str(),
        );
        let level = match level {
            log::Level::Trace => {
                tracing::trace!(plugin, version, event_id, "{message}");
                LogLevel::Trace
            }
            log::Level::Debug => {
                tracing::debug!(plugin, version, event_id, "{message}");
                LogLevel::Debug
            }
            log::Level::Info => {
                tracing::info!(plugin, version, event_id, "{message}");
                LogLevel::Info
            }
            log::Level::Warn => {
                tracing::warn!(plugin, version, event_id, "{message}");
                LogLevel::Warn
            }
            log::Level::Error => {
                tracing::error!(plugin, version, event_id, "{message}");
                LogLevel::Error
            }
        };
        // Lines are kept for test reports; bounded like the outbox.
        if self.logs.len() < ctx.limits.max_emits as usize {
            self.logs.push(LogLine { level, message });
        }
        Ok(())
    }
}

impl config::Host for CallContext {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        let config = &self.ctx.config;
        Ok(config
            .binary_search_by(|(k, _)| k.as_str().cmp(&key))
            .ok()
            .map(|i| config[i].1.clone()))
    }

    async fn all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.ctx.config.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keys() {
        for ok in ["a", "stock.sku-1", "a/b_c=d", "A9"] {
            assert!(validate_state_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "ä"] {
            assert!(validate_state_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers() {
        let h = |k: &str, v: &str| WitHeader {
            key: k.into(),
            value: v.into(),
        };
        assert!(validate_header(&h("Customer-Id", "c1")).is_ok());
        assert!(
            validate_header(&h("Nats-Msg-Id", "x"))
                .unwrap_err()
                .contains("set by the host")
        );
        assert!(validate_header(&h("weir-plugin", "x")).is_err());
        assert!(validate_header(&h("a b", "x")).is_err());
        assert!(validate_header(&h("a:b", "x")).is_err());
        assert!(validate_header(&h("ok", "line\nbreak")).is_err());
    }
}
