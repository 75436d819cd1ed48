//! What came of one plugin call, as the pipeline acts on it.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::labels::labelled;

/// The result of handling one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The plugin succeeded: publish its outbox, commit its state, ack.
    Ok,
    /// The plugin asked to be retried.
    Retry {
        /// What the plugin said.
        reason: String,
        /// How long the plugin asked to wait first; the retry backoff when it did not say.
        #[serde(skip_serializing_if = "Option::is_none", with = "opt_millis")]
        delay: Option<Duration>,
    },
    /// The plugin rejected the event: dead-letter it.
    Reject {
        /// Why, as the plugin said.
        reason: String,
    },
    /// The guest crashed: a panic, `unreachable`, stack overflow, a bad
    /// memory access. `message` has the trap and what the guest wrote to
    /// stderr.
    Trap {
        /// The trap, and the tail of the guest's stderr.
        message: String,
    },
    /// The call ran past the plugin's time limit and was interrupted.
    Deadline {
        /// The plugin's `limits.timeout-ms`.
        #[serde(rename = "limit_ms", with = "millis")]
        limit: Duration,
    },
    /// The guest tried to grow its memory beyond the plugin's cap.
    OutOfMemory {
        /// The plugin's `limits.memory-mb`, in bytes.
        limit_bytes: u64,
    },
    /// The host could not serve the call (the state store was unreachable,
    /// say). The plugin did nothing wrong; the event is retried.
    HostError {
        /// What failed.
        message: String,
    },
    /// The call succeeded, but its effects can never be made durable: the
    /// committed outbox would be larger than the server accepts in one
    /// message. Dead-lettered at once, since every run would end the same.
    TooLarge {
        /// What was too large (the outbox, say).
        what: String,
        /// Its size.
        bytes: u64,
        /// The server's `max_payload`.
        limit: u64,
    },
    /// The message could not be read (its header block is malformed), so
    /// the plugin never saw it. Dead-lettered at once with the raw headers.
    Malformed {
        /// Why the message could not be read.
        message: String,
    },
}

impl Outcome {
    /// Whether the call succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }

    /// A short stable name, for metrics labels and dead-letter headers.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok => OutcomeKind::Ok,
            Outcome::Retry { .. } => OutcomeKind::Retry,
            Outcome::Reject { .. } => OutcomeKind::Reject,
            Outcome::Trap { .. } => OutcomeKind::Trap,
            Outcome::Deadline { .. } => OutcomeKind::Deadline,
            Outcome::OutOfMemory { .. } => OutcomeKind::OutOfMemory,
            Outcome::HostError { .. } => OutcomeKind::HostError,
            Outcome::TooLarge { .. } => OutcomeKind::TooLarge,
            Outcome::Malformed { .. } => OutcomeKind::Malformed,
        }
    }

    /// The limit that stopped the call, if one did.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        match self {
            Outcome::Deadline { .. } => Some(LimitHit::Deadline),
            Outcome::OutOfMemory { .. } => Some(LimitHit::Memory),
            _ => None,
        }
    }
}

labelled! {
    /// Which [`Outcome`] a call had, without its details.
    pub enum OutcomeKind {
        /// [`Outcome::Ok`].
        Ok => "ok",
        /// [`Outcome::Retry`].
        Retry => "retry",
        /// [`Outcome::Reject`].
        Reject => "reject",
        /// [`Outcome::Trap`].
        Trap => "trap",
        /// [`Outcome::Deadline`].
        Deadline => "deadline",
        /// [`Outcome::OutOfMemory`].
        OutOfMemory => "out_of_memory",
        /// [`Outcome::HostError`].
        HostError => "host_error",
        /// [`Outcome::TooLarge`].
        TooLarge => "too_large",
        /// [`Outcome::Malformed`].
        Malformed => "malformed",
    }
}

impl OutcomeKind {
    /// Every kind but `ok`: the reasons an event can be dead-lettered.
    pub fn failures() -> impl Iterator<Item = OutcomeKind> {
        Self::ALL.iter().copied().filter(|k| *k != OutcomeKind::Ok)
    }
}

labelled! {
    /// A plugin limit that stopped a call.
    pub enum LimitHit {
        /// The call ran past `limits.timeout-ms`.
        Deadline => "deadline",
        /// The guest tried to grow past `limits.memory-mb`.
        Memory => "memory",
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Retry {
                reason,
                delay: Some(d),
            } => {
                write!(f, "retry in {} ms: {reason}", d.as_millis())
            }
            Outcome::Retry {
                reason,
                delay: None,
            } => write!(f, "retry: {reason}"),
            Outcome::Reject { reason } => write!(f, "rejected: {reason}"),
            Outcome::Trap { message } => write!(f, "guest trapped: {message}"),
            Outcome::Deadline { limit } => {
                write!(
                    f,
                    "deadline: still running after the {} ms limit",
                    limit.as_millis()
                )
            }
            Outcome::OutOfMemory { limit_bytes } => {
                write!(
                    f,
                    "out of memory: tried to grow past the {limit_bytes}-byte cap"
                )
            }
            Outcome::HostError { message } => write!(f, "host error: {message}"),
            Outcome::TooLarge { what, bytes, limit } => write!(
                f,
                "too large: {what} is {bytes} bytes, above the {limit} bytes the server accepts in one message"
            ),
            Outcome::Malformed { message } => write!(f, "malformed message: {message}"),
        }
    }
}

mod millis {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

mod opt_millis {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::millis::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_has_its_own_kind_and_limit() {
        let text = |s: &str| s.to_owned();
        let outcomes = [
            Outcome::Ok,
            Outcome::Retry {
                reason: text("r"),
                delay: None,
            },
            Outcome::Reject { reason: text("r") },
            Outcome::Trap { message: text("t") },
            Outcome::Deadline {
                limit: Duration::ZERO,
            },
            Outcome::OutOfMemory { limit_bytes: 0 },
            Outcome::HostError { message: text("h") },
            Outcome::TooLarge {
                what: text("w"),
                bytes: 2,
                limit: 1,
            },
            Outcome::Malformed { message: text("m") },
        ];
        let kinds: Vec<OutcomeKind> = outcomes.iter().map(Outcome::kind).collect();
        assert_eq!(kinds, OutcomeKind::ALL);
        // The serialized tag is the kind's label.
        for outcome in &outcomes {
            let json = serde_json::to_value(outcome).unwrap();
            assert_eq!(json["outcome"], outcome.kind().as_str());
        }
        assert_eq!(OutcomeKind::failures().count(), OutcomeKind::ALL.len() - 1);
        let limits: Vec<_> = outcomes.iter().filter_map(Outcome::limit_hit).collect();
        assert_eq!(limits, LimitHit::ALL);
    }
}
