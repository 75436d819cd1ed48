//! `weir.toml`: how the host connects to NATS and where its plugins are.
//!
//! Parsed strictly and resolved completely (paths made absolute, defaults
//! applied) before anything starts, so a typo fails at start-up with the
//! file and key named, never halfway through a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::names;
use crate::sandbox::LongCalls;

/// The whole host configuration.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HostConfig {
    /// `[nats]`: how to reach the server.
    #[serde(default)]
    pub nats: NatsConfig,
    /// `[plugins]`: where plugins come from.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// `[dead-letter]`: where dead letters go.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    /// Streams the host creates when they do not exist yet. Production
    /// setups often manage streams elsewhere and leave this empty; `weir
    /// dev` and the demo rely on it.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// `[runtime]`: shutdown, ack wait, the compile cache and host-wide guest budgets.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// `[state]`: plugin state and done records.
    #[serde(default)]
    pub state: StateConfig,
    /// `[admin]`: the HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[telemetry]`: lag polling and span export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[control]`: the `weir plugins` subject and who may use it.
    #[serde(default)]
    pub control: ControlConfig,
}

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Default: `$NATS_URL`, else
    /// `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password, with `user`.
    pub password: Option<String>,
    /// A server token.
    pub token: Option<String>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// `[nats.tls]`.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Client name shown by the server's monitoring.
    pub name: Option<String>,
}

/// TLS to the server: whether it is required, whom to trust, and the
/// client certificate for mutual TLS.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// Refuse to connect without TLS.
    #[serde(default)]
    pub required: bool,
    /// CA bundle to verify the server with.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// Where the host finds its plugins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginsConfig {
    /// Directory of `name.wasm` + `name.toml` pairs, relative to the
    /// config file.
    pub dir: PathBuf,
    /// Watch the directory and deploy, update and remove plugins as their
    /// files change.
    #[serde(default = "defaults::watch")]
    pub watch: bool,
    /// Largest `.wasm` file the host reads, in MiB; bigger ones are refused
    /// without being read.
    #[serde(default = "defaults::max_wasm_mb")]
    pub max_wasm_mb: u64,
    /// A NATS Object Store bucket of plugin releases (`weir plugins
    /// deploy`): the host writes each deployed plugin's current release
    /// into `dir` and serves it from there. Created if missing.
    #[serde(default)]
    pub bucket: Option<String>,
    /// Replicas of the bucket's stream when the host creates it.
    #[serde(default = "defaults::replicas")]
    pub bucket_replicas: usize,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            watch: true,
            max_wasm_mb: defaults::max_wasm_mb(),
            bucket: None,
            bucket_replicas: defaults::replicas(),
        }
    }
}

/// Where events that cannot be processed go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeadLetterConfig {
    /// The stream holding dead letters; created if missing.
    pub stream: String,
    /// Dead letters are published on `<prefix>.<plugin>.<original subject>`.
    pub subject_prefix: String,
    /// Copies of the dead-letter stream kept on a cluster.
    pub replicas: usize,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            stream: "WEIR_DLQ".into(),
            subject_prefix: "weir.dlq".into(),
            replicas: 1,
        }
    }
}

/// A stream to create if it does not exist.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StreamConfig {
    /// The stream's name.
    pub name: String,
    /// The subjects it captures.
    pub subjects: Vec<String>,
    /// JetStream's duplicate window: publishes with a `Nats-Msg-Id` seen
    /// within it are dropped. Must cover the longest time an event can take
    /// from first attempt to ack (see ARCHITECTURE.md).
    #[serde(default = "defaults::duplicate_window_s")]
    pub duplicate_window_s: u64,
    /// Discard messages older than this (0 = keep forever).
    #[serde(default)]
    pub max_age_s: u64,
    /// Copies kept on a JetStream cluster (1 for a single server; 3 or 5
    /// on a cluster, so losing a node loses nothing).
    #[serde(default = "defaults::replicas")]
    pub replicas: usize,
}

