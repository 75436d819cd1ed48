//! Reading the plugin directory: which `NAME.wasm` + `NAME.toml` pairs it
//! holds, and the fingerprint of each.
//!
//! A component is fingerprinted by its SHA-256, read through a small
//! buffer, and loaded by that digest: from the compile cache, which keys
//! artifacts by it, or read again and checked against it (see
//! [`Sandbox::load_file`](crate::sandbox::Sandbox::load_file)). So the
//! version that is fingerprinted is exactly the version that gets loaded,
//! however the files change meanwhile. A `.wasm` whose size, modification
//! time and inode are as on the previous scan is not read again (the
//! 30-second rescan of a directory of large Python components would
//! otherwise re-hash them forever), and one above the size cap is refused
//! without being read.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::digest::sha256_file;

/// How long a `.wasm` may sit without its `.toml` (or the reverse) before
/// it is reported: long enough for any deployment to finish copying.
pub const UNPAIRED_GRACE: Duration = Duration::from_secs(10);

/// The bytes that make a plugin version: a change to either file is a new
/// version to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// SHA-256 of the component.
    pub wasm: [u8; 32],
    /// SHA-256 of the manifest.
    pub manifest: [u8; 32],
}

/// A complete plugin found in the directory.
pub struct Found {
    /// `NAME.wasm`.
    pub wasm_path: PathBuf,
    /// `NAME.toml`, as read.
    pub manifest_text: String,
    /// What the two files were when read.
    pub fingerprint: Fingerprint,
}

/// What the directory holds under one plugin name.
pub enum Entry {
    /// Both files, ready to load.
    Found(Found),
    /// Present but unusable before anything is loaded: a bad name, a file
    /// over the size cap, a half that has been alone too long.
    Refused {
        /// The file refused.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The identity of a file's contents as the file system reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Option<Self> {
        Some(Stamp {
            len: meta.len(),
            modified: meta.modified().ok()?,
            inode: meta.ino(),
        })
    }
}

/// Scans one directory, remembering what it saw for the next scan.
pub struct Scanner {
    dir: PathBuf,
    max_wasm_bytes: u64,
    digests: HashMap<PathBuf, (Stamp, [u8; 32])>,
    /// When each lone half was first seen, and whether it was reported.
    unpaired: HashMap<String, (Instant, bool)>,
}

impl Scanner {
    /// A scanner of `dir` that refuses components over `max_wasm_bytes`.
    pub fn new(dir: PathBuf, max_wasm_bytes: u64) -> Self {
        Scanner {
            dir,
            max_wasm_bytes,
            digests: HashMap::new(),
            unpaired: HashMap::new(),
        }
    }

    /// The earliest moment a lone half becomes reportable, if any is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.unpaired
            .values()
            .filter(|(_, reported)| !reported)
            .map(|(seen, _)| *seen + UNPAIRED_GRACE)
            .min()
    }

    /// Every plugin name in the directory and what stands under it.
    pub fn scan(&mut self) -> anyhow::Result<BTreeMap<String, Entry>> {
        let mut halves: BTreeMap<String, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
        for path in plugin_files(&self.dir)? {
            let (Some(stem), Some(ext)) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let slot = halves.entry(stem.to_owned()).or_default();
            match ext {
                "wasm" => slot.0 = Some(path),
                _ => slot.1 = Some(path),
            }
        }
        let mut entries = BTreeMap::new();
        let now = Instant::now();
        self.unpaired.retain(|name, _| {
            halves
                .get(name)
                .is_some_and(|(w, m)| w.is_none() || m.is_none())
        });
        for (name, halves) in halves {
            let (wasm_path, manifest_path) = match halves {
                (Some(wasm), Some(manifest)) => (wasm, manifest),
                (wasm, manifest) => {
                    if let Some(entry) = self.lone_half(&name, wasm, manifest, now) {
                        entries.insert(name, entry);
                    }
                    continue;
                }
            };
            if let Err(reason) = crate::names::validate_plugin_name(&name) {
                entries.insert(
                    name,
                    Entry::Refused {
                        path: wasm_path,
                        reason,
                    },
                );
                continue;
            }
            match self.read_pair(&wasm_path, &manifest_path) {
                Ok(Some(found)) => {
                    entries.insert(name, Entry::Found(found));
                }
                // Vanished under us: a removal or deployment in progress.
                Ok(None) => {}
                Err(reason) => {
                    entries.insert(
                        name,
                        Entry::Refused {
                            path: wasm_path,
                            reason,
                        },
                    );
                }
            }
        }
        let known: Vec<PathBuf> = entries
            .values()
            .filter_map(|e| match e {
                Entry::Found(f) => Some(f.wasm_path.clone()),
                Entry::Refused { .. } => None,
            })
            .collect();
        self.digests.retain(|path, _| known.contains(path));
        Ok(entries)
    }

    /// A `.wasm` without its `.toml` or the reverse: quiet during the grace
    /// period (a deployment copies one file, then the other), reported once
    /// after it.
    fn lone_half(
        &mut self,
        name: &str,
        wasm: Option<PathBuf>,
        manifest: Option<PathBuf>,
        now: Instant,
    ) -> Option<Entry> {
        let (present, missing) = match (wasm, manifest) {
            (Some(wasm), None) => (wasm, format!("{name}.toml")),
            (None, Some(manifest)) => (manifest, format!("{name}.wasm")),
            _ => return None,
        };
        let (seen, reported) = self.unpaired.entry(name.to_owned()).or_insert((now, false));
        if now.duration_since(*seen) < UNPAIRED_GRACE {
            return None;
        }
        let reason = format!(
            "{} has no {missing} beside it; a plugin needs both files",
            present.display()
        );
        if !*reported {
            tracing::warn!("{reason}");
            *reported = true;
        }
        Some(Entry::Refused {
            path: present,
            reason,
        })
    }

    /// Read a pair; `Ok(None)` when a file vanished meanwhile.
    fn read_pair(
        &mut self,
        wasm_path: &Path,
        manifest_path: &Path,
    ) -> Result<Option<Found>, String> {
        let Ok(manifest_text) = std::fs::read_to_string(manifest_path) else {
            return Ok(None);
        };
        let Ok(meta) = std::fs::metadata(wasm_path) else {
            return Ok(None);
        };
        if meta.len() > self.max_wasm_bytes {
            return Err(format!(
                "{} is {:.1} MiB, above `plugins.max-wasm-mb` ({} MiB); not read",
                wasm_path.display(),
                meta.len() as f64 / f64::from(1 << 20),
                self.max_wasm_bytes >> 20
            ));
        }
        let stamp = Stamp::of(&meta);
        let cached = self
            .digests
            .get(wasm_path)
            .filter(|(seen, _)| Some(*seen) == stamp)
            .map(|(_, digest)| *digest);
        let digest = match cached {
            Some(digest) => digest,
            None => {
                let Ok(digest) = sha256_file(wasm_path) else {
                    return Ok(None);
                };
                // Stamped from before the read: a write racing the read
                // changes the stamp, so the next scan reads it again.
                if let Some(stamp) = stamp {
                    self.digests.insert(wasm_path.to_owned(), (stamp, digest));
                }
                digest
            }
        };
        Ok(Some(Found {
            wasm_path: wasm_path.to_owned(),
            fingerprint: Fingerprint {
                wasm: digest,
                manifest: Sha256::digest(manifest_text.as_bytes()).into(),
            },
            manifest_text,
        }))
    }
}

