//! JetStream pull consumers: one durable consumer per plugin.
//!
//! Each plugin gets its own durable named after it, filtered on its
//! subjects, so plugins progress independently and a new plugin is only a
//! new consumer: producers never change.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;

use crate::event::{Event, Header};
use crate::jetstream::generation::Generation;
use crate::manifest::{Manifest, StartPosition, start_time};

/// The priority group exclusive plugins pull in.
pub const PRIORITY_GROUP: &str = "weir";

/// How long a pinned host may go without pulling before another takes over.
pub const PIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most events of one lane handled, and committed, as one run.
pub const MAX_RUN: usize = 128;

/// How much of a plugin's stream a host pulls at once.
///
/// `max_ack_pending` (the manifest's `max-in-flight`) is what bounds the
/// work a host holds for a plugin: the server delivers no more than that
/// many unacknowledged events, so a slow plugin backs up into its own
/// consumer, never into host memory. Pull requests ask for at least 32: a
/// request the server can only partly fill simply waits, whereas tiny
/// requests make the client re-request after every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Messages one pull request asks for.
    pub batch: usize,
    /// Messages delivered but not yet acknowledged, at most.
    pub max_ack_pending: i64,
}

impl FlowLimits {
    /// The limits `manifest` asks for.
    pub fn of(manifest: &Manifest) -> Self {
        let max_ack_pending = manifest.max_in_flight as usize;
        FlowLimits {
            batch: max_ack_pending.clamp(32, 256),
            max_ack_pending: max_ack_pending as i64,
        }
    }
}

/// The consumer configuration a manifest asks for in `generation`, which
/// may start somewhere else than the manifest says.
pub fn consumer_config(
    plugin: &str,
    manifest: &Manifest,
    generation: &Generation,
    ack_wait: Duration,
) -> anyhow::Result<consumer::pull::Config> {
    let deliver_policy = match (&generation.start, &manifest.start) {
        (Some(reset), _) => reset.deliver_policy()?,
        (None, start) => manifest_policy(start)?,
    };
    let max_ack_pending = FlowLimits::of(manifest).max_ack_pending;
    let name = generation.durable_name(plugin);
    let mut config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: manifest.description.clone(),
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        // Redelivery is unlimited on the server: the host counts attempts
        // itself and dead-letters, so an event is never left stranded when
        // the server gives up on it.
        max_deliver: -1,
        max_ack_pending,
        ..Default::default()
    };
    match manifest.subjects.as_slice() {
        [one] => config.filter_subject = one.clone(),
        many => config.filter_subjects = many.to_vec(),
    }
    if manifest.exclusive {
        // The server pins one pulling host; a standby takes over when the
        // pinned one has not pulled for PIN_TIMEOUT.
        config.priority_policy = consumer::PriorityPolicy::PinnedClient;
        config.priority_groups = vec![PRIORITY_GROUP.into()];
        config.priority_timeout = PIN_TIMEOUT;
    }
    Ok(config)
}

fn manifest_policy(start: &StartPosition) -> anyhow::Result<consumer::DeliverPolicy> {
    Ok(match start {
        StartPosition::New => consumer::DeliverPolicy::New,
        StartPosition::All => consumer::DeliverPolicy::All,
        StartPosition::Sequence(start_sequence) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: *start_sequence,
        },
        StartPosition::Time(t) => consumer::DeliverPolicy::ByStartTime {
            start_time: start_time(t).map_err(anyhow::Error::msg)?,
        },
    })
}

/// One life of a stream, as consumed in one generation: the stream's name
/// and when it was created (a stream deleted and created again under the
/// same name starts its sequences over, so a sequence only names an event
/// together with the stream's creation time), and the plugin's
/// [`Generation`], which scopes what counts as done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incarnation {
    /// The stream's name.
    pub stream: String,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_ns: i128,
    /// The plugin's consumer generation.
    pub generation: Generation,
}

