//! The sandbox: one engine, one linker, and the per-call store.
//!
//! Instances are created from a pre-linked
//! [`InstancePre`](wasmtime::component::InstancePre) and serve one event at
//! a time; an instance that returned cleanly is reused for a later event
//! (see `instances`), and a trap, a deadline or a memory cap ends that
//! event alone and discards its instance.

pub(crate) mod budget;
pub mod compile_cache;
pub(crate) mod cpu;
mod engine;
pub(crate) mod imports;
pub(crate) mod instances;
mod invoke;
pub(crate) mod limits;
pub(crate) mod long_calls;
pub mod plugin;
mod stdio;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::{Plugin as PluginWorld, PluginPre};
use crate::manifest::{Manifest, ManifestError};
use crate::sandbox::compile_cache::{CompileCache, CompileError};
use crate::sandbox::plugin::{Plugin, PluginVersion};

pub use engine::EPOCH_TICK;

/// The wasmtime the host is built with, for build info and bug reports.
/// A test checks it against Cargo.lock.
pub const WASMTIME_VERSION: &str = "48.0.8";
pub use budget::HostMemoryExhausted;
pub use imports::{CallContext, LogLevel, LogLine, PluginContext, StateUnavailable};
pub use instances::InstanceStats;
pub use invoke::Invocation;
pub use limits::{DeadlineExceeded, MemoryLimitExceeded};
pub use long_calls::LongCalls;

/// Settings for the sandbox as a whole.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// Where compiled plugins are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Linear memory all instances of all plugins may hold together.
    pub memory_budget_bytes: u64,
    /// Guest calls that may run at once, shared fairly between plugins;
    /// 0 means one per core.
    pub running_guest_calls: usize,
    /// Of those, calls that compute past their first epoch tick; 0 means
    /// one fewer than `running_guest_calls`, at least one.
    pub running_long_calls: usize,
    /// How the guest code of calls that compute past one epoch tick runs,
    /// where the process may (see [`Sandbox::long_calls`]).
    pub long_calls: LongCalls,
}

/// The default host-wide guest memory budget (`runtime.max-guest-memory-mb`).
pub const DEFAULT_MEMORY_BUDGET_MB: u64 = 2048;

impl SandboxConfig {
    /// The default cache location: `$WEIR_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/weir`, else `~/.cache/weir`.
    pub fn with_default_cache() -> Self {
        let dir = std::env::var_os("WEIR_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("weir")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/weir")));
        SandboxConfig {
            cache_dir: dir.map(|d| d.join("compiled")),
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_MB << 20,
            running_guest_calls: 0,
            running_long_calls: 0,
            long_calls: LongCalls::default(),
        }
    }
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest is missing or invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The component file could not be read.
    #[error("cannot read plugin {}: {error}", path.display())]
    Read {
        /// The component's path.
        path: PathBuf,
        /// Shown in the message, not chained as a source, so `{:#}` prints it once.
        error: std::io::Error,
    },
    /// The file is not a component wasmtime can compile.
    #[error("{} is not a valid WebAssembly component: {message}", path.display())]
    Compile {
        /// The component's path.
        path: PathBuf,
        /// What the compiler said.
        message: String,
    },
    /// The component's imports or exports do not match `wit/plugin.wit`.
    #[error("{} does not fit the weir:plugin world: {message}", path.display())]
    World {
        /// The component's path.
        path: PathBuf,
        /// What does not match.
        message: String,
    },
    /// The component file no longer has the contents it was fingerprinted
    /// with: it is being replaced, and the next scan will load the new one.
    #[error("{} changed while it was being loaded", path.display())]
    Changed {
        /// The component's path.
        path: PathBuf,
    },
    /// The file name is not a valid plugin name.
    #[error("{}: {message} (expected NAME.wasm)", path.display())]
    Name {
        /// The component's path.
        path: PathBuf,
        /// What is wrong with the name.
        message: String,
    },
}

/// Compiles, links and runs plugins.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<CallContext>,
    cache: CompileCache,
    budget: Arc<budget::MemoryBudget>,
    cpu: Arc<cpu::CpuShare>,
}

