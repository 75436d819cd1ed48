use serde::de::DeserializeOwned;

use crate::{Error, Event, reject};

impl Event {
    /// Build an event by hand, for native unit tests of plugin logic.
    pub fn new(subject: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Event {
            id: String::new(),
            subject: subject.into(),
            headers: Vec::new(),
            payload: payload.into(),
            sequence: 0,
            attempt: 1,
            timestamp_ms: 0,
        }
    }

    /// The first header named `key` (compared case-insensitively, as HTTP
    /// and NATS tooling usually do).
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .map(|h| h.value.as_str())
    }

    /// Every value of the headers named `key`, in order.
    pub fn headers_named<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.key.eq_ignore_ascii_case(key))
            .map(|h| h.value.as_str())
    }

    /// The payload decoded as JSON. A payload that does not decode is a
    /// permanent failure, so the error is a [`reject`] naming the problem.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            reject(format!(
                "payload of event {} is not the expected JSON: {e}",
                self.id
            ))
        })
    }

    /// The payload as UTF-8 text, or a [`reject`] if it is not UTF-8.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| reject(format!("payload of event {} is not UTF-8: {e}", self.id)))
    }
}
