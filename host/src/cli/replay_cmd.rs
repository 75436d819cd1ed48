//! `weir replay`: run a candidate version over a range of history with no
//! effects, and compare what it would have emitted with the live plugin's
//! outputs.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};

use weir::event::Emitted;
use weir::manifest::Manifest;
use weir::outcome::OutcomeKind;
use weir::replay::candidate::{self, Bound, Overlay, Range, Run, Verdict};
use weir::sandbox::plugin::Plugin;
use weir::sandbox::{Sandbox, SandboxConfig};
use weir::testing::fixtures;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The candidate component (its manifest is NAME.toml beside it unless
    /// --manifest is given).
    candidate: PathBuf,
    /// The candidate's manifest, if not beside the component.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// The host configuration (NATS connection, state bucket names).
    #[arg(long, short, default_value = "weir.toml")]
    config: PathBuf,
    /// The stream to read (default: the candidate manifest's).
    #[arg(long)]
    stream: Option<String>,
    /// Subject filters, comma-separated (default: the candidate manifest's).
    #[arg(long, value_delimiter = ',')]
    subjects: Vec<String>,
    /// The first event: a stream sequence or an RFC 3339 time (default: the
    /// first the stream holds).
    #[arg(long)]
    from: Option<String>,
    /// The last event, inclusive (default: the last stored when the replay
    /// starts).
    #[arg(long)]
    to: Option<String>,
    /// Most events to run.
    #[arg(long, default_value = "10000")]
    limit: usize,
    /// Compare with what this live plugin emitted for the same events, and
    /// exit with status 1 on any difference. The candidate reads this
    /// plugin's current state (read-only); without --against, the state of
    /// the plugin named like the candidate, if there is one.
    #[arg(long)]
    against: Option<String>,
    /// Streams holding the live plugin's outputs, comma-separated (default:
    /// the streams capturing the subjects the candidate emits on).
    #[arg(long, value_delimiter = ',')]
    outputs: Vec<String>,
    /// One JSON object per event, then a summary object.
    #[arg(long)]
    json: bool,
}

/// 1 is for differences, so a CI step can gate a deploy on it; 2 for errors.
const EXIT_DIFFERENT: u8 = 1;
const EXIT_ERROR: u8 = 2;

