//! `weir run`: serve the plugin directory against a NATS server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::LogFormat;
use weir::config::HostConfig;
use weir::supervisor::{Supervisor, shutdown_signal};
use weir::telemetry::subscriber::Telemetry;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The host configuration.
    #[arg(long, short, default_value = "weir.toml")]
    config: PathBuf,
    /// Serve this plugin directory instead of the config's.
    #[arg(long)]
    plugins: Option<PathBuf>,
}

/// The configuration with command-line overrides applied.
pub(super) fn load_config(config: &Path, plugins: &Option<PathBuf>) -> anyhow::Result<HostConfig> {
    let mut config = if config.exists() {
        HostConfig::load(config)?
    } else if config.as_os_str() == "weir.toml" {
        // No config file at the default place: run on defaults.
        HostConfig::parse("", &std::env::current_dir()?).map_err(anyhow::Error::msg)?
    } else {
        anyhow::bail!("config file {} does not exist", config.display());
    };
    if let Some(dir) = plugins {
        config.plugins.dir = std::path::absolute(dir)?;
    }
    Ok(config)
}

pub fn run(args: RunArgs, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    let config = load_config(&args.config, &args.plugins)?;
    let telemetry = init_telemetry(&config, log_format)?;
    let served = super::runtime()?.block_on(serve(config));
    telemetry.shutdown();
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Logs and traces for a serving host, set up before its runtime starts.
pub(super) fn init_telemetry(
    config: &HostConfig,
    log_format: LogFormat,
) -> anyhow::Result<Telemetry> {
    weir::telemetry::subscriber::init("info", log_format.is_json(), Some(&config.telemetry))
}

/// Run the host until SIGINT/SIGTERM, then shut down gracefully.
pub(super) async fn serve(config: HostConfig) -> anyhow::Result<()> {
    let host = Supervisor::start(config).await?;
    let (plugins, failed) = (host.plugins().await.len(), host.failures().await.len());
    tracing::info!(plugins, failed, "weir is running");
    shutdown_signal().await;
    tracing::info!("shutting down");
    host.shutdown().await;
    Ok(())
}
