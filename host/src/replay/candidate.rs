//! `weir replay`: a candidate version of a plugin run over a range of
//! history with no effects at all, and what it would have emitted compared
//! with what the live plugin emitted for the same events.
//!
//! Nothing is published, committed or acknowledged. Events are read
//! through an ephemeral consumer that acknowledges nothing. The candidate's
//! state reads go to the live plugin's bucket, read-only, under an
//! in-memory layer holding the candidate's own writes: its later events see
//! its earlier writes, and nothing is ever stored. It starts from the live
//! plugin's *current* state, not the state as of the range's first event,
//! so a stateful plugin's outputs can differ from the live ones for that
//! reason alone.
//!
//! The live plugin's outputs are found by the headers every output carries:
//! `Weir-Plugin` names the plugin and `Weir-Cause-Id` the event. The
//! message id tells the generation (see [`crate::jetstream::generation`]); after a
//! reset only the newest generation's outputs of an event count.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, kv};
use futures::future::BoxFuture;
use time::OffsetDateTime;

use crate::event::{Emitted, Event};
use crate::jetstream::source::Incarnation;
use crate::sandbox::Invocation;
use crate::sandbox::plugin::Plugin;
use crate::state::{CommittedState, StateChange, StateReadError, Versioned};

/// One end of the range of history to run over.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    /// A stream sequence.
    Sequence(u64),
    /// The first event stored at or after this time.
    Time(OffsetDateTime),
}

impl Bound {
    /// A stream sequence (`1200`) or an RFC 3339 time.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(n) = text.parse::<u64>() {
            return match n {
                0 => Err("stream sequences count from 1".into()),
                n => Ok(Bound::Sequence(n)),
            };
        }
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map(Bound::Time)
            .map_err(|_| {
                format!(
                    "{text:?} is neither a stream sequence nor an RFC 3339 time (e.g. 2026-01-31T00:00:00Z)"
                )
            })
    }

    fn deliver_policy(&self) -> consumer::DeliverPolicy {
        match self {
            Bound::Sequence(start_sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: *start_sequence,
            },
            Bound::Time(start_time) => consumer::DeliverPolicy::ByStartTime {
                start_time: *start_time,
            },
        }
    }

    fn passed_by(&self, sequence: u64, published: OffsetDateTime) -> bool {
        match self {
            Bound::Sequence(last) => sequence > *last,
            Bound::Time(last) => published > *last,
        }
    }
}

/// Which events to run the candidate over.
#[derive(Debug, Clone)]
pub struct Range {
    /// The stream to read.
    pub stream: String,
    /// Subject filters; the candidate manifest's subjects when empty.
    pub subjects: Vec<String>,
    /// Where to start; the stream's first event when `None`.
    pub from: Option<Bound>,
    /// Inclusive.
    pub to: Option<Bound>,
    /// Events to run at most.
    pub limit: usize,
}

/// An event of the range, with when the stream stored it.
pub struct Stored {
    /// The event, as the plugin would get it.
    pub event: Event,
    /// When the stream stored it.
    pub published: OffsetDateTime,
}

/// Read the range's events, oldest first: at most `range.limit`, and only
/// those stored when the read began, so a busy stream cannot keep it going.
pub async fn read_events(js: &jetstream::Context, range: &Range) -> anyhow::Result<Vec<Stored>> {
    let mut stream = js
        .get_stream(&range.stream)
        .await
        .with_context(|| format!("stream {} does not exist or cannot be read", range.stream))?;
    let info = stream.info().await?;
    let incarnation = Incarnation {
        stream: range.stream.clone(),
        created_ns: info.created.unix_timestamp_nanos(),
        generation: Default::default(),
    };
    let last_stored = info.state.last_sequence;
    let mut config = consumer::pull::Config {
        deliver_policy: range
            .from
            .as_ref()
            .map_or(consumer::DeliverPolicy::All, Bound::deliver_policy),
        description: Some("weir replay: reads history, acknowledges nothing".into()),
        ..Default::default()
    };
    match range.subjects.as_slice() {
        [one] => config.filter_subject = one.clone(),
        many => config.filter_subjects = many.to_vec(),
    }
    let mut events = Vec::new();
    crate::jetstream::source::read_history(&stream, config, |message| {
        let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (sequence, published) = (info.stream_sequence, info.published);
        let past = range
            .to
            .as_ref()
            .is_some_and(|to| to.passed_by(sequence, published));
        if past || sequence > last_stored {
            return Ok(false);
        }
        events.push(Stored {
            event: crate::jetstream::source::to_event(&message, &incarnation)?,
            published,
        });
        Ok(events.len() < range.limit)
    })
    .await?;
    Ok(events)
}