/// The `*.wasm` and `*.toml` files of `dir`, sorted by name, skipping
/// hidden files (editor swap files, `.name.tmp` files being written).
pub fn plugin_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading plugin directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && (name.ends_with(".wasm") || name.ends_with(".toml"))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn pairs_are_found_and_unchanged_files_not_reread() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.wasm", b"one");
        write(dir.path(), "a.toml", b"m");
        let mut scanner = Scanner::new(dir.path().to_owned(), 1 << 20);
        let Entry::Found(first) = scanner.scan().unwrap().remove("a").unwrap() else {
            panic!("a should be found");
        };
        // Rewritten in place with the same length and modification time:
        // the stamp is unchanged, so the scan must not hash it again.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("a.wasm"))
            .unwrap();
        let modified = file.metadata().unwrap().modified().unwrap();
        std::io::Write::write_all(&mut &file, b"eno").unwrap();
        file.set_modified(modified).unwrap();
        let Entry::Found(again) = scanner.scan().unwrap().remove("a").unwrap() else {
            panic!("a should be found");
        };
        assert_eq!(
            again.fingerprint, first.fingerprint,
            "unchanged file was read again"
        );
        // Replaced the way deployments do it: a new inode.
        write(dir.path(), ".a.tmp", b"two!");
        std::fs::rename(dir.path().join(".a.tmp"), dir.path().join("a.wasm")).unwrap();
        let Entry::Found(changed) = scanner.scan().unwrap().remove("a").unwrap() else {
            panic!("a should be found");
        };
        assert_ne!(changed.fingerprint, first.fingerprint);
    }

    #[test]
    fn oversized_and_badly_named_files_are_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "big.wasm", &vec![0; 2048]);
        write(dir.path(), "big.toml", b"m");
        write(dir.path(), "a b.wasm", b"x");
        write(dir.path(), "a b.toml", b"m");
        let mut scanner = Scanner::new(dir.path().to_owned(), 1024);
        let entries = scanner.scan().unwrap();
        let Some(Entry::Refused { reason, .. }) = entries.get("big") else {
            panic!("big should be refused");
        };
        assert!(reason.contains("max-wasm-mb"), "{reason}");
        let Some(Entry::Refused { reason, .. }) = entries.get("a b") else {
            panic!("a b should be refused");
        };
        assert!(reason.contains("letters, digits"), "{reason}");
    }

    #[test]
    fn a_lone_half_is_reported_only_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "half.wasm", b"x");
        let mut scanner = Scanner::new(dir.path().to_owned(), 1 << 20);
        assert!(scanner.scan().unwrap().is_empty());
        assert!(scanner.next_deadline().is_some());
        // Pretend the grace period has passed.
        for (seen, _) in scanner.unpaired.values_mut() {
            *seen -= UNPAIRED_GRACE;
        }
        let entries = scanner.scan().unwrap();
        let Some(Entry::Refused { reason, .. }) = entries.get("half") else {
            panic!("half should be reported");
        };
        assert!(reason.contains("half.toml"), "{reason}");
        write(dir.path(), "half.toml", b"m");
        assert!(matches!(
            scanner.scan().unwrap().get("half"),
            Some(Entry::Found(_))
        ));
        assert!(scanner.next_deadline().is_none());
    }
}