/// How the host runs plugins as a whole.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeConfig {
    /// How long shutdown waits for in-flight events before releasing them
    /// back to the stream.
    pub shutdown_grace_ms: u64,
    /// Compiled-plugin cache; default `~/.cache/weir/compiled`.
    pub cache_dir: Option<PathBuf>,
    /// Redelivery timer for an unacknowledged event; a handler running
    /// longer sends progress acks so it is not redelivered under it.
    pub ack_wait_ms: u64,
    /// Linear memory all plugin instances together may hold, in MiB. A
    /// growth past it ends that call as a host error (retried later), so
    /// many plugins at their caps cannot take the host's memory.
    pub max_guest_memory_mb: u64,
    /// Guest calls that may run at once, across all plugins; a freed turn
    /// goes to the waiting plugin that has used the least guest CPU.
    /// Default: one per core.
    pub max_running_guest_calls: Option<usize>,
    /// Of those, how many calls that compute past their first epoch tick
    /// may run at once. Default: one fewer than `max-running-guest-calls`
    /// (at least one), so guests that compute for long never hold every
    /// core from nats-server and the host's own I/O, which every other
    /// plugin's events need; set it equal to `max-running-guest-calls` on
    /// a host whose plugins are all CPU-bound.
    pub max_running_long_calls: Option<usize>,
    /// How the guest code of calls that compute past an epoch tick runs
    /// (Linux), so nats-server and the host's own I/O are not held up by
    /// it. `long-slice` (the default) asks for a long time slice, which
    /// woken threads pre-empt, and keeps the call's fair share; it needs
    /// Linux 6.12 or later, else such calls run as `normal`. `idle` runs
    /// them at `SCHED_IDLE`, a shorter tail for other plugins, but such
    /// calls then get the CPU mostly when nothing else wants it (a thread
    /// starved there for 1 ms gets its normal priority back until its next
    /// tick), so a heavy plugin on a busy machine slows down; it needs
    /// `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20, without which the host says
    /// so and uses `long-slice`.
    pub long_calls: LongCalls,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shutdown_grace_ms: 10_000,
            cache_dir: None,
            ack_wait_ms: 30_000,
            max_guest_memory_mb: crate::sandbox::DEFAULT_MEMORY_BUDGET_MB,
            max_running_guest_calls: None,
            max_running_long_calls: None,
            long_calls: LongCalls::default(),
        }
    }
}

/// Durable plugin state and idempotency records.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StateConfig {
    /// KV buckets are named `<prefix>_<plugin>`.
    pub bucket_prefix: String,
    /// Replicas of each bucket (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// How long an idempotency record ("this event is done") is kept. It
    /// must outlast any redelivery of the event: keep it well above the
    /// stream's duplicate window and your longest outage.
    pub done_ttl_s: u64,
    /// Record every finished event so a redelivery is recognised and its
    /// effects are not repeated. Turning it off trades exactly-once effects
    /// for one less write per event.
    pub idempotency: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            bucket_prefix: "weir_state".into(),
            replicas: 1,
            done_ttl_s: 7 * 24 * 3600,
            idempotency: true,
        }
    }
}

/// The admin HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/plugins`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Serve the endpoint (default true when weir is built with its
    /// `admin` feature, as the `weir` binary is; false otherwise).
    pub enabled: bool,
    /// Loopback by default: the endpoint shows plugin names and counters,
    /// so exposing it further is a deliberate choice (with a token).
    pub listen: String,
    /// A bearer token required on `/metrics` and `/plugins`. The health
    /// probes stay open: they reveal nothing and probes rarely carry secrets.
    pub token: Option<String>,
    /// The token read from a file (trailing whitespace ignored).
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: cfg!(feature = "admin"),
            listen: "127.0.0.1:9464".into(),
            token: None,
            token_file: None,
        }
    }
}

impl AdminConfig {
    /// `listen` as a socket address.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.listen.parse().map_err(|e| {
            format!(
                "`admin.listen` {:?} is not an address:port: {e}",
                self.listen
            )
        })
    }

    /// The bearer token, if one is configured.
    pub fn bearer_token(&self) -> anyhow::Result<Option<String>> {
        crate::secret::read_token(self.token.as_deref(), self.token_file.as_deref(), "admin")
    }
}

