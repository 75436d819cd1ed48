//! Dead letters: events a plugin rejected or failed on too many times.
//!
//! The dead letter keeps the original payload and headers and adds headers
//! saying which plugin gave up on it, why, after how many attempts, and
//! where the event came from. The input is terminated only after the dead
//! letter is stored.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};

use crate::event::Event;
use crate::outcome::Outcome;
use crate::telemetry::propagation;

/// Headers on every dead letter.
pub mod headers {
    pub const PLUGIN: &str = "Weir-Dlq-Plugin";
    pub const PLUGIN_VERSION: &str = "Weir-Dlq-Plugin-Version";
    /// The outcome kind: reject, retry, trap, deadline, out_of_memory, host_error.
    pub const REASON: &str = "Weir-Dlq-Reason";
    /// The outcome in words.
    pub const ERROR: &str = "Weir-Dlq-Error";
    pub const ATTEMPTS: &str = "Weir-Dlq-Attempts";
    pub const EVENT_ID: &str = "Weir-Dlq-Event-Id";
    pub const SUBJECT: &str = "Weir-Dlq-Subject";
    pub const STREAM: &str = "Weir-Dlq-Stream";
    pub const SEQUENCE: &str = "Weir-Dlq-Sequence";
    /// When the host dead-lettered it (RFC 3339, UTC).
    pub const TIME: &str = "Weir-Dlq-Time";
}

/// Longest error text kept in a header: NATS headers share the 1 MiB
/// message limit with the payload, and a novel-length trap message would
/// be truncated by people anyway.
const MAX_ERROR_LEN: usize = 2048;

/// What is known about the event being dead-lettered.
pub struct DeadLetter<'a> {
    pub plugin: &'a str,
    pub version: &'a str,
    pub stream: &'a str,
    pub event: &'a Event,
    pub outcome: &'a Outcome,
    /// Trace-context headers continuing the event's trace.
    pub trace: Vec<(String, String)>,
}

/// `<prefix>.<plugin>.<original subject>`.
pub fn subject(prefix: &str, plugin: &str, original: &str) -> String {
    format!("{prefix}.{plugin}.{original}")
}

/// Header values may not contain line breaks; keep them short too.
fn header_safe(text: &str) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() > MAX_ERROR_LEN {
        let cut = (0..=MAX_ERROR_LEN)
            .rev()
            .find(|&i| clean.is_char_boundary(i))
            .unwrap_or(0);
        clean.truncate(cut);
        clean.push_str("...");
    }
    clean
}

/// Publish the dead letter and wait for JetStream to store it.
pub async fn publish(
    js: &jetstream::Context,
    prefix: &str,
    letter: &DeadLetter<'_>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let event = letter.event;
    let mut headers = HeaderMap::new();
    for h in &event.headers {
        // The original id would collide with the dead letter's own dedup
        // id; the trace context is replaced by the failing span's.
        let own = h
            .key
            .eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref())
            || propagation::is_replaced(&h.key, &letter.trace);
        if !own {
            headers.append(h.key.as_str(), h.value.as_str());
        }
    }
    for (key, value) in &letter.trace {
        headers.insert(key.as_str(), value.as_str());
    }
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    for (key, value) in [
        (headers::PLUGIN, letter.plugin.to_owned()),
        (headers::PLUGIN_VERSION, letter.version.to_owned()),
        (headers::REASON, letter.outcome.kind().to_owned()),
        (headers::ERROR, header_safe(&letter.outcome.to_string())),
        (headers::ATTEMPTS, event.attempt.to_string()),
        (headers::EVENT_ID, event.id.clone()),
        (headers::SUBJECT, event.subject.clone()),
        (headers::STREAM, letter.stream.to_owned()),
        (headers::SEQUENCE, event.sequence.to_string()),
        (headers::TIME, now),
    ] {
        headers.insert(key, value.as_str());
    }
    let publish = PublishMessage::build()
        .headers(headers)
        .payload(event.payload.clone().into())
        .message_id(format!("weir-dlq:{}:{}", letter.plugin, event.id));
    let subject = subject(prefix, letter.plugin, &event.subject);
    let ack = js.send_publish(subject.clone(), publish).await?;
    crate::outbox::await_stored(ack, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("dead letter to {subject}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_single_line_and_bounded() {
        assert_eq!(header_safe("a\nb\r\tc"), "a b  c");
        let long = "é".repeat(3000);
        let safe = header_safe(&long);
        assert!(safe.len() <= MAX_ERROR_LEN + 3);
        assert!(safe.ends_with("..."));
    }
}
