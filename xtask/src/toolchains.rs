//! Guest toolchains at pinned versions, installed on first use into a
//! directory beside the build output (reused between builds and CI runs on
//! one machine) and reinstalled when a pin changes.
//!
//! - Python tools (componentize-py; zig and wasm-tools for C) from PyPI
//!   into one virtualenv, pinned by each plugin's `requirements-build.txt`.
//! - componentize-js from npm, pinned by `plugins/notify/package-lock.json`.
//! - wit-bindgen's C generator from crates.io, pinned here.
//! - The WASI preview1 adapter, from the crate pinned in Cargo.lock.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::{command, run};

/// The wit-bindgen whose C generator builds the C plugin; the same release
/// as the Rust guests' `wit-bindgen` crate.
pub const WIT_BINDGEN_VERSION: &str = "0.61.1";

/// The WASI preview1 → preview2 adapter for reactor modules, from the
/// wasmtime release the host uses.
pub const PREVIEW1_REACTOR_ADAPTER: &[u8] =
    wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;

/// Where the tools live.
pub struct Toolchains {
    dir: PathBuf,
}

impl Toolchains {
    pub fn new(target_dir: &Path) -> Self {
        Toolchains {
            dir: target_dir.join("guest-toolchains"),
        }
    }

    /// A virtualenv with every pinned Python build tool.
    pub fn python_tools(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let venv = self.dir.join("venv");
        let requirements = [
            root.join("plugins/loyalty/requirements-build.txt"),
            root.join("plugins/analytics/requirements-build.txt"),
        ];
        self.install_once("venv", &requirements, || {
            run(command("python3")
                .arg("-m")
                .arg("venv")
                .arg("--clear")
                .arg(&venv))?;
            let mut pip = command(venv.join("bin/pip"));
            pip.args(["install", "--quiet", "--disable-pip-version-check"]);
            for r in &requirements {
                pip.arg("-r").arg(r);
            }
            run(&mut pip)
        })?;
        Ok(venv.join("bin"))
    }

    /// `componentize-js`, installed from the notify plugin's lockfile.
    pub fn componentize_js(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("npm");
        let package = root.join("plugins/notify");
        let files = [
            package.join("package.json"),
            package.join("package-lock.json"),
        ];
        self.install_once("npm", &files, || {
            std::fs::create_dir_all(&dir)?;
            for f in &files {
                std::fs::copy(f, dir.join(f.file_name().context("file name")?))?;
            }
            run(command("npm").current_dir(&dir).args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ]))
        })?;
        Ok(dir.join("node_modules/.bin/componentize-js"))
    }

    /// A virtualenv with the hand-written Python consumer's dependencies
    /// (`tests/peers/requirements.txt`), apart from the build tools.
    pub fn peer_python(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let venv = self.dir.join("peers-venv");
        let requirements = root.join("tests/peers/requirements.txt");
        self.install_once("peers-venv", std::slice::from_ref(&requirements), || {
            run(command("python3")
                .args(["-m", "venv", "--clear"])
                .arg(&venv))?;
            run(command(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&requirements))
        })?;
        Ok(venv.join("bin/python"))
    }

    /// npm `nats` for the hand-written JavaScript consumer, installed beside
    /// it in `tests/peers/node_modules` (Node resolves ES module imports from
    /// the script's own directory, not from a path variable).
    pub fn peer_node_modules(&self, root: &Path) -> anyhow::Result<()> {
        let dir = root.join("tests/peers");
        if dir.join("node_modules/nats/package.json").is_file() {
            return Ok(());
        }
        run(command("npm").current_dir(&dir).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]))
    }

    /// wit-bindgen's CLI, for its C generator.
    pub fn wit_bindgen(&self) -> anyhow::Result<PathBuf> {
        let root = self.dir.join("cargo");
        // The pin is a file so it is stamped like the others.
        std::fs::create_dir_all(&self.dir)?;
        let pin = self.dir.join("wit-bindgen.pin");
        std::fs::write(&pin, WIT_BINDGEN_VERSION)?;
        self.install_once("wit-bindgen", &[pin], || {
            run(crate::cargo()
                .args(["install", "--locked", "--quiet"])
                .arg(format!("wit-bindgen-cli@{WIT_BINDGEN_VERSION}"))
                .arg("--root")
                .arg(&root))
        })?;
        Ok(root.join("bin/wit-bindgen"))
    }

    /// The WASI preview1 → preview2 adapter for reactor modules.
    pub fn preview1_adapter(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("wasi_snapshot_preview1.reactor.wasm");
        let bytes =
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            std::fs::create_dir_all(&self.dir)?;
            std::fs::write(&path, bytes)?;
        }
        Ok(path)
    }

    /// Run `install` unless it already ran for exactly these `pins`
    /// (files whose bytes name the versions).
    fn install_once(
        &self,
        name: &str,
        pins: &[PathBuf],
        install: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let digest = digest_files(pins)?;
        let stamp = self.dir.join(format!("{name}.installed"));
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(digest.as_str()) {
            return Ok(());
        }
        eprintln!(
            "installing the {name} guest toolchain into {}",
            self.dir.display()
        );
        install().with_context(|| format!("installing the {name} guest toolchain"))?;
        std::fs::write(&stamp, digest)?;
        Ok(())
    }
}

/// SHA-256 over the contents of `files`, in order.
pub fn digest_files(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hex::encode(hasher.finalize()))
}
