//! Running one call and turning whatever happened into an [`Outcome`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, UpdateDeadline};

use super::budget::HostMemoryExhausted;
use super::cpu::Turn;
use super::imports::{CallContext, LogLevel, LogLine, PluginContext, StateUnavailable};
use super::instances::{Instance, InstancePool};
use super::limits::{DeadlineExceeded, MemoryLimitExceeded};
use super::long_calls::{self, LongCalls};
use crate::bindings::{GuestError, PluginPre};
use crate::event::{Emitted, Event};
use crate::outcome::Outcome;
use crate::state::{CommittedState, StateChange};

/// Everything observable about one call.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// How the call ended.
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
const IMPORT_GRACE: Duration = Duration::from_millis(250);

/// Keep this much of the guest's stderr in a trap message.
const STDERR_IN_MESSAGE: usize = 2048;

fn new_store(
    pre: &PluginPre<CallContext>,
    ctx: &Arc<PluginContext>,
    state: Arc<dyn CommittedState>,
) -> Store<CallContext> {
    let mut store = Store::new(pre.engine(), CallContext::new(ctx.clone(), state));
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_callback(|mut ctx| {
        // The guest stopped at a tick: the turn's bookkeeping and whatever
        // the runtime runs next on this thread run at normal priority.
        long_calls::restore();
        let data = ctx.data_mut();
        data.ticks += 1;
        if Instant::now() >= data.deadline {
            return Err(wasmtime::Error::new(DeadlineExceeded));
        }
        // A call still running at its second tick computes for long: it
        // needs a long-call permit, and its guest code goes on set apart
        // (see `sandbox::long_calls`).
        let long = data.ticks >= 2;
        let wait: Pin<Box<dyn Future<Output = ()> + Send>> = match &data.turn {
            Some(turn) => turn.after_tick(long),
            None => Box::pin(tokio::task::yield_now()),
        };
        let policy = match &data.turn {
            Some(turn) if long => turn.long_calls(),
            _ => LongCalls::Normal,
        };
        let wait = match policy {
            LongCalls::Normal => wait,
            _ => Box::pin(async move {
                wait.await;
                long_calls::set_apart(policy);
            }),
        };
        Ok(UpdateDeadline::YieldCustom(
            1,
            match &data.turn {
                Some(turn) => turn.at_tick(wait),
                None => wait,
            },
        ))
    });
    store
}

fn start_call(
    store: &mut Store<CallContext>,
    event: &Event,
    deadline: Instant,
    turn: &Turn,
    state: Arc<dyn CommittedState>,
) {
    store
        .data_mut()
        .begin(&event.id, deadline, turn.handle(), state);
    store.set_epoch_deadline(1);
}

/// Run `event` in an instance of a plugin: an idle one from its pool, or a
/// new one from `pre`. The call waits for a turn on the guest CPU first; its deadline
/// starts with the turn and covers instantiation too.
pub(crate) async fn invoke(
    pre: &PluginPre<CallContext>,
    ctx: &Arc<PluginContext>,
    pool: &InstancePool,
    timeout: Duration,
    event: &Event,
    state: Arc<dyn CommittedState>,
) -> Invocation {
    let turn = ctx.cpu.turn(&ctx.cpu_key).await;
    let started = Instant::now();
    let deadline = started + timeout;
    let hard_stop = tokio::time::Instant::from_std(deadline + IMPORT_GRACE);
    let handle = turn.handle();
    // Told when the guest waits for the host, so its scheduler can count
    // the call as not computing meanwhile.
    let view = state.clone();
    let waiting = || view.waiting();
    let mut instance = match pool.take() {
        Some(instance) => instance,
        None => {
            let mut store = new_store(pre, ctx, state.clone());
            start_call(&mut store, event, deadline, &turn, state.clone());
            pool.created();
            tracing::debug!(plugin = %ctx.name, "new instance");
            let instantiating = handle.computing(
                long_calls::restoring(pre.instantiate_async(&mut store)),
                waiting,
            );
            match tokio::time::timeout_at(hard_stop, instantiating).await {
                Ok(Ok(world)) => Instance {
                    store,
                    world,
                    served: 0,
                },
                Ok(Err(e)) => return finish(&mut store, Ok(Err(e)), timeout, started),
                Err(elapsed) => return finish(&mut store, Err(elapsed), timeout, started),
            }
        }
    };
    start_call(&mut instance.store, event, deadline, &turn, state);
    let wit_event = event.to_wit();
    let result = tokio::time::timeout_at(
        hard_stop,
        handle.computing(
            long_calls::restoring(
                instance
                    .world
                    .weir_plugin_handler()
                    .call_handle(&mut instance.store, &wit_event),
            ),
            waiting,
        ),
    )
    .await;
    // Only a call that returned leaves the instance in a state fit for
    // another event; a trap or an interrupted call may have left it
    // anywhere.
    let returned = matches!(result, Ok(Ok(_)));
    let invocation = finish(&mut instance.store, result, timeout, started);
    if returned {
        pool.give_back(instance);
    }
    invocation
}

type CallResult = Result<wasmtime::Result<Result<(), GuestError>>, tokio::time::error::Elapsed>;

fn finish(
    store: &mut Store<CallContext>,
    result: CallResult,
    timeout: Duration,
    started: Instant,
) -> Invocation {
    // A call that ended while its guest ran set apart.
    long_calls::restore();
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
    let (stdout, dropped) = data.stdout.take();
    logs.extend(
        String::from_utf8_lossy(&stdout)
            .lines()
            .map(|line| LogLine {
                level: LogLevel::Info,
                message: format!("stdout: {line}"),
            }),
    );
    if dropped > 0 {
        logs.push(LogLine {
            level: LogLevel::Warn,
            message: format!("stdout: {dropped} more bytes dropped"),
        });
    }
    data.stderr.take();
    let (emitted, state_changes, state_reads) = if outcome.is_ok() {
        (
            std::mem::take(&mut data.outbox),
            std::mem::take(&mut data.pending).into_changes(),
            std::mem::take(&mut data.reads),
        )
    } else {
        (Vec::new(), Vec::new(), BTreeMap::new())
    };
    Invocation {
        outcome,
        emitted,
        state_reads,
        state_changes,
        logs,
        duration: started.elapsed(),
    }
}

fn classify_trap(error: &wasmtime::Error, data: &CallContext, timeout: Duration) -> Outcome {
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
    if let Some(e) = error.downcast_ref::<HostMemoryExhausted>() {
        // The plugin kept within its own cap; the host as a whole is full.
        tracing::warn!(plugin = %data.ctx.name, "{e}");
        return Outcome::HostError {
            message: e.to_string(),
        };
    }
    let mut message = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => format!("{trap}"),
        None => format!("{error:#}"),
    };
    let stderr = data.stderr.peek();
    let stderr = String::from_utf8_lossy(&stderr);
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        let tail_start = stderr.ceil_char_boundary(stderr.len().saturating_sub(STDERR_IN_MESSAGE));
        message.push_str("; guest stderr: ");
        message.push_str(&stderr[tail_start..]);
    }
    Outcome::Trap { message }
}
