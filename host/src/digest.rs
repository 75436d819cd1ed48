//! SHA-256 of a file, read through a small buffer.
//!
//! Components are tens of megabytes (CPython, SpiderMonkey) and compiled
//! artifacts more. Reading one whole into a fresh buffer only to hash it
//! costs a page fault per page of new memory, and on a virtual machine the
//! first touch of memory is slow: measured on the 2-core test machine, a
//! host spent 180 ms of a 300 ms start-up faulting in the buffers it read
//! a Python plugin and its artifact into (BENCHMARKS.md, "Start-up").

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Large enough that a read is one system call per quarter megabyte, small
/// enough to stay in the allocator's reused memory.
const CHUNK: usize = 256 << 10;

/// The SHA-256 of the file at `path`.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    sha256_read(&mut std::fs::File::open(path)?)
}

/// The SHA-256 of everything `file` has left to read.
pub(crate) fn sha256_read(file: &mut impl Read) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_digest_of_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Spans several chunks and ends mid-chunk.
        let bytes: Vec<u8> = (0..(CHUNK * 2 + 12_345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let whole: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(sha256_file(&path).unwrap(), whole);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            <[u8; 32]>::from(Sha256::digest(b""))
        );
    }
}
