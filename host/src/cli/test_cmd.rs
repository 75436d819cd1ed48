//! `weir test`: run a plugin over a JSON Lines file of events, print one
//! JSON result per event, and check them against expectations.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::Value;

use weir::testing::{TestPlugin, expect, fixtures};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The plugin component (its manifest is NAME.toml beside it unless --manifest is given).
    plugin: PathBuf,
    /// Events to feed it, one JSON object per line.
    #[arg(long)]
    events: PathBuf,
    /// Expected results, one JSON object per event, matched as a subset of each result.
    #[arg(long)]
    expect: Option<PathBuf>,
    /// The plugin manifest, if not beside the component.
    #[arg(long)]
    manifest: Option<PathBuf>,
}

/// Exit status when an expectation fails; 2 is for errors (bad input files,
/// a plugin that does not load), as with most test tools.
const EXIT_MISMATCH: u8 = 1;
const EXIT_ERROR: u8 = 2;

pub fn run(args: TestArgs) -> ExitCode {
    match execute(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(EXIT_MISMATCH),
        Err(e) => {
            eprintln!("weir test: {}", super::describe(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Non-empty lines of a JSON Lines file, with their line numbers.
fn read_lines(path: &PathBuf) -> anyhow::Result<Vec<(usize, String)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if !line.trim().is_empty() && !line.trim_start().starts_with("//") {
            lines.push((i + 1, line));
        }
    }
    Ok(lines)
}

/// Runs the events; returns the number of events whose expectation failed.
fn execute(args: &TestArgs) -> anyhow::Result<usize> {
    let events = read_lines(&args.events)?
        .into_iter()
        .map(|(n, line)| {
            fixtures::parse_event(&line)
                .map_err(|e| anyhow::anyhow!("{}:{n}: invalid event: {e}", args.events.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let expectations = match &args.expect {
        None => None,
        Some(path) => {
            let lines = read_lines(path)?;
            let parsed = lines
                .into_iter()
                .map(|(n, line)| {
                    serde_json::from_str::<Value>(&line)
                        .map(|v| (n, v))
                        .map_err(|e| anyhow::anyhow!("{}:{n}: invalid JSON: {e}", path.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(
                parsed.len() == events.len(),
                "{} has {} expectations for {} events in {}",
                path.display(),
                parsed.len(),
                events.len(),
                args.events.display()
            );
            Some(parsed)
        }
    };
    let mut plugin = match &args.manifest {
        Some(manifest) => TestPlugin::load_with_manifest(&args.plugin, manifest)?,
        None => TestPlugin::load(&args.plugin)?,
    };
    let mut failed = 0;
    let stdout = std::io::stdout();
    for (i, event) in events.into_iter().enumerate() {
        // Report the id and sequence the plugin saw, not the blank ones
        // of the file.
        let event = plugin.number(event);
        let invocation = plugin.handle(event.clone());
        let result = fixtures::result_json(&event, &invocation);
        writeln!(stdout.lock(), "{result}")?;
        if let Some(expectations) = &expectations {
            let (line, expected) = &expectations[i];
            let problems = expect::mismatches(expected, &result);
            if !problems.is_empty() {
                failed += 1;
                eprintln!("FAIL event {} (expectation line {line}):", i + 1);
                for p in problems {
                    eprintln!("  {p}");
                }
            }
        }
    }
    if let Some(expectations) = &expectations {
        let total = expectations.len();
        eprintln!("weir test: {} passed, {failed} failed", total - failed);
    }
    Ok(failed)
}
