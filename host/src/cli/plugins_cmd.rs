//! `weir plugins`: see and remove the plugins of running hosts, over NATS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use weir::jetstream::generation::{self, ResetTo};
use weir::jetstream::plugin_bucket::PluginBucket;
use weir::supervisor::PluginInfo;
use weir::supervisor::control::{self, Request};

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
    /// directories, and its deployment from the plugin bucket if it has
    /// one. Its durable consumer is kept (re-adding the plugin resumes
    /// where it stopped) unless --delete-consumer is given.
    Remove {
        name: String,
        /// Also delete the plugin's durable consumer and start its next
        /// generation: a re-added plugin starts from its manifest's start
        /// position again and runs those events again, with effects.
        #[arg(long)]
        delete_consumer: bool,
    },
    /// Deploy a plugin version to every host configured with `[plugins]
    /// bucket`: validated (a component of the plugin world with a valid
    /// manifest), uploaded once, and served by each host through its usual
    /// safe swap. Waits until every running host serves it.
    Deploy {
        /// The component; the plugin is named after its file stem.
        wasm: PathBuf,
        /// Its manifest (default: NAME.toml beside it).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// How long to wait for running hosts to serve it, in seconds.
        #[arg(long, default_value = "60")]
        converge_s: u64,
    },
    /// Return a plugin deployed through the bucket to its previous release,
    /// on every host.
    Rollback {
        name: String,
        /// How long to wait for running hosts to serve it, in seconds.
        #[arg(long, default_value = "60")]
        converge_s: u64,
    },
    /// Re-run a plugin's history, with effects: its outputs are published
    /// again and its state updated again (state is kept, not cleared).
    ///
    /// The plugin moves to a new generation: a new durable consumer starting
    /// at --to, and done records of its own, so every event from there runs
    /// once more; within the generation exactly-once holds as always.
    /// Running hosts switch within about a second (events in flight finish
    /// first); hosts started later start in the new generation. Restarts and
    /// new versions never re-run anything.
    Reset {
        name: String,
        /// Where the re-run starts: `all` (all the stream holds),
        /// `sequence N` or `time T` (RFC 3339, e.g. 2026-01-31T00:00:00Z).
        #[arg(long, num_args = 1..=2, value_names = ["WHERE", "VALUE"], required = true)]
        to: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// How long to wait for running hosts to switch, in seconds.
        #[arg(long, default_value = "30")]
        converge_s: u64,
    },
}

