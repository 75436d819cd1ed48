//! Dead letters: events a plugin rejected or failed on too many times.
//!
//! The dead letter keeps the original payload and headers and adds headers
//! saying which plugin gave up on it, why, after how many attempts, and
//! where the event came from. The input is terminated only after the dead
//! letter is stored.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::event::Event;
use crate::outcome::Outcome;
use crate::telemetry::propagation;

/// Headers on every dead letter.
pub mod headers {
    /// The plugin that gave up on the event.
    pub const PLUGIN: &str = "Weir-Dlq-Plugin";
    /// The version of it that did.
    pub const PLUGIN_VERSION: &str = "Weir-Dlq-Plugin-Version";
    /// The outcome kind: reject, retry, trap, deadline, out_of_memory, host_error.
    pub const REASON: &str = "Weir-Dlq-Reason";
    /// The outcome in words.
    pub const ERROR: &str = "Weir-Dlq-Error";
    /// Deliveries of the event, the last one included.
    pub const ATTEMPTS: &str = "Weir-Dlq-Attempts";
    /// The event's id (see `Event::id`).
    pub const EVENT_ID: &str = "Weir-Dlq-Event-Id";
    /// The subject the event was published on.
    pub const SUBJECT: &str = "Weir-Dlq-Subject";
    /// The stream the event is in.
    pub const STREAM: &str = "Weir-Dlq-Stream";
    /// Its sequence in that stream.
    pub const SEQUENCE: &str = "Weir-Dlq-Sequence";
    /// The plugin's [generation](crate::jetstream::generation) when it gave up, when
    /// not 0: a replay commits in that generation's scope.
    pub const GENERATION: &str = "Weir-Dlq-Generation";
    /// When the host dead-lettered it (RFC 3339, UTC).
    pub const TIME: &str = "Weir-Dlq-Time";
    /// Set when the dead letter does not carry the whole event (it would
    /// not fit the server's max_payload): the original payload size in
    /// bytes. The event itself is still in its stream, at
    /// [`STREAM`]/[`SEQUENCE`].
    pub const TRUNCATED: &str = "Weir-Dlq-Truncated";
    /// Set when the event's own headers were left out to make the dead
    /// letter fit: how many there were.
    pub const HEADERS_DROPPED: &str = "Weir-Dlq-Headers-Dropped";
    /// For an event whose header block could not be parsed: the block as
    /// received, base64-encoded.
    pub const RAW_HEADERS: &str = "Weir-Dlq-Raw-Headers";
}

/// Room left in a dead letter for what NATS adds around headers and
/// payload, so a letter sized to the limit is never refused by a few bytes.
const SIZE_SLACK: usize = 1024;

/// Longest error text kept in a header: NATS headers share the 1 MiB
/// message limit with the payload, and a novel-length trap message would
/// be truncated by people anyway.
const MAX_ERROR_LEN: usize = 2048;

/// What is known about the event being dead-lettered.
pub struct DeadLetter<'a> {
    /// The plugin that gave up.
    pub plugin: &'a str,
    /// Its version.
    pub version: &'a str,
    /// The stream the event came from.
    pub stream: &'a str,
    /// The plugin's consumer generation.
    pub generation: u64,
    /// Set when a replay of dead letter N failed again and this letter
    /// takes its place: its message id must differ from the first one's,
    /// or the stream's duplicate window would drop it.
    pub replaces: Option<u64>,
    /// The event.
    pub event: &'a Event,
    /// Why it was given up on.
    pub outcome: &'a Outcome,
    /// Trace-context headers continuing the event's trace.
    pub trace: Vec<(String, String)>,
    /// The event's header block as received, when it could not be parsed.
    pub raw_headers: Option<&'a [u8]>,
}

/// `<prefix>.<plugin>.<original subject>`.
pub fn subject(prefix: &str, plugin: &str, original: &str) -> String {
    format!("{prefix}.{plugin}.{original}")
}

/// Whether `subject` is a dead letter's (under `<prefix>.`).
pub fn is_dead_letter(prefix: &str, subject: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// Header values may not contain line breaks; keep them short too.
fn header_safe(text: &str) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() > MAX_ERROR_LEN {
        clean.truncate(clean.floor_char_boundary(MAX_ERROR_LEN));
        clean.push_str("...");
    }
    clean
}

/// Bytes a header block takes on the wire.
fn header_bytes<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> usize {
    // "NATS/1.0\r\n", "Key: value\r\n" each, and the closing "\r\n".
    10 + pairs.map(|(k, v)| k.len() + v.len() + 4).sum::<usize>() + 2
}

/// The dead letter's headers and payload, cut to fit `max_payload`: the
/// event's own headers go first, then the payload is truncated. What was
/// left out is said in headers, and the whole event is still in its stream.
type Headers = Vec<(String, String)>;