/// Control requests over NATS (`weir plugins list/remove`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ControlConfig {
    /// Hosts listen on `<subject-prefix>.plugins`. Deployments that share
    /// a NATS account need prefixes of their own, or they control each
    /// other's hosts.
    pub subject_prefix: String,
    /// The secret a request must carry to change anything (remove a
    /// plugin). Without one, hosts refuse every such request.
    pub token: Option<String>,
    /// The token read from a file (trailing whitespace ignored).
    pub token_file: Option<PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            subject_prefix: "weir.control".into(),
            token: None,
            token_file: None,
        }
    }
}

impl ControlConfig {
    /// The subject hosts answer plugin requests on.
    pub fn subject(&self) -> String {
        format!("{}.plugins", self.subject_prefix)
    }

    /// The control token, if one is configured.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        crate::secret::read_token(self.token.as_deref(), self.token_file.as_deref(), "control")
    }
}

/// Consumer-lag polling and OpenTelemetry trace export.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TelemetryConfig {
    /// How often each plugin's consumer info is read for the lag gauges.
    pub lag_poll_ms: u64,
    /// Where spans go over OTLP/HTTP, used verbatim (include `/v1/traces`).
    /// Unset: no export, but `traceparent` is still propagated.
    pub otlp_endpoint: Option<String>,
    /// The OTLP encoding (`http/protobuf`, the default, or `http/json`).
    pub otlp_protocol: OtlpProtocol,
    /// Extra HTTP headers on every export (an API key, say).
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// `service.name` on exported spans.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            lag_poll_ms: 5_000,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            otlp_headers: Default::default(),
            service_name: "weir".into(),
        }
    }
}

/// How spans are encoded for the OTLP/HTTP collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    /// Protocol buffers, what collectors expect by default.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// JSON.
    #[serde(rename = "http/json")]
    HttpJson,
}

mod defaults {
    pub(super) fn duplicate_window_s() -> u64 {
        120
    }

    pub(super) fn watch() -> bool {
        true
    }

    pub(super) fn max_wasm_mb() -> u64 {
        128
    }

    pub(super) fn replicas() -> usize {
        1
    }
}