impl Incarnation {
    /// The id of an event that carries no `Nats-Msg-Id`:
    /// `<stream>:<creation time in ns>:<sequence>`.
    pub fn event_id(&self, sequence: u64) -> String {
        format!("{}:{}:{sequence}", self.stream, self.created_ns)
    }
}

/// Create the plugin's durable consumer of `generation`, or bind to it if
/// it exists. An existing consumer keeps its position; settings that may
/// change (filters, flow limits, ack wait) are updated. Fails when the
/// stream does not exist or none of its subjects overlaps the plugin's.
/// Consumers of older generations are deleted.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    plugin: &str,
    manifest: &Manifest,
    generation: &Generation,
    ack_wait: Duration,
) -> anyhow::Result<(consumer::PullConsumer, Incarnation)> {
    let mut stream = js.get_stream(&manifest.stream).await.with_context(|| {
        format!(
            "plugin {plugin}: stream {} is not available",
            manifest.stream
        )
    })?;
    let info = stream
        .info()
        .await
        .with_context(|| format!("plugin {plugin}: reading stream {}", manifest.stream))?;
    let captured = &info.config.subjects;
    let outside: Vec<&String> = manifest
        .subjects
        .iter()
        .filter(|subject| {
            !captured
                .iter()
                .any(|c| crate::names::subjects_overlap(c, subject))
        })
        .collect();
    if outside.len() == manifest.subjects.len() {
        anyhow::bail!(
            "plugin {plugin}: none of its subjects ({}) is captured by stream {} (its subjects: {}), so it would never receive an event",
            manifest.subjects.join(", "),
            manifest.stream,
            captured.join(", ")
        );
    }
    for subject in outside {
        tracing::warn!(%plugin, stream = %manifest.stream, "subject {subject:?} is not captured by the stream; the plugin receives nothing on it until the stream captures it");
    }
    let incarnation = Incarnation {
        stream: manifest.stream.clone(),
        created_ns: info.created.unix_timestamp_nanos(),
        generation: generation.clone(),
    };
    let config = consumer_config(plugin, manifest, generation, ack_wait)?;
    let name = generation.durable_name(plugin);
    let consumer = match stream.get_consumer::<consumer::pull::Config>(&name).await {
        Ok(existing) => {
            // The start position only applies at creation; keep the one it has.
            let mut update = config;
            update.deliver_policy = existing.cached_info().config.deliver_policy;
            stream
                .update_consumer(update)
                .await
                .with_context(|| format!("plugin {plugin}: updating consumer {name}"))?
        }
        Err(_) => stream
            .create_consumer(config)
            .await
            .with_context(|| format!("plugin {plugin}: creating consumer {name}"))?,
    };
    if generation.number > 0 {
        retire_older_consumers(&stream, plugin, generation.number).await;
    }
    Ok((consumer, incarnation))
}

/// Delete `plugin`'s consumers of generations before `number`. Every host
/// that starts the plugin in a new generation tries, so one that fails
/// here (the server away for a moment) is made up for by the next.
async fn retire_older_consumers(stream: &jetstream::stream::Stream, plugin: &str, number: u64) {
    let mut names = stream.consumer_names();
    let mut older = Vec::new();
    while let Some(name) = names.next().await {
        match name {
            Ok(name) if crate::jetstream::generation::is_older_durable(&name, plugin, number) => {
                older.push(name)
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%plugin, "listing consumers to delete older generations': {e}");
                return;
            }
        }
    }
    for name in older {
        match stream.delete_consumer(&name).await {
            Ok(_) => {
                tracing::info!(%plugin, consumer = %name, generation = number, "deleted the consumer of an older generation")
            }
            Err(e) => {
                tracing::debug!(%plugin, consumer = %name, "deleting an older generation's consumer: {e}")
            }
        }
    }
}