fn fit(
    event_headers: Headers,
    weir_headers: Headers,
    payload: &[u8],
    max_payload: usize,
) -> (Headers, Vec<u8>) {
    let budget = max_payload.saturating_sub(SIZE_SLACK);
    let weir = |extra: &[(String, String)]| {
        header_bytes(
            weir_headers
                .iter()
                .chain(extra)
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    };
    let note = |key: &str, value: usize| (key.to_owned(), value.to_string());
    let mut extra = Vec::new();
    let mut own = event_headers;
    let own_bytes = |own: &[(String, String)]| {
        own.iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
    };
    if weir(&extra) + own_bytes(&own) > budget / 2 {
        extra.push(note(headers::HEADERS_DROPPED, own.len()));
        own.clear();
    }
    let truncated = note(headers::TRUNCATED, payload.len());
    let head =
        weir(&[extra.as_slice(), std::slice::from_ref(&truncated)].concat()) + own_bytes(&own);
    let mut body = payload.to_vec();
    if head + body.len() > budget {
        body.truncate(budget.saturating_sub(head));
        extra.push(truncated);
    }
    let mut all = own;
    all.extend(weir_headers);
    all.extend(extra);
    (all, body)
}

/// Publish the dead letter and wait for JetStream to store it. A letter
/// that would not fit the server's `max_payload` is cut to fit (see
/// [`headers::TRUNCATED`]), so a dead letter can always be stored.
pub async fn publish(
    js: &jetstream::Context,
    prefix: &str,
    letter: &DeadLetter<'_>,
    timeout: Duration,
) -> Result<u64, DeadLetterError> {
    let event = letter.event;
    // The original id would collide with the dead letter's own dedup id.
    let own = propagation::carried(&event.headers, &letter.trace)
        .filter(|h| {
            !h.key
                .eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref())
        })
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut weir: Headers = [
        (headers::PLUGIN, letter.plugin.to_owned()),
        (headers::PLUGIN_VERSION, letter.version.to_owned()),
        (headers::REASON, letter.outcome.kind().as_str().to_owned()),
        (headers::ERROR, header_safe(&letter.outcome.to_string())),
        (headers::ATTEMPTS, event.attempt.to_string()),
        (headers::EVENT_ID, event.id.clone()),
        (headers::SUBJECT, event.subject.clone()),
        (headers::STREAM, letter.stream.to_owned()),
        (headers::SEQUENCE, event.sequence.to_string()),
        (headers::TIME, now),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if letter.generation > 0 {
        weir.push((
            headers::GENERATION.to_owned(),
            letter.generation.to_string(),
        ));
    }
    if let Some(raw) = letter.raw_headers {
        weir.push((headers::RAW_HEADERS.to_owned(), BASE64.encode(raw)));
    }
    weir.extend(letter.trace.iter().cloned());
    let max_payload = js.client().server_info().max_payload;
    let (all, payload) = fit(own, weir, &event.payload, max_payload);
    let mut headers = HeaderMap::new();
    for (key, value) in &all {
        headers.append(key.as_str(), value.as_str());
    }
    let publish = PublishMessage::build()
        .headers(headers)
        .payload(payload.into())
        .message_id(format!(
            "weir-dlq:{}:{}{}",
            crate::jetstream::generation::Tagged(letter.plugin, letter.generation),
            event.id,
            letter
                .replaces
                .map(|id| format!(":replaces-{id}"))
                .unwrap_or_default()
        ));
    let subject = subject(prefix, letter.plugin, &event.subject);
    let error = |message: String| DeadLetterError {
        subject: subject.clone(),
        message,
    };
    let ack = js
        .send_publish(subject.clone(), publish)
        .await
        .map_err(|e| error(e.to_string()))?;
    crate::jetstream::outbox::await_stored(ack, timeout)
        .await
        .map_err(error)
}

/// A dead letter JetStream did not store. The pipeline sends the event
/// back to be tried again, up to the plugin's `max-deliveries`.
#[derive(Debug, thiserror::Error)]
#[error("dead letter to {subject}: {message}")]
pub struct DeadLetterError {
    /// The dead-letter subject it was published to.
    pub subject: String,
    /// What went wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_too_large_for_the_server_is_cut_to_fit() {
        let own = vec![("Customer-Id".to_owned(), "c-1".to_owned())];
        let weir = vec![(headers::PLUGIN.to_owned(), "p".to_owned())];
        let (all, body) = fit(own.clone(), weir.clone(), b"small", 4096);
        assert_eq!(body, b"small");
        assert!(!all.iter().any(|(k, _)| k == headers::TRUNCATED));
        let payload = vec![b'x'; 10_000];
        let (all, body) = fit(own, weir.clone(), &payload, 4096);
        let size = header_bytes(all.iter().map(|(k, v)| (k.as_str(), v.as_str()))) + body.len();
        assert!(size <= 4096 - SIZE_SLACK, "{size}");
        assert!(
            all.iter()
                .any(|(k, v)| k == headers::TRUNCATED && v == "10000")
        );
        assert!(all.iter().any(|(k, _)| k == "Customer-Id"));
        // Headers alone too big: they go, and say so.
        let huge = vec![("Big".to_owned(), "y".repeat(5000))];
        let (all, _) = fit(huge, weir, b"p", 4096);
        assert!(!all.iter().any(|(k, _)| k == "Big"));
        assert!(
            all.iter()
                .any(|(k, v)| k == headers::HEADERS_DROPPED && v == "1")
        );
    }

    #[test]
    fn header_values_are_single_line_and_bounded() {
        assert_eq!(header_safe("a\nb\r\tc"), "a b  c");
        let long = "é".repeat(3000);
        let safe = header_safe(&long);
        assert!(safe.len() <= MAX_ERROR_LEN + 3);
        assert!(safe.ends_with("..."));
    }
}
