//! A plugin's durable store: its state, the record of which events are
//! done, and the outbox of every committed event not yet published, in one
//! JetStream KV bucket (`<prefix>_<plugin>`).
//!
//! Keys of the bucket:
//!
//! - `s.<key>`: the plugin's state key `<key>`;
//! - `d.<scope>.<block>`: a done block (see [`blocks`]): which events of
//!   4,096 stream sequences are committed, with the outboxes of those whose
//!   outputs are not yet published;
//! - `i.<digest>`: a producer-given event id (`Nats-Msg-Id`) already done,
//!   which recognises the same event published again after the input
//!   stream's duplicate window.
//!
//! The effects of a run of events are committed together with their done
//! marks through the plugin's group committer (`committer`): all of it is
//! stored or none. Outputs are published after the commit, from the
//! committed outbox, under deterministic message ids; a redelivered event
//! whose mark is set re-publishes that outbox (JetStream drops the
//! duplicates) and is acked without running the plugin again.

pub mod blocks;
mod cache;
mod committer;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use futures::future::BoxFuture;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

pub use blocks::Scope;
use cache::StateCache;
use committer::Command;

use crate::config::StateConfig;
use crate::event::Emitted;
use crate::state::{CommittedState, StateChange, StateReadError, Versioned};

/// The bucket of `plugin`: `<prefix>_<plugin>`.
pub fn bucket_name(config: &StateConfig, plugin: &str) -> String {
    format!("{}_{plugin}", config.bucket_prefix)
}

/// One event's share of a commit.
#[derive(Debug, Clone)]
pub struct EventEffects {
    /// Its stream sequence (in the request's scope).
    pub seq: u64,
    /// The producer's `Nats-Msg-Id`, when it gave one.
    pub msg_id: Option<String>,
    /// What it emitted, encoded ([`blocks::encode_outbox`]); `None` when
    /// it emitted nothing.
    pub outbox: Option<bytes::Bytes>,
}

impl EventEffects {
    /// The effects of the event at `seq`, with its producer id if it has one.
    pub fn new(seq: u64, msg_id: Option<String>, outbox: &[Emitted]) -> Self {
        EventEffects {
            seq,
            msg_id,
            outbox: (!outbox.is_empty()).then(|| blocks::encode_outbox(outbox)),
        }
    }
}

/// What a run read for a key it did not write first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// The committed value, at this revision.
    Committed(u64),
    /// The value an earlier run wrote and submitted but was not committed
    /// yet (this is its request number): the run commits only after it.
    Pending(u64),
}

/// The effects of a run of events, to commit as one.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    /// Whose done marks these are (see [`Scope`]).
    pub scope: Scope,
    /// The events, in the order they ran.
    pub events: Vec<EventEffects>,
    /// Their state changes, last write per key.
    pub writes: Vec<StateChange>,
    /// What they read of every key they read before writing it.
    pub reads: BTreeMap<String, Read>,
    /// Set by [`PluginStore::commit`].
    id: u64,
    /// How many events it commits, kept when their done marks are not
    /// (idempotency off).
    event_count: usize,
}

impl CommitRequest {
    /// A request to commit a run's effects.
    pub fn new(
        scope: Scope,
        events: Vec<EventEffects>,
        writes: Vec<StateChange>,
        reads: BTreeMap<String, Read>,
    ) -> Self {
        CommitRequest {
            scope,
            event_count: events.len(),
            events,
            writes,
            reads,
            id: 0,
        }
    }
}

/// Writes submitted for commit and not answered yet, by key: the value
/// and the number of the request that wrote it last. Runs read these
/// before committed state, so events of different runs touching the same
/// key chain instead of conflicting; the committer makes sure a run that
/// read a pending value commits after, and only with, the run that wrote it.
#[derive(Default)]
pub(crate) struct PendingWrites(std::sync::Mutex<HashMap<String, PendingWrite>>);

/// A submitted write: the value (`None` for a delete) and its request.
#[derive(Clone)]
struct PendingWrite {
    value: Option<Vec<u8>>,
    by: u64,
}

impl PendingWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingWrite>> {
        // Inserts and removes cannot leave the map half-changed.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &str) -> Option<PendingWrite> {
        self.lock().get(key).cloned()
    }

    /// Forget what request `id` wrote (it is committed, or never will be).
    pub(crate) fn settle(&self, id: u64, writes: &[StateChange]) {
        let mut pending = self.lock();
        for change in writes {
            if pending.get(change.key()).is_some_and(|w| w.by == id) {
                pending.remove(change.key());
            }
        }
    }
}

