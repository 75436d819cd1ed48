//! The host's view of an event and of what a plugin emits.

use serde::{Deserialize, Serialize};

use crate::bindings::WitHeader;

/// One message header. Keys may repeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The header name, as sent (matched case-insensitively).
    pub key: String,
    /// Its value.
    pub value: String,
}

impl Header {
    /// A header `key: value`.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Header {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// An event as handed to a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `Nats-Msg-Id` when present, else `<stream>:<created>:<sequence>`
    /// (`<stream>:<sequence>` in broker-free tests, which have no stream).
    pub id: String,
    /// The subject it was published on.
    pub subject: String,
    /// Its headers, in order, as published.
    pub headers: Vec<Header>,
    /// Its body, as published.
    pub payload: Vec<u8>,
    /// Stream sequence.
    pub sequence: u64,
    /// Delivery attempt, 1 on first delivery.
    pub attempt: u32,
    /// Milliseconds since the Unix epoch when the stream stored the event.
    pub timestamp_ms: u64,
}

impl Event {
    /// A first-delivery event with no headers, for tests and tools.
    pub fn new(
        id: impl Into<String>,
        subject: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Event {
            id: id.into(),
            subject: subject.into(),
            headers: Vec::new(),
            payload: payload.into(),
            sequence: 0,
            attempt: 1,
            timestamp_ms: 0,
        }
    }

    /// The first header named `key`, compared case-insensitively.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .map(|h| h.value.as_str())
    }

    pub(crate) fn to_wit(&self) -> crate::bindings::weir::plugin::types::Event {
        crate::bindings::weir::plugin::types::Event {
            id: self.id.clone(),
            subject: self.subject.clone(),
            headers: self.headers.iter().map(Header::to_wit).collect(),
            payload: self.payload.clone(),
            sequence: self.sequence,
            attempt: self.attempt,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

impl Header {
    pub(crate) fn to_wit(&self) -> WitHeader {
        WitHeader {
            key: self.key.clone(),
            value: self.value.clone(),
        }
    }

    pub(crate) fn from_wit(h: WitHeader) -> Self {
        Header {
            key: h.key,
            value: h.value,
        }
    }
}

/// An event a plugin asked to publish, held in the outbox until the
/// plugin's call succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emitted {
    /// The subject to publish on.
    pub subject: String,
    /// Headers to publish with; the host adds its own (`Weir-*`, trace context).
    pub headers: Vec<Header>,
    /// The body to publish.
    pub payload: Vec<u8>,
}
