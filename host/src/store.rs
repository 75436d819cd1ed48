//! A plugin's durable store: its state, its idempotency ("done") records and
//! the outbox of every committed event, in one JetStream KV bucket.
//!
//! An event's effects are committed as **one atomic batch** (NATS 2.12+
//! atomic publish) on the bucket's stream:
//!
//! - every state key it wrote (`s.<key>`), each guarded by
//!   `Nats-Expected-Last-Subject-Sequence` = the revision the call read, so a
//!   concurrent writer of the same key makes the batch fail instead of being
//!   overwritten;
//! - its done record (`d.<digest of event id>`), guarded by expected
//!   sequence 0 (no record yet) and expiring after `done-ttl-s`, whose value
//!   is the event's outbox.
//!
//! Either all of it is stored or none. Outputs are published *after* the
//! commit, from the committed outbox, under deterministic message ids; a
//! redelivered event whose done record exists re-publishes that outbox
//! (JetStream drops the duplicates) and is acked without running the plugin.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::StateConfig;
use crate::event::Emitted;
use crate::state::{StateChange, StateStore, Versioned};

/// The bucket of `plugin`: `<prefix>_<plugin>`.
pub fn bucket_name(config: &StateConfig, plugin: &str) -> String {
    format!("{}_{plugin}", config.bucket_prefix)
}

/// KV key of a plugin's state key.
fn state_key(key: &str) -> String {
    format!("s.{key}")
}

/// KV key of an event's done record. Event ids may hold characters KV keys
/// may not (`:` in `<stream>:<seq>`), so the key is a digest.
pub fn done_key(event_id: &str) -> String {
    format!(
        "d.{}",
        &hex::encode(Sha256::digest(event_id.as_bytes()))[..32]
    )
}

/// JetStream's "wrong last sequence" error: a guarded subject moved.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// What became of a commit.
#[derive(Debug)]
pub enum Commit {
    /// Stored: the effects are durable.
    Committed,
    /// The event was already committed (by an earlier attempt or another
    /// host); here is the outbox it committed.
    AlreadyDone(Vec<Emitted>),
    /// A state key the call read was written by someone else meanwhile: run
    /// the event again on fresh state.
    Conflict,
}

/// One plugin's bucket.
pub struct PluginStore {
    client: async_nats::Client,
    kv: kv::Store,
    done_ttl: Duration,
    idempotency: bool,
    batches: mpsc::UnboundedSender<BatchRequest>,
}

/// One message of a commit: subject, headers, payload.
type Message = (String, HeaderMap, Bytes);

/// A multi-message commit waiting for the group committer.
struct BatchRequest {
    messages: Vec<Message>,
    reply: oneshot::Sender<Result<(), CommitError>>,
}

/// Group commits stay well inside the server's 1,000 messages per batch.
const MAX_GROUP_MESSAGES: usize = 500;
/// ... and small enough that a large outbox never makes a group unwieldy.
const MAX_GROUP_BYTES: usize = 1 << 20;

