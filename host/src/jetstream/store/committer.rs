//! The group committer: one task per plugin that makes the effects of
//! many events durable in as few JetStream messages as it can.
//!
//! Runs of events ask to commit through a queue. The committer takes
//! everything waiting, checks it against what it knows (a stale read is a
//! conflict, an event already marked done is reported as such), and writes
//! what is left as one unit:
//!
//! - each state key written, once, with its final value, guarded by the
//!   revision the runs read;
//! - each done block touched, with the new marks and outboxes, guarded by
//!   the block's revision;
//! - a record per producer-given event id, guarded by "must not exist".
//!
//! One message goes as a plain publish; more go as one atomic batch, which
//! the server stores whole or not at all. One group is in flight at a time
//! and the next forms meanwhile, which is what makes groups large under
//! load (an atomic batch costs the server about 1.8 ms of CPU and a file
//! sync whatever its size; see BENCHMARKS.md). Groups cannot overlap: the
//! server checks a batch's guards without waiting for the batch ahead of it
//! to be applied, so a group built on the revisions of one in flight is
//! refused (tried: with two in flight, every second group was).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use bytes::Bytes;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use super::blocks::{Block, Scope, id_key};
use super::cache::StateCache;
use super::{Commit, CommitError, CommitRequest, DoneOutboxes, PendingWrites, Read};
use crate::state::StateChange;

/// Messages in one group, well inside the server's 1,000 per atomic batch.
const MAX_GROUP_MESSAGES: usize = 900;
/// Payload bytes in one group.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// Room kept in every message for its subject and headers.
const MESSAGE_SLACK: usize = 1024;
/// Groups one request may be part of before it is answered with a
/// conflict (its events then run again later, with backoff).
const MAX_TRIES: u32 = 4;
/// Done blocks kept in memory.
const MAX_BLOCKS: usize = 64;
/// Producer-given ids known to be done, kept in memory.
const MAX_KNOWN_IDS: usize = 100_000;
/// With nothing to commit for this long, blocks still holding published
/// outboxes are rewritten without them.
const IDLE_CLEANUP: Duration = Duration::from_millis(500);

/// JetStream's "wrong last sequence" error: a guarded subject moved.
const WRONG_LAST_SEQUENCE: u64 = 10071;

type Reply = oneshot::Sender<Result<Commit, CommitError>>;

pub(super) enum Command {
    Commit(CommitRequest, Reply),
    /// These events' outputs are published: their outboxes need not be
    /// kept any longer.
    Published(Scope, Vec<u64>),
}

/// Settings the committer needs from the store.
pub(super) struct Settings {
    pub client: async_nats::Client,
    pub kv: kv::Store,
    /// `$KV.<bucket>.`
    pub prefix: String,
    pub done_ttl: Duration,
    pub cache: Arc<StateCache>,
    pub pending: Arc<PendingWrites>,
    /// Events per stored group.
    pub groups: Histogram,
}

pub(super) fn spawn(settings: Settings) -> mpsc::UnboundedSender<Command> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let committer = Committer {
        settings,
        blocks: HashMap::new(),
        published: HashMap::new(),
        known_ids: HashMap::new(),
        last_writer: HashMap::new(),
        stuck: false,
    };
    tokio::spawn(committer.run(receiver));
    sender
}

/// A block as last written or read, and its revision (0: never written).
#[derive(Clone, Default)]
struct Known {
    block: Block,
    revision: u64,
}

struct Committer {
    settings: Settings,
    blocks: HashMap<String, Known>,
    /// Per block key, sequences whose outboxes can go at its next write.
    published: HashMap<String, HashSet<u64>>,
    /// Keys of producer-given ids known to be done, until their records
    /// expire (`done-ttl-s`): after that the same id is a new event.
    known_ids: HashMap<String, std::time::Instant>,
    /// Per state key, the request that last committed it and the revision
    /// it got: a read of that request's pending write is then still valid.
    last_writer: HashMap<String, (u64, u64)>,
    /// The last group admitted nothing for want of room.
    stuck: bool,
}

