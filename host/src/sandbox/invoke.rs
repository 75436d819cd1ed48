//! Running one call and turning whatever happened into an [`Outcome`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, UpdateDeadline};

use crate::bindings::{GuestError, Plugin as PluginWorld};
use crate::event::{Emitted, Event};
use crate::outcome::Outcome;
use crate::plugin::Plugin;
use crate::sandbox::host::{CallState, LogLevel, LogLine, StateUnavailable};
use crate::sandbox::limits::{DeadlineExceeded, MemoryLimitExceeded};
use crate::state::{StateChange, StateStore};

/// Everything observable about one call.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub outcome: Outcome,
    /// The outbox: empty unless the outcome is `Ok`.
    pub emitted: Vec<Emitted>,
    /// State changes to commit: empty unless the outcome is `Ok`.
    pub state_changes: Vec<StateChange>,
    /// The revision of every key the call read from the store, to guard
    /// the commit against concurrent writers.
    pub state_reads: BTreeMap<String, u64>,
    /// Guest log lines, whatever the outcome.
    pub logs: Vec<LogLine>,
    /// Wall time of the call, instantiation included.
    pub duration: Duration,
}

/// Host calls (a state read from a slow store) are not interrupted by the
/// epoch; this outer timer catches them a little after the guest's deadline.
const HOST_GRACE: Duration = Duration::from_millis(250);

/// Keep this much of the guest's stderr in a trap message.
const STDERR_IN_MESSAGE: usize = 2048;

fn new_store(plugin: &Plugin, state: Arc<dyn StateStore>) -> Store<CallState> {
    let mut store = Store::new(
        plugin.pre().engine(),
        CallState::new(plugin.context().clone(), state),
    );
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_callback(|ctx| {
        if Instant::now() >= ctx.data().deadline {
            Err(wasmtime::Error::new(DeadlineExceeded))
        } else {
            // Yield so a guest spinning without host calls shares the thread.
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}

fn start_call(store: &mut Store<CallState>, event: &Event, timeout: Duration) {
    store.data_mut().begin(&event.id, Instant::now() + timeout);
    store.set_epoch_deadline(1);
}

/// Run `event` in a fresh instance of `plugin`.
pub(crate) async fn invoke_fresh(
    plugin: &Plugin,
    event: &Event,
    state: Arc<dyn StateStore>,
) -> Invocation {
    let started = Instant::now();
    let timeout = plugin.manifest().limits.timeout();
    let mut store = new_store(plugin, state);
    start_call(&mut store, event, timeout);
    let wit_event = event.to_wit();
    let call = async {
        let world = plugin.pre().instantiate_async(&mut store).await?;
        world
            .weir_plugin_handler()
            .call_handle(&mut store, &wit_event)
            .await
    };
    let result = tokio::time::timeout(timeout + HOST_GRACE, call).await;
    finish(store, result, timeout, started)
}

/// An instance kept across calls. Faster than a fresh instance per event
/// (no instantiation), but globals and memory carry over between events, so
/// the pipeline does not use it; benchmarks and embedders that trust their
/// guests may. After any outcome but `Ok`, the instance is discarded and
/// the next call instantiates a new one.
pub struct WarmInstance {
    plugin: Plugin,
    state: Arc<dyn StateStore>,
    live: Option<(Store<CallState>, PluginWorld)>,
}

impl WarmInstance {
    pub(crate) fn new(plugin: Plugin, state: Arc<dyn StateStore>) -> Self {
        WarmInstance {
            plugin,
            state,
            live: None,
        }
    }

    pub async fn invoke(&mut self, event: &Event) -> Invocation {
        let started = Instant::now();
        let timeout = self.plugin.manifest().limits.timeout();
        let (mut store, world) = match self.live.take() {
            Some(live) => live,
            None => {
                let mut store = new_store(&self.plugin, self.state.clone());
                start_call(&mut store, event, timeout);
                match self.plugin.pre().instantiate_async(&mut store).await {
                    Ok(world) => (store, world),
                    Err(e) => return finish(store, Ok(Err(e)), timeout, started),
                }
            }
        };
        start_call(&mut store, event, timeout);
        let wit_event = event.to_wit();
        let result = tokio::time::timeout(
            timeout + HOST_GRACE,
            world
                .weir_plugin_handler()
                .call_handle(&mut store, &wit_event),
        )
        .await;
        let ok = matches!(result, Ok(Ok(Ok(()))));
        let (invocation, store) = finish_keep(store, result, timeout, started);
        if ok {
            self.live = Some((store, world));
        }
        invocation
    }
}

type CallResult = Result<wasmtime::Result<Result<(), GuestError>>, tokio::time::error::Elapsed>;

fn finish(
    store: Store<CallState>,
    result: CallResult,
    timeout: Duration,
    started: Instant,
) -> Invocation {
    finish_keep(store, result, timeout, started).0
}

fn finish_keep(
    mut store: Store<CallState>,
    result: CallResult,
    timeout: Duration,
    started: Instant,
) -> (Invocation, Store<CallState>) {
    let outcome = match result {
        Err(_elapsed) => Outcome::Deadline { limit: timeout },
        Ok(Ok(Ok(()))) => Outcome::Ok,
        Ok(Ok(Err(GuestError::Retry(r)))) => Outcome::Retry {
            reason: r.reason,
            delay: r.delay_ms.map(|ms| Duration::from_millis(u64::from(ms))),
        },
        Ok(Ok(Err(GuestError::Reject(reason)))) => Outcome::Reject { reason },
        Ok(Err(error)) => classify_trap(&error, store.data(), timeout),
    };
    let data = store.data_mut();
    let mut logs = std::mem::take(&mut data.logs);
    // What a guest prints (a debugging println!, say) shows up with its logs.
    let stdout = data.stdout.contents();
    logs.extend(
        String::from_utf8_lossy(&stdout)
            .lines()
            .map(|line| LogLine {
                level: LogLevel::Info,
                message: format!("stdout: {line}"),
            }),
    );
    let (emitted, state_changes, state_reads) = if outcome.is_ok() {
        (
            std::mem::take(&mut data.outbox),
            std::mem::take(&mut data.pending).into_changes(),
            std::mem::take(&mut data.reads),
        )
    } else {
        (Vec::new(), Vec::new(), BTreeMap::new())
    };
    let invocation = Invocation {
        outcome,
        emitted,
        state_reads,
        state_changes,
        logs,
        duration: started.elapsed(),
    };
    (invocation, store)
}

fn classify_trap(error: &wasmtime::Error, data: &CallState, timeout: Duration) -> Outcome {
    if error.downcast_ref::<DeadlineExceeded>().is_some() {
        return Outcome::Deadline { limit: timeout };
    }
    if let Some(e) = error.downcast_ref::<MemoryLimitExceeded>() {
        return Outcome::OutOfMemory {
            limit_bytes: e.limit_bytes,
        };
    }
    if let Some(e) = error.downcast_ref::<StateUnavailable>() {
        return Outcome::HostError {
            message: e.to_string(),
        };
    }
    let mut message = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => format!("{trap}"),
        None => format!("{error:#}"),
    };
    let stderr = data.stderr.contents();
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        let tail_start = stderr.len().saturating_sub(STDERR_IN_MESSAGE);
        let tail_start = (tail_start..stderr.len())
            .find(|&i| stderr.is_char_boundary(i))
            .unwrap_or(0);
        message.push_str("; guest stderr: ");
        message.push_str(&stderr[tail_start..]);
    }
    Outcome::Trap { message }
}