pub fn run(args: ReplayArgs) -> ExitCode {
    match execute(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_DIFFERENT),
        Err(e) => {
            eprintln!("weir replay: {}", super::describe(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Whether the candidate matched the live plugin (or there was nothing to
/// compare with).
fn execute(args: ReplayArgs) -> anyhow::Result<bool> {
    let config = super::run_cmd::load_config(&args.config, &None)?;
    let parse = |text: &Option<String>, flag: &str| {
        text.as_deref()
            .map(Bound::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let (from, to) = (parse(&args.from, "--from")?, parse(&args.to, "--to")?);
    anyhow::ensure!(args.limit > 0, "--limit must be at least 1");
    if let Some(name) = &args.against {
        weir::names::validate_plugin_name(name).map_err(anyhow::Error::msg)?;
    }
    let plugin = load_candidate(&args, &config)?;
    let manifest = plugin.manifest();
    let range = Range {
        stream: args
            .stream
            .clone()
            .unwrap_or_else(|| manifest.stream.clone()),
        subjects: match args.subjects.is_empty() {
            true => manifest.subjects.clone(),
            false => args.subjects.clone(),
        },
        from,
        to,
        limit: args.limit,
    };
    super::runtime()?.block_on(async {
        let client = weir::jetstream::connection::connect(&config).await?;
        let js = async_nats::jetstream::new(client);
        let events = candidate::read_events(&js, &range).await?;
        let Some(first) = events.first() else {
            eprintln!("no events of {} in that range", range.stream);
            return Ok(true);
        };
        let since = first.published;
        let state_of = args.against.as_deref().unwrap_or(plugin.name());
        let bucket = weir::jetstream::store::bucket_name(&config.state, state_of);
        let live_state = js.get_key_value(&bucket).await.ok();
        if live_state.is_none() {
            eprintln!("no state bucket {bucket}: the candidate starts from empty state");
        }
        let runs = candidate::run_all(&plugin, events, Arc::new(Overlay::new(live_state))).await;
        let live = match &args.against {
            None => None,
            Some(name) => {
                let streams: BTreeSet<String> = match args.outputs.is_empty() {
                    false => args.outputs.iter().cloned().collect(),
                    true => candidate::streams_capturing(&js, &runs).await?,
                };
                anyhow::ensure!(
                    !streams.is_empty(),
                    "the candidate emitted nothing, so it is not known where {name}'s outputs are: name their streams with --outputs"
                );
                let causes: HashSet<&str> =
                    runs.iter().map(|r| r.stored.event.id.as_str()).collect();
                let found = candidate::live_outputs(&js, name, &streams, since, &causes).await?;
                Some(found)
            }
        };
        let mut report = Report::default();
        for run in &runs {
            let live = live
                .as_ref()
                .map(|found| found.get(&run.stored.event.id).cloned().unwrap_or_default());
            let verdict = live
                .as_deref()
                .map(|live| Verdict::of(&run.invocation.emitted, live));
            report.count(run, verdict);
            if args.json {
                println!("{}", event_json(run, live.as_deref(), verdict));
            } else {
                print!("{}", event_text(run, live.as_deref(), verdict));
            }
        }
        if args.json {
            println!("{}", json!({ "summary": report.json(&range, args.against.as_deref()) }));
        } else {
            println!("{}", report.text(&range, args.against.as_deref()));
        }
        Ok(report.differences() == 0)
    })
}

fn load_candidate(args: &ReplayArgs, config: &weir::config::HostConfig) -> anyhow::Result<Plugin> {
    let mut sandbox_config = SandboxConfig::with_default_cache();
    if let Some(dir) = &config.runtime.cache_dir {
        sandbox_config.cache_dir = Some(dir.clone());
    }
    let sandbox = Sandbox::new(sandbox_config)?;
    let path = &args.candidate;
    anyhow::ensure!(
        path.is_file(),
        "candidate {} does not exist",
        path.display()
    );
    let loaded = match &args.manifest {
        Some(manifest) => Manifest::load(manifest)
            .map_err(anyhow::Error::from)
            .and_then(|m| Ok(sandbox.load_with_manifest(path, m)?)),
        None => sandbox.load(path).map_err(anyhow::Error::from),
    };
    loaded.with_context(|| format!("candidate {} is not a plugin Weir can run", path.display()))
}

#[derive(Default)]
struct Report {
    ran: usize,
    ok: usize,
    rejected: usize,
    retried: usize,
    failed: usize,
    first: u64,
    last: u64,
    verdicts: [usize; 4],
}

impl Report {
    fn count(&mut self, run: &Run, verdict: Option<Verdict>) {
        let sequence = run.stored.event.sequence;
        if self.ran == 0 {
            self.first = sequence;
        }
        self.last = sequence;
        self.ran += 1;
        match run.invocation.outcome.kind() {
            OutcomeKind::Ok => self.ok += 1,
            OutcomeKind::Reject => self.rejected += 1,
            OutcomeKind::Retry => self.retried += 1,
            _ => self.failed += 1,
        }
        if let Some(v) = verdict {
            self.verdicts[v as usize] += 1;
        }
    }

    fn differences(&self) -> usize {
        self.verdicts[1..].iter().sum()
    }

    fn text(&self, range: &Range, against: Option<&str>) -> String {
        let mut text = format!(
            "ran {} events of {} (sequences {}..={}), nothing published, committed or acked: {} ok, {} rejected, {} asked to retry, {} failed",
            self.ran,
            range.stream,
            self.first,
            self.last,
            self.ok,
            self.rejected,
            self.retried,
            self.failed
        );
        if let Some(name) = against {
            let [same, different, only_candidate, only_live] = self.verdicts;
            text.push_str(&format!(
                "\nagainst {name}: {same} same, {different} different, {only_candidate} only in candidate, {only_live} only in live"
            ));
        }
        text
    }

    fn json(&self, range: &Range, against: Option<&str>) -> Value {
        let mut summary = json!({
            "stream": range.stream,
            "events": self.ran,
            "first_sequence": self.first,
            "last_sequence": self.last,
            "ok": self.ok,
            "rejected": self.rejected,
            "retry": self.retried,
            "failed": self.failed,
        });
        if let Some(name) = against {
            let [same, different, only_candidate, only_live] = self.verdicts;
            summary["against"] = json!(name);
            summary["same"] = json!(same);
            summary["different"] = json!(different);
            summary["only_in_candidate"] = json!(only_candidate);
            summary["only_in_live"] = json!(only_live);
        }
        summary
    }
}

fn event_json(run: &Run, live: Option<&[Emitted]>, verdict: Option<Verdict>) -> Value {
    let mut out = fixtures::result_json(&run.stored.event, &run.invocation);
    out["sequence"] = json!(run.stored.event.sequence);
    out["subject"] = json!(run.stored.event.subject);
    if let (Some(live), Some(verdict)) = (live, verdict) {
        out["verdict"] = json!(verdict);
        out["live"] = fixtures::emitted_json(live);
    }
    out
}

fn event_text(run: &Run, live: Option<&[Emitted]>, verdict: Option<Verdict>) -> String {
    let event = &run.stored.event;
    let invocation = &run.invocation;
    let what = match invocation.outcome.is_ok() {
        true => format!("emitted {}", invocation.emitted.len()),
        false => invocation.outcome.to_string(),
    };
    let mut text = match verdict {
        Some(v) => format!(
            "{:<17} {:>8}  {}  {what}\n",
            v.label(),
            event.sequence,
            event.id
        ),
        None => format!("{:>8}  {}  {what}\n", event.sequence, event.id),
    };
    if matches!(verdict, Some(v) if v != Verdict::Same) {
        for (side, outputs) in [
            ("candidate", invocation.emitted.as_slice()),
            ("live", live.unwrap_or_default()),
        ] {
            for e in outputs {
                text.push_str(&format!(
                    "    {side:<9}  {} {}\n",
                    e.subject,
                    preview(&e.payload)
                ));
            }
        }
    }
    text
}

fn preview(payload: &[u8]) -> String {
    const MAX: usize = 120;
    match std::str::from_utf8(payload) {
        Ok(text) if text.chars().count() > MAX => {
            format!("{}…", text.chars().take(MAX).collect::<String>())
        }
        Ok(text) => text.to_owned(),
        Err(_) => format!("<{} bytes of binary>", payload.len()),
    }
}
