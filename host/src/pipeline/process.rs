//! One run's path: the events a lane handed over, in stream order. Each is
//! run against committed state plus what the events before it in the run
//! wrote; the ones that succeed are committed together, then their outputs
//! are published and they are acked. Nothing is acked before its effects
//! are durable; on any host-side failure the events go back to the stream.
//!
//! Every delivered message ends in bounded time as processed,
//! dead-lettered or terminated on purpose, each counted: failures of the
//! plugin and of the host both count toward `max-deliveries`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::event::{Emitted, Event};
use crate::jetstream::dlq::{self, DeadLetter};
use crate::jetstream::outbox::{Outgoing, PublishError};
use crate::jetstream::source;
use crate::jetstream::store::{Commit, CommitRequest, EventEffects, PluginStore, Read, Scope};
use crate::outcome::{Outcome, OutcomeKind};
use crate::pipeline::lanes::{RunHandle, Shape};
use crate::pipeline::{PipelineContext, lock};
use crate::sandbox::plugin::Plugin;
use crate::state::{CommittedState, StateChange, StateReadError, Versioned, WaitGuard};
use crate::telemetry::metrics::TerminationReason;
use crate::telemetry::{Counted, propagation, spans};

/// Runs of one event when its commit keeps losing to concurrent writers of
/// the same state keys, before it goes back to the stream with backoff.
const MAX_CONFLICT_RERUNS: usize = 5;

/// What the pipeline decided for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Processed: its effects are durable and it was acked.
    Acked,
    /// Sent back to be tried again later.
    Retried,
    /// Moved to the dead-letter stream, for the outcome of this kind.
    DeadLettered(OutcomeKind),
    /// Ended on purpose without processing or a dead letter.
    Terminated(TerminationReason),
    /// A host-side failure sent it back for another try.
    HostError,
    /// A redelivery of an event already committed: finished without
    /// running the plugin again.
    Duplicate,
}

/// One delivered message and the event it carries.
struct Delivery {
    message: jetstream::Message,
    /// Its lane: its ordering key, or the shared queue.
    lane: String,
    /// An ordered retry does not run again before this.
    not_before: Option<tokio::time::Instant>,
    event: Event,
    /// The consumer span everything done for this event runs in.
    span: tracing::Span,
    /// The producer's `Nats-Msg-Id`, when it gave one, scoped by the
    /// generation: what its done record is kept under.
    msg_id: Option<String>,
    stream: String,
    /// When the stream stored it.
    published: time::OffsetDateTime,
    /// Conflicts lost so far.
    reruns: usize,
}

/// An event that succeeded and waits for its commit.
struct Succeeded {
    delivery: Delivery,
    outbox: Vec<Emitted>,
}

/// How a run is told to end early.
pub(super) struct Ends {
    /// The pipeline is shutting down: finish the stretch in progress, hand
    /// back the events not started.
    pub stopping: CancellationToken,
    /// Out of grace: hand back everything not settled, now.
    pub release: CancellationToken,
}

