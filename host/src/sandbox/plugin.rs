//! A loaded plugin: one version of one component, compiled and linked.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::compile_cache::CacheStatus;
use super::imports::{CallContext, PluginContext};
use super::instances::{InstancePool, InstanceStats};
use super::invoke::{Invocation, invoke};
use crate::bindings::PluginPre;
use crate::event::Event;
use crate::manifest::Manifest;
use crate::state::CommittedState;

/// A plugin version: the first 12 hex digits of the component's SHA-256.
/// Two files with the same bytes are the same version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginVersion(String);

impl PluginVersion {
    /// The version of the component `wasm`.
    pub fn of(wasm: &[u8]) -> Self {
        Self::from_digest(&Sha256::digest(wasm).into())
    }

    /// The version of the component whose SHA-256 is `digest`.
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        PluginVersion(hex::encode(&digest[..6]))
    }

    /// The 12 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PluginVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

struct Inner {
    name: String,
    version: PluginVersion,
    manifest: Manifest,
    path: PathBuf,
    cache_status: CacheStatus,
    pre: PluginPre<CallContext>,
    ctx: Arc<PluginContext>,
    instances: InstancePool,
}

/// A plugin ready to run. Cheap to clone: clones share the compiled code.
#[derive(Clone)]
pub struct Plugin(Arc<Inner>);

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.0.name)
            .field("version", &self.0.version)
            .field("path", &self.0.path)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    pub(crate) fn new(
        name: String,
        version: PluginVersion,
        manifest: Manifest,
        path: PathBuf,
        cache_status: CacheStatus,
        pre: PluginPre<CallContext>,
        ctx: Arc<PluginContext>,
    ) -> Self {
        Plugin(Arc::new(Inner {
            instances: InstancePool::new(&manifest),
            name,
            version,
            manifest,
            path,
            cache_status,
            pre,
            ctx,
        }))
    }

    /// The plugin's name: its file name without `.wasm`.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// This version's id.
    pub fn version(&self) -> &PluginVersion {
        &self.0.version
    }

    /// The manifest it was loaded with.
    pub fn manifest(&self) -> &Manifest {
        &self.0.manifest
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Whether loading this plugin was served by the compile cache.
    pub fn cache_status(&self) -> CacheStatus {
        self.0.cache_status
    }

    /// How this version's instances have been used.
    pub fn instance_stats(&self) -> InstanceStats {
        self.0.instances.stats()
    }

    /// How many guest calls of the host's (this plugin's and others')
    /// may run at once: more of its calls than this only queue.
    pub fn guest_call_slots(&self) -> usize {
        self.0.ctx.cpu.slots()
    }

    /// Handle `event`, reading committed state from `state`, in an instance
    /// as the manifest's `[instances]` policy says. Never fails: whatever
    /// went wrong is in the outcome.
    pub async fn invoke(&self, event: &Event, state: Arc<dyn CommittedState>) -> Invocation {
        invoke(
            &self.0.pre,
            &self.0.ctx,
            &self.0.instances,
            self.0.manifest.limits.timeout(),
            event,
            state,
        )
        .await
    }
}
