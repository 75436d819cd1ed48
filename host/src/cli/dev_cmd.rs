//! `weir dev`: the batteries-included way to run locally. Uses the
//! configured NATS server when one answers; otherwise starts a private
//! nats-server with its store under `.weir/`. With `--cluster N` it always
//! starts a private N-node JetStream cluster, with everything Weir creates
//! replicated three ways, so fail-over can be tried by killing a node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::LogFormat;
use weir::config::HostConfig;
use weir::dev::{NatsCluster, NatsServer};

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
    /// Start a private JetStream cluster of N nodes (3 to 5) instead of one
    /// server, with streams, state and dead letters replicated three ways.
    #[arg(long, value_name = "N")]
    cluster: Option<usize>,
}

/// The replication `weir dev --cluster` gives what Weir creates.
const CLUSTER_REPLICAS: usize = 3;

pub fn run(args: DevArgs, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    let config = super::run_cmd::load_config(&args.config, &args.plugins)?;
    let telemetry = super::run_cmd::init_telemetry(&config, log_format)?;
    let served = serve(args, config);
    telemetry.shutdown();
    served
}

fn serve(args: DevArgs, mut config: HostConfig) -> anyhow::Result<ExitCode> {
    let runtime = super::runtime()?;
    if let Some(nodes) = args.cluster {
        let _cluster = start_cluster(nodes, &args.state_dir, &mut config)?;
        runtime.block_on(super::run_cmd::serve(config))?;
        return Ok(ExitCode::SUCCESS);
    }
    let reachable = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            weir::jetstream::connection::connect(&config),
        )
        .await
    });
    let _server = match reachable {
        Ok(Ok(_)) => {
            tracing::info!(url = %config.nats_url(), "using the running NATS server");
            None
        }
        _ => {
            let store = args.state_dir.join("nats");
            let server = match local_port(&config.nats_url()) {
                Some(port) => NatsServer::start(&store, port)?,
                None if std::net::TcpListener::bind("127.0.0.1:4222").is_ok() => {
                    NatsServer::start(&store, 4222)?
                }
                None => NatsServer::start_on_free_port(&store, "")?,
            };
            tracing::info!(url = %server.url(), store = %server.store_dir().display(), "started a private nats-server");
            config.nats.url = Some(server.url());
            Some(server)
        }
    };
    runtime.block_on(super::run_cmd::serve(config))?;
    Ok(ExitCode::SUCCESS)
}

/// Start the private cluster and point `config` at it, replicated.
fn start_cluster(
    nodes: usize,
    state_dir: &std::path::Path,
    config: &mut HostConfig,
) -> anyhow::Result<NatsCluster> {
    if !(3..=5).contains(&nodes) {
        anyhow::bail!(
            "--cluster takes 3 to 5 nodes (JetStream needs three for replicas = 3), not {nodes}"
        );
    }
    // The first node takes the configured loopback port, so clients
    // configured the same way find the cluster.
    let first = local_port(&config.nats_url())
        .filter(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok());
    let cluster = NatsCluster::start_kept(&state_dir.join("cluster"), first, nodes)?;
    for (i, node) in cluster.nodes.iter().enumerate() {
        tracing::info!(
            node = format!("n{i}"),
            url = %node.url(),
            pid = node.pid().unwrap_or_default(),
            "cluster node started; `kill -9` it to try fail-over"
        );
    }
    tracing::info!(urls = %cluster.urls(), "started a private nats-server cluster");
    config.nats.url = Some(cluster.urls());
    let replicas = CLUSTER_REPLICAS;
    config.state.replicas = config.state.replicas.max(replicas);
    config.dead_letter.replicas = config.dead_letter.replicas.max(replicas);
    config.plugins.bucket_replicas = config.plugins.bucket_replicas.max(replicas);
    for stream in &mut config.streams {
        stream.replicas = stream.replicas.max(replicas);
    }
    Ok(cluster)
}

/// The port of a loopback URL like `nats://127.0.0.1:4333`: the private
/// server takes the address the configuration points at, so clients
/// configured the same way find it.
fn local_port(url: &str) -> Option<u16> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.rsplit('@').next()?;
    matches!(host, "127.0.0.1" | "localhost")
        .then(|| port.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_port_only_for_loopback() {
        assert_eq!(super::local_port("nats://127.0.0.1:4333"), Some(4333));
        assert_eq!(super::local_port("nats://u:p@localhost:5000"), Some(5000));
        assert_eq!(super::local_port("nats://example.com:4222"), None);
        assert_eq!(super::local_port("nats://127.0.0.1"), None);
    }
}