/// Process the messages of one run, in order. A run from a keyed lane
/// retries a retryable failure here, holding the lane, so no later event of
/// its key can overtake it; otherwise the event is handed back to the
/// stream with a delay.
pub(super) async fn process_run(
    ctx: Arc<PipelineContext>,
    plugin: Plugin,
    messages: Vec<(String, jetstream::Message)>,
    ends: Ends,
    shape: Shape,
    lanes: RunHandle,
) {
    let release = ends.release;
    let incarnation = ctx.incarnation();
    let generation = incarnation.generation.number;
    let scope = Scope::new(&incarnation.stream, incarnation.created_ns, generation);
    // Where to send progress and releases for each message of the run.
    let held: Vec<(u64, async_nats::Subject)> = messages
        .iter()
        .filter_map(|(_, m)| Some((m.info().ok()?.stream_sequence, m.reply.clone()?)))
        .collect();
    let mut left: HashMap<String, usize> = HashMap::new();
    for (lane, _) in &messages {
        *left.entry(lane.clone()).or_default() += 1;
    }
    let client = ctx.js.client();
    let mut queue = VecDeque::with_capacity(messages.len());
    for (lane, message) in messages {
        match delivery(&plugin, lane.clone(), message, &incarnation) {
            Some(d) => queue.push_back(d),
            None => {
                ctx.count(&plugin, Counted::HostError);
                *left.entry(lane).or_default() -= 1;
            }
        }
    }
    let run = Run {
        ctx: &ctx,
        plugin: &plugin,
        scope,
        generation,
        ordered: plugin.manifest().ordering_key.is_some(),
        shared: shape == Shape::Shared,
        stopping: ends.stopping,
        settled: Mutex::new(Vec::new()),
        left: Mutex::new(left),
        lanes,
    };
    let work = run.handle(queue);
    tokio::pin!(work);
    // Whatever the run waits on (a commit, a publish, a retry's backoff),
    // tell the server every third of the ack wait that its events are still
    // being worked on, so none is redelivered under it.
    let period = ctx.ack_wait / 3;
    let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            biased;
            () = &mut work => break,
            () = release.cancelled() => {
                // Shutting down and out of grace: hand back what is not
                // settled now rather than letting it wait out its ack wait.
                let release = bytes::Bytes::from(AckKind::Nak(Some(super::RELEASE_DELAY)));
                for reply in run.unsettled(&held) {
                    if let Err(e) = client.publish(reply, release.clone()).await {
                        tracing::debug!(plugin = plugin.name(), "releasing: {e}");
                    }
                }
                break;
            }
            _ = progress.tick() => {
                for reply in run.unsettled(&held) {
                    if let Err(e) = client.publish(reply, AckKind::Progress.into()).await {
                        tracing::debug!("progress ack failed: {e}");
                    }
                }
            }
        }
    }
}

fn delivery(
    plugin: &Plugin,
    lane: String,
    message: jetstream::Message,
    incarnation: &source::Incarnation,
) -> Option<Delivery> {
    let event = match source::to_event(&message, incarnation) {
        Ok(event) => event,
        Err(e) => {
            // Without delivery info there is nothing to ack or retry.
            tracing::error!(
                plugin = plugin.name(),
                "dropping a message that is not a JetStream delivery: {e:#}"
            );
            return None;
        }
    };
    let (stream, published) = message
        .info()
        .map(|i| (i.stream.to_owned(), i.published))
        .unwrap_or((String::new(), time::OffsetDateTime::UNIX_EPOCH));
    let span = spans::consumer(
        plugin.name(),
        plugin.version().as_str(),
        || incarnation.generation.durable_name(plugin.name()),
        &event,
        &stream,
    );
    let msg_id = source::producer_id(&message).map(|id| incarnation.generation.scoped_id(id));
    Some(Delivery {
        message,
        lane,
        not_before: None,
        event,
        span,
        msg_id,
        stream,
        published,
        reruns: 0,
    })
}

/// What one run shares.
struct Run<'a> {
    ctx: &'a PipelineContext,
    plugin: &'a Plugin,
    scope: Scope,
    generation: u64,
    /// Retries hold the run's place in its key's lane.
    ordered: bool,
    /// Taken from the shared queue of an unordered plugin.
    shared: bool,
    stopping: CancellationToken,
    /// Stream sequences of the run's events settled so far.
    settled: Mutex<Vec<u64>>,
    /// Events of each lane not settled yet; at zero the lane's key goes
    /// back to the lanes for other runs.
    left: Mutex<HashMap<String, usize>>,
    /// Hands keys back, and parks the run while it waits.
    lanes: RunHandle,
}

/// How a stretch of a run ended.
enum Stop {
    /// Every event it took ran and succeeded.
    Clean,
    /// This event did not succeed; the ones before it did.
    Failed(Box<Delivery>, Outcome),
}

/// Events run together: those that succeeded, what they did to state, and
/// how the stretch ended.
struct Stretch {
    succeeded: Vec<Succeeded>,
    state: Arc<RunState>,
    stop: Stop,
}

