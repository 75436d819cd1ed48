//! Consumer generations: re-running a plugin's history on purpose.
//!
//! An event's done record is what keeps a restart, a redelivery or a new
//! version from running it twice. A plugin that is *meant* to run its
//! history again (`weir plugins reset`, or `weir plugins remove
//! --delete-consumer` and adding it back) moves to a new generation
//! instead, and everything that says "this event's effects happened" is
//! scoped by generation:
//!
//! - done blocks and producer-id records ([`crate::jetstream::store::blocks`]);
//! - the message ids of its outputs and dead letters, so the output
//!   stream's duplicate window does not drop the re-run's outputs as
//!   copies of the first run's;
//! - its durable consumer, `weir-NAME` in generation 0 and `weir-NAME@genN`
//!   after, created at the generation's start position.
//!
//! State is not scoped: the re-run reads and updates the state the plugin
//! has. Within a generation exactly-once holds as before; across
//! generations, each event runs once per generation.
//!
//! The generation is a record in the plugin's store bucket under [`KEY`];
//! no record means generation 0, whose names are the ones Weir used before
//! generations existed, so stores written by older hosts keep their
//! meaning. Hosts read it when they start the plugin and check it every
//! [`POLL`]; a host that sees a newer one restarts the plugin's pipeline
//! under it and deletes the consumers of older generations.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{consumer::DeliverPolicy, kv};
use serde::{Deserialize, Serialize};

/// The key of the generation record in the plugin's store bucket.
pub const KEY: &str = "generation";

/// How often a host checks whether its plugins moved to a new generation.
pub const POLL: Duration = Duration::from_secs(1);

/// Where a new generation's consumer starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResetTo {
    /// The whole history the stream holds.
    All,
    /// From this stream sequence on.
    Sequence(u64),
    /// From the first event stored at or after this time (RFC 3339).
    Time(String),
}

impl ResetTo {
    /// Parse `all`, `sequence N` or `time T` (the words after `--to`).
    pub fn parse(words: &[String]) -> Result<Self, String> {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        let to = match words.as_slice() {
            ["all"] => ResetTo::All,
            ["sequence", n] => match n.parse::<u64>() {
                Ok(0) | Err(_) => {
                    return Err(format!(
                        "`sequence {n}`: a stream sequence is a whole number from 1"
                    ));
                }
                Ok(n) => ResetTo::Sequence(n),
            },
            ["time", t] => ResetTo::Time((*t).to_owned()),
            _ => {
                return Err(format!(
                    "`--to {}`: expected `all`, `sequence N` or `time T` (RFC 3339, e.g. 2026-01-31T00:00:00Z)",
                    words.join(" ")
                ));
            }
        };
        to.deliver_policy().map_err(|e| format!("{e:#}"))?;
        Ok(to)
    }

    /// The consumer deliver policy that starts there.
    pub fn deliver_policy(&self) -> anyhow::Result<DeliverPolicy> {
        Ok(match self {
            ResetTo::All => DeliverPolicy::All,
            ResetTo::Sequence(start_sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: *start_sequence,
            },
            ResetTo::Time(t) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::parse(
                    t,
                    &time::format_description::well_known::Rfc3339,
                )
                .with_context(|| {
                    format!("`time {t}` is not an RFC 3339 time (e.g. 2026-01-31T00:00:00Z)")
                })?,
            },
        })
    }
}

impl fmt::Display for ResetTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetTo::All => f.write_str("all"),
            ResetTo::Sequence(n) => write!(f, "sequence {n}"),
            ResetTo::Time(t) => write!(f, "time {t}"),
        }
    }
}

/// One generation of a plugin's consumption of its stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// 0 for a plugin never reset; one more with each reset (and each
    /// `weir plugins remove --delete-consumer`).
    pub number: u64,
    /// Where its consumer starts; `None`: where the manifest says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<ResetTo>,
    /// When it began (RFC 3339) and what began it, for people reading the
    /// bucket.
    #[serde(default)]
    pub began: String,
    /// What began it (`reset --to all`, say).
    #[serde(default)]
    pub why: String,
}

impl Generation {
    /// The name of its durable consumer for `plugin`.
    pub fn durable_name(&self, plugin: &str) -> String {
        durable_name(plugin, self.number)
    }

    /// What a producer-given event id is recorded as in this generation.
    pub fn scoped_id(&self, id: String) -> String {
        match self.number {
            0 => id,
            n => Tagged(&id, n).to_string(),
        }
    }
}

/// A name as used in generation `number`: the name itself in generation
/// 0, `name@genN` after. Plugin names hold only letters, digits, `-` and
/// `_`, so the tag cannot make one plugin's name look like another's.
pub struct Tagged<'a>(pub &'a str, pub u64);

impl fmt::Display for Tagged<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            0 => f.write_str(self.0),
            n => write!(f, "{}@gen{n}", self.0),
        }
    }
}

/// The durable consumer of `plugin` in generation `number`.
pub fn durable_name(plugin: &str, number: u64) -> String {
    Tagged(&format!("weir-{plugin}"), number).to_string()
}

/// Whether `consumer` is `plugin`'s durable consumer of a generation
/// before `number`.
pub fn is_older_durable(consumer: &str, plugin: &str, number: u64) -> bool {
    let Some(rest) = consumer.strip_prefix(&format!("weir-{plugin}")) else {
        return false;
    };
    match rest {
        "" => number > 0,
        _ => rest
            .strip_prefix("@gen")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n < number),
    }
}

