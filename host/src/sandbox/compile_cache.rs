//! On-disk cache of compiled plugins.
//!
//! Compiling a component is the slow part of loading a plugin (seconds for
//! a Python or JavaScript guest). Artifacts are keyed by the SHA-256 of the
//! component and by the engine's compatibility hash (wasmtime version,
//! compiler settings, CPU features), so an upgrade or a different machine
//! never loads an artifact it cannot run.
//!
//! An entry is two files: `<digest>.cwasm`, the artifact exactly as wasmtime
//! serialized it, and `<digest>.sha256`, the SHA-256 of that artifact. The
//! artifact is mapped from the file, not read into memory: a 35 MB Python
//! artifact read into a fresh buffer cost a new host most of its start-up
//! in page faults, and mapped it is shared with the page cache and with
//! every other host on the machine. Writers only ever rename complete
//! files into place, which is what makes the mapping safe: a file that
//! someone rewrites in place while a host has it mapped would take that
//! host down.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::digest::sha256_read;
use crate::labels::labelled;

/// Part of the directory key: a cache written in another layout (the
/// checksum in front of the artifact, before) is never read as this one.
const LAYOUT: &str = "artifact + sha256 file";

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
    /// `<root>/<engine and layout hash>`; `None` when caching is off.
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

impl CompileCache {
    /// A cache under `root` for `engine`'s code; `None` disables caching.
    pub fn new(root: Option<PathBuf>, engine: &Engine) -> Self {
        let dir = root.map(|root| {
            let mut hasher = Sha256Hasher(Sha256::new());
            engine.precompile_compatibility_hash().hash(&mut hasher);
            LAYOUT.hash(&mut hasher);
            root.join(&hex::encode(hasher.0.finalize())[..16])
        });
        CompileCache { dir }
    }

    /// Where this engine's entries are kept, if caching is on.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The compiled form of the component whose SHA-256 is `digest`: from
    /// the cache when it holds it, in which case `wasm` is never called;
    /// otherwise compiled from what `wasm` returns, and cached.
    pub fn load_or_compile<W: AsRef<[u8]>, E>(
        &self,
        engine: &Engine,
        digest: &[u8; 32],
        wasm: impl FnOnce() -> Result<W, E>,
    ) -> Result<(Component, CacheStatus), CompileError<E>> {
        let entry = self.dir.as_deref().map(|dir| Entry::new(dir, digest));
        if let Some(entry) = &entry {
            match entry.read(engine) {
                Ok(Some(component)) => return Ok((component, CacheStatus::Hit)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %entry.artifact.display(), "ignoring unusable compile cache entry: {e:#}")
                }
            }
        }
        let wasm = wasm().map_err(CompileError::Source)?;
        let component = Component::new(engine, wasm.as_ref()).map_err(CompileError::Compile)?;
        let Some(entry) = entry else {
            return Ok((component, CacheStatus::Disabled));
        };
        // A cache that cannot be written (read-only disk, full disk) costs a
        // recompile next time, nothing more.
        if let Err(e) = entry.write(&component) {
            tracing::warn!(path = %entry.artifact.display(), "could not write compile cache entry: {e:#}");
        }
        Ok((component, CacheStatus::Miss))
    }
}

/// Why [`CompileCache::load_or_compile`] has no component. An unusable
/// cache entry is not among the reasons: it is logged and compiled over.
#[derive(Debug)]
pub enum CompileError<E> {
    /// The component's bytes could not be had.
    Source(E),
    /// Wasmtime could not compile them.
    Compile(wasmtime::Error),
}

/// Why a cache entry could not be used or kept. Either way the plugin is
/// compiled instead; the error is only logged.
#[derive(Debug, thiserror::Error)]
enum ArtifactError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the checksum file is not 32 bytes")]
    BadChecksumFile,
    #[error("checksum mismatch")]
    Checksum,
    #[error("replaced while it was being loaded")]
    Replaced,
    #[error(transparent)]
    Wasmtime(#[from] wasmtime::Error),
    #[error(transparent)]
    Persist(#[from] tempfile::PersistError),
}

/// The two files of one component's entry.
struct Entry<'a> {
    dir: &'a Path,
    artifact: PathBuf,
    checksum: PathBuf,
}