/// Committed outboxes by stream sequence (empty when already published).
pub type DoneOutboxes = Vec<(u64, Vec<Emitted>)>;

/// What became of a commit.
#[derive(Debug, PartialEq)]
pub enum Commit {
    /// Stored: the effects are durable.
    Committed,
    /// Nothing was stored: these events of the run were committed before
    /// (by an earlier attempt, or another host); here are their committed
    /// outboxes, empty when already published. The run's other events
    /// must run again.
    AlreadyDone(DoneOutboxes),
    /// A state key the run read was written by someone else meanwhile: run
    /// it again on fresh state.
    Conflict,
    /// The run's outbox would not fit one message the server accepts; no
    /// run of these events can commit.
    TooLarge {
        /// The outbox's size.
        bytes: u64,
        /// The server's `max_payload`.
        limit: u64,
    },
}

/// A commit that failed. It may or may not have been stored (an
/// acknowledgement can be lost); the events are retried, and a redelivery
/// finds whatever did commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The plugin's commit task is gone (the pipeline is stopping).
    #[error("the commit task of this plugin has stopped")]
    Stopped,
    /// The server did not answer, refused the batch, or a done block
    /// could not be read.
    #[error("{0}")]
    Store(String),
}

/// A commit queued by [`PluginStore::submit`].
pub struct Submitted(Option<oneshot::Receiver<Result<Commit, CommitError>>>);

impl Submitted {
    /// What became of it.
    pub async fn outcome(self) -> Result<Commit, CommitError> {
        match self.0 {
            None => Ok(Commit::Committed),
            Some(answer) => answer.await.map_err(|_| CommitError::Stopped)?,
        }
    }
}

/// One plugin's bucket.
pub struct PluginStore {
    kv: kv::Store,
    cache: Arc<StateCache>,
    pending: Arc<PendingWrites>,
    next_request: std::sync::atomic::AtomicU64,
    idempotency: bool,
    committer: mpsc::UnboundedSender<Command>,
}

/// The done marks of a redelivered event could not be read, so whether it
/// was already committed is unknown: the event is retried as a host error.
#[derive(Debug, thiserror::Error)]
#[error("reading done marks {key}: {message}")]
pub struct DoneReadError {
    /// The done block's key.
    pub key: String,
    /// What went wrong.
    pub message: String,
}

/// The done block stored at `key` and its revision: an empty block when
/// there is none (revision 0) or it was deleted.
async fn read_block(kv: &kv::Store, key: &str) -> Result<(blocks::Block, u64), DoneReadError> {
    let error = |message: String| DoneReadError {
        key: key.to_owned(),
        message,
    };
    let entry = kv.entry(key).await.map_err(|e| error(e.to_string()))?;
    Ok(match entry {
        Some(e) if e.operation == kv::Operation::Put => (
            blocks::Block::decode(&e.value).map_err(|e| error(format!("decoding: {e}")))?,
            e.revision,
        ),
        Some(e) => (blocks::Block::default(), e.revision),
        None => (blocks::Block::default(), 0),
    })
}

