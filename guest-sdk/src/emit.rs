//! The outbox: events published here go out only if `handle` returns `Ok`.

use serde::Serialize;

use crate::bindings::weir::plugin::emit;
use crate::{Header, LimitError};

/// Publish `payload` on `subject` once the current event succeeds.
pub fn publish(subject: &str, payload: &[u8]) -> Result<(), LimitError> {
    emit::publish(subject, &[], payload)
}

/// Publish `value` as JSON on `subject` once the current event succeeds.
pub fn json<T: Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), crate::Error> {
    let payload = serde_json::to_vec(value)?;
    Ok(publish(subject, &payload)?)
}

/// An event to publish, with headers.
///
/// ```no_run
/// weir_guest::emit::Message::new("orders.flagged")
///     .header("Customer-Id", "c-42")
///     .payload(b"{}".to_vec())
///     .send()?;
/// # Ok::<(), weir_guest::LimitError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    subject: String,
    headers: Vec<Header>,
    payload: Vec<u8>,
}

impl Message {
    /// A message with no headers and an empty payload.
    pub fn new(subject: impl Into<String>) -> Self {
        Message {
            subject: subject.into(),
            headers: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// Add a header (keys may repeat).
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Set the payload bytes.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = payload.into();
        self
    }

    /// Set the payload to `value` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, serde_json::Error> {
        Ok(self.payload(serde_json::to_vec(value)?))
    }

    /// Queue the message in the outbox.
    pub fn send(self) -> Result<(), LimitError> {
        emit::publish(&self.subject, &self.headers, &self.payload)
    }
}
