//! Done blocks: which events of a stream are committed, in one KV message
//! per 4,096 stream sequences instead of one per event.
//!
//! A block record holds a bitmap of the committed sequences of its range
//! and, for the ones whose outputs are not yet known to be published, their
//! outboxes. The committer rewrites a block with every commit that touches
//! it (guarded by the block's revision, so two hosts never overwrite each
//! other's marks), and leaves out the outboxes published since.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::event::Emitted;

/// Stream sequences per block record.
pub const BLOCK_SPAN: u64 = 4096;

/// The record of one block.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    /// Bit `seq % BLOCK_SPAN` is set once `seq` is committed.
    done: Vec<u8>,
    /// Outboxes of committed events not yet known to be published, by
    /// sequence, in sequence order, each kept encoded (see
    /// [`encode_outbox`]): a block is copied for every group that touches
    /// it, and copying encoded outboxes only counts references.
    pending: Vec<(u64, Bytes)>,
}

/// An outbox as a block keeps it.
pub fn encode_outbox(outbox: &[Emitted]) -> Bytes {
    // Encoding strings and bytes into a Vec cannot fail.
    postcard::to_allocvec(outbox).unwrap_or_default().into()
}

fn decode_outbox(bytes: &[u8]) -> Vec<Emitted> {
    // Written by this code; an unreadable one would be a bug, and
    // re-publishing nothing is the safe way to fail.
    postcard::from_bytes(bytes).unwrap_or_else(|e| {
        tracing::error!("a committed outbox could not be decoded: {e}");
        Vec::new()
    })
}

impl Block {
    /// Whether the event at stream sequence `seq` is marked done.
    pub fn is_done(&self, seq: u64) -> bool {
        let bit = (seq % BLOCK_SPAN) as usize;
        self.done
            .get(bit / 8)
            .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
    }

    /// Mark `seq` committed, keeping its encoded outbox until it is
    /// published (`None`: it emitted nothing).
    pub fn mark(&mut self, seq: u64, outbox: Option<&Bytes>) {
        let bit = (seq % BLOCK_SPAN) as usize;
        if self.done.len() <= bit / 8 {
            self.done.resize(bit / 8 + 1, 0);
        }
        self.done[bit / 8] |= 1 << (bit % 8);
        if let Some(outbox) = outbox {
            match self.pending.binary_search_by_key(&seq, |(s, _)| *s) {
                Ok(i) => self.pending[i].1 = outbox.clone(),
                Err(i) => self.pending.insert(i, (seq, outbox.clone())),
            }
        }
    }

    /// The committed outbox of `seq`: `None` when `seq` is not committed,
    /// empty when it is and its outputs are published.
    pub fn outbox(&self, seq: u64) -> Option<Vec<Emitted>> {
        if !self.is_done(seq) {
            return None;
        }
        Some(
            self.pending
                .binary_search_by_key(&seq, |(s, _)| *s)
                .map(|i| decode_outbox(&self.pending[i].1))
                .unwrap_or_default(),
        )
    }

    /// Forget the outboxes of `published` sequences.
    pub fn drop_published(&mut self, mut published: impl FnMut(u64) -> bool) {
        self.pending.retain(|(seq, _)| !published(*seq));
    }

    /// Take in what another writer recorded: its marks and its outboxes.
    pub fn merge(&mut self, other: &Block) {
        if self.done.len() < other.done.len() {
            self.done.resize(other.done.len(), 0);
        }
        for (mine, theirs) in self.done.iter_mut().zip(&other.done) {
            *mine |= theirs;
        }
        for (seq, outbox) in &other.pending {
            if let Err(i) = self.pending.binary_search_by_key(seq, |(s, _)| *s) {
                self.pending.insert(i, (*seq, outbox.clone()));
            }
        }
    }

    /// The record's bytes: postcard of the bitmap and the pending list.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let pending: Vec<(u64, &[u8])> = self
            .pending
            .iter()
            .map(|(seq, outbox)| (*seq, outbox.as_ref()))
            .collect();
        postcard::to_allocvec(&(&self.done, pending))
    }

    /// A block as stored; an empty value is an empty block.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        if bytes.is_empty() {
            return Ok(Block::default());
        }
        let (done, pending): (Vec<u8>, Vec<(u64, Vec<u8>)>) = postcard::from_bytes(bytes)?;
        Ok(Block {
            done,
            pending: pending
                .into_iter()
                .map(|(seq, outbox)| (seq, Bytes::from(outbox)))
                .collect(),
        })
    }

    /// Bytes an encoded outbox adds to an encoded block (its length, its
    /// sequence and length prefixes).
    pub fn outbox_cost(outbox: &Bytes) -> usize {
        outbox.len() + 20
    }
}