impl PluginStore {
    /// Open the plugin's bucket, creating it on first use, with atomic
    /// batches and per-message TTLs enabled on its stream. Each commit
    /// observes its number of events in `groups`.
    pub async fn open(
        js: &jetstream::Context,
        config: &StateConfig,
        plugin: &str,
        groups: Histogram,
    ) -> anyhow::Result<Self> {
        let bucket = bucket_name(config, plugin);
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: format!("Weir state, done records and outbox of plugin {plugin}"),
                    history: 1,
                    num_replicas: config.replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating state bucket {bucket}"))?,
        };
        let mut stream = js
            .get_stream(&kv.stream_name)
            .await
            .with_context(|| format!("opening {}", kv.stream_name))?;
        let info = stream
            .info()
            .await
            .with_context(|| format!("reading {}", kv.stream_name))?;
        if !info.config.allow_atomic_publish || !info.config.allow_message_ttl {
            let mut updated = info.config.clone();
            updated.allow_atomic_publish = true;
            updated.allow_message_ttl = true;
            js.update_stream(updated).await.with_context(|| {
                format!(
                    "enabling atomic batches on {} (needs nats-server 2.12+)",
                    kv.stream_name
                )
            })?;
        }
        let cache = Arc::new(StateCache::default());
        let pending = Arc::new(PendingWrites::default());
        let committer = committer::spawn(committer::Settings {
            client: js.client(),
            kv: kv.clone(),
            prefix: kv.prefix.clone(),
            done_ttl: Duration::from_secs(config.done_ttl_s),
            cache: cache.clone(),
            pending: pending.clone(),
            groups,
        });
        Ok(PluginStore {
            kv,
            cache,
            pending,
            next_request: std::sync::atomic::AtomicU64::new(1),
            idempotency: config.idempotency,
            committer,
        })
    }

    /// The bucket itself, for records kept beside the plugin's effects
    /// (its [generation](crate::jetstream::generation)).
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// Whether done marks are kept (see `StateConfig::idempotency`).
    pub fn idempotency(&self) -> bool {
        self.idempotency
    }

    /// The committed outbox of event `seq` of `scope`, if it is done.
    pub async fn done(
        &self,
        scope: &Scope,
        seq: u64,
    ) -> Result<Option<Vec<Emitted>>, DoneReadError> {
        let (block, _) = read_block(&self.kv, &scope.block_key(seq)).await?;
        Ok(block.outbox(seq))
    }

    /// Commit a run's effects and done marks atomically. Without
    /// idempotency only state changes are committed.
    pub async fn commit(&self, request: CommitRequest) -> Result<Commit, CommitError> {
        self.submit(request)?.outcome().await
    }

    /// Queue a run's commit: from now on other runs read its writes as
    /// pending. The outcome is awaited separately.
    pub fn submit(&self, mut request: CommitRequest) -> Result<Submitted, CommitError> {
        if !self.idempotency {
            request.events.clear();
        }
        if request.events.is_empty() && request.writes.is_empty() {
            return Ok(Submitted(None));
        }
        let (reply, answer) = oneshot::channel();
        {
            // Publishing the writes and queueing the request under one lock
            // keeps the queue in the order runs could read each other.
            let mut pending = self.pending.lock();
            request.id = self
                .next_request
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for change in &request.writes {
                let value = match change {
                    StateChange::Set { value, .. } => Some(value.clone()),
                    StateChange::Delete { .. } => None,
                };
                pending.insert(
                    change.key().to_owned(),
                    PendingWrite {
                        value,
                        by: request.id,
                    },
                );
            }
            if self
                .committer
                .send(Command::Commit(request, reply))
                .is_err()
            {
                return Err(CommitError::Stopped);
            }
        }
        Ok(Submitted(Some(answer)))
    }

    /// The value of `key` a run should see: a pending write, else the
    /// committed value; and what to record as read.
    pub async fn read(&self, key: &str) -> Result<(Versioned, Read), StateReadError> {
        if let Some(PendingWrite { value, by }) = self.pending.get(key) {
            return Ok((Versioned { value, revision: 0 }, Read::Pending(by)));
        }
        let versioned = self.get(key).await?;
        let read = Read::Committed(versioned.revision);
        Ok((versioned, read))
    }

    /// These events' outputs are published: their outboxes need not be
    /// kept. Not awaited; if it is lost, the outboxes stay until their
    /// block is written again or expires.
    pub fn published(&self, scope: &Scope, seqs: Vec<u64>) {
        if self.idempotency && !seqs.is_empty() {
            let _ = self.committer.send(Command::Published(scope.clone(), seqs));
        }
    }
}

impl CommittedState for PluginStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, StateReadError>> {
        Box::pin(async move {
            if let Some(cached) = self.cache.get(key) {
                return Ok(cached);
            }
            let entry = self
                .kv
                .entry(format!("s.{key}"))
                .await
                .map_err(|e| StateReadError::new(key, e))?;
            let versioned = match entry {
                None => Versioned {
                    value: None,
                    revision: 0,
                },
                Some(e) if e.operation == kv::Operation::Put => Versioned {
                    value: Some(e.value.to_vec()),
                    revision: e.revision,
                },
                // A delete marker: no value, but its revision guards the key.
                Some(e) => Versioned {
                    value: None,
                    revision: e.revision,
                },
            };
            self.cache.observed(key, versioned.clone());
            Ok(versioned)
        })
    }
}
