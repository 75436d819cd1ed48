//! `weir dlq`: look at the dead-letter stream, and clear it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use weir::jetstream::dlq_store::{DeadLetters, Letter, Selection};

#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    /// The host configuration (NATS connection, dead-letter stream).
    #[arg(long, short, global = true, default_value = "weir.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, clap::Args)]
struct SelectArgs {
    /// Only dead letters of this plugin.
    #[arg(long)]
    plugin: Option<String>,
    /// Only this reason: reject, retry, trap, deadline, out_of_memory,
    /// host_error, too_large, malformed.
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters stored at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
}

impl SelectArgs {
    fn selection(&self) -> anyhow::Result<Selection> {
        let since = self
            .since
            .as_deref()
            .map(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .with_context(|| format!("--since {t:?} is not an RFC 3339 time"))
            })
            .transpose()?;
        Ok(Selection {
            plugin: self.plugin.clone(),
            reason: self.reason.clone(),
            since,
        })
    }

    fn is_empty(&self) -> bool {
        self.plugin.is_none() && self.reason.is_none() && self.since.is_none()
    }
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// One line per dead letter: id, when, plugin, reason, attempts, where
    /// the event came from, its id and the start of its payload.
    List {
        #[command(flatten)]
        select: SelectArgs,
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter in full: its story, the event's headers and payload.
    Show {
        /// The dead letter's id (its sequence in the dead-letter stream).
        id: u64,
    },
    /// Run dead letters again through their plugin's current version (the
    /// one in the plugin directory), with exactly-once effects; only that
    /// plugin sees them. A replayed dead letter is deleted; one that fails
    /// again stays, and its new reason is printed.
    Replay {
        /// Dead letter ids (default: the selection).
        ids: Vec<u64>,
        #[command(flatten)]
        select: SelectArgs,
        /// Every dead letter (needed when no id or selection is given).
        #[arg(long)]
        all: bool,
        /// Say what would be replayed, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete dead letters for good.
    Purge {
        #[command(flatten)]
        select: SelectArgs,
        /// Every dead letter (needed when no selection is given).
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let config = super::run_cmd::load_config(&args.config, &None)?;
    super::runtime()?.block_on(async {
        let client = weir::jetstream::connection::connect(&config).await?;
        let js = async_nats::jetstream::new(client);
        let letters = DeadLetters::open(
            &js,
            &config.dead_letter.stream,
            &config.dead_letter.subject_prefix,
        )
        .await?;
        match args.command {
            DlqCommand::List { select, json } => {
                for letter in letters.list(&select.selection()?).await? {
                    if json {
                        let mut value = serde_json::to_value(&letter)?;
                        value["payload"] = letter.preview(usize::MAX).into();
                        println!("{value}");
                    } else {
                        println!("{}", line(&letter));
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Show { id } => {
                print!("{}", full(&letters.get(id).await?));
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Replay {
                ids,
                select,
                all,
                dry_run,
            } => {
                let chosen = if !ids.is_empty() {
                    let mut chosen = Vec::new();
                    for id in ids {
                        chosen.push(letters.get(id).await?);
                    }
                    chosen
                } else if select.is_empty() && !all {
                    bail!("say which dead letters to replay (ids, --plugin, --reason, --since) or --all");
                } else {
                    letters.list(&select.selection()?).await?
                };
                replay(&config, &js, &letters, chosen, dry_run).await
            }
            DlqCommand::Purge { select, all, yes } => {
                if select.is_empty() && !all {
                    bail!("say which dead letters to purge (--plugin, --reason, --since) or --all");
                }
                let chosen = letters.list(&select.selection()?).await?;
                if chosen.is_empty() {
                    println!("no dead letter matches");
                    return Ok(ExitCode::SUCCESS);
                }
                if !yes && !super::confirm(&format!("delete {} dead letters for good?", chosen.len()))? {
                    println!("nothing deleted");
                    return Ok(ExitCode::FAILURE);
                }
                for letter in &chosen {
                    letters.delete(letter.id).await?;
                }
                println!("deleted {} dead letters", chosen.len());
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Replay `chosen`, plugin by plugin; a summary at the end, and progress
/// on stderr for long runs.
async fn replay(
    config: &weir::config::HostConfig,
    js: &async_nats::jetstream::Context,
    letters: &DeadLetters,
    chosen: Vec<Letter>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use weir::replay::dead_letters::{Replayed, Replayer};
    let mut by_plugin: std::collections::BTreeMap<String, Vec<Letter>> = Default::default();
    for letter in chosen {
        by_plugin
            .entry(letter.plugin.clone())
            .or_default()
            .push(letter);
    }
    let total: usize = by_plugin.values().map(Vec::len).sum();
    if dry_run {
        for letter in by_plugin.values().flatten() {
            println!("would replay {}", line(letter));
        }
        println!("{total} dead letters would be replayed");
        return Ok(ExitCode::SUCCESS);
    }
    let (mut processed, mut already, mut failed, mut done) = (0, 0, 0, 0);
    for (plugin, group) in by_plugin {
        let replayer = Replayer::open(config, js, &plugin).await?;
        eprintln!(
            "replaying {} dead letters of {plugin} with version {}",
            group.len(),
            replayer.version()
        );
        for letter in group {
            match replayer.replay(&letter).await? {
                Replayed::Failed(why) => {
                    failed += 1;
                    println!(
                        "dead letter {} cannot be replayed and stays: {why}",
                        letter.id
                    );
                }
                Replayed::FailedAgain { why, new_letter } => {
                    failed += 1;
                    letters.delete(letter.id).await?;
                    println!(
                        "dead letter {} failed again: {why}; dead letter {new_letter} replaces it with the new reason",
                        letter.id
                    );
                }
                outcome => {
                    letters.delete(letter.id).await?;
                    if outcome == Replayed::Processed {
                        processed += 1;
                    } else {
                        already += 1;
                    }
                }
            }
            done += 1;
            if total >= 100 && done % 100 == 0 {
                eprintln!("  {done}/{total}");
            }
        }
    }
    println!(
        "replayed {processed}, already done before {already}, failed again {failed} (of {total})"
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn line(l: &Letter) -> String {
    format!(
        "{:>8}  {}  {:<16} {:<13} {:>3}x  {} ({}:{})  {}  {}",
        l.id,
        l.stored,
        l.plugin,
        l.reason,
        l.attempts,
        l.subject,
        l.stream,
        l.sequence,
        l.event_id,
        l.preview(60)
    )
}

fn full(l: &Letter) -> String {
    let mut out = format!(
        "dead letter {}, stored {}\n  plugin:   {}\n  reason:   {}\n  error:    {}\n  attempts: {}\n  event:    {} from {} ({} sequence {})\n",
        l.id,
        l.stored,
        l.plugin,
        l.reason,
        l.error,
        l.attempts,
        l.event_id,
        l.subject,
        l.stream,
        l.sequence
    );
    if l.truncated {
        out.push_str("  the payload was cut to fit; the whole event is still in its stream\n");
    }
    out.push_str("headers:\n");
    for (k, v) in &l.headers {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    out.push_str("payload:\n");
    match std::str::from_utf8(&l.payload) {
        Ok(text) => {
            out.push_str(text);
            out.push('\n');
        }
        Err(_) => out.push_str(&format!("  <{} bytes of binary>\n", l.payload.len())),
    }
    out
}