impl PluginStore {
    /// Open the plugin's bucket, creating it on first use, with atomic
    /// batches and per-message TTLs enabled on its stream.
    pub async fn open(
        js: &jetstream::Context,
        config: &StateConfig,
        plugin: &str,
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
        let client = js.client();
        Ok(PluginStore {
            batches: spawn_group_committer(client.clone()),
            client,
            kv,
            done_ttl: Duration::from_secs(config.done_ttl_s),
            idempotency: config.idempotency,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}{key}", self.kv.prefix)
    }

    /// The outbox of `event_id` if it was committed already.
    pub async fn done(&self, event_id: &str) -> anyhow::Result<Option<Vec<Emitted>>> {
        let entry = self
            .kv
            .entry(done_key(event_id))
            .await
            .context("reading done record")?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some(decode_outbox(&e.value)?)),
            _ => Ok(None),
        }
    }

    /// Commit an event's state changes and done record atomically.
    pub async fn commit(
        &self,
        event_id: &str,
        changes: &[StateChange],
        reads: &BTreeMap<String, u64>,
        outbox: &[Emitted],
    ) -> anyhow::Result<Commit> {
        let mut messages: Vec<(String, HeaderMap, Bytes)> = Vec::with_capacity(changes.len() + 1);
        for change in changes {
            let mut headers = HeaderMap::new();
            if let Some(revision) = reads.get(change.key()) {
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    revision.to_string().as_str(),
                );
            }
            let payload = match change {
                StateChange::Set { value, .. } => Bytes::from(value.clone()),
                StateChange::Delete { .. } => {
                    headers.insert("KV-Operation", "DEL");
                    Bytes::new()
                }
            };
            messages.push((self.subject(&state_key(change.key())), headers, payload));
        }
        if self.idempotency {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            headers.insert(
                async_nats::header::NATS_MESSAGE_TTL,
                self.done_ttl.as_secs().to_string().as_str(),
            );
            messages.push((
                self.subject(&done_key(event_id)),
                headers,
                encode_outbox(outbox)?,
            ));
        }
        let result = match messages.len() {
            0 => return Ok(Commit::Committed),
            1 => {
                self.publish_one(messages.pop().context("one message")?)
                    .await
            }
            _ => {
                let (reply, answer) = oneshot::channel();
                self.batches
                    .send(BatchRequest { messages, reply })
                    .map_err(|_| anyhow::anyhow!("the commit task of this plugin has stopped"))?;
                answer
                    .await
                    .context("the commit task of this plugin has stopped")?
            }
        };
        match result {
            Ok(()) => Ok(Commit::Committed),
            Err(CommitError::WrongLastSequence) => match self.done(event_id).await? {
                Some(outbox) if self.idempotency => Ok(Commit::AlreadyDone(outbox)),
                _ => Ok(Commit::Conflict),
            },
            Err(CommitError::Other(e)) => Err(e),
        }
    }

    /// After the outputs are published and the event acked, shrink the done
    /// record to an empty marker: the outbox copy is no longer needed. Not
    /// awaited; if it is lost, the record still expires with its TTL.
    pub async fn forget_outbox(&self, event_id: &str) {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_TTL,
            self.done_ttl.as_secs().to_string().as_str(),
        );
        let subject = self.subject(&done_key(event_id));
        if let Err(e) = self
            .client
            .publish_with_headers(subject, headers, Bytes::new())
            .await
        {
            tracing::debug!("shrinking done record: {e}");
        }
    }

    async fn publish_one(
        &self,
        (subject, headers, payload): (String, HeaderMap, Bytes),
    ) -> Result<(), CommitError> {
        let response = self
            .client
            .request_with_headers(subject, headers, payload)
            .await
            .map_err(|e| CommitError::Other(e.into()))?;
        check_ack(&response.payload, None)
    }
}

impl StateStore for PluginStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, anyhow::Result<Versioned>> {
        Box::pin(async move {
            let entry = self
                .kv
                .entry(state_key(key))
                .await
                .with_context(|| format!("state get {key}"))?;
            Ok(match entry {
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
            })
        })
    }
}

async fn publish_batch(
    client: &async_nats::Client,
    messages: Vec<Message>,
) -> Result<(), CommitError> {
    let batch_id = format!("{:032x}", rand::random::<u128>());
    let last = messages.len();
    for (i, (subject, mut headers, payload)) in messages.into_iter().enumerate() {
        let sequence = i + 1;
        headers.insert(async_nats::header::NATS_BATCH_ID, batch_id.as_str());
        headers.insert(
            async_nats::header::NATS_BATCH_SEQUENCE,
            sequence.to_string().as_str(),
        );
        if sequence < last {
            // Only the commit is acknowledged; a failure anywhere in the
            // batch is reported there.
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| CommitError::Other(e.into()))?;
        } else {
            headers.insert(
                async_nats::header::NATS_BATCH_COMMIT,
                async_nats::header::NATS_BATCH_COMMIT_FINAL,
            );
            let response = client
                .request_with_headers(subject, headers, payload)
                .await
                .map_err(|e| CommitError::Other(e.into()))?;
            return check_ack(&response.payload, Some((&batch_id, last)));
        }
    }
    Ok(())
}

