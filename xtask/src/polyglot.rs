//! Plugins written in Python, JavaScript and C, each built with its own
//! language's toolchain into a component under `dist/plugins/`.
//!
//! Builds are cached by content: the inputs (sources, the WIT contract, the
//! toolchain pins) are hashed, and a component built from the same inputs
//! before is reused. Componentizing Python or JavaScript takes ~10 s, so
//! this keeps `cargo xtask build` quick when only Rust changed.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::toolchains::{Toolchains, digest_files};
use crate::{command, copy_if_changed, run};

#[derive(Debug, Clone, Copy)]
enum Language {
    Python,
    JavaScript,
    C,
}

/// A plugin in a language other than Rust.
pub struct Plugin {
    pub name: &'static str,
    /// Its directory, holding `<name>.toml`, sources and `tests/`.
    pub dir: &'static str,
    language: Language,
    /// Source files (relative to `dir`) that go into the component.
    sources: &'static [&'static str],
    /// Files pinning its toolchain (relative to the workspace root).
    pins: &'static [&'static str],
}

pub const PLUGINS: &[Plugin] = &[
    Plugin {
        name: "loyalty",
        dir: "plugins/loyalty",
        language: Language::Python,
        sources: &["app.py", "points.py"],
        pins: &["plugins/loyalty/requirements-build.txt"],
    },
    Plugin {
        name: "notify",
        dir: "plugins/notify",
        language: Language::JavaScript,
        sources: &["notify.js", "format.js"],
        pins: &["plugins/notify/package-lock.json"],
    },
    Plugin {
        name: "analytics",
        dir: "plugins/analytics",
        language: Language::C,
        sources: &["analytics.c"],
        pins: &["plugins/analytics/requirements-build.txt"],
    },
];

/// Build every plugin (or reuse an identical earlier build) and put it
/// with its manifest into `dist/plugins/`.
pub fn build(root: &Path, target_dir: &Path) -> anyhow::Result<()> {
    let toolchains = Toolchains::new(target_dir);
    let cache = target_dir.join("guest-builds");
    std::fs::create_dir_all(&cache)?;
    let dest = root.join("dist/plugins");
    std::fs::create_dir_all(&dest)?;
    for plugin in PLUGINS {
        let dir = root.join(plugin.dir);
        let mut inputs: Vec<PathBuf> = plugin.sources.iter().map(|s| dir.join(s)).collect();
        // The contract and how plugins are built are inputs of every build.
        inputs.push(root.join("wit/plugin.wit"));
        inputs.push(root.join("xtask/src/polyglot.rs"));
        inputs.push(root.join("xtask/src/toolchains.rs"));
        inputs.extend(plugin.pins.iter().map(|p| root.join(p)));
        let digest = digest_files(&inputs)?;
        let built = cache.join(format!("{}-{}.wasm", plugin.name, &digest[..16]));
        if !built.exists() {
            let partial = built.with_extension("partial");
            build_one(root, &toolchains, plugin, &dir, &partial)
                .with_context(|| format!("building the {} plugin", plugin.name))?;
            std::fs::rename(&partial, &built)?;
        }
        copy_if_changed(&built, &dest.join(format!("{}.wasm", plugin.name)))?;
        copy_if_changed(
            &dir.join(format!("{}.toml", plugin.name)),
            &dest.join(format!("{}.toml", plugin.name)),
        )?;
    }
    Ok(())
}

fn build_one(
    root: &Path,
    toolchains: &Toolchains,
    plugin: &Plugin,
    dir: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let wit = root.join("wit");
    match plugin.language {
        Language::Python => {
            let bin = toolchains.python_tools(root)?;
            let module = plugin.sources[0].trim_end_matches(".py");
            run(command(bin.join("componentize-py"))
                // Keep the source tree free of bytecode caches.
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .arg("--wit-path")
                .arg(&wit)
                .args(["--world", "plugin", "componentize", "--python-path"])
                .arg(dir)
                .arg(module)
                .arg("--output")
                .arg(out))
        }
        Language::JavaScript => {
            let componentize_js = toolchains.componentize_js(root)?;
            // Without -d http/fetch-event the component would import
            // wasi:http, which the sandbox does not provide.
            run(command(componentize_js)
                .arg(dir.join(plugin.sources[0]))
                .arg("--wit")
                .arg(&wit)
                .args([
                    "--world-name",
                    "plugin",
                    "-d",
                    "http",
                    "fetch-event",
                    "--out",
                ])
                .arg(out))
        }
        Language::C => build_c(root, toolchains, plugin, dir, out),
    }
}

/// wit-bindgen generates the bindings, zig's clang compiles a wasm32-wasi
/// reactor module, and wasm-tools wraps it with the preview1 adapter into a
/// component.
fn build_c(
    root: &Path,
    toolchains: &Toolchains,
    plugin: &Plugin,
    dir: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let bin = toolchains.python_tools(root)?;
    let wit_bindgen = toolchains.wit_bindgen()?;
    let adapter = toolchains.preview1_adapter()?;
    let work = out.with_extension("c-build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    run(command(&wit_bindgen)
        .arg("c")
        .arg(root.join("wit"))
        .args(["--world", "plugin", "--out-dir"])
        .arg(&work))?;
    let core = work.join("core.wasm");
    let mut cc = command(bin.join("python"));
    cc.args([
        "-m",
        "ziglang",
        "cc",
        "-target",
        "wasm32-wasi",
        "-mexec-model=reactor",
        "-s",
    ])
    .args(["-O2", "-Wall", "-Werror", "-Wno-unused-function"])
    // zig's default 16 MiB stack would be all of a small plugin's memory
    // cap; event handlers need far less.
    .arg("-Wl,-z,stack-size=262144")
    .arg("-I")
    .arg(&work);
    for source in plugin.sources {
        cc.arg(dir.join(source));
    }
    cc.arg(work.join("plugin.c"))
        .arg(work.join("plugin_component_type.o"))
        .arg("-o")
        .arg(&core);
    run(&mut cc)?;
    run(command(bin.join("wasm-tools"))
        .args(["component", "new"])
        .arg(&core)
        .arg("--adapt")
        .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
        .arg("-o")
        .arg(out))?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
