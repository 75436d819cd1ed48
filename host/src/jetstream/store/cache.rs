//! The host's copy of a plugin's committed state: the value and revision of
//! recently used keys.
//!
//! Every commit of this host updates it, so on a single host it is exact
//! and a state read costs no round trip. Another host's writes are not
//! seen until the entry is older than [`MAX_AGE`] or a commit guarded by
//! the stale revision is refused (which refreshes it and runs the event
//! again): a key an event writes is always checked at commit; a key it only
//! reads may be up to [`MAX_AGE`] old when several hosts share a plugin.
//!
//! The bound is generous on purpose. A read that misses costs a KV round
//! trip inside the sandbox call, milliseconds while the bucket's stream is
//! busy with commits; with keys seen less often than the bound, misses
//! slow the plugin, which makes keys come round more slowly still. At one
//! second, 1,000 customers at concurrency 2 fell from 6,000 to 600 events/s.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::Versioned;

/// Longest time a cached entry is trusted without a commit confirming it.
pub(super) const MAX_AGE: Duration = Duration::from_secs(10);

/// Bytes of values, and entries, kept before the oldest are dropped.
const MAX_BYTES: usize = 64 << 20;
const MAX_ENTRIES: usize = 100_000;

struct Entry {
    value: Versioned,
    fetched: Instant,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Insertion order, for eviction; may name keys already gone.
    order: VecDeque<String>,
    bytes: usize,
}

/// Committed values by key.
#[derive(Default)]
pub(super) struct StateCache(Mutex<Inner>);

impl StateCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before it could panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed value of `key`, if known and fresh.
    pub(super) fn get(&self, key: &str) -> Option<Versioned> {
        let inner = self.lock();
        inner
            .entries
            .get(key)
            .filter(|e| e.fetched.elapsed() < MAX_AGE)
            .map(|e| e.value.clone())
    }

    /// The revision of `key` this host last saw, however old.
    pub(super) fn revision(&self, key: &str) -> Option<u64> {
        self.lock().entries.get(key).map(|e| e.value.revision)
    }

    /// Record `value` as read from the store. An older revision than the
    /// one held (a read that raced a commit) is ignored.
    pub(super) fn observed(&self, key: &str, value: Versioned) {
        let mut inner = self.lock();
        match inner.entries.get(key).map(|e| e.value.revision) {
            Some(held) if held > value.revision => {}
            Some(held) if held == value.revision => {
                if let Some(entry) = inner.entries.get_mut(key) {
                    entry.fetched = Instant::now();
                }
            }
            _ => {
                Self::remove(&mut inner, key);
                Self::insert(&mut inner, key, value);
            }
        }
    }

    /// Record what this host committed: `value` at `revision` (`None` for
    /// a delete).
    pub(super) fn committed(&self, key: &str, value: Option<Vec<u8>>, revision: u64) {
        let mut inner = self.lock();
        Self::remove(&mut inner, key);
        Self::insert(&mut inner, key, Versioned { value, revision });
    }

    /// Forget `key` (its revision is unknown after a failed commit).
    pub(super) fn forget(&self, key: &str) {
        Self::remove(&mut self.lock(), key);
    }

    fn remove(inner: &mut Inner, key: &str) {
        if let Some(old) = inner.entries.remove(key) {
            inner.bytes -= size(&old.value).min(inner.bytes);
        }
    }

    fn insert(inner: &mut Inner, key: &str, value: Versioned) {
        inner.bytes += size(&value);
        inner.entries.insert(
            key.to_owned(),
            Entry {
                value,
                fetched: Instant::now(),
            },
        );
        inner.order.push_back(key.to_owned());
        while inner.bytes > MAX_BYTES
            || inner.entries.len() > MAX_ENTRIES
            || inner.order.len() > 4 * inner.entries.len() + 1024
        {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if inner.bytes > MAX_BYTES || inner.entries.len() > MAX_ENTRIES {
                Self::remove(inner, &oldest);
            }
        }
    }
}

fn size(value: &Versioned) -> usize {
    value.value.as_ref().map_or(0, Vec::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(value: &str, revision: u64) -> Versioned {
        Versioned {
            value: Some(value.as_bytes().to_vec()),
            revision,
        }
    }

    #[test]
    fn commits_win_over_older_reads() {
        let cache = StateCache::default();
        assert_eq!(cache.get("k"), None);
        cache.committed("k", Some(b"new".to_vec()), 7);
        cache.observed("k", v("old", 5));
        assert_eq!(cache.get("k"), Some(v("new", 7)));
        cache.observed("k", v("newer", 9));
        assert_eq!(cache.get("k"), Some(v("newer", 9)));
        assert_eq!(cache.revision("k"), Some(9));
        cache.forget("k");
        assert_eq!(cache.revision("k"), None);
    }

    #[test]
    fn memory_is_bounded() {
        let cache = StateCache::default();
        let big = vec![0u8; 1 << 20];
        for i in 0..100 {
            cache.committed(&format!("k{i}"), Some(big.clone()), i);
        }
        assert!(cache.lock().bytes <= MAX_BYTES);
        assert!(cache.get("k99").is_some());
        assert!(cache.get("k0").is_none(), "the oldest went first");
    }
}