/// The live plugin's state, read-only, under the candidate's own writes.
pub struct Overlay {
    live: Option<kv::Store>,
    own: Mutex<HashMap<String, Option<Vec<u8>>>>,
}

impl Overlay {
    /// An empty layer over `live`, the plugin's state bucket if it has one.
    pub fn new(live: Option<kv::Store>) -> Self {
        Overlay {
            live,
            own: Mutex::new(HashMap::new()),
        }
    }

    /// Keep a successful call's writes, in memory only.
    pub fn apply(&self, changes: &[StateChange]) {
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        for change in changes {
            let value = match change {
                StateChange::Set { value, .. } => Some(value.clone()),
                StateChange::Delete { .. } => None,
            };
            own.insert(change.key().to_owned(), value);
        }
    }
}

impl CommittedState for Overlay {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, StateReadError>> {
        let own = self
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        Box::pin(async move {
            let value = match (own, &self.live) {
                (Some(value), _) => value,
                (None, None) => None,
                (None, Some(live)) => match live.entry(format!("s.{key}")).await.map_err(|e| {
                    StateReadError::new(key, format!("the live plugin's state: {e}"))
                })? {
                    Some(e) if e.operation == kv::Operation::Put => Some(e.value.to_vec()),
                    _ => None,
                },
            };
            Ok(Versioned { value, revision: 0 })
        })
    }
}

/// How the candidate's outputs for one event compare with the live ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Both emitted the same outputs (or neither emitted any).
    Same,
    /// Both emitted, not the same.
    Different,
    /// Only the candidate emitted.
    OnlyInCandidate,
    /// Only the live plugin emitted.
    OnlyInLive,
}

impl Verdict {
    /// Compare outputs, ignoring the headers the host adds.
    pub fn of(candidate: &[Emitted], live: &[Emitted]) -> Self {
        let candidate: Vec<Emitted> = candidate.iter().map(comparable).collect();
        match (candidate.is_empty(), live.is_empty()) {
            (true, true) => Verdict::Same,
            (false, true) => Verdict::OnlyInCandidate,
            (true, false) => Verdict::OnlyInLive,
            (false, false) if candidate == live => Verdict::Same,
            (false, false) => Verdict::Different,
        }
    }

    /// As the report prints it.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Same => "same",
            Verdict::Different => "different",
            Verdict::OnlyInCandidate => "only-in-candidate",
            Verdict::OnlyInLive => "only-in-live",
        }
    }
}

/// Headers the host or the tracer adds, which say nothing about what the
/// plugin decided.
fn added_by_host(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.starts_with("weir-")
        || key.starts_with("nats-")
        || key == "traceparent"
        || key == "tracestate"
}

/// An output with only the plugin's own headers.
fn comparable(emitted: &Emitted) -> Emitted {
    Emitted {
        subject: emitted.subject.clone(),
        headers: emitted
            .headers
            .iter()
            .filter(|h| !added_by_host(&h.key))
            .cloned()
            .collect(),
        payload: emitted.payload.clone(),
    }
}

/// The candidate's run of one event.
pub struct Run {
    /// The event.
    pub stored: Stored,
    /// What the candidate did with it.
    pub invocation: Invocation,
}

/// Run `plugin` over `events` in order, with no effects: its state writes
/// go to `state` (in memory) and nothing else leaves the process.
pub async fn run_all(plugin: &Plugin, events: Vec<Stored>, state: Arc<Overlay>) -> Vec<Run> {
    let mut runs = Vec::with_capacity(events.len());
    for stored in events {
        let invocation = plugin.invoke(&stored.event, state.clone()).await;
        if invocation.outcome.is_ok() {
            state.apply(&invocation.state_changes);
        }
        runs.push(Run { stored, invocation });
    }
    runs
}

/// The streams holding what the candidate emitted.
pub async fn streams_capturing(
    js: &jetstream::Context,
    runs: &[Run],
) -> anyhow::Result<BTreeSet<String>> {
    let subjects: BTreeSet<&str> = runs
        .iter()
        .flat_map(|r| r.invocation.emitted.iter().map(|e| e.subject.as_str()))
        .collect();
    let mut streams = BTreeSet::new();
    for subject in subjects {
        if let Ok(stream) = js.stream_by_subject(subject).await {
            streams.insert(stream);
        }
    }
    Ok(streams)
}

