//! Per-plugin key-value state as the sandbox sees it.
//!
//! A plugin's call reads committed state through a [`CommittedState`] and writes
//! into a `PendingState` overlay; the pipeline commits the overlay only if
//! the call succeeded, so a failed event leaves no trace.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

/// A committed value and the revision it was read at. The revision guards
/// the commit: a write to a key is refused if the key moved past the
/// revision the call read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Versioned {
    /// The value; `None` when the key is not set.
    pub value: Option<Vec<u8>>,
    /// 0 when the key was never written.
    pub revision: u64,
}

/// Committed state of one plugin.
pub trait CommittedState: Send + Sync + 'static {
    /// The committed value of `key`.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, StateReadError>>;

    /// The call reading this state stopped computing to wait for the host
    /// (a read of this state from its store, a WASI poll such as a sleep)
    /// and goes on computing once the
    /// returned guard is dropped: for whoever schedules the calls (the
    /// pipeline lets another run start meanwhile). Nothing by default.
    fn waiting(&self) -> Option<WaitGuard> {
        None
    }
}

/// Held while a call waits for the host; see [`CommittedState::waiting`].
pub type WaitGuard = Box<dyn Send + Sync>;

/// Committed state could not be read (the store did not answer). The call
/// that asked fails as a host error and its event is retried.
#[derive(Debug, thiserror::Error)]
#[error("reading state key {key}: {message}")]
pub struct StateReadError {
    /// The key asked for.
    pub key: String,
    /// What went wrong.
    pub message: String,
}

impl StateReadError {
    /// `key` could not be read because of `error`.
    pub fn new(key: &str, error: impl std::fmt::Display) -> Self {
        StateReadError {
            key: key.to_owned(),
            message: error.to_string(),
        }
    }
}

/// One change a call made to its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// `key` set to `value`.
    Set {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
    },
    /// `key` removed.
    Delete {
        /// The key.
        key: String,
    },
}

impl StateChange {
    /// The key the change is to.
    pub fn key(&self) -> &str {
        match self {
            StateChange::Set { key, .. } | StateChange::Delete { key } => key,
        }
    }
}

/// Writes made during one call, over the committed state.
#[derive(Default)]
pub(crate) struct PendingState {
    /// Last write per key wins; `None` is a delete.
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl PendingState {
    /// `Some(answer)` when this call already wrote `key`.
    pub(crate) fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.writes.get(key).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.writes.len()
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.writes.contains_key(key)
    }

    pub(crate) fn set(&mut self, key: String, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub(crate) fn delete(&mut self, key: String) {
        self.writes.insert(key, None);
    }

    pub(crate) fn into_changes(self) -> Vec<StateChange> {
        self.writes
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => StateChange::Set { key, value },
                None => StateChange::Delete { key },
            })
            .collect()
    }
}

/// State held in process memory: for `weir test`, `weir::testing` and
/// benchmarks, where there is no broker.
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    inner: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemoryState {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply a successful call's changes.
    pub fn commit(&self, changes: &[StateChange]) {
        let mut map = self.lock();
        for change in changes {
            match change {
                StateChange::Set { key, value } => {
                    map.insert(key.clone(), value.clone());
                }
                StateChange::Delete { key } => {
                    map.remove(key);
                }
            }
        }
    }

    /// A copy of everything committed so far.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.lock().clone()
    }

    /// Set a committed value directly, to seed a test.
    pub fn insert(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.lock().insert(key.into(), value.into());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every mutation is a single insert/remove), so poisoning is moot.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CommittedState for MemoryState {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Versioned, StateReadError>> {
        // One process, one writer at a time: no revisions to guard.
        let value = self.lock().get(key).cloned();
        Box::pin(async move { Ok(Versioned { value, revision: 0 }) })
    }
}