impl<'a> Entry<'a> {
    fn new(dir: &'a Path, digest: &[u8; 32]) -> Self {
        let stem = hex::encode(digest);
        Entry {
            dir,
            artifact: dir.join(format!("{stem}.cwasm")),
            checksum: dir.join(format!("{stem}.sha256")),
        }
    }

    /// The cached component, `None` when there is no complete entry.
    fn read(&self, engine: &Engine) -> Result<Option<Component>, ArtifactError> {
        let expected = match std::fs::read(&self.checksum) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let expected: [u8; 32] = expected
            .try_into()
            .map_err(|_| ArtifactError::BadChecksumFile)?;
        let mut file = match std::fs::File::open(&self.artifact) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let verified = file.metadata()?;
        if sha256_read(&mut file)? != expected {
            return Err(ArtifactError::Checksum);
        }
        // Wasmtime maps the artifact by its path. Files are only ever
        // renamed into place, never written in place, so the same inode
        // before and after the mapping means the mapped file is the one
        // just verified.
        #[cfg(test)]
        tests::between_verifying_and_mapping(&self.artifact);
        let component = deserialize_file(engine, &self.artifact)?;
        let mapped = std::fs::metadata(&self.artifact)?;
        if (mapped.dev(), mapped.ino()) != (verified.dev(), verified.ino()) {
            return Err(ArtifactError::Replaced);
        }
        Ok(Some(component))
    }

    /// The artifact first, then its checksum, each renamed into place
    /// whole: a reader finds no checksum, or one for a complete artifact.
    fn write(&self, component: &Component) -> Result<(), ArtifactError> {
        let artifact = component.serialize()?;
        std::fs::create_dir_all(self.dir)?;
        write_whole(self.dir, &self.artifact, &artifact)?;
        write_whole(self.dir, &self.checksum, &Sha256::digest(&artifact))?;
        Ok(())
    }
}

/// Write beside `path` and rename: readers see the whole file or none, and
/// a host that has the old file mapped keeps its own copy.
fn write_whole(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), ArtifactError> {
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

#[allow(unsafe_code)]
fn deserialize_file(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file was produced by `Component::serialize` of an engine
    // with the same compatibility hash (it is in the directory name) and
    // renamed into place whole by `write_whole`; its checksum was verified
    // just now, and the caller checks that the file mapped is the file
    // verified. Nothing in Weir writes an entry in place, so the mapping
    // cannot change under the engine. Wasmtime additionally checks the
    // header and engine settings.
    unsafe { Component::deserialize_file(engine, path) }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// The smallest component there is: the header of an empty one.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    type Step = Box<dyn FnOnce(&Path)>;

    thread_local! {
        /// What happens to the artifact's path between its checksum and its mapping.
        static MEANWHILE: RefCell<Option<Step>> = RefCell::new(None);
    }

    pub(super) fn between_verifying_and_mapping(artifact: &Path) {
        if let Some(step) = MEANWHILE.with(|m| m.borrow_mut().take()) {
            step(artifact);
        }
    }

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    #[test]
    fn an_artifact_replaced_before_it_is_mapped_is_not_used() {
        let engine = engine();
        let root = tempfile::tempdir().unwrap();
        let cache = CompileCache::new(Some(root.path().to_path_buf()), &engine);
        let digest = [7u8; 32];
        let compile = || Ok::<_, std::convert::Infallible>(EMPTY_COMPONENT);
        let (_, status) = cache.load_or_compile(&engine, &digest, compile).unwrap();
        assert_eq!(status, CacheStatus::Miss);

        // Another writer renames an artifact into place after this reader
        // verified the old one: same bytes, so only the inode tells.
        let dir = cache.dir().unwrap().to_path_buf();
        MEANWHILE.with(|m| {
            *m.borrow_mut() = Some(Box::new(move |artifact: &Path| {
                let bytes = std::fs::read(artifact).unwrap();
                write_whole(&dir, artifact, &bytes).unwrap();
            }))
        });
        let entry = Entry::new(cache.dir().unwrap(), &digest);
        assert!(matches!(entry.read(&engine), Err(ArtifactError::Replaced)));

        // Left alone, the replacement is a whole entry and is served.
        let (_, status) = cache.load_or_compile(&engine, &digest, compile).unwrap();
        assert_eq!(status, CacheStatus::Hit);
    }
}
