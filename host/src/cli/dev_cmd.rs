//! `weir dev`: the batteries-included way to run locally. Uses the
//! configured NATS server when one answers; otherwise starts a private
//! nats-server with its store under `.weir/`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::dev::NatsServer;

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The host configuration (optional).
    #[arg(long, short, default_value = "weir.toml")]
    config: PathBuf,
    /// Serve this plugin directory instead of the config's.
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Where the private server keeps its data.
    #[arg(long, default_value = ".weir")]
    state_dir: PathBuf,
}

pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let mut config = super::run_cmd::load_config(&args.config, &args.plugins)?;
    let runtime = super::runtime()?;
    let reachable = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(2), crate::nats::connect(&config)).await
    });
    let _server = match reachable {
        Ok(Ok(_)) => {
            tracing::info!(url = %config.nats_url(), "using the running NATS server");
            None
        }
        _ => {
            let port = if std::net::TcpListener::bind("127.0.0.1:4222").is_ok() {
                4222
            } else {
                crate::dev::free_port()?
            };
            let server = NatsServer::start(&args.state_dir.join("nats"), port)?;
            tracing::info!(url = %server.url(), store = %server.store_dir().display(), "started a private nats-server");
            config.nats.url = Some(server.url());
            Some(server)
        }
    };
    runtime.block_on(super::run_cmd::serve(config))?;
    Ok(ExitCode::SUCCESS)
}