/// Last writers remembered, at most.
const MAX_LAST_WRITERS: usize = 100_000;

/// A request waiting for a group, and how many groups it has been in.
struct Waiting {
    request: CommitRequest,
    reply: Reply,
    tries: u32,
}

/// One write of a group.
struct Write {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    /// What the cache learns once it is stored.
    learn: Learn,
}

enum Learn {
    State {
        key: String,
        value: Option<Vec<u8>>,
        writer: u64,
    },
    Block {
        key: String,
        block: Block,
        dropped: Vec<u64>,
    },
    Id(String),
}

/// A group's working copy of a done block.
struct Working {
    block: Block,
    /// Sequences whose published outboxes this copy leaves out.
    dropped: Vec<u64>,
    /// Its encoded size, kept up to date as marks are added (encoding the
    /// block for every admitted run would cost as much as the group).
    bytes: usize,
}

/// A state key a group writes.
struct GroupWrite {
    /// Its final value (`None`: deleted).
    value: Option<Vec<u8>>,
    /// The revision it must still have, when a member read it.
    guard: Option<u64>,
    /// The member that wrote it last.
    writer: u64,
}

/// Requests admitted to a group, and the answers that wait for its outcome.
#[derive(Default)]
struct Group {
    members: Vec<Waiting>,
    writes: BTreeMap<String, GroupWrite>,
    /// Working copies of the blocks the group touches, without the
    /// outboxes published since they were last written (those sequences
    /// listed beside them).
    blocks: BTreeMap<String, Working>,
    ids: Vec<String>,
    bytes: usize,
    /// Requests whose events an earlier member of this group commits:
    /// already done if the group lands, to run again if it does not.
    duplicates: Vec<(Waiting, DoneOutboxes)>,
    /// Requests that read a key an earlier member writes, before it did.
    conflicts: Vec<Waiting>,
}

enum Reads {
    Valid,
    /// Stale because an earlier member of the group writes what it read:
    /// it can run again once the group has landed.
    StaleInGroup,
    Stale,
}

enum Admission {
    Admitted,
    /// Answered already, or waiting on the group's outcome.
    Settled,
    /// Does not fit this group; first in line for the next.
    Full(Waiting),
}

impl Committer {
    /// Whether the record of a producer-given id is known to exist still.
    fn id_known(&self, key: &str) -> bool {
        self.known_ids
            .get(key)
            .is_some_and(|expires| std::time::Instant::now() < *expires)
    }