/// The plugin's current generation, and the record's revision (`None`
/// when there is none yet: generation 0).
pub async fn read(bucket: &kv::Store) -> anyhow::Result<(Generation, Option<u64>)> {
    let entry = bucket
        .entry(KEY)
        .await
        .context("reading the plugin's generation")?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let generation = serde_json::from_slice(&e.value).with_context(|| {
                format!(
                    "the generation record in {} is not valid: {}",
                    bucket.name,
                    String::from_utf8_lossy(&e.value)
                )
            })?;
            Ok((generation, Some(e.revision)))
        }
        Some(e) => Ok((Generation::default(), Some(e.revision))),
        None => Ok((Generation::default(), None)),
    }
}

/// The current generation of `plugin`, from its store bucket; 0 when the
/// bucket does not exist yet. Cheaper than opening the plugin's store,
/// which a host does after binding the consumer.
pub async fn of_plugin(
    js: &async_nats::jetstream::Context,
    config: &crate::config::StateConfig,
    plugin: &str,
) -> anyhow::Result<Generation> {
    match store_bucket(js, config, plugin).await? {
        Some(bucket) => Ok(read(&bucket).await?.0),
        None => Ok(Generation::default()),
    }
}

/// The plugin's store bucket, if it was ever created.
pub async fn store_bucket(
    js: &async_nats::jetstream::Context,
    config: &crate::config::StateConfig,
    plugin: &str,
) -> anyhow::Result<Option<kv::Store>> {
    let bucket = crate::jetstream::store::bucket_name(config, plugin);
    match js.get_key_value(&bucket).await {
        Ok(store) => Ok(Some(store)),
        Err(e) if bucket_missing(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("opening {bucket}")),
    }
}

/// Whether opening a KV bucket failed because it does not exist, as
/// opposed to the server being out of reach.
fn bucket_missing(e: &async_nats::jetstream::context::KeyValueError) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind, KeyValueErrorKind};
    e.kind() == KeyValueErrorKind::GetBucket
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<GetStreamError>())
            .is_some_and(|g| {
                matches!(g.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
            })
}

/// Start the next generation, beginning at `start` (the manifest's start
/// position when `None`). Two resets at once each get their own number.
pub async fn advance(
    bucket: &kv::Store,
    start: Option<ResetTo>,
    why: &str,
) -> anyhow::Result<Generation> {
    loop {
        let (current, revision) = read(bucket).await?;
        let next = Generation {
            number: current.number + 1,
            start: start.clone(),
            began: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            why: why.to_owned(),
        };
        let value: bytes::Bytes = serde_json::to_vec(&next)?.into();
        let written = match revision {
            None => bucket.create(KEY, value).await.map(|_| ()).map_err(|e| {
                let lost = e.kind() == kv::CreateErrorKind::AlreadyExists;
                (lost, anyhow::Error::new(e))
            }),
            Some(revision) => bucket
                .update(KEY, value, revision)
                .await
                .map(|_| ())
                .map_err(|e| {
                    let lost = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                    (lost, anyhow::Error::new(e))
                }),
        };
        match written {
            Ok(()) => return Ok(next),
            // Someone else started a generation in between: count from theirs.
            Err((true, _)) => continue,
            Err((false, e)) => {
                return Err(e.context(format!("writing the generation record in {}", bucket.name)));
            }
        }
    }
}

/// Resolves with the plugin's generation once it is past `ours`, checking
/// every [`POLL`]; `None` when `stop` fires first. A failed read (the
/// server away for a moment) is tried again at the next check.
pub async fn newer_than(
    bucket: &kv::Store,
    ours: u64,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<Generation> {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tick.tick() => {}
        }
        match read(bucket).await {
            Ok((generation, _)) if generation.number > ours => return Some(generation),
            Ok(_) => {}
            Err(e) => tracing::debug!(bucket = %bucket.name, "checking the generation: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn reset_positions_parse_or_say_what_is_wrong() {
        assert_eq!(ResetTo::parse(&words("all")), Ok(ResetTo::All));
        assert_eq!(
            ResetTo::parse(&words("sequence 42")),
            Ok(ResetTo::Sequence(42))
        );
        assert!(ResetTo::parse(&words("time 2026-01-31T00:00:00Z")).is_ok());
        for (bad, says) in [
            ("sequence 0", "from 1"),
            ("sequence x", "from 1"),
            ("time yesterday", "RFC 3339"),
            ("everything", "expected `all`"),
            ("all 3", "expected `all`"),
        ] {
            let error = ResetTo::parse(&words(bad)).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn older_consumers_are_told_apart_from_other_plugins() {
        assert_eq!(durable_name("fraud", 0), "weir-fraud");
        assert_eq!(durable_name("fraud", 3), "weir-fraud@gen3");
        assert!(is_older_durable("weir-fraud", "fraud", 1));
        assert!(is_older_durable("weir-fraud@gen2", "fraud", 3));
        assert!(!is_older_durable("weir-fraud@gen3", "fraud", 3));
        assert!(!is_older_durable("weir-fraud", "fraud", 0));
        assert!(!is_older_durable("weir-fraud-2", "fraud", 3));
        assert!(!is_older_durable("weir-fraud2@gen1", "fraud", 3));
    }

    #[test]
    fn generation_zero_keeps_the_names_from_before_generations() {
        let zero = Generation::default();
        assert_eq!(zero.scoped_id("order-1".into()), "order-1");
        let two = Generation {
            number: 2,
            ..Default::default()
        };
        assert_eq!(two.scoped_id("order-1".into()), "order-1@gen2");
    }
}