impl Sandbox {
    /// An engine, a linker with the WASI and weir:plugin imports, and the compile cache.
    pub fn new(config: SandboxConfig) -> anyhow::Result<Self> {
        let engine = engine::build().context("configuring the wasm engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("linking WASI")?;
        PluginWorld::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("linking the weir:plugin imports")?;
        let cache = CompileCache::new(config.cache_dir, &engine);
        let slots = match config.running_guest_calls {
            0 => cpu::CpuShare::default_slots(),
            n => n,
        };
        let long_slots = match config.running_long_calls {
            0 => slots.saturating_sub(1),
            n => n,
        };
        Ok(Sandbox {
            engine,
            linker,
            cache,
            budget: Arc::new(budget::MemoryBudget::new(config.memory_budget_bytes)),
            cpu: cpu::CpuShare::new(slots, long_slots, config.long_calls),
        })
    }

    /// The engine every plugin is compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// How long guest calls run: what was asked for, or what this kernel
    /// and process can do of it ([`LongCalls::effective`]).
    pub fn long_calls(&self) -> LongCalls {
        self.cpu.long_calls()
    }

    /// Guest linear memory held by live instances now, in bytes.
    pub fn guest_memory(&self) -> u64 {
        self.budget.held()
    }

    /// Load `wasm` and the manifest beside it. Compiling is CPU-bound and
    /// can take seconds for large guests (a cache miss on a Python or JS
    /// component); call it off the async runtime's worker threads.
    pub fn load(&self, wasm: &Path) -> Result<Plugin, LoadError> {
        let manifest = Manifest::load(&Manifest::path_for(wasm))?;
        self.load_with_manifest(wasm, manifest)
    }

    /// Load `wasm` with a manifest given by the caller.
    pub fn load_with_manifest(&self, wasm: &Path, manifest: Manifest) -> Result<Plugin, LoadError> {
        let name = plugin_name(wasm)?;
        let digest = crate::digest::sha256_file(wasm).map_err(|error| LoadError::Read {
            path: wasm.to_owned(),
            error,
        })?;
        self.load_file(name, wasm, &digest, manifest)
    }

    /// Load the component at `path`, whose SHA-256 the caller has taken
    /// (the supervisor's scan has). On a compile-cache hit the file is not
    /// read at all; otherwise it is read and must still have that digest,
    /// so the version fingerprinted is exactly the version loaded.
    pub fn load_file(
        &self,
        name: String,
        path: &Path,
        digest: &[u8; 32],
        manifest: Manifest,
    ) -> Result<Plugin, LoadError> {
        let read = || {
            let bytes = std::fs::read(path).map_err(|error| LoadError::Read {
                path: path.to_owned(),
                error,
            })?;
            if Sha256::digest(&bytes).as_slice() != digest {
                return Err(LoadError::Changed {
                    path: path.to_owned(),
                });
            }
            Ok(bytes)
        };
        self.load_component(name, path, digest, read, manifest)
    }

    /// Load a component from bytes already in memory (a deployment being
    /// checked before it is stored).
    pub fn load_bytes(
        &self,
        name: String,
        path: &Path,
        bytes: &[u8],
        manifest: Manifest,
    ) -> Result<Plugin, LoadError> {
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        self.load_component(name, path, &digest, || Ok(bytes), manifest)
    }

    fn load_component<W: AsRef<[u8]>>(
        &self,
        name: String,
        path: &Path,
        digest: &[u8; 32],
        wasm: impl FnOnce() -> Result<W, LoadError>,
        manifest: Manifest,
    ) -> Result<Plugin, LoadError> {
        let version = PluginVersion::from_digest(digest);
        let (component, cache_status) = self
            .cache
            .load_or_compile(&self.engine, digest, wasm)
            .map_err(|e| match e {
                CompileError::Source(e) => e,
                CompileError::Compile(e) => LoadError::Compile {
                    path: path.to_owned(),
                    message: format!("{e:#}"),
                },
            })?;
        let world_error = |e: wasmtime::Error| LoadError::World {
            path: path.to_owned(),
            message: format!("{e:#}"),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(world_error)?;
        let pre = PluginPre::new(instance_pre).map_err(world_error)?;
        let ctx = Arc::new(PluginContext {
            name: name.clone(),
            version: version.to_string(),
            limits: manifest.limits.clone(),
            config: manifest.config_strings().into_iter().collect(),
            budget: self.budget.clone(),
            cpu: self.cpu.clone(),
            cpu_key: Arc::from(name.as_str()),
        });
        tracing::debug!(plugin = %name, %version, cache = ?cache_status, "plugin compiled and linked");
        Ok(Plugin::new(
            name,
            version,
            manifest,
            path.to_owned(),
            cache_status,
            pre,
            ctx,
        ))
    }
}

/// `fraud` for `plugins/fraud.wasm`, if that is a valid plugin name.
pub fn plugin_name(wasm: &Path) -> Result<String, LoadError> {
    let error = |message: String| LoadError::Name {
        path: wasm.to_owned(),
        message,
    };
    let stem = wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| error("the file name is not UTF-8".into()))?;
    crate::names::validate_plugin_name(stem).map_err(error)?;
    Ok(stem.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn wasmtime_version_matches_the_lockfile() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        let entry = format!(
            "name = \"wasmtime\"\nversion = \"{}\"",
            super::WASMTIME_VERSION
        );
        assert!(lock.contains(&entry), "Cargo.lock has another wasmtime");
    }
}
