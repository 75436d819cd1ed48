//! On-disk cache of compiled plugins.
//!
//! Compiling a component is the slow part of loading a plugin (seconds for
//! a Python or JavaScript guest). Artifacts are keyed by the SHA-256 of the
//! component and by the engine's compatibility hash (wasmtime version,
//! compiler settings, CPU features), so an upgrade or a different machine
//! never loads an artifact it cannot run.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::labels::labelled;

labelled! {
    /// Whether a load was served from the cache.
    pub enum CacheStatus {
        /// Compiled code was read from the cache.
        Hit => "hit",
        /// The component was compiled (and cached).
        Miss => "miss",
        /// Caching is off: the component was compiled.
        Disabled => "disabled",
    }
}

/// Compiled components on disk, keyed by the component's digest and the
/// engine's compatibility hash, so a restart or another host's copy of the
/// same plugin skips the compile.
pub struct CompileCache {
    /// `<root>/<engine hash>`; `None` when caching is off.
    dir: Option<PathBuf>,
}

/// Feeds `Hash` output into SHA-256, so the engine key is stable across
/// processes (unlike `DefaultHasher`, which is randomly seeded per build of std).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        0
    }
}

/// Artifacts start with the SHA-256 of the rest. Deserializing trusts its
/// input (it is native code), so a torn or corrupted file must never reach it.
const CHECKSUM_LEN: usize = 32;

impl CompileCache {
    /// A cache under `root` for `engine`'s code; `None` disables caching.
    pub fn new(root: Option<PathBuf>, engine: &Engine) -> Self {
        let dir = root.map(|root| {
            let mut hasher = Sha256Hasher(Sha256::new());
            engine.precompile_compatibility_hash().hash(&mut hasher);
            root.join(&hex::encode(hasher.0.finalize())[..16])
        });
        CompileCache { dir }
    }

    /// Where this engine's entries are kept, if caching is on.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The compiled form of `wasm`, from the cache when possible.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
    ) -> wasmtime::Result<(Component, CacheStatus)> {
        let Some(dir) = &self.dir else {
            return Ok((Component::new(engine, wasm)?, CacheStatus::Disabled));
        };
        let path = dir.join(format!("{}.cwasm", hex::encode(Sha256::digest(wasm))));
        match read_artifact(engine, &path) {
            Ok(Some(component)) => return Ok((component, CacheStatus::Hit)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable compile cache entry: {e:#}")
            }
        }
        let component = Component::new(engine, wasm)?;
        // A cache that cannot be written (read-only disk, full disk) costs a
        // recompile next time, nothing more.
        if let Err(e) = write_artifact(&component, dir, &path) {
            tracing::warn!(path = %path.display(), "could not write compile cache entry: {e:#}");
        }
        Ok((component, CacheStatus::Miss))
    }
}

/// Why a cache entry could not be used or kept. Either way the plugin is
/// compiled instead; the error is only logged.
#[derive(Debug, thiserror::Error)]
enum ArtifactError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("truncated artifact")]
    Truncated,
    #[error("checksum mismatch")]
    Checksum,
    #[error(transparent)]
    Wasmtime(#[from] wasmtime::Error),
    #[error(transparent)]
    Persist(#[from] tempfile::PersistError),
}

fn read_artifact(engine: &Engine, path: &Path) -> Result<Option<Component>, ArtifactError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if bytes.len() <= CHECKSUM_LEN {
        return Err(ArtifactError::Truncated);
    }
    let (checksum, artifact) = bytes.split_at(CHECKSUM_LEN);
    if Sha256::digest(artifact).as_slice() != checksum {
        return Err(ArtifactError::Checksum);
    }
    Ok(Some(deserialize(engine, artifact)?))
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `artifact` was produced by `Component::serialize` of an engine
    // with the same compatibility hash (it is in the directory name), written
    // by `write_artifact` below under its checksum, which was verified just
    // now. Wasmtime additionally checks the header and engine settings.
    unsafe { Component::deserialize(engine, artifact) }
}

fn write_artifact(component: &Component, dir: &Path, path: &Path) -> Result<(), ArtifactError> {
    let artifact = component.serialize()?;
    std::fs::create_dir_all(dir)?;
    // Write beside the target and rename: readers see the whole file or none.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &Sha256::digest(&artifact))?;
    std::io::Write::write_all(&mut tmp, &artifact)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}