/// What `plugin` emitted for each of `causes` (event ids), read from
/// `streams` from `since` on: per event, the newest generation's outputs in
/// the order they were emitted.
pub async fn live_outputs(
    js: &jetstream::Context,
    plugin: &str,
    streams: &BTreeSet<String>,
    since: OffsetDateTime,
    causes: &HashSet<&str>,
) -> anyhow::Result<HashMap<String, Vec<Emitted>>> {
    // cause -> generation -> index -> output
    let mut found: HashMap<String, BTreeMap<u64, BTreeMap<usize, Emitted>>> = HashMap::new();
    for name in streams {
        let range = Range {
            stream: name.clone(),
            subjects: Vec::new(),
            from: Some(Bound::Time(since)),
            to: None,
            limit: usize::MAX,
        };
        for stored in read_events(js, &range).await? {
            let event = stored.event;
            if event.header(crate::jetstream::outbox::headers::PLUGIN) != Some(plugin) {
                continue;
            }
            let Some(cause) = event.header(crate::jetstream::outbox::headers::CAUSE_ID) else {
                continue;
            };
            if !causes.contains(cause) {
                continue;
            }
            let (generation, index) = event
                .header(async_nats::header::NATS_MESSAGE_ID.as_ref())
                .and_then(|id| output_position(id, plugin))
                .unwrap_or((0, 0));
            let output = comparable(&Emitted {
                subject: event.subject.clone(),
                headers: event.headers.clone(),
                payload: event.payload.clone(),
            });
            found
                .entry(cause.to_owned())
                .or_default()
                .entry(generation)
                .or_default()
                .insert(index, output);
        }
    }
    Ok(found
        .into_iter()
        .filter_map(|(cause, mut generations)| {
            let (_, newest) = generations.pop_last()?;
            Some((cause, newest.into_values().collect()))
        })
        .collect())
}

/// The generation and index an output's message id
/// (`weir:<plugin>[@genN]:<event id>:<index>`, see
/// [`crate::jetstream::outbox::message_id`]) names.
fn output_position(message_id: &str, plugin: &str) -> Option<(u64, usize)> {
    let rest = message_id.strip_prefix("weir:")?.strip_prefix(plugin)?;
    let (tag, rest) = rest.split_once(':')?;
    let generation = match tag {
        "" => 0,
        tag => tag.strip_prefix("@gen")?.parse().ok()?,
    };
    let (_, index) = rest.rsplit_once(':')?;
    Some((generation, index.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Header;

    fn out(subject: &str, payload: &str, headers: &[(&str, &str)]) -> Emitted {
        Emitted {
            subject: subject.into(),
            headers: headers.iter().map(|(k, v)| Header::new(*k, *v)).collect(),
            payload: payload.into(),
        }
    }

    #[test]
    fn verdicts_compare_only_what_the_plugin_decided() {
        let mine = [out("orders.flagged", "42", &[("Reason", "amount")])];
        let live = [out("orders.flagged", "42", &[("Reason", "amount")])];
        assert_eq!(Verdict::of(&mine, &live), Verdict::Same);
        let traced = [out(
            "orders.flagged",
            "42",
            &[("Reason", "amount"), ("traceparent", "00-ab-cd-01")],
        )];
        assert_eq!(Verdict::of(&traced, &live), Verdict::Same);
        let other = [out("orders.flagged", "42", &[("Reason", "country")])];
        assert_eq!(Verdict::of(&other, &live), Verdict::Different);
        assert_eq!(Verdict::of(&[], &live), Verdict::OnlyInLive);
        assert_eq!(Verdict::of(&mine, &[]), Verdict::OnlyInCandidate);
        assert_eq!(Verdict::of(&[], &[]), Verdict::Same);
    }

    #[test]
    fn output_message_ids_tell_generation_and_index() {
        assert_eq!(
            output_position("weir:fraud:ORDERS:17:3:2", "fraud"),
            Some((0, 2))
        );
        assert_eq!(
            output_position("weir:fraud@gen4:order-9:0", "fraud"),
            Some((4, 0))
        );
        assert_eq!(output_position("weir:fraud2:order-9:0", "fraud"), None);
        assert_eq!(output_position("something else", "fraud"), None);
    }

    #[test]
    fn bounds_are_sequences_or_times() {
        assert_eq!(Bound::parse("12"), Ok(Bound::Sequence(12)));
        assert!(matches!(
            Bound::parse("2026-01-31T00:00:00Z"),
            Ok(Bound::Time(_))
        ));
        assert!(Bound::parse("0").unwrap_err().contains("from 1"));
        assert!(Bound::parse("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
