use std::time::Duration;

use crate::{Error, LimitError, RetryAfter};

/// A transient failure: redeliver the event later, with the manifest's backoff.
pub fn retry(reason: impl Into<String>) -> Error {
    Error::Retry(RetryAfter {
        reason: reason.into(),
        delay_ms: None,
    })
}

/// A transient failure: redeliver the event after `delay` (capped at
/// `u32::MAX` milliseconds).
pub fn retry_after(reason: impl Into<String>, delay: Duration) -> Error {
    let delay_ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
    Error::Retry(RetryAfter {
        reason: reason.into(),
        delay_ms: Some(delay_ms),
    })
}

/// A permanent failure: dead-letter the event now with `reason`.
pub fn reject(reason: impl Into<String>) -> Error {
    Error::Reject(reason.into())
}

/// A sentence for people, unlike the generated `Display`, which prints the
/// variant's debug form.
pub fn describe_limit(e: &LimitError) -> String {
    match e {
        LimitError::TooLarge(max) => format!("larger than the plugin's limit of {max} bytes"),
        LimitError::TooMany(max) => format!("more than the plugin's limit of {max} per event"),
        LimitError::Invalid(why) => format!("invalid: {why}"),
    }
}

/// Hitting a limit is deterministic: retrying the same event would hit it
/// again, so `?` on a limit error rejects the event.
impl From<LimitError> for Error {
    fn from(e: LimitError) -> Self {
        reject(format!(
            "plugin exceeded a host limit: {}",
            describe_limit(&e)
        ))
    }
}

/// Encoding our own values as JSON only fails on a bug in the plugin (a map
/// with non-string keys, say): also permanent.
impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        reject(format!("JSON encoding failed: {e}"))
    }
}
