//! Loading plugins: clear errors for bad input, and the compile cache.
//! Needs `cargo xtask build` first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking

use std::path::{Path, PathBuf};

use sha2::Digest;

use weir::sandbox::compile_cache::CacheStatus;
use weir::sandbox::{LoadError, Sandbox, SandboxConfig};

const HOSTILE: &str = "../dist/test-guests/hostile";

/// Copy a built guest and its manifest into `dir` as `name`.
fn install(dir: &Path, from: &str, name: &str) -> std::path::PathBuf {
    std::fs::copy(format!("{from}.wasm"), dir.join(format!("{name}.wasm"))).unwrap();
    std::fs::copy(format!("{HOSTILE}.toml"), dir.join(format!("{name}.toml"))).unwrap();
    dir.join(format!("{name}.wasm"))
}

fn sandbox(cache: Option<&Path>) -> Sandbox {
    Sandbox::new(SandboxConfig {
        cache_dir: cache.map(Path::to_path_buf),
        ..SandboxConfig::with_default_cache()
    })
    .unwrap()
}

#[test]
fn garbage_bytes_are_not_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "garbage");
    std::fs::write(&wasm, b"definitely not wasm").unwrap();
    let err = sandbox(None).load(&wasm).unwrap_err();
    assert!(matches!(err, LoadError::Compile { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("garbage.wasm is not a valid WebAssembly component"),
        "{err}"
    );
}

#[test]
fn core_module_is_not_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "core");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
    let err = sandbox(None).load(&wasm).unwrap_err();
    assert!(matches!(err, LoadError::Compile { .. }), "{err}");
}

#[test]
fn component_of_another_world_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), "../dist/test-guests/notplugin", "command");
    let err = sandbox(None).load(&wasm).unwrap_err();
    assert!(matches!(err, LoadError::World { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("does not fit the weir:plugin world"),
        "{err}"
    );
}

#[test]
fn missing_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "lonely");
    std::fs::remove_file(dir.path().join("lonely.toml")).unwrap();
    let err = sandbox(None).load(&wasm).unwrap_err();
    assert!(err.to_string().contains("lonely.toml"), "{err}");
}

#[test]
fn invalid_manifest_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "typo");
    std::fs::write(
        dir.path().join("typo.toml"),
        "subjects = [\"a\"]\nstream = \"S\"\n[limits]\nmemory = 1\n",
    )
    .unwrap();
    let err = sandbox(None).load(&wasm).unwrap_err().to_string();
    assert!(err.contains("typo.toml") && err.contains("memory"), "{err}");
}

#[test]
fn compile_cache_serves_the_second_load_and_survives_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "cached");
    let first = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(first.cache_status(), CacheStatus::Miss);
    // A new sandbox stands for a restarted host.
    let second = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(second.cache_status(), CacheStatus::Hit);
    assert_eq!(first.version(), second.version());
    // The entry is mapped by plugins that use it; nothing rewrites it in
    // place while they live.
    drop((first, second));

    // Flip a byte in the artifact: the checksum catches it, the plugin is
    // recompiled and the entry rewritten.
    let artifact = cache_files(cache.path(), "cwasm");
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();
    let third = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(third.cache_status(), CacheStatus::Miss);
    let fourth = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(fourth.cache_status(), CacheStatus::Hit);

    // An artifact without its checksum (a writer that died between the
    // two) is not trusted either.
    std::fs::remove_file(cache_files(cache.path(), "sha256")).unwrap();
    let fifth = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(fifth.cache_status(), CacheStatus::Miss);
    let sixth = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(sixth.cache_status(), CacheStatus::Hit);

    // Nor is one whose checksum file is not a checksum.
    drop((third, fourth, fifth, sixth));
    std::fs::write(cache_files(cache.path(), "sha256"), b"not 32 bytes").unwrap();
    let seventh = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(seventh.cache_status(), CacheStatus::Miss);
    let eighth = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(eighth.cache_status(), CacheStatus::Hit);
}

/// The one cache file with extension `ext`.
fn cache_files(cache: &Path, ext: &str) -> PathBuf {
    let mut found = Vec::new();
    for engine_dir in std::fs::read_dir(cache).unwrap() {
        for entry in std::fs::read_dir(engine_dir.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == ext) {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

#[test]
fn a_cache_hit_does_not_read_the_component() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "cached");
    let digest: [u8; 32] = sha2::Sha256::digest(std::fs::read(&wasm).unwrap()).into();
    let manifest = || weir::manifest::Manifest::load(&wasm.with_extension("toml")).unwrap();
    let first = sandbox(Some(cache.path()))
        .load_file("cached".into(), &wasm, &digest, manifest())
        .unwrap();
    assert_eq!(first.cache_status(), CacheStatus::Miss);
    // The file the digest was taken from is gone: only the cache has it.
    std::fs::remove_file(&wasm).unwrap();
    let second = sandbox(Some(cache.path()))
        .load_file("cached".into(), &wasm, &digest, manifest())
        .unwrap();
    assert_eq!(second.cache_status(), CacheStatus::Hit);
    assert_eq!(first.version(), second.version());
}

/// Hosts sharing a cache directory (a volume, or one host's reload racing
/// its own start) compile the same plugin at once: every writer renames
/// whole files into place, so each load succeeds, whatever order the
/// renames land in, and the cache serves the next one.
#[test]
fn concurrent_first_loads_share_one_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "shared");
    let versions: Vec<String> = std::thread::scope(|scope| {
        let loads: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let plugin = sandbox(Some(cache.path())).load(&wasm).unwrap();
                    plugin.version().to_string()
                })
            })
            .collect();
        loads.into_iter().map(|l| l.join().unwrap()).collect()
    });
    assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");
    let after = sandbox(Some(cache.path())).load(&wasm).unwrap();
    assert_eq!(after.cache_status(), CacheStatus::Hit);
    // Nothing half-written is left behind.
    let mut names: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .flat_map(|engine_dir| std::fs::read_dir(engine_dir.unwrap().path()).unwrap())
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].ends_with(".cwasm") && names[1].ends_with(".sha256"),
        "{names:?}"
    );
}

#[test]
fn a_component_that_no_longer_has_its_digest_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = install(dir.path(), HOSTILE, "moving");
    let manifest = weir::manifest::Manifest::load(&wasm.with_extension("toml")).unwrap();
    let err = sandbox(None)
        .load_file("moving".into(), &wasm, &[0; 32], manifest)
        .unwrap_err();
    assert!(matches!(err, LoadError::Changed { .. }), "{err}");
}

#[test]
fn version_is_the_content_digest() {
    let dir = tempfile::tempdir().unwrap();
    let a = install(dir.path(), HOSTILE, "a");
    let b = install(dir.path(), HOSTILE, "b");
    let sandbox = sandbox(None);
    let (a, b) = (sandbox.load(&a).unwrap(), sandbox.load(&b).unwrap());
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version().as_str().len(), 12);
}