pub fn run(args: PluginsArgs) -> anyhow::Result<ExitCode> {
    let config = super::run_cmd::load_config(&args.config, &None)?;
    let wait = Duration::from_millis(args.wait_ms);
    let subject = config.control.subject();
    let token = match (&args.token_file, std::env::var("WEIR_CONTROL_TOKEN")) {
        (Some(file), _) => weir::secret::read_token(None, Some(file), "--token-file")?,
        (None, Ok(token)) if !token.is_empty() => Some(token),
        _ => config.control.token()?,
    };

    super::runtime()?.block_on(async {
        let client = weir::jetstream::connection::connect(&config).await?;
        let ask = || control::ask(&client, &subject, &Request::List, token.as_deref(), wait);
        match args.command {
            PluginsCommand::List { json } => {
                let answers = ask().await?;
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
                        "  {:<20} {:<13} {:<9} {:>4} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  subjects",
                        "plugin",
                        "version",
                        "status",
                        "gen",
                        "processed",
                        "retried",
                        "dead",
                        "skipped",
                        "lag",
                        "p99 ms"
                    );
                    for p in &answer.plugins {
                        println!(
                            "  {:<20} {:<13} {:<9} {:>4} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}  {} ({})",
                            p.name,
                            p.version,
                            p.status,
                            p.generation,
                            p.counters.processed,
                            p.counters.retried,
                            p.counters.dead_lettered,
                            p.counters.duplicates,
                            p.counters.lag.pending,
                            p.counters
                                .ack_p99_us
                                .map_or("-".to_owned(), |us| format!("{:.2}", us as f64 / 1e3)),
                            p.subjects.join(", "),
                            p.stream
                        );
                        if let Some(error) = &p.error {
                            println!("    error: {error}");
                        }
                    }
                }
                let js = async_nats::jetstream::new(client.clone());
                if !json && let Some(bucket) = PluginBucket::open(&js, &config.plugins, false).await? {
                    println!("bucket {}", bucket.name());
                    for (name, d) in bucket.deployments().await? {
                        let serving = answers
                            .iter()
                            .filter(|a| a.plugins.iter().any(|p| p.name == name && p.version == d.version))
                            .count();
                        println!(
                            "  {name:<20} {:<13} deployed {}, served by {serving} of {} hosts{}",
                            d.version,
                            d.deployed_at,
                            answers.len(),
                            if d.previous.is_empty() { String::new() } else { format!(" ({} earlier releases)", d.previous.len()) }
                        );
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
                let js = async_nats::jetstream::new(client.clone());
                // First, or a host would write the files back from the bucket.
                let undeployed = match PluginBucket::open(&js, &config.plugins, false).await? {
                    Some(bucket) if bucket.remove(&name).await? => {
                        println!("removed {name}'s deployment from bucket {}", bucket.name());
                        true
                    }
                    _ => false,
                };
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
                    if undeployed {
                        return Ok(ExitCode::SUCCESS);
                    }
                    anyhow::bail!("no running host serves a plugin named {name}");
                };
                if delete_consumer {
                    let mut number = 0;
                    if let Some(bucket) = generation::store_bucket(&js, &config.state, &name).await? {
                        number = generation::read(&bucket).await?.0.number;
                        let next = generation::advance(
                            &bucket,
                            None,
                            "weir plugins remove --delete-consumer",
                        )
                        .await?;
                        println!(
                            "{name} moved to generation {}: re-added, it runs from its manifest's start position again, with effects",
                            next.number
                        );
                    }
                    let durable = generation::durable_name(&name, number);
                    js.delete_consumer_from_stream(&durable, &stream)
                        .await
                        .with_context(|| format!("deleting consumer {durable} on {stream}"))?;
                    println!("deleted consumer {durable} on stream {stream}");
                }
                Ok(ExitCode::SUCCESS)
            }
            PluginsCommand::Reset {
                name,
                to,
                yes,
                converge_s,
            } => {
                let to = ResetTo::parse(&to).map_err(anyhow::Error::msg)?;
                weir::names::validate_plugin_name(&name).map_err(anyhow::Error::msg)?;
                let js = async_nats::jetstream::new(client.clone());
                let Some(bucket) = generation::store_bucket(&js, &config.state, &name).await? else {
                    anyhow::bail!(
                        "plugin {name} has no store bucket ({}) on this NATS: it never ran here, so there is no history to re-run",
                        weir::jetstream::store::bucket_name(&config.state, &name)
                    );
                };
                let question = format!(
                    "re-run {name}'s history from {to} with effects (outputs published again, state updated again)?"
                );
                if !yes && !super::confirm(&question)? {
                    println!("nothing changed");
                    return Ok(ExitCode::FAILURE);
                }
                let next =
                    generation::advance(&bucket, Some(to.clone()), &format!("weir plugins reset --to {to}"))
                        .await?;
                println!("{name} moved to generation {} starting at {to}", next.number);
                let reached = |p: &PluginInfo| p.generation >= next.number;
                converge(ask, &name, false, reached, Duration::from_secs(converge_s)).await
            }
            PluginsCommand::Deploy {
                wasm,
                manifest,
                converge_s,
            } => {
                let js = async_nats::jetstream::new(client.clone());
                let bucket = open_bucket(&js, &config).await?;
                let release = validate_release(&config, &client, &wasm, manifest).await?;
                let name = release.name;
                let deployment = bucket
                    .deploy(&name, &release.version, &release.manifest, &release.wasm)
                    .await?;
                println!(
                    "deployed {name} version {} (release {}) to bucket {}",
                    deployment.version,
                    deployment.release,
                    bucket.name()
                );
                let reached = |p: &PluginInfo| p.version == deployment.version;
                converge(ask, &name, true, reached, Duration::from_secs(converge_s)).await
            }
            PluginsCommand::Rollback { name, converge_s } => {
                let js = async_nats::jetstream::new(client.clone());
                let bucket = open_bucket(&js, &config).await?;
                let deployment = bucket.rollback(&name).await?;
                println!(
                    "{name} rolled back to version {} (release {})",
                    deployment.version, deployment.release
                );
                let reached = |p: &PluginInfo| p.version == deployment.version;
                converge(ask, &name, true, reached, Duration::from_secs(converge_s)).await
            }
        }
    })
}