/// The group committer: multi-message commits of one plugin are serialized
/// by the server anyway (batches on a stream do not overlap, and each costs
/// milliseconds), so commits that arrive together are stored as one atomic
/// batch. If that batch loses a revision check, each commit is retried on
/// its own so only the loser sees the conflict.
fn spawn_group_committer(client: async_nats::Client) -> mpsc::UnboundedSender<BatchRequest> {
    let (sender, mut requests) = mpsc::unbounded_channel::<BatchRequest>();
    tokio::spawn(async move {
        let mut carried: Option<BatchRequest> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match requests.recv().await {
                    Some(request) => request,
                    None => break,
                },
            };
            let mut size = first.messages.len();
            let mut bytes: usize = first.messages.iter().map(|m| m.2.len()).sum();
            let mut group = vec![first];
            while let Ok(next) = requests.try_recv() {
                let next_bytes: usize = next.messages.iter().map(|m| m.2.len()).sum();
                if size + next.messages.len() > MAX_GROUP_MESSAGES
                    || bytes + next_bytes > MAX_GROUP_BYTES
                {
                    carried = Some(next);
                    break;
                }
                size += next.messages.len();
                bytes += next_bytes;
                group.push(next);
            }
            commit_group(&client, group).await;
        }
    });
    sender
}

async fn commit_group(client: &async_nats::Client, mut group: Vec<BatchRequest>) {
    if group.len() == 1 {
        if let Some(request) = group.pop() {
            let result = publish_batch(client, request.messages).await;
            let _ = request.reply.send(result);
        }
        return;
    }
    let all: Vec<Message> = group
        .iter()
        .flat_map(|r| r.messages.iter().cloned())
        .collect();
    match publish_batch(client, all).await {
        Ok(()) => {
            for request in group {
                let _ = request.reply.send(Ok(()));
            }
        }
        Err(CommitError::WrongLastSequence) => {
            for request in group {
                let result = publish_batch(client, request.messages).await;
                let _ = request.reply.send(result);
            }
        }
        Err(CommitError::Other(e)) => {
            let message = format!("{e:#}");
            for request in group {
                let _ = request
                    .reply
                    .send(Err(CommitError::Other(anyhow::anyhow!("{message}"))));
            }
        }
    }
}

enum CommitError {
    WrongLastSequence,
    Other(anyhow::Error),
}

#[derive(serde::Deserialize)]
struct PubAck {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    count: Option<usize>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

fn check_ack(payload: &[u8], batch: Option<(&str, usize)>) -> Result<(), CommitError> {
    let ack: PubAck = serde_json::from_slice(payload).map_err(|e| {
        CommitError::Other(anyhow::anyhow!("unreadable commit acknowledgement: {e}"))
    })?;
    if let Some(error) = ack.error {
        if error.err_code == WRONG_LAST_SEQUENCE {
            return Err(CommitError::WrongLastSequence);
        }
        return Err(CommitError::Other(anyhow::anyhow!(
            "commit refused: {} (error code {})",
            error.description,
            error.err_code
        )));
    }
    if let Some((id, count)) = batch
        && (ack.batch.as_deref() != Some(id) || ack.count != Some(count))
    {
        return Err(CommitError::Other(anyhow::anyhow!(
            "commit acknowledged a different batch"
        )));
    }
    Ok(())
}

fn encode_outbox(outbox: &[Emitted]) -> anyhow::Result<Bytes> {
    Ok(postcard::to_allocvec(outbox)
        .context("encoding the outbox")?
        .into())
}

fn decode_outbox(bytes: &[u8]) -> anyhow::Result<Vec<Emitted>> {
    if bytes.is_empty() {
        // Shrunk after publishing: nothing left to re-publish.
        return Ok(Vec::new());
    }
    postcard::from_bytes(bytes).context("decoding a committed outbox")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Header;

    #[test]
    fn done_keys_are_valid_kv_keys_and_stable() {
        let key = done_key("ORDERS:42");
        assert_eq!(key, done_key("ORDERS:42"));
        assert_ne!(key, done_key("ORDERS:43"));
        assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
    }

    #[test]
    fn outbox_round_trips() {
        let outbox = vec![Emitted {
            subject: "a.b".into(),
            headers: vec![Header::new("k", "v")],
            payload: b"\x00\xffbody".to_vec(),
        }];
        assert_eq!(
            decode_outbox(&encode_outbox(&outbox).unwrap()).unwrap(),
            outbox
        );
        assert!(decode_outbox(&[]).unwrap().is_empty());
    }
}
