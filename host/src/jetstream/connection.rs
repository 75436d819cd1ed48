//! Connecting to NATS and making sure the streams the host needs exist.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};

use crate::config::{HostConfig, StreamConfig};

/// Connect as `config` says. The client reconnects by itself forever after
/// the first connection; a first connection that fails is an error, so a
/// wrong URL is reported at start-up instead of hanging.
pub async fn connect(config: &HostConfig) -> anyhow::Result<async_nats::Client> {
    let n = &config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(n.name.clone().unwrap_or_else(|| "weir".into()))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                // A permissions violation lands here: the operator must see it.
                async_nats::Event::ServerError(e) => tracing::warn!("NATS server error: {e}"),
                other => tracing::debug!("NATS event: {other}"),
            }
        });
    if let Some(path) = &n.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?;
    }
    if let (Some(user), Some(password)) = (&n.user, &n.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &n.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &n.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .with_context(|| format!("reading nkey seed {}", path.display()))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if n.tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &n.tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&n.tls.cert_file, &n.tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let url = config.nats_url();
    // A comma-separated list names several servers of one cluster; the
    // client takes them as a list, not as one string.
    let servers = url
        .split(',')
        .map(|one| {
            one.trim()
                .parse::<async_nats::ServerAddr>()
                .with_context(|| format!("`nats.url`: {one:?} is not a NATS server URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    options
        .connect(servers)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// Create `spec` if no stream of that name exists; an existing stream is
/// left as its owner configured it.
pub async fn ensure_stream(js: &jetstream::Context, spec: &StreamConfig) -> anyhow::Result<()> {
    let config = stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        duplicate_window: Duration::from_secs(spec.duplicate_window_s),
        max_age: Duration::from_secs(spec.max_age_s),
        storage: stream::StorageType::File,
        num_replicas: spec.replicas,
        ..Default::default()
    };
    // A cluster electing a leader, or busy, times out requests for a while,
    // and one still forming has too few peers to place replicas on; that is
    // no reason to give up starting.
    let deadline = tokio::time::Instant::now() + STREAM_SETUP_PATIENCE;
    let mut pause = Duration::from_millis(250);
    loop {
        match js.get_or_create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if cluster_not_ready(&e) && tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(stream = %spec.name, "creating the stream: {e}; retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).with_context(|| format!("creating stream {}", spec.name)),
        }
    }
}

/// Whether creating a stream failed only because the server or cluster is
/// not ready yet.
fn cluster_not_ready(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as Kind;
    match e.kind() {
        Kind::TimedOut | Kind::JetStreamUnavailable => true,
        Kind::JetStream(e) => e.error_code() == jetstream::ErrorCode::CLUSTER_NO_PEERS,
        _ => false,
    }
}

/// How long start-up keeps retrying a stream the server is too busy (or
/// not yet able) to create.
const STREAM_SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// Every stream of `config`, plus the dead-letter stream.
pub async fn ensure_streams(js: &jetstream::Context, config: &HostConfig) -> anyhow::Result<()> {
    for spec in &config.streams {
        ensure_stream(js, spec).await?;
    }
    let dlq = &config.dead_letter;
    ensure_stream(
        js,
        &StreamConfig {
            name: dlq.stream.clone(),
            subjects: vec![format!("{}.>", dlq.subject_prefix)],
            duplicate_window_s: 120,
            max_age_s: 0,
            replicas: dlq.replicas,
        },
    )
    .await
}