impl Run<'_> {
    async fn handle(&self, mut queue: VecDeque<Delivery>) {
        // Lowered to one when a run's outbox is too large to commit at once.
        let mut stretch_len = usize::MAX;
        while !queue.is_empty() {
            if self.stopping.is_cancelled() {
                // Shutting down: what has not started goes back, in order.
                for delivery in queue.drain(..) {
                    let release = AckKind::Nak(Some(super::RELEASE_DELAY));
                    ack(&delivery.message, release, self.plugin, &delivery.event).await;
                    self.done_with(&delivery);
                }
                break;
            }
            // Unordered runs that keep colliding execute one at a time,
            // each submitting its writes before the next reads.
            let turn = match self.shared {
                true => self.ctx.contention.enter().await,
                false => None,
            };
            let stretch = self.execute(&mut queue, stretch_len).await;
            let (committed, again, too_large) =
                self.commit(stretch.succeeded, &stretch.state, turn).await;
            if too_large {
                stretch_len = 1;
            }
            self.publish_and_ack(committed).await;
            // Events to run again come before the one that failed, which
            // then runs again after them rather than being acted on now.
            let redo = !again.is_empty();
            if let Stop::Failed(delivery, outcome) = stretch.stop {
                if redo {
                    queue.push_front(*delivery);
                } else if let Some(retry) = self.failed(*delivery, &outcome).await {
                    // Its key waits for the retry; the run's other keys go
                    // first rather than wait with it.
                    defer(&mut queue, retry);
                }
            }
            for delivery in again.into_iter().rev() {
                queue.push_front(delivery);
            }
        }
    }

    /// Run up to `limit` events from the front of `queue` until one does not
    /// succeed. Redelivered events already committed, and messages that
    /// cannot be events, are finished on the way. A retry waiting for its
    /// time ends the stretch, or (at the start of one) is waited for.
    async fn execute(&self, queue: &mut VecDeque<Delivery>, limit: usize) -> Stretch {
        let state = Arc::new(RunState::new(self.ctx.store.clone(), self.lanes.clone()));
        let mut succeeded: Vec<Succeeded> = Vec::new();
        while succeeded.len() < limit
            && !self.stopping.is_cancelled()
            && let Some(delivery) = queue.pop_front()
        {
            if let Some(at) = delivery.not_before {
                if !succeeded.is_empty() {
                    queue.push_front(delivery);
                    break;
                }
                self.lanes.parked(tokio::time::sleep_until(at)).await;
            }
            if let Some(raw) = source::malformed_headers(&delivery.message) {
                let raw = raw.to_vec();
                // The plugin cannot be given an event whose headers are
                // unknown, and no later attempt would read them better.
                let outcome = Outcome::Malformed {
                    message: "the header block could not be parsed; it is kept base64-encoded in the dead letter".into(),
                };
                let disposition = self.dead_letter(&delivery, &outcome, Some(&raw)).await;
                self.settle(&delivery, disposition);
                continue;
            }
            if delivery.event.attempt > 1 && self.ctx.idempotency {
                // A redelivery may find the event already committed (the
                // host died, or an ack was lost, after the commit).
                match self
                    .ctx
                    .store
                    .done(&self.scope, delivery.event.sequence)
                    .await
                {
                    Ok(Some(outbox)) => {
                        self.finish_done(delivery, outbox).await;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let disposition = self.host_error(&delivery, &e).await;
                        self.settle(&delivery, disposition);
                        continue;
                    }
                }
            }
            let call = spans::invoke(&delivery.span, self.plugin.name());
            let view: Arc<dyn CommittedState> = state.clone();
            let invocation = {
                // Closed only when the pipeline is dropped, which it is not
                // while a run is in it.
                let _permit = self.ctx.executions.acquire().await;
                self.plugin
                    .invoke(&delivery.event, view)
                    .instrument(call.clone())
                    .instrument(delivery.span.clone())
                    .await
            };
            self.ctx.observe_call(self.plugin, &invocation, &call);
            if !invocation.outcome.is_ok() {
                return Stretch {
                    succeeded,
                    state,
                    stop: Stop::Failed(Box::new(delivery), invocation.outcome),
                };
            }
            state.apply(invocation.state_changes);
            succeeded.push(Succeeded {
                delivery,
                outbox: invocation.emitted,
            });
        }
        Stretch {
            succeeded,
            state,
            stop: Stop::Clean,
        }
    }

    /// Commit what succeeded. Returns the committed events, the events to
    /// run again, and whether the stretch was too large to commit at once.
    async fn commit(
        &self,
        succeeded: Vec<Succeeded>,
        state: &RunState,
        turn: Option<tokio::sync::MutexGuard<'_, ()>>,
    ) -> (Vec<Succeeded>, Vec<Delivery>, bool) {
        if succeeded.is_empty() {
            return (succeeded, Vec::new(), false);
        }
        let (writes, reads) = state.effects();
        let events = succeeded
            .iter()
            .map(|s| {
                EventEffects::new(
                    s.delivery.event.sequence,
                    s.delivery.msg_id.clone(),
                    &s.outbox,
                )
            })
            .collect();
        let request = CommitRequest::new(self.scope.clone(), events, writes, reads);
        let submitted = self.ctx.store.submit(request);
        drop(turn);
        let outcome = match submitted {
            Ok(submitted) => submitted.outcome().await,
            Err(e) => Err(e),
        };
        if self.shared {
            self.ctx
                .contention
                .record(matches!(outcome, Ok(Commit::Conflict)));
        }
        match outcome {
            Ok(Commit::Committed) => (succeeded, Vec::new(), false),
            Ok(Commit::AlreadyDone(done)) => {
                let mut again = Vec::new();
                for s in succeeded {
                    match done
                        .iter()
                        .find(|(seq, _)| *seq == s.delivery.event.sequence)
                    {
                        Some((_, outbox)) => self.finish_done(s.delivery, outbox.clone()).await,
                        None => again.push(s.delivery),
                    }
                }
                (Vec::new(), again, false)
            }
            Ok(Commit::Conflict) => {
                let mut again = Vec::new();
                let series = self.ctx.series(self.plugin);
                for mut s in succeeded {
                    s.delivery.reruns += 1;
                    series.conflict_rerun();
                    if s.delivery.reruns <= MAX_CONFLICT_RERUNS {
                        tracing::debug!(parent: &s.delivery.span, "state changed under the event; running it again");
                        again.push(s.delivery);
                        continue;
                    }
                    // Contention this persistent is better resolved by time
                    // than by spinning.
                    let delay = backoff(self.plugin, s.delivery.event.attempt);
                    tracing::warn!(parent: &s.delivery.span, "state kept changing under the event; retrying in {delay:?}");
                    self.retry_later(&s.delivery, delay).await;
                    self.settle(&s.delivery, Disposition::Retried);
                }
                (Vec::new(), again, false)
            }
            Ok(Commit::TooLarge { .. }) if succeeded.len() > 1 => {
                // Together too large for one message; each alone may fit.
                let again = succeeded.into_iter().map(|s| s.delivery).collect();
                (Vec::new(), again, true)
            }
            Ok(Commit::TooLarge { bytes, limit }) => {
                for s in succeeded {
                    let outcome = Outcome::TooLarge {
                        what: format!("the outbox of {} events", s.outbox.len()),
                        bytes,
                        limit,
                    };
                    let disposition = self.dead_letter(&s.delivery, &outcome, None).await;
                    self.settle(&s.delivery, disposition);
                }
                (Vec::new(), Vec::new(), false)
            }
            Err(e) => {
                for s in succeeded {
                    let disposition = self.host_error(&s.delivery, &e).await;
                    self.settle(&s.delivery, disposition);
                }
                (Vec::new(), Vec::new(), false)
            }
        }
    }

    /// The effects are committed: publish the outboxes and acknowledge.
    async fn publish_and_ack(&self, committed: Vec<Succeeded>) {
        if committed.is_empty() {
            return;
        }
        let traces: Vec<Vec<(String, String)>> = committed
            .iter()
            .map(|s| propagation::outgoing(&s.delivery.span, &s.delivery.event))
            .collect();
        let outgoing: Vec<Outgoing<'_>> = committed
            .iter()
            .zip(&traces)
            .map(|(s, trace)| Outgoing {
                event: &s.delivery.event,
                emitted: &s.outbox,
                trace,
            })
            .collect();
        let published = self.publish(&outgoing).await;
        if let Err(e) = published {
            // Committed, so a redelivery re-publishes from the outbox.
            for s in &committed {
                let disposition = self.host_error(&s.delivery, &e).await;
                self.settle(&s.delivery, disposition);
            }
            return;
        }
        let with_outputs: Vec<u64> = committed
            .iter()
            .filter(|s| !s.outbox.is_empty())
            .map(|s| s.delivery.event.sequence)
            .collect();
        self.ctx.store.published(&self.scope, with_outputs);
        self.ack_all(committed.iter().map(|s| &s.delivery), Disposition::Acked)
            .await;
    }

    /// Publish outputs as this plugin version and generation, and wait
    /// until JetStream stored each.
    async fn publish(&self, outgoing: &[Outgoing<'_>]) -> Result<(), PublishError> {
        crate::jetstream::outbox::publish(
            &self.ctx.js,
            self.plugin.name(),
            self.plugin.version().as_str(),
            self.generation,
            outgoing,
            self.ctx.publish_timeout,
        )
        .await
    }

    /// Acknowledge processed events. The acks are not confirmed: a lost
    /// one means a redelivery, which done marks finish without running the
    /// event again (without them it runs again, and no confirmation could
    /// have prevented that, only reported it).
    async fn ack_all<'d>(
        &self,
        deliveries: impl Iterator<Item = &'d Delivery>,
        disposition: Disposition,
    ) {
        for delivery in deliveries {
            if let Err(e) = delivery.message.ack().await {
                tracing::warn!(parent: &delivery.span, "ack not sent: {e}");
                self.settle(delivery, Disposition::HostError);
                continue;
            }
            self.ctx
                .publish_to_ack(self.plugin, since(delivery.published));
            self.settle(delivery, disposition);
        }
    }

    /// An event committed before: publish its committed outbox (JetStream
    /// drops what already landed) and acknowledge it.
    async fn finish_done(&self, delivery: Delivery, outbox: Vec<Emitted>) {
        let trace = propagation::outgoing(&delivery.span, &delivery.event);
        let outgoing = [Outgoing {
            event: &delivery.event,
            emitted: &outbox,
            trace: &trace,
        }];
        let published = self.publish(&outgoing).await;
        match published {
            Ok(()) => {
                if !outbox.is_empty() {
                    self.ctx
                        .store
                        .published(&self.scope, vec![delivery.event.sequence]);
                }
                self.ack_all(std::iter::once(&delivery), Disposition::Duplicate)
                    .await;
            }
            Err(e) => {
                let disposition = self.host_error(&delivery, &e).await;
                self.settle(&delivery, disposition);
            }
        }
    }

    /// The plugin did not succeed: dead-letter, retry later, or (for an
    /// ordered plugin) wait and return the event to run again in place.
    async fn failed(&self, mut delivery: Delivery, outcome: &Outcome) -> Option<Delivery> {
        let last = delivery.event.attempt >= self.plugin.manifest().retry.max_deliveries;
        if matches!(outcome, Outcome::Reject { .. }) || last {
            let disposition = self.dead_letter(&delivery, outcome, None).await;
            self.settle(&delivery, disposition);
            return None;
        }
        let delay = match outcome {
            Outcome::Retry {
                delay: Some(delay), ..
            } => *delay,
            _ => backoff(self.plugin, delivery.event.attempt),
        };
        tracing::info!(parent: &delivery.span, attempt = delivery.event.attempt, "{outcome}; retrying in {delay:?}");
        if self.ordered {
            // Hold the lane: no later event of the key may overtake this one.
            self.ctx.count(self.plugin, Counted::Retried);
            delivery.not_before = Some(tokio::time::Instant::now() + delay);
            delivery.event.attempt += 1;
            return Some(delivery);
        }
        self.retry_later(&delivery, delay).await;
        self.settle(&delivery, Disposition::Retried);
        None
    }

    /// Send the event back to be delivered again after `delay`.
    async fn retry_later(&self, delivery: &Delivery, delay: Duration) {
        ack(
            &delivery.message,
            AckKind::Nak(Some(delay)),
            self.plugin,
            &delivery.event,
        )
        .await;
    }

    /// The host could not make the effects durable: send the event back with
    /// backoff. Host failures count toward `max-deliveries` like any other,
    /// so one that repeats on the same event (a subject no stream captures,
    /// say) ends in a dead letter naming it instead of looping.
    async fn host_error(
        &self,
        delivery: &Delivery,
        e: &(dyn std::fmt::Display + Sync),
    ) -> Disposition {
        if delivery.event.attempt >= self.plugin.manifest().retry.max_deliveries {
            let outcome = Outcome::HostError {
                message: e.to_string(),
            };
            return self.dead_letter(delivery, &outcome, None).await;
        }
        let delay = backoff(self.plugin, delivery.event.attempt);
        tracing::warn!(parent: &delivery.span, attempt = delivery.event.attempt, "effects not durable, retrying in {delay:?}: {e}");
        self.retry_later(delivery, delay).await;
        Disposition::HostError
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        outcome: &Outcome,
        raw_headers: Option<&[u8]>,
    ) -> Disposition {
        let (event, message) = (&delivery.event, &delivery.message);
        if dlq::is_dead_letter(&self.ctx.dlq_prefix, &event.subject) {
            // A dead letter failed again in a plugin that consumes them. It
            // is in the dead-letter stream already; another one would only
            // start a loop of ever longer subjects.
            tracing::error!(parent: &delivery.span, stream = %delivery.stream, sequence = event.sequence, "a dead letter failed and is not dead-lettered again: {outcome}");
            return self
                .terminate(delivery, TerminationReason::DeadLetterLoop)
                .await;
        }
        let letter = DeadLetter {
            plugin: self.plugin.name(),
            version: self.plugin.version().as_str(),
            stream: &delivery.stream,
            generation: self.generation,
            replaces: None,
            event,
            outcome,
            trace: propagation::outgoing(&delivery.span, event),
            raw_headers,
        };
        let published = dlq::publish(
            &self.ctx.js,
            &self.ctx.dlq_prefix,
            &letter,
            self.ctx.publish_timeout,
        )
        .await;
        if let Err(e) = published {
            if event.attempt >= self.plugin.manifest().retry.max_deliveries {
                tracing::error!(parent: &delivery.span, stream = %delivery.stream, sequence = event.sequence, "dead letter could not be stored on any attempt; the event stays in its stream only: {e:#}");
                return self
                    .terminate(delivery, TerminationReason::DeadLetterUnstorable)
                    .await;
            }
            let delay = backoff(self.plugin, event.attempt);
            tracing::warn!(parent: &delivery.span, "dead letter not stored, retrying in {delay:?}: {e:#}");
            ack(message, AckKind::Nak(Some(delay)), self.plugin, event).await;
            return Disposition::HostError;
        }
        tracing::warn!(parent: &delivery.span, attempts = event.attempt, "dead-lettered: {outcome}");
        match message.double_ack_with(AckKind::Term).await {
            Ok(_) => Disposition::DeadLettered(outcome.kind()),
            Err(e) => {
                // Redelivered later; the dead letter's message id keeps it single.
                tracing::warn!(parent: &delivery.span, "terminate not confirmed: {e}");
                Disposition::HostError
            }
        }
    }

    /// End an event for good without processing it or storing a dead letter.
    async fn terminate(&self, delivery: &Delivery, reason: TerminationReason) -> Disposition {
        match delivery.message.double_ack_with(AckKind::Term).await {
            Ok(()) => Disposition::Terminated(reason),
            Err(e) => {
                tracing::warn!(parent: &delivery.span, "terminate not confirmed: {e}");
                Disposition::HostError
            }
        }
    }

    /// Count what became of an event; it is no longer this run's to hold.
    fn settle(&self, delivery: &Delivery, disposition: Disposition) {
        let ctx = self.ctx;
        match disposition {
            Disposition::Acked => ctx.count(self.plugin, Counted::Processed),
            Disposition::Retried => ctx.count(self.plugin, Counted::Retried),
            Disposition::DeadLettered(reason) => {
                ctx.count_dead_letter(self.plugin, reason);
                delivery.span.record("otel.status_code", "ERROR");
            }
            Disposition::Terminated(reason) => {
                ctx.count_terminated(self.plugin, reason);
                delivery.span.record("otel.status_code", "ERROR");
            }
            Disposition::HostError => ctx.count(self.plugin, Counted::HostError),
            Disposition::Duplicate => ctx.count(self.plugin, Counted::Duplicate),
        }
        self.done_with(delivery);
    }

    /// `delivery` needs nothing more from this run.
    fn done_with(&self, delivery: &Delivery) {
        lock(&self.settled).push(delivery.event.sequence);
        let mut left = lock(&self.left);
        if let Some(n) = left.get_mut(&delivery.lane) {
            *n -= 1;
            if *n == 0 {
                left.remove(&delivery.lane);
                self.lanes.release(&delivery.lane);
            }
        }
    }

    /// Reply subjects of the run's messages not settled yet.
    fn unsettled(&self, held: &[(u64, async_nats::Subject)]) -> Vec<async_nats::Subject> {
        let settled = lock(&self.settled);
        held.iter()
            .filter(|(seq, _)| !settled.contains(seq))
            .map(|(_, reply)| reply.clone())
            .collect()
    }
}