    fn remember_id(&mut self, key: String, expires: std::time::Instant) {
        // A bound on memory, not on correctness: an id forgotten here is
        // still refused by the server's guard.
        if self.known_ids.len() >= MAX_KNOWN_IDS {
            let now = std::time::Instant::now();
            self.known_ids.retain(|_, expires| *expires > now);
            if self.known_ids.len() >= MAX_KNOWN_IDS {
                self.known_ids.clear();
            }
        }
        self.known_ids.insert(key, expires);
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut queue: VecDeque<Waiting> = VecDeque::new();
        loop {
            // A request that found no room (its block is full of outboxes
            // waiting to be published) waits for the next command, which
            // is usually the news that they are.
            let stuck = !queue.is_empty() && self.stuck;
            if queue.is_empty() || stuck {
                match tokio::time::timeout(IDLE_CLEANUP, commands.recv()).await {
                    Ok(Some(command)) => self.take(command, &mut queue),
                    Ok(None) => break,
                    Err(_) => {
                        self.clean_idle_blocks().await;
                        continue;
                    }
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.take(command, &mut queue);
            }
            let group = self.form_group(&mut queue).await;
            self.stuck = group.members.is_empty() && !queue.is_empty();
            self.commit(group, &mut queue).await;
        }
    }

    fn take(&mut self, command: Command, queue: &mut VecDeque<Waiting>) {
        match command {
            Command::Commit(request, reply) => queue.push_back(Waiting {
                request,
                reply,
                tries: 0,
            }),
            Command::Published(scope, seqs) => {
                for seq in seqs {
                    self.published
                        .entry(scope.block_key(seq))
                        .or_default()
                        .insert(seq);
                }
            }
        }
    }

    fn limit(&self) -> usize {
        self.settings
            .client
            .server_info()
            .max_payload
            .saturating_sub(MESSAGE_SLACK)
    }

    async fn form_group(&mut self, queue: &mut VecDeque<Waiting>) -> Group {
        let mut group = Group::default();
        while let Some(waiting) = queue.pop_front() {
            match self.admit(&mut group, waiting).await {
                Ok(Admission::Admitted | Admission::Settled) => {}
                Ok(Admission::Full(waiting)) => {
                    queue.push_front(waiting);
                    break;
                }
                Err((waiting, e)) => {
                    // The blocks could not be read: NATS is away.
                    self.answer(waiting, Err(e));
                }
            }
            if group.message_count() >= MAX_GROUP_MESSAGES || group.bytes >= MAX_GROUP_BYTES {
                break;
            }
        }
        group
    }

    /// The group's working copy of block `key`, made on first use.
    fn working_block<'g>(&self, group: &'g mut Group, key: &str) -> &'g mut Working {
        group.blocks.entry(key.to_owned()).or_insert_with(|| {
            let mut block = self
                .blocks
                .get(key)
                .map(|k| k.block.clone())
                .unwrap_or_default();
            let published = self.published.get(key);
            let mut dropped = Vec::new();
            block.drop_published(|seq| {
                let gone = published.is_some_and(|p| p.contains(&seq));
                if gone {
                    dropped.push(seq);
                }
                gone
            });
            let bytes = block.encode().map_or(0, |e| e.len());
            Working {
                block,
                dropped,
                bytes,
            }
        })
    }

    /// Check `waiting` against what is known and add it to `group`.
    async fn admit(
        &mut self,
        group: &mut Group,
        waiting: Waiting,
    ) -> Result<Admission, (Waiting, CommitError)> {
        let keys: Vec<String> = waiting
            .request
            .events
            .iter()
            .map(|e| waiting.request.scope.block_key(e.seq))
            .collect();
        for key in keys {
            if let Err(e) = self.load_block(&key).await {
                return Err((waiting, e));
            }
        }
        let request = &waiting.request;
        // Events this host (or another) committed already.
        let mut done = Vec::new();
        let mut done_in_group = false;
        for event in &request.events {
            let key = request.scope.block_key(event.seq);
            if let Some(outbox) = group
                .blocks
                .get(&key)
                .and_then(|w| w.block.outbox(event.seq))
            {
                done_in_group = true;
                done.push((event.seq, outbox));
            } else if let Some(outbox) = self
                .blocks
                .get(&key)
                .and_then(|k| k.block.outbox(event.seq))
            {
                done.push((event.seq, outbox));
            } else if event
                .msg_id
                .as_ref()
                .is_some_and(|id| self.id_known(&id_key(id)))
            {
                // The same event published again: its effects happened.
                done.push((event.seq, Vec::new()));
            }
        }
        if !done.is_empty() {
            if done_in_group {
                group.duplicates.push((waiting, done));
            } else {
                self.answer(waiting, Ok(Commit::AlreadyDone(done)));
            }
            return Ok(Admission::Settled);
        }
        // Reads that are not what the request would read now.
        match self.check_reads(group, request) {
            Reads::Valid => {}
            Reads::StaleInGroup => {
                group.conflicts.push(waiting);
                return Ok(Admission::Settled);
            }
            Reads::Stale => {
                self.answer(waiting, Ok(Commit::Conflict));
                return Ok(Admission::Settled);
            }
        }
        // Room: every block it touches must stay one message.
        let limit = self.limit();
        let mut growth: BTreeMap<String, usize> = BTreeMap::new();
        for event in &request.events {
            *growth
                .entry(request.scope.block_key(event.seq))
                .or_default() += event.outbox.as_ref().map_or(0, Block::outbox_cost) + 8;
        }
        for (key, added) in &growth {
            // A block with no outboxes at all (a bitmap) is a few hundred bytes.
            if *added + 1024 > limit {
                let too_large = Commit::TooLarge {
                    bytes: *added as u64,
                    limit: limit as u64,
                };
                self.answer(waiting, Ok(too_large));
                return Ok(Admission::Settled);
            }
            if self.working_block(group, key).bytes + added > limit {
                return Ok(Admission::Full(waiting));
            }
        }
        let value_bytes: usize = request
            .writes
            .iter()
            .map(|w| match w {
                StateChange::Set { value, .. } => value.len(),
                StateChange::Delete { .. } => 0,
            })
            .sum();
        let new_messages = request
            .writes
            .iter()
            .filter(|w| !group.writes.contains_key(w.key()))
            .count()
            + growth
                .keys()
                .filter(|k| !group.blocks.contains_key(*k))
                .count()
            + request.events.iter().filter(|e| e.msg_id.is_some()).count();
        if !group.members.is_empty()
            && (group.message_count() + new_messages > MAX_GROUP_MESSAGES
                || group.bytes + value_bytes + growth.values().sum::<usize>() > MAX_GROUP_BYTES)
        {
            return Ok(Admission::Full(waiting));
        }
        // Admit.
        for change in &request.writes {
            let key = change.key().to_owned();
            let value = match change {
                StateChange::Set { value, .. } => Some(value.clone()),
                StateChange::Delete { .. } => None,
            };
            // The revision the key has before this group, if the request
            // depends on it; a blind write is not guarded.
            let guard = match request.reads.get(&key) {
                Some(Read::Committed(revision)) => Some(*revision),
                Some(Read::Pending(by)) => self
                    .last_writer
                    .get(&key)
                    .filter(|(writer, _)| writer == by)
                    .map(|(_, revision)| *revision),
                None => None,
            };
            let entry = group.writes.entry(key).or_insert(GroupWrite {
                value: None,
                guard,
                writer: request.id,
            });
            entry.value = value;
            entry.guard = entry.guard.or(guard);
            entry.writer = request.id;
        }
        for event in &request.events {
            let key = request.scope.block_key(event.seq);
            let working = self.working_block(group, &key);
            working.block.mark(event.seq, event.outbox.as_ref());
            working.bytes += event.outbox.as_ref().map_or(0, Block::outbox_cost) + 8;
            if let Some(id) = &event.msg_id {
                group.ids.push(id_key(id));
            }
        }
        group.bytes += value_bytes + growth.values().sum::<usize>();
        group.members.push(waiting);
        Ok(Admission::Admitted)
    }

    /// Whether what `request` read is still what it would read now.
    fn check_reads(&self, group: &Group, request: &CommitRequest) -> Reads {
        let cache = &self.settings.cache;
        for (key, read) in &request.reads {
            let written_here = group.writes.get(key).map(|w| w.writer);
            let valid = match (read, written_here) {
                // An earlier member writes it: only a read of exactly that
                // write stands.
                (Read::Pending(by), Some(writer)) => *by == writer,
                (Read::Committed(_), Some(_)) => {
                    return Reads::StaleInGroup;
                }
                (Read::Committed(revision), None) => {
                    cache.revision(key).is_none_or(|known| known == *revision)
                }
                // The write read is committed and nothing wrote the key since.
                (Read::Pending(by), None) => {
                    self.last_writer.get(key).is_some_and(|(writer, revision)| {
                        writer == by && cache.revision(key) == Some(*revision)
                    })
                }
            };
            if !valid {
                return Reads::Stale;
            }
        }
        Reads::Valid
    }

    /// Answer a request, and withdraw its pending writes: they are either
    /// committed now (and in the cache) or never will be.
    fn answer(&self, waiting: Waiting, answer: Result<Commit, CommitError>) {
        self.settings
            .pending
            .settle(waiting.request.id, &waiting.request.writes);
        let _ = waiting.reply.send(answer);
    }

    /// Make sure the block `key` is known, reading it if not.
    async fn load_block(&mut self, key: &str) -> Result<(), CommitError> {
        if self.blocks.contains_key(key) {
            return Ok(());
        }
        let known = self.read_block(key).await?;
        if self.blocks.len() >= MAX_BLOCKS {
            // Blocks fill in sequence order: the lowest is the coldest.
            if let Some(oldest) = self.blocks.keys().min_by_key(|k| block_index(k)).cloned() {
                self.blocks.remove(&oldest);
            }
        }
        self.blocks.insert(key.to_owned(), known);
        Ok(())
    }

    async fn read_block(&self, key: &str) -> Result<Known, CommitError> {
        let (block, revision) = super::read_block(&self.settings.kv, key)
            .await
            .map_err(|e| CommitError::Store(e.to_string()))?;
        Ok(Known { block, revision })
    }

    /// The messages of `group`, in the order they are sent.
    fn writes(&self, group: &Group) -> Vec<Write> {
        let ttl = self.settings.done_ttl.as_secs().to_string();
        let mut writes = Vec::with_capacity(group.message_count());
        for (key, write) in &group.writes {
            let (value, guard) = (&write.value, write.guard);
            let mut headers = HeaderMap::new();
            if let Some(revision) = guard {
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    revision.to_string().as_str(),
                );
            }
            let payload = match value {
                Some(value) => Bytes::from(value.clone()),
                None => {
                    headers.insert("KV-Operation", "DEL");
                    Bytes::new()
                }
            };
            writes.push(Write {
                subject: format!("{}s.{key}", self.settings.prefix),
                headers,
                payload,
                learn: Learn::State {
                    key: key.clone(),
                    value: value.clone(),
                    writer: write.writer,
                },
            });
        }
        for (key, working) in &group.blocks {
            let (block, dropped) = (working.block.clone(), working.dropped.clone());
            writes.push(self.block_write(key, block, dropped, &ttl));
        }
        for id in &group.ids {
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl.as_str());
            writes.push(Write {
                subject: format!("{}{id}", self.settings.prefix),
                headers,
                payload: Bytes::new(),
                learn: Learn::Id(id.clone()),
            });
        }
        writes
    }

    fn block_write(&self, key: &str, block: Block, dropped: Vec<u64>, ttl: &str) -> Write {
        let revision = self.blocks.get(key).map_or(0, |k| k.revision);
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
        headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl);
        // Encoding a block of bytes and strings cannot fail.
        let payload = Bytes::from(block.encode().unwrap_or_default());
        Write {
            subject: format!("{}{key}", self.settings.prefix),
            headers,
            payload,
            learn: Learn::Block {
                key: key.to_owned(),
                block,
                dropped,
            },
        }
    }

    async fn commit(&mut self, mut group: Group, queue: &mut VecDeque<Waiting>) {
        if group.members.is_empty() {
            // Nothing admitted; answers that waited on it can go now.
            self.settle(&mut group, false);
            return;
        }
        let writes = self.writes(&group);
        let stored = store(&self.settings.client, &writes).await;
        match stored {
            Ok(last) => {
                let first = last + 1 - writes.len() as u64;
                for (i, write) in writes.into_iter().enumerate() {
                    self.learn(write.learn, first + i as u64);
                }
                let events: usize = group.members.iter().map(|m| m.request.event_count).sum();
                self.settings.groups.observe(events as f64);
                for member in group.members.drain(..) {
                    self.answer(member, Ok(Commit::Committed));
                }
                self.settle(&mut group, true);
            }
            Err(StoreError::WrongLastSequence) => {
                // Someone else wrote a guarded subject. Learn the server's
                // view of everything the group guarded; the requests then
                // queue again and are checked against it.
                self.diagnose(&group).await;
                self.settle(&mut group, false);
                for mut member in group.members.into_iter().rev() {
                    member.tries += 1;
                    if member.tries >= MAX_TRIES {
                        self.answer(member, Ok(Commit::Conflict));
                    } else {
                        queue.push_front(member);
                    }
                }
            }
            Err(StoreError::Other(message)) => {
                // The outcome is unknown (a timeout may hide a success):
                // forget what the group touched, and let every event of it
                // be retried; a redelivery finds whatever did commit.
                for key in group.writes.keys() {
                    self.settings.cache.forget(key);
                }
                for key in group.blocks.keys() {
                    self.blocks.remove(key);
                }
                self.settle(&mut group, false);
                for member in std::mem::take(&mut group.members) {
                    self.answer(member, Err(CommitError::Store(message.clone())));
                }
            }
        }
    }

    fn learn(&mut self, learn: Learn, revision: u64) {
        match learn {
            Learn::State { key, value, writer } => {
                self.settings.cache.committed(&key, value, revision);
                if self.last_writer.len() >= MAX_LAST_WRITERS {
                    self.last_writer.clear();
                }
                self.last_writer.insert(key, (writer, revision));
            }
            Learn::Block {
                key,
                block,
                dropped,
            } => {
                if let Some(published) = self.published.get_mut(&key) {
                    for seq in dropped {
                        published.remove(&seq);
                    }
                    if published.is_empty() {
                        self.published.remove(&key);
                    }
                }
                self.blocks.insert(key, Known { block, revision });
            }
            Learn::Id(id) => {
                let expires = std::time::Instant::now() + self.settings.done_ttl;
                self.remember_id(id, expires);
            }
        }
    }

    /// After a refused group: read back every block, id and guarded key it
    /// touched, so that re-admitting its requests sees the truth.
    async fn diagnose(&mut self, group: &Group) {
        for key in group.blocks.keys() {
            match self.read_block(key).await {
                Ok(known) => {
                    let mut merged = known.block;
                    if let Some(mine) = self.blocks.get(key) {
                        // Outboxes this host holds for its own marks stay.
                        merged.merge(&mine.block);
                    }
                    self.blocks.insert(
                        key.clone(),
                        Known {
                            block: merged,
                            revision: known.revision,
                        },
                    );
                }
                Err(_) => {
                    self.blocks.remove(key);
                }
            }
        }
        for id in &group.ids {
            if let Ok(Some(entry)) = self.settings.kv.entry(id).await
                && entry.operation == kv::Operation::Put
            {
                // Known for what is left of the record's life.
                let age = (time::OffsetDateTime::now_utc() - entry.created)
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                let left = self.settings.done_ttl.saturating_sub(age);
                self.remember_id(id.clone(), std::time::Instant::now() + left);
            }
        }
        for (key, write) in &group.writes {
            if write.guard.is_none() {
                continue;
            }
            match self.settings.kv.entry(format!("s.{key}")).await {
                Ok(Some(entry)) => self.settings.cache.observed(
                    key,
                    crate::state::Versioned {
                        value: (entry.operation == kv::Operation::Put)
                            .then(|| entry.value.to_vec()),
                        revision: entry.revision,
                    },
                ),
                Ok(None) => self.settings.cache.observed(
                    key,
                    crate::state::Versioned {
                        value: None,
                        revision: 0,
                    },
                ),
                Err(_) => self.settings.cache.forget(key),
            }
        }
    }

    /// With nothing else to do, rewrite blocks whose published outboxes
    /// are still stored, so they do not linger until the blocks expire.
    async fn clean_idle_blocks(&mut self) {
        let keys: Vec<String> = self.published.keys().cloned().collect();
        let ttl = self.settings.done_ttl.as_secs().to_string();
        for key in keys {
            if !self.blocks.contains_key(&key) {
                self.published.remove(&key);
                continue;
            }
            let mut group = Group::default();
            self.working_block(&mut group, &key);
            let Some(working) = group.blocks.remove(&key) else {
                continue;
            };
            let write = self.block_write(&key, working.block, working.dropped, &ttl);
            match store(&self.settings.client, std::slice::from_ref(&write)).await {
                Ok(revision) => self.learn(write.learn, revision),
                // Another host wrote it meanwhile; read it again next time.
                Err(_) => {
                    self.blocks.remove(&key);
                }
            }
        }
    }
}

