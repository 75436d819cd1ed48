//! The host-wide budget of guest linear memory.
//!
//! Each plugin's `memory-mb` caps one instance; nothing in a manifest bounds
//! how many instances, of how many plugins, hold that much at once. The
//! budget does: every instance's memory is reserved from it as it grows and
//! given back when the instance is dropped, and a growth the budget cannot
//! cover ends the call as a host error (the event is retried later), not as
//! the plugin's out-of-memory, since the plugin stayed within its own cap.

use std::sync::atomic::{AtomicU64, Ordering};

/// Linear memory all instances of all plugins may hold together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    held: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit_bytes: u64) -> Self {
        MemoryBudget {
            limit: limit_bytes,
            held: AtomicU64::new(0),
        }
    }

    /// Take `bytes` from the budget, or nothing if they do not fit.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|after| *after <= self.limit)
            })
            .is_ok()
    }

    pub fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes held by live instances now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// A memory growth the host-wide budget could not cover.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the host's guest memory budget ({} MiB, `runtime.max-guest-memory-mb`) is spent: \
     {wanted_bytes} more bytes were asked for; the event is retried",
    budget_bytes >> 20
)]
pub struct HostMemoryExhausted {
    /// `runtime.max-guest-memory-mb`, in bytes.
    pub budget_bytes: u64,
    /// What the instance asked to grow by.
    pub wanted_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::{HostMemoryExhausted, MemoryBudget};

    #[test]
    fn exhaustion_names_the_budget_and_the_ask() {
        let e = HostMemoryExhausted {
            budget_bytes: 2048 << 20,
            wanted_bytes: 65536,
        };
        assert_eq!(
            e.to_string(),
            "the host's guest memory budget (2048 MiB, `runtime.max-guest-memory-mb`) is spent: \
             65536 more bytes were asked for; the event is retried"
        );
    }

    #[test]
    fn reservations_stay_within_the_limit() {
        let budget = MemoryBudget::new(100);
        assert!(budget.try_reserve(60));
        assert!(!budget.try_reserve(41));
        assert!(budget.try_reserve(40));
        assert_eq!(budget.held(), 100);
        budget.release(60);
        assert!(budget.try_reserve(50));
        assert_eq!(budget.held(), 90);
    }
}
