//! Reading the dead-letter stream: what `weir dlq` lists, shows and purges.
//!
//! A dead letter is named by its sequence in the dead-letter stream. Its
//! story is in its `Weir-Dlq-*` headers (see [`crate::jetstream::dlq::headers`]).

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use serde::Serialize;

use crate::jetstream::dlq::headers;

/// One dead letter as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    /// Its sequence in the dead-letter stream: what `show` and `purge` take.
    pub id: u64,
    /// When it was stored (RFC 3339).
    pub stored: String,
    /// The plugin that gave up on the event.
    pub plugin: String,
    /// The outcome kind that sent it (`reject`, `trap`, ...).
    pub reason: String,
    /// The outcome in words.
    pub error: String,
    /// Deliveries of the event, the last one included.
    pub attempts: u32,
    /// The event's id.
    pub event_id: String,
    /// Where the event came from.
    pub subject: String,
    /// The stream the event is in.
    pub stream: String,
    /// Its sequence there.
    pub sequence: u64,
    /// The plugin's generation when it gave up (see [`crate::jetstream::generation`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub generation: u64,
    /// Whether the letter was cut to fit the server's `max_payload`; the
    /// whole event is still in its stream.
    pub truncated: bool,
    /// The event's own headers (the `Weir-Dlq-*` ones left out).
    pub headers: Vec<(String, String)>,
    /// The event's payload (or as much as fitted).
    #[serde(skip)]
    pub payload: bytes::Bytes,
    #[serde(skip)]
    stored_at: time::OffsetDateTime,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Letter {
    fn from_parts(
        id: u64,
        stored_at: time::OffsetDateTime,
        map: Option<&HeaderMap>,
        payload: bytes::Bytes,
    ) -> Self {
        let get = |key: &str| {
            map.and_then(|m| m.get(key))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let own = map
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(k, _)| !k.to_string().starts_with("Weir-Dlq-"))
            .flat_map(|(k, values)| {
                values
                    .iter()
                    .map(move |v| (k.to_string(), v.as_str().to_owned()))
            })
            .collect();
        Letter {
            id,
            stored: stored_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            stored_at,
            plugin: get(headers::PLUGIN),
            reason: get(headers::REASON),
            error: get(headers::ERROR),
            attempts: get(headers::ATTEMPTS).parse().unwrap_or(0),
            event_id: get(headers::EVENT_ID),
            subject: get(headers::SUBJECT),
            stream: get(headers::STREAM),
            sequence: get(headers::SEQUENCE).parse().unwrap_or(0),
            generation: get(headers::GENERATION).parse().unwrap_or(0),
            truncated: !get(headers::TRUNCATED).is_empty(),
            headers: own,
            payload,
        }
    }

    /// The payload as text when it is UTF-8, at most `max` characters.
    pub fn preview(&self, max: usize) -> String {
        match std::str::from_utf8(&self.payload) {
            Ok(text) => {
                let flat: String = text
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                match flat.char_indices().nth(max) {
                    Some((cut, _)) => format!("{}…", &flat[..cut]),
                    None => flat,
                }
            }
            Err(_) => format!("<{} bytes of binary>", self.payload.len()),
        }
    }
}

/// Which dead letters a command is about.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only this plugin's letters.
    pub plugin: Option<String>,
    /// Only letters of this outcome kind.
    pub reason: Option<String>,
    /// Stored at or after this time.
    pub since: Option<time::OffsetDateTime>,
}

impl Selection {
    fn matches(&self, letter: &Letter) -> bool {
        self.plugin.as_ref().is_none_or(|p| *p == letter.plugin)
            && self.reason.as_ref().is_none_or(|r| *r == letter.reason)
            && self.since.is_none_or(|t| letter.stored_at >= t)
    }
}

/// The dead-letter stream of a deployment.
pub struct DeadLetters {
    stream: jetstream::stream::Stream,
    name: String,
    subject_prefix: String,
}

impl DeadLetters {
    /// The dead-letter stream `stream`, whose subjects start with `subject_prefix`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        subject_prefix: &str,
    ) -> anyhow::Result<Self> {
        let handle = js
            .get_stream(stream)
            .await
            .with_context(|| format!("opening the dead-letter stream {stream}"))?;
        Ok(DeadLetters {
            stream: handle,
            name: stream.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
        })
    }

    /// Every dead letter `selection` picks, oldest first.
    pub async fn list(&self, selection: &Selection) -> anyhow::Result<Vec<Letter>> {
        let filter = match &selection.plugin {
            Some(plugin) => format!("{}.{plugin}.>", self.subject_prefix),
            None => format!("{}.>", self.subject_prefix),
        };
        let deliver_policy = match selection.since {
            Some(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
            None => consumer::DeliverPolicy::All,
        };
        let config = consumer::pull::Config {
            filter_subject: filter,
            deliver_policy,
            ..Default::default()
        };
        let mut out = Vec::new();
        crate::jetstream::source::read_history(&self.stream, config, |message| {
            let info = message
                .info()
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", self.name))?;
            let letter = Letter::from_parts(
                info.stream_sequence,
                info.published,
                message.headers.as_ref(),
                message.payload.clone(),
            );
            if selection.matches(&letter) {
                out.push(letter);
            }
            Ok(true)
        })
        .await?;
        Ok(out)
    }

    /// The dead letter `id`.
    pub async fn get(&self, id: u64) -> anyhow::Result<Letter> {
        match self.stream.get_raw_message(id).await {
            Ok(message)
                if message
                    .subject
                    .starts_with(&format!("{}.", self.subject_prefix)) =>
            {
                Ok(Letter::from_parts(
                    message.sequence,
                    message.time,
                    Some(&message.headers),
                    message.payload,
                ))
            }
            Ok(_) => bail!("message {id} of {} is not a dead letter", self.name),
            Err(e) => bail!("no dead letter {id} in {}: {e}", self.name),
        }
    }

    /// Remove the dead letter `id` for good.
    pub async fn delete(&self, id: u64) -> anyhow::Result<()> {
        self.stream
            .delete_message(id)
            .await
            .with_context(|| format!("deleting dead letter {id} from {}", self.name))?;
        Ok(())
    }
}