impl Group {
    fn message_count(&self) -> usize {
        self.writes.len() + self.blocks.len() + self.ids.len()
    }
}

impl Committer {
    /// Answer the requests that waited on `group`'s outcome.
    fn settle(&self, group: &mut Group, landed: bool) {
        for (waiting, done) in group.duplicates.drain(..) {
            let answer = if landed {
                Commit::AlreadyDone(done)
            } else {
                Commit::Conflict
            };
            self.answer(waiting, Ok(answer));
        }
        for waiting in group.conflicts.drain(..) {
            self.answer(waiting, Ok(Commit::Conflict));
        }
    }
}

fn block_index(key: &str) -> u64 {
    key.rsplit('.')
        .next()
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

enum StoreError {
    WrongLastSequence,
    Other(String),
}

/// Store `writes` as one unit; the stream sequence of the last one.
async fn store(client: &async_nats::Client, writes: &[Write]) -> Result<u64, StoreError> {
    let other = |e: &dyn std::fmt::Display| StoreError::Other(e.to_string());
    if let [one] = writes {
        let response = client
            .request_with_headers(
                one.subject.clone(),
                one.headers.clone(),
                one.payload.clone(),
            )
            .await
            .map_err(|e| other(&e))?;
        return check_ack(&response.payload, None);
    }
    let batch_id = format!("{:032x}", rand::random::<u128>());
    let last = writes.len();
    for (i, write) in writes.iter().enumerate() {
        let sequence = i + 1;
        let mut headers = write.headers.clone();
        headers.insert(async_nats::header::NATS_BATCH_ID, batch_id.as_str());
        headers.insert(
            async_nats::header::NATS_BATCH_SEQUENCE,
            sequence.to_string().as_str(),
        );
        if sequence < last {
            // Only the commit is acknowledged; a failure anywhere in the
            // batch is reported there.
            client
                .publish_with_headers(write.subject.clone(), headers, write.payload.clone())
                .await
                .map_err(|e| other(&e))?;
        } else {
            headers.insert(
                async_nats::header::NATS_BATCH_COMMIT,
                async_nats::header::NATS_BATCH_COMMIT_FINAL,
            );
            let response = client
                .request_with_headers(write.subject.clone(), headers, write.payload.clone())
                .await
                .map_err(|e| other(&e))?;
            return check_ack(&response.payload, Some((&batch_id, last)));
        }
    }
    Err(other(&"an empty group has nothing to store"))
}

#[derive(serde::Deserialize)]
struct PubAck {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
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

fn check_ack(payload: &[u8], batch: Option<(&str, usize)>) -> Result<u64, StoreError> {
    let ack: PubAck = serde_json::from_slice(payload)
        .map_err(|e| StoreError::Other(format!("unreadable commit acknowledgement: {e}")))?;
    if let Some(error) = ack.error {
        if error.err_code == WRONG_LAST_SEQUENCE {
            return Err(StoreError::WrongLastSequence);
        }
        return Err(StoreError::Other(format!(
            "commit refused: {} (error code {})",
            error.description, error.err_code
        )));
    }
    if let Some((id, count)) = batch
        && (ack.batch.as_deref() != Some(id) || ack.count != Some(count))
    {
        return Err(StoreError::Other(
            "commit acknowledged a different batch".into(),
        ));
    }
    Ok(ack.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_are_read() {
        assert!(matches!(
            check_ack(br#"{"stream":"S","seq":7}"#, None),
            Ok(7)
        ));
        assert!(matches!(
            check_ack(
                br#"{"stream":"S","seq":9,"batch":"b","count":3}"#,
                Some(("b", 3))
            ),
            Ok(9)
        ));
        assert!(matches!(
            check_ack(
                br#"{"stream":"S","seq":9,"batch":"x","count":3}"#,
                Some(("b", 3))
            ),
            Err(StoreError::Other(_))
        ));
        assert!(matches!(
            check_ack(
                br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 4"}}"#,
                None
            ),
            Err(StoreError::WrongLastSequence)
        ));
        assert!(matches!(
            check_ack(b"not json", None),
            Err(StoreError::Other(_))
        ));
    }

    #[test]
    fn block_keys_sort_by_index() {
        assert_eq!(block_index("d.0123456789abcdef.42"), 42);
        assert_eq!(block_index("nonsense"), 0);
    }
}
