//! `weir plugins`: see and remove the plugins of running hosts, over NATS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::control::{self, Request};

#[derive(Debug, clap::Args)]
pub struct PluginsArgs {
    /// The host configuration (for the NATS connection).
    #[arg(long, short, global = true, default_value = "weir.toml")]
    config: PathBuf,
    /// How long to collect answers from hosts.
    #[arg(long, global = true, default_value = "1000")]
    wait_ms: u64,
    /// A file holding the control token to present (default:
    /// $WEIR_CONTROL_TOKEN, else the config's `control.token` or
    /// `control.token-file`). Removing needs it; listing needs it (or the
    /// admin token) when the hosts have an admin token.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: PluginsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PluginsCommand {
    /// List the plugins every running host serves: name, version, subjects, counters.
    List {
        /// Print JSON (one object per host) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop a plugin on every host and remove its files from their plugin
    /// directories. Its durable consumer is kept (re-adding the plugin
    /// resumes where it stopped) unless --delete-consumer is given.
    Remove {
        name: String,
        /// Also delete the plugin's durable consumer: a re-added plugin then
        /// starts from its manifest's start position again.
        #[arg(long)]
        delete_consumer: bool,
    },
}

pub fn run(args: PluginsArgs) -> anyhow::Result<ExitCode> {
    let config = super::run_cmd::load_config(&args.config, &None)?;
    let wait = Duration::from_millis(args.wait_ms);
    let subject = config.control.subject();
    let token = match (&args.token_file, std::env::var("WEIR_CONTROL_TOKEN")) {
        (Some(file), _) => crate::secret::read_token(None, Some(file), "--token-file")?,
        (None, Ok(token)) if !token.is_empty() => Some(token),
        _ => config.control.token()?,
    };

    super::runtime()?.block_on(async {
        let client = crate::nats::connect(&config).await?;
        match args.command {
            PluginsCommand::List { json } => {
                let answers =
                    control::ask(&client, &subject, &Request::List, token.as_deref(), wait).await?;
                if answers.is_empty() {
                    anyhow::bail!("no running weir host answered on {}", config.nats_url());
                }
                let refused = answers.iter().filter(|a| a.error.is_some()).count();
                for answer in &answers {
                    if json {
                        println!("{}", serde_json::to_string(answer)?);
                        continue;
                    }
                    if let Some(error) = &answer.error {
                        eprintln!("host {}: {error}", answer.host);
                        continue;
                    }
                    println!("host {}", answer.host);
                    println!(
                        "  {:<20} {:<13} {:<9} {:>10} {:>8} {:>8} {:>8} {:>8}  subjects",
                        "plugin",
                        "version",
                        "status",
                        "processed",
                        "retried",
                        "dead",
                        "skipped",
                        "lag"
                    );
                    for p in &answer.plugins {
                        println!(
                            "  {:<20} {:<13} {:<9} {:>10} {:>8} {:>8} {:>8} {:>8}  {} ({})",
                            p.name,
                            p.version,
                            p.status,
                            p.counters.processed,
                            p.counters.retried,
                            p.counters.dead_lettered,
                            p.counters.skipped_duplicates,
                            p.counters.lag.pending,
                            p.subjects.join(", "),
                            p.stream
                        );
                        if let Some(error) = &p.error {
                            println!("    error: {error}");
                        }
                    }
                }
                Ok(if refused == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            PluginsCommand::Remove {
                name,
                delete_consumer,
            } => {
                let answers = control::ask(
                    &client,
                    &subject,
                    &Request::Remove { name: name.clone() },
                    token.as_deref(),
                    wait,
                )
                .await?;
                let mut stream = None;
                for answer in &answers {
                    match (&answer.error, &answer.removed_from_stream) {
                        (Some(e), _) => eprintln!("host {}: {e}", answer.host),
                        (None, Some(s)) => {
                            println!("host {}: removed {name}", answer.host);
                            stream = Some(s.clone());
                        }
                        (None, None) => {}
                    }
                }
                let Some(stream) = stream else {
                    if let Some(refusal) = answers.iter().find_map(|a| a.error.as_ref()) {
                        anyhow::bail!("{name} was not removed: {refusal}");
                    }
                    anyhow::bail!("no running host serves a plugin named {name}");
                };
                if delete_consumer {
                    let js = async_nats::jetstream::new(client);
                    let durable = crate::source::durable_name(&name);
                    js.delete_consumer_from_stream(&durable, &stream)
                        .await
                        .with_context(|| format!("deleting consumer {durable} on {stream}"))?;
                    println!("deleted consumer {durable} on stream {stream}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