/// A config file that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {error}", path.display())]
    Read {
        /// The config file's path.
        path: PathBuf,
        /// Shown in the message, not chained as a source, so `{:#}` prints it once.
        error: std::io::Error,
    },
    /// The file is not a valid config.
    #[error("invalid config {}: {message}", path.display())]
    Invalid {
        /// The config file's path.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl HostConfig {
    /// Read, validate and resolve `path`; relative paths inside are taken
    /// from the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parse and validate `text`; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let mut config: HostConfig =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        config.resolve(base);
        config.validate()?;
        Ok(config)
    }

    /// Make relative paths absolute against `base`.
    pub fn resolve(&mut self, base: &Path) {
        let absolute = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        absolute(&mut self.plugins.dir);
        for p in [
            &mut self.nats.credentials_file,
            &mut self.nats.nkey_seed_file,
            &mut self.nats.tls.ca_file,
            &mut self.nats.tls.cert_file,
            &mut self.nats.tls.key_file,
            &mut self.runtime.cache_dir,
            &mut self.admin.token_file,
            &mut self.control.token_file,
        ]
        .into_iter()
        .flatten()
        {
            absolute(p);
        }
    }

    fn validate(&self) -> Result<(), String> {
        let n = &self.nats;
        let methods = [
            n.credentials_file.is_some(),
            n.user.is_some() || n.password.is_some(),
            n.token.is_some(),
            n.nkey_seed_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(
                "`nats`: give only one of credentials-file, user + password, token, nkey-seed-file"
                    .into(),
            );
        }
        if n.user.is_some() != n.password.is_some() {
            return Err("`nats.user` and `nats.password` go together".into());
        }
        if n.tls.cert_file.is_some() != n.tls.key_file.is_some() {
            return Err("`nats.tls.cert-file` and `nats.tls.key-file` go together".into());
        }
        if let Some(url) = &n.url {
            names::validate_nats_url(url).map_err(|why| format!("`nats.url` {why}"))?;
        }
        self.validate_streams()?;
        names::validate_bucket_prefix(&self.state.bucket_prefix)
            .map_err(|why| format!("`state.bucket-prefix` {:?} {why}", self.state.bucket_prefix))?;
        if let Some(bucket) = &self.plugins.bucket {
            names::validate_bucket_prefix(bucket)
                .map_err(|why| format!("`plugins.bucket` {bucket:?} {why}"))?;
        }
        if self.state.done_ttl_s == 0 {
            return Err("`state.done-ttl-s` must be at least 1".into());
        }
        if self.plugins.max_wasm_mb == 0 {
            return Err("`plugins.max-wasm-mb` must be at least 1".into());
        }
        if self.runtime.max_running_guest_calls == Some(0) {
            return Err("`runtime.max-running-guest-calls` must be at least 1".into());
        }
        if self.runtime.max_running_long_calls == Some(0) {
            return Err("`runtime.max-running-long-calls` must be at least 1".into());
        }
        if self.runtime.max_guest_memory_mb == 0 {
            return Err("`runtime.max-guest-memory-mb` must be at least 1".into());
        }
        if self.runtime.ack_wait_ms < 1_000 {
            return Err("`runtime.ack-wait-ms` must be at least 1000".into());
        }
        let replicas = std::iter::once(("state.replicas".to_owned(), self.state.replicas))
            .chain(std::iter::once((
                "plugins.bucket-replicas".to_owned(),
                self.plugins.bucket_replicas,
            )))
            .chain(std::iter::once((
                "dead-letter.replicas".to_owned(),
                self.dead_letter.replicas,
            )))
            .chain(
                self.streams
                    .iter()
                    .map(|s| (format!("streams {}: replicas", s.name), s.replicas)),
            );
        for (key, n) in replicas {
            // JetStream's own bounds.
            if !(1..=5).contains(&n) {
                return Err(format!("`{key}` must be between 1 and 5, not {n}"));
            }
        }
        self.admin.listen_addr()?;
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            return Err("`admin`: give only one of token, token-file".into());
        }
        if self.control.token.is_some() && self.control.token_file.is_some() {
            return Err("`control`: give only one of token, token-file".into());
        }
        names::validate_publish_subject(&self.control.subject_prefix).map_err(|why| {
            format!(
                "`control.subject-prefix` {:?} {why}",
                self.control.subject_prefix
            )
        })?;
        if self.telemetry.lag_poll_ms < 100 {
            return Err("`telemetry.lag-poll-ms` must be at least 100".into());
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!(
                "`telemetry.otlp-endpoint` {endpoint:?} must be an http:// or https:// URL"
            ));
        }
        Ok(())
    }

    /// Streams to create and the dead-letter stream: valid names and
    /// subjects, and no subject captured by two of them (NATS would refuse
    /// to create the second one).
    fn validate_streams(&self) -> Result<(), String> {
        let dlq = &self.dead_letter;
        names::validate_stream_name(&dlq.stream)
            .map_err(|why| format!("`dead-letter.stream` {:?} {why}", dlq.stream))?;
        names::validate_publish_subject(&dlq.subject_prefix)
            .map_err(|why| format!("`dead-letter.subject-prefix` {why}"))?;
        let mut claimed: Vec<(String, &str)> =
            vec![(format!("{}.>", dlq.subject_prefix), dlq.stream.as_str())];
        for s in &self.streams {
            names::validate_stream_name(&s.name)
                .map_err(|why| format!("`streams`: stream name {:?} {why}", s.name))?;
            if s.subjects.is_empty() {
                return Err(format!(
                    "`streams`: stream {} needs at least one subject",
                    s.name
                ));
            }
            if s.name == dlq.stream {
                return Err(format!(
                    "`streams`: {} is the dead-letter stream, which the host creates itself",
                    s.name
                ));
            }
            for subject in &s.subjects {
                names::validate_subject_filter(subject)
                    .map_err(|why| format!("`streams`: subject {subject:?} of {} {why}", s.name))?;
                if let Some((other, owner)) = claimed
                    .iter()
                    .find(|(other, _)| names::subjects_overlap(other, subject))
                {
                    return Err(format!(
                        "`streams`: subject {subject:?} of {} overlaps {other:?} of {owner}",
                        s.name
                    ));
                }
            }
            claimed.extend(s.subjects.iter().map(|sub| (sub.clone(), s.name.as_str())));
        }
        Ok(())
    }

    /// The NATS URL to use: config, else `$NATS_URL`, else the local default.
    pub fn nats_url(&self) -> String {
        self.nats
            .url
            .clone()
            .or_else(|| std::env::var("NATS_URL").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
    }

    /// `runtime.shutdown-grace-ms` as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.runtime.shutdown_grace_ms)
    }

    /// `runtime.ack-wait-ms` as a duration.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.runtime.ack_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_all_defaults() {
        let c = HostConfig::parse("", Path::new("/etc/weir")).unwrap();
        assert_eq!(c.plugins.dir, PathBuf::from("/etc/weir/plugins"));
        assert_eq!(c.dead_letter.stream, "WEIR_DLQ");
    }

    #[test]
    fn full_config_parses_and_resolves_paths() {
        let c = HostConfig::parse(
            r#"
            [nats]
            url = "nats://a:4222,nats://b:4222"
            credentials-file = "secrets/weir.creds"
            [nats.tls]
            required = true
            ca-file = "/abs/ca.pem"
            [plugins]
            dir = "../plugins"
            [dead-letter]
            stream = "DLQ"
            subject-prefix = "dead"
            [[streams]]
            name = "ORDERS"
            subjects = ["orders.>"]
            [runtime]
            shutdown-grace-ms = 100
            long-calls = "idle"
            max-running-long-calls = 3
            [admin]
            listen = "0.0.0.0:9000"
            token-file = "secrets/admin-token"
            [telemetry]
            otlp-endpoint = "http://collector:4318/v1/traces"
            otlp-protocol = "http/json"
            otlp-headers = { x-api-key = "k" }
            "#,
            Path::new("/srv/weir"),
        )
        .unwrap();
        assert_eq!(
            c.nats.credentials_file,
            Some(PathBuf::from("/srv/weir/secrets/weir.creds"))
        );
        assert_eq!(c.nats.tls.ca_file, Some(PathBuf::from("/abs/ca.pem")));
        assert_eq!(c.plugins.dir, PathBuf::from("/srv/weir/../plugins"));
        assert_eq!(c.streams[0].duplicate_window_s, 120);
        assert_eq!(c.nats_url(), "nats://a:4222,nats://b:4222");
        assert_eq!(
            c.admin.token_file,
            Some(PathBuf::from("/srv/weir/secrets/admin-token"))
        );
        assert_eq!(c.admin.listen_addr().unwrap().port(), 9000);
        assert_eq!(c.telemetry.otlp_protocol, OtlpProtocol::HttpJson);
        assert_eq!(c.telemetry.otlp_headers["x-api-key"], "k");
        assert_eq!(c.telemetry.service_name, "weir");
        assert_eq!(c.runtime.long_calls, LongCalls::Idle);
        assert_eq!(c.runtime.max_running_long_calls, Some(3));
        assert_eq!(RuntimeConfig::default().max_running_long_calls, None);
        assert_eq!(RuntimeConfig::default().long_calls, LongCalls::LongSlice);
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("[nats]\nurl = 3\n", "url"),
            ("[nats]\nuser = \"u\"\n", "password"),
            (
                "[nats]\ntoken = \"t\"\ncredentials-file = \"c\"\n",
                "only one",
            ),
            ("[plugin]\ndir = \"x\"\n", "plugin"),
            (
                "[[streams]]\nname = \"S\"\nsubjects = []\n",
                "at least one subject",
            ),
            ("[runtime]\nack-wait-ms = 5\n", "ack-wait-ms"),
            (
                "[dead-letter]\nsubject-prefix = \"a.>\"\n",
                "subject-prefix",
            ),
            ("[admin]\nlisten = \"localhost\"\n", "admin.listen"),
            (
                "[admin]\ntoken = \"a\"\ntoken-file = \"b\"\n",
                "only one of token",
            ),
            ("[telemetry]\notlp-protocol = \"grpc\"\n", "otlp-protocol"),
            ("[telemetry]\nlag-poll-ms = 10\n", "lag-poll-ms"),
            (
                "[telemetry]\notlp-endpoint = \"collector:4318\"\n",
                "http://",
            ),
            ("[nats]\nurl = \"\"\n", "nats.url"),
            ("[nats]\nurl = \"http://x:4222\"\n", "nats.url"),
            ("[state]\nbucket-prefix = \"a.b\"\n", "state.bucket-prefix"),
            ("[state]\ndone-ttl-s = 0\n", "done-ttl-s"),
            ("[plugins]\ndir = \"p\"\nmax-wasm-mb = 0\n", "max-wasm-mb"),
            (
                "[runtime]\nmax-running-long-calls = 0\n",
                "max-running-long-calls",
            ),
            (
                "[[streams]]\nname = \"bad name\"\nsubjects = [\"a\"]\n",
                "stream name \"bad name\" may not contain whitespace",
            ),
            (
                "[[streams]]\nname = \"A\"\nsubjects = [\"orders.>\"]\n\
                 [[streams]]\nname = \"B\"\nsubjects = [\"orders.placed\"]\n",
                "\"orders.placed\" of B overlaps \"orders.>\" of A",
            ),
            (
                "[[streams]]\nname = \"A\"\nsubjects = [\"weir.dlq.x\"]\n",
                "overlaps \"weir.dlq.>\" of WEIR_DLQ",
            ),
            (
                "[[streams]]\nname = \"WEIR_DLQ\"\nsubjects = [\"x\"]\n",
                "dead-letter stream",
            ),
            ("[dead-letter]\nstream = \"a.b\"\n", "dead-letter.stream"),
        ] {
            let err = HostConfig::parse(text, Path::new(".")).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn admin_token_file_errors_name_the_admin_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = AdminConfig {
            token_file: Some(dir.path().join("missing")),
            ..AdminConfig::default()
        };
        let missing = config.bearer_token().unwrap_err().to_string();
        assert!(missing.contains("admin.token-file"), "{missing}");
        assert_eq!(AdminConfig::default().bearer_token().unwrap(), None);
    }

    #[test]
    fn replicas_are_within_jetstreams_bounds() {
        let c = HostConfig::parse(
            "[state]\nreplicas = 3\n[dead-letter]\nreplicas = 3\n[[streams]]\nname = \"S\"\nsubjects = [\"s.>\"]\nreplicas = 5\n",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            (
                c.state.replicas,
                c.dead_letter.replicas,
                c.streams[0].replicas
            ),
            (3, 3, 5)
        );
        for (text, needle) in [
            ("[state]\nreplicas = 0\n", "state.replicas"),
            ("[dead-letter]\nreplicas = 7\n", "dead-letter.replicas"),
            (
                "[[streams]]\nname = \"S\"\nsubjects = [\"s.>\"]\nreplicas = 6\n",
                "streams S: replicas",
            ),
        ] {
            let err = HostConfig::parse(text, Path::new(".")).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn control_subject_and_token() {
        let c = HostConfig::parse(
            "[control]\nsubject-prefix = \"acme.weir\"\ntoken-file = \"secrets/control\"\n",
            Path::new("/srv/weir"),
        )
        .unwrap();
        assert_eq!(c.control.subject(), "acme.weir.plugins");
        assert_eq!(
            c.control.token_file,
            Some(PathBuf::from("/srv/weir/secrets/control"))
        );
        assert_eq!(
            HostConfig::default().control.subject(),
            "weir.control.plugins"
        );
        for (text, needle) in [
            (
                "[control]\ntoken = \"a\"\ntoken-file = \"b\"\n",
                "only one of token",
            ),
            (
                "[control]\nsubject-prefix = \"weir.>\"\n",
                "control.subject-prefix",
            ),
            (
                "[control]\nsubject-prefix = \"\"\n",
                "control.subject-prefix",
            ),
        ] {
            let err = HostConfig::parse(text, Path::new(".")).unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, "[nats\n").unwrap();
        let err = HostConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("weir.toml"), "{err}");
    }
}