/// The deployment's plugin bucket; an error when the config names none.
async fn open_bucket(
    js: &async_nats::jetstream::Context,
    config: &weir::config::HostConfig,
) -> anyhow::Result<PluginBucket> {
    PluginBucket::open(js, &config.plugins, true).await?.context(
        "the config names no plugin bucket: set `bucket` under [plugins] (the hosts need it too)",
    )
}

/// A release checked as a host would check it before upload.
struct Release {
    name: String,
    version: weir::sandbox::plugin::PluginVersion,
    manifest: String,
    wasm: Vec<u8>,
}

async fn validate_release(
    config: &weir::config::HostConfig,
    client: &async_nats::Client,
    wasm: &std::path::Path,
    manifest: Option<PathBuf>,
) -> anyhow::Result<Release> {
    let name = wasm
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{} has no file name to name the plugin by", wasm.display()))?
        .to_owned();
    weir::names::validate_plugin_name(&name).map_err(anyhow::Error::msg)?;
    let manifest_path = manifest.unwrap_or_else(|| weir::manifest::Manifest::path_for(wasm));
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading the manifest {}", manifest_path.display()))?;
    let bytes = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    let invalid = |why: String| anyhow::anyhow!("{}: {why}", manifest_path.display());
    let parsed = weir::manifest::Manifest::parse(&text).map_err(invalid)?;
    parsed
        .limits
        .check_fits(client.server_info().max_payload)
        .map_err(invalid)?;
    let mut sandbox_config = weir::sandbox::SandboxConfig::with_default_cache();
    if let Some(dir) = &config.runtime.cache_dir {
        sandbox_config.cache_dir = Some(dir.clone());
    }
    let (path, plugin_name) = (wasm.to_owned(), name.clone());
    // The bytes go to the loader and back, rather than being copied for it,
    // and the version is the one it took.
    let (bytes, version) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let sandbox = weir::sandbox::Sandbox::new(sandbox_config)?;
        let plugin = sandbox.load_bytes(plugin_name, &path, &bytes, parsed)?;
        Ok((bytes, plugin.version().clone()))
    })
    .await?
    .with_context(|| format!("{} is not a plugin Weir can run", wasm.display()))?;
    Ok(Release {
        version,
        name,
        manifest: text,
        wasm: bytes,
    })
}

/// Wait until every running host's `name` has `reached` the goal,
/// reporting each host once it has. With `every_host`, a host that does
/// not serve `name` has not reached it (a deploy); without, it is left out
/// (a reset only concerns the hosts running the plugin).
async fn converge<F, Fut>(
    ask: F,
    name: &str,
    every_host: bool,
    reached: impl Fn(&PluginInfo) -> bool,
    limit: Duration,
) -> anyhow::Result<ExitCode>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<control::Response>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut reported = std::collections::BTreeSet::new();
    loop {
        let mut behind = Vec::new();
        let mut counted = 0;
        for answer in ask().await? {
            let plugin = answer.plugins.iter().find(|p| p.name == name);
            match plugin {
                None if !every_host => continue,
                None => behind.push(format!("{} (not serving {name})", answer.host)),
                Some(p) if reached(p) => {
                    if reported.insert(answer.host.clone()) {
                        println!(
                            "host {}: {name} runs in generation {}, version {}",
                            answer.host, p.generation, p.version
                        );
                    }
                }
                Some(p) => behind.push(format!(
                    "{} (version {}, generation {}{})",
                    answer.host,
                    p.version,
                    p.generation,
                    p.error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )),
            }
            counted += 1;
        }
        if counted == 0 {
            println!("no running host serves {name}; hosts pick the change up when they start it");
            return Ok(ExitCode::SUCCESS);
        }
        if behind.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "not there after {limit:?}: {} (`weir plugins list` shows each host's version and generation)",
                behind.join(", ")
            );
            return Ok(ExitCode::FAILURE);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
