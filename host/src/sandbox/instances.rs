//! Instances of one plugin version, reused across events.
//!
//! Instantiating is most of what a call costs (a fresh CPython or
//! StarlingMonkey heap is mapped and faulted in for every instance), so an
//! instance that finished an event cleanly goes back to the pool and takes
//! the next one. The rules that keep this safe:
//!
//! - An instance serves one event at a time: it is taken out of the pool
//!   for the call and only returned after it.
//! - Only a call that returned (`ok`, `retry` or `reject`) returns its
//!   instance. A trap, a deadline, a memory-cap hit or a host failure
//!   discards it, so whatever the guest did to its globals on the way down
//!   never reaches another event.
//! - An instance is replaced after `recycle-after-events` events and once
//!   its linear memory grew past `recycle-above-memory-mb`.
//! - `isolation = "event"` turns reuse off: every event gets a new instance.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::Store;

use crate::bindings::Plugin as PluginWorld;
use crate::manifest::{Isolation, Manifest};
use crate::sandbox::imports::CallContext;

/// A live instance and its store.
pub(crate) struct Instance {
    pub store: Store<CallContext>,
    pub world: PluginWorld,
    /// Events this instance has finished.
    pub served: u64,
}

/// The idle instances of one plugin version.
pub(crate) struct InstancePool {
    idle: Mutex<Vec<Instance>>,
    reuse: bool,
    /// Idle instances kept; more would only hold memory, since no more
    /// calls than this run at once.
    max_idle: usize,
    recycle_after_events: u64,
    recycle_memory_bytes: u64,
    created: AtomicU64,
}

/// How a plugin's instances have been used, for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceStats {
    /// Instances created so far.
    pub created: u64,
    /// Instances idle in the pool now.
    pub idle: usize,
}

impl InstancePool {
    pub(crate) fn new(manifest: &Manifest) -> Self {
        InstancePool {
            idle: Mutex::new(Vec::new()),
            reuse: manifest.instances.isolation == Isolation::Instance,
            max_idle: manifest.concurrency as usize,
            recycle_after_events: manifest.instances.recycle_after_events,
            recycle_memory_bytes: manifest.recycle_memory_bytes(),
            created: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        // Pushing and popping cannot leave the list half-updated.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle instance, if there is one.
    pub(crate) fn take(&self) -> Option<Instance> {
        self.lock().pop()
    }

    /// Count an instance just created.
    pub(crate) fn created(&self) {
        self.created.fetch_add(1, Ordering::Relaxed);
    }

    /// Return an instance whose call returned; it is kept unless a recycle
    /// rule says otherwise.
    pub(crate) fn give_back(&self, mut instance: Instance) {
        instance.served += 1;
        let worn = instance.served >= self.recycle_after_events
            || instance.store.data().limiter.held_bytes() > self.recycle_memory_bytes;
        if !self.reuse || worn {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(instance);
        }
    }

    pub(crate) fn stats(&self) -> InstanceStats {
        InstanceStats {
            created: self.created.load(Ordering::Relaxed),
            idle: self.lock().len(),
        }
    }
}