/// Put a retry of an ordered plugin, and the later events of its key, at
/// the back of the run's queue, after the other keys' events.
fn defer(queue: &mut VecDeque<Delivery>, retry: Delivery) {
    let (mut same_key, others): (VecDeque<Delivery>, VecDeque<Delivery>) =
        queue.drain(..).partition(|d| d.lane == retry.lane);
    *queue = others;
    queue.push_back(retry);
    queue.append(&mut same_key);
}

/// State as the events of one run see it: what the run's earlier events
/// wrote, else what other runs submitted, else what is committed. What was
/// read of each key before the run wrote it guards the run's commit.
struct RunState {
    store: Arc<PluginStore>,
    /// Parked while the call waits for the host (a read from the server,
    /// a WASI poll).
    run: RunHandle,
    inner: Mutex<RunInner>,
}

#[derive(Default)]
struct RunInner {
    /// Last write per key; `None` is a delete.
    overlay: BTreeMap<String, Option<Vec<u8>>>,
    reads: BTreeMap<String, Read>,
}

impl RunState {
    fn new(store: Arc<PluginStore>, run: RunHandle) -> Self {
        RunState {
            store,
            run,
            inner: Mutex::new(RunInner::default()),
        }
    }

    /// Lay a succeeded event's changes over what later events see.
    fn apply(&self, changes: Vec<StateChange>) {
        let mut inner = lock(&self.inner);
        for change in changes {
            match change {
                StateChange::Set { key, value } => inner.overlay.insert(key, Some(value)),
                StateChange::Delete { key } => inner.overlay.insert(key, None),
            };
        }
    }