/// Read `stream` oldest first, from where `config` starts and through its
/// filters, with an ephemeral consumer that acknowledges nothing: each
/// message goes to `take` until it returns false or none is left.
pub async fn read_history(
    stream: &jetstream::stream::Stream,
    mut config: consumer::pull::Config,
    mut take: impl FnMut(jetstream::Message) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    config.ack_policy = consumer::AckPolicy::None;
    config.inactive_threshold = Duration::from_secs(30);
    let name = stream.cached_info().config.name.clone();
    let mut reader = stream
        .create_consumer(config)
        .await
        .with_context(|| format!("reading {name}"))?;
    let mut pending = reader
        .info()
        .await
        .with_context(|| format!("reading {name}"))?
        .num_pending;
    while pending > 0 {
        let mut batch = reader
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .with_context(|| format!("reading {name}"))?;
        let mut got = false;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?;
            got = true;
            pending = message
                .info()
                .map_err(|e| anyhow::anyhow!("reading {name}: {e}"))?
                .pending;
            if !take(message)? {
                return Ok(());
            }
        }
        if !got {
            pending = reader.info().await?.num_pending;
        }
    }
    Ok(())
}

/// Whether the consumer `durable` (or its whole stream) no longer exists on
/// the server, as opposed to being out of reach for a moment.
pub async fn consumer_gone(js: &jetstream::Context, stream: &str, durable: &str) -> bool {
    use jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
    match js.get_stream(stream).await {
        Err(e) => matches!(
            e.kind(),
            GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        ),
        Ok(stream) => matches!(
            stream.consumer_info(durable).await.map_err(|e| e.kind()),
            Err(ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound)
        ),
    }
}

/// The lane an event runs in: its ordering key; without one, a lane of its
/// own, or the plugin's single lane when it runs one event at a time.
pub fn lane_of(message: &jetstream::Message, manifest: &Manifest) -> String {
    match &manifest.ordering_key {
        Some(key) => {
            let headers = message.headers.as_ref();
            let lookup = |name: &str| {
                headers
                    .and_then(|h| {
                        h.iter()
                            .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))
                    })
                    .and_then(|(_, v)| v.first())
                    .map(|v| v.as_str())
            };
            format!("k:{}", key.key_of(message.subject.as_str(), lookup))
        }
        // One event at a time means in stream order: one lane.
        None if manifest.concurrency == 1 => "one".into(),
        // Unique per delivery: no ordering, only the concurrency bound.
        None => format!("m:{}", message.reply.as_deref().unwrap_or_default()),
    }
}

/// The `Nats-Msg-Id` the producer gave a message, if any.
pub fn producer_id(message: &jetstream::Message) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .filter(|id| !id.is_empty())
}

/// The raw header block of a message whose headers could not be parsed.
pub fn malformed_headers(message: &jetstream::Message) -> Option<&[u8]> {
    message.headers.as_ref().and_then(|h| h.malformed())
}

/// A message with no JetStream delivery info (its reply subject is not an
/// ack subject): there is nothing to ack or retry it with.
#[derive(Debug, thiserror::Error)]
#[error("not a JetStream delivery: {0}")]
pub struct NotADelivery(String);

/// The event a JetStream message carries, delivered from `incarnation`.
pub fn to_event(
    message: &jetstream::Message,
    incarnation: &Incarnation,
) -> Result<Event, NotADelivery> {
    let info = message.info().map_err(|e| NotADelivery(e.to_string()))?;
    let headers: Vec<Header> = message
        .headers
        .iter()
        .flat_map(|map| map.iter())
        .flat_map(|(k, values)| {
            values
                .iter()
                .map(move |v| Header::new(k.to_string(), v.as_str()))
        })
        .collect();
    let id = producer_id(message).unwrap_or_else(|| incarnation.event_id(info.stream_sequence));
    Ok(Event {
        id,
        subject: message.subject.to_string(),
        headers,
        payload: message.payload.to_vec(),
        sequence: info.stream_sequence,
        attempt: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
        timestamp_ms: u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
    })
}
