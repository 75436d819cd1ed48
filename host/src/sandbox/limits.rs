//! Per-call resource limits enforced inside the store.

use std::sync::Arc;

use wasmtime::ResourceLimiter;

use super::budget::{HostMemoryExhausted, MemoryBudget};

/// The guest tried to grow a memory past its cap. Raised as the trap that
/// ends the call, so the outcome names the cause instead of whatever the
/// guest's allocator does on failure.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("memory limit exceeded: guest asked for {desired_bytes} bytes, cap is {limit_bytes}")]
pub struct MemoryLimitExceeded {
    /// The plugin's `limits.memory-mb`, in bytes.
    pub limit_bytes: u64,
    /// The size the guest asked to grow to.
    pub desired_bytes: u64,
}

/// The call ran past its deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("deadline exceeded")]
pub struct DeadlineExceeded;

/// Caps each linear memory and table of a plugin instance, keeps count of
/// how much linear memory the instance holds (the recycle rule reads it),
/// and reserves that memory from the host-wide budget.
pub(crate) struct Limiter {
    memory_bytes: u64,
    held_bytes: u64,
    budget: Arc<MemoryBudget>,
}

/// Tables hold function references; this is far above what real guests use
/// (CPython's is in the tens of thousands) and far below what hurts the host.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// A component instantiates a handful of core instances (the guest, the WASI
/// adapter, shims); more means something is wrong.
const MAX_INSTANCES: usize = 64;

impl Limiter {
    pub(crate) fn new(memory_bytes: u64, budget: Arc<MemoryBudget>) -> Self {
        Limiter {
            memory_bytes,
            held_bytes: 0,
            budget,
        }
    }

    /// Linear memory of every memory of the instance, in bytes.
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held_bytes
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        // The store, and with it every memory of the instance, goes now.
        self.budget.release(self.held_bytes);
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired_bytes = desired as u64;
        if desired_bytes > self.memory_bytes {
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit_bytes: self.memory_bytes,
                desired_bytes,
            }));
        }
        let grows = maximum.is_none_or(|max| desired <= max);
        if grows {
            let more = (desired - current) as u64;
            if !self.budget.try_reserve(more) {
                return Err(wasmtime::Error::new(HostMemoryExhausted {
                    budget_bytes: self.budget.limit(),
                    wanted_bytes: more,
                }));
            }
            self.held_bytes += more;
        }
        Ok(grows)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|max| desired <= max))
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_INSTANCES
    }
}