    /// The run's state changes, last write per key, and its reads.
    fn effects(&self) -> (Vec<StateChange>, BTreeMap<String, Read>) {
        let inner = lock(&self.inner);
        let writes = inner
            .overlay
            .iter()
            .map(|(key, value)| match value {
                Some(value) => StateChange::Set {
                    key: key.clone(),
                    value: value.clone(),
                },
                None => StateChange::Delete { key: key.clone() },
            })
            .collect();
        (writes, inner.reads.clone())
    }
}

impl CommittedState for RunState {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, StateReadError>> {
        Box::pin(async move {
            {
                let inner = lock(&self.inner);
                if let Some(value) = inner.overlay.get(key) {
                    return Ok(Versioned {
                        value: value.clone(),
                        revision: 0,
                    });
                }
            }
            // A read that waits on the server parks the run through
            // `waiting`, as the call gives its turn up.
            let (versioned, read) = self.store.read(key).await?;
            lock(&self.inner)
                .reads
                .entry(key.to_owned())
                .or_insert(read);
            Ok(versioned)
        })
    }

    fn waiting(&self) -> Option<WaitGuard> {
        Some(Box::new(self.run.park()))
    }
}

/// Time since the stream stored a message (zero if clocks disagree).
fn since(published: time::OffsetDateTime) -> Duration {
    Duration::try_from(time::OffsetDateTime::now_utc() - published).unwrap_or_default()
}

fn backoff(plugin: &Plugin, attempt: u32) -> Duration {
    plugin
        .manifest()
        .retry
        .backoff_with_jitter(attempt, rand::random::<f64>())
}

async fn ack(message: &jetstream::Message, kind: AckKind, plugin: &Plugin, event: &Event) {
    if let Err(e) = message.ack_with(kind).await {
        // The server redelivers after the ack wait anyway.
        tracing::warn!(plugin = plugin.name(), event_id = %event.id, "sending {kind:?} failed: {e}");
    }
}