/// Which life of which stream, as seen by which consumer generation, a
/// done record belongs to: 16 hex digits, so it fits a KV key whatever
/// the stream is called.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(pub String);

impl Scope {
    /// Generation 0 hashes as before generations existed, so done records
    /// written by older hosts keep their meaning.
    pub fn new(stream: &str, created_ns: i128, generation: u64) -> Self {
        let named = match generation {
            0 => format!("{stream}\n{created_ns}"),
            n => format!("{stream}\n{created_ns}\n{n}"),
        };
        let digest = Sha256::digest(named.as_bytes());
        Scope(hex::encode(&digest[..8]))
    }

    /// KV key of the block holding `seq`.
    pub fn block_key(&self, seq: u64) -> String {
        format!("d.{}.{}", self.0, seq / BLOCK_SPAN)
    }
}

/// KV key of the record of a producer-given event id (`Nats-Msg-Id`),
/// which recognises the same event published again after the input
/// stream's duplicate window. Ids may hold characters KV keys may not.
pub fn id_key(event_id: &str) -> String {
    format!(
        "i.{}",
        &hex::encode(Sha256::digest(event_id.as_bytes()))[..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Header;

    fn out(subject: &str) -> Vec<Emitted> {
        vec![Emitted {
            subject: subject.into(),
            headers: vec![Header::new("k", "v")],
            payload: b"\x00\xffbody".to_vec(),
        }]
    }

    #[test]
    fn marks_outboxes_and_round_trips() {
        let mut block = Block::default();
        assert!(!block.is_done(4100));
        assert_eq!(block.outbox(4100), None);
        block.mark(4100, Some(&encode_outbox(&out("a"))));
        block.mark(4103, None);
        assert!(block.is_done(4100) && block.is_done(4103) && !block.is_done(4101));
        assert_eq!(block.outbox(4100), Some(out("a")));
        assert_eq!(block.outbox(4103), Some(Vec::new()));
        let decoded = Block::decode(&block.encode().unwrap()).unwrap();
        assert_eq!(decoded, block);
        block.drop_published(|seq| seq == 4100);
        assert_eq!(
            block.outbox(4100),
            Some(Vec::new()),
            "published: done, nothing to resend"
        );
    }

    #[test]
    fn merging_keeps_both_writers_marks() {
        let mut mine = Block::default();
        mine.mark(1, Some(&encode_outbox(&out("mine"))));
        let mut theirs = Block::default();
        theirs.mark(4000, Some(&encode_outbox(&out("theirs"))));
        mine.merge(&theirs);
        assert!(mine.is_done(1) && mine.is_done(4000));
        assert_eq!(mine.outbox(4000), Some(out("theirs")));
        assert!(mine.encode().unwrap().len() < 1024);
    }

    #[test]
    fn keys_are_valid_kv_keys_and_stable() {
        let scope = Scope::new("ORDERS with odd ✓ name", 1_764_520_000_123_456_789, 0);
        assert_eq!(
            scope,
            Scope::new("ORDERS with odd ✓ name", 1_764_520_000_123_456_789, 0)
        );
        assert_eq!(
            scope.0,
            hex::encode(&Sha256::digest("ORDERS with odd ✓ name\n1764520000123456789")[..8]),
            "generation 0 names what hosts before generations named"
        );
        assert_ne!(scope, Scope::new("ORDERS with odd ✓ name", 1, 0));
        assert_ne!(
            scope,
            Scope::new("ORDERS with odd ✓ name", 1_764_520_000_123_456_789, 1)
        );
        for key in [scope.block_key(42), id_key("ORDERS:42")] {
            assert!(
                key.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'),
                "{key}"
            );
        }
        assert_eq!(scope.block_key(4095), scope.block_key(0));
        assert_ne!(scope.block_key(4096), scope.block_key(0));
    }
}
