//! Plugin manifests: the `name.toml` beside each `name.wasm`.
//!
//! Parsed strictly: an unknown key is an error, so a typo never silently
//! falls back to a default. Errors name the file, the key and what was
//! expected.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::names::{validate_stream_name, validate_subject_filter};

/// Everything a manifest says about a plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// One line on what the plugin does, for `weir plugins list`.
    #[serde(default)]
    pub description: Option<String>,
    /// Subjects (wildcards allowed) whose events the plugin receives.
    pub subjects: Vec<String>,
    /// The JetStream stream holding those subjects.
    pub stream: String,
    /// Where a new plugin's consumer starts in the stream.
    #[serde(default)]
    pub start: StartPosition,
    /// How many events of this plugin may run in the sandbox at once. Events
    /// waiting for their commit do not count. With 1 and no ordering key,
    /// events run one after another in stream order.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u32,
    /// Most events a host holds for this plugin, delivered and not yet
    /// acknowledged (the consumer's `max_ack_pending`): the bound on the
    /// host's memory for this plugin (times its largest event) and on how
    /// much work one commit can group. A slow plugin's backlog beyond it
    /// stays in JetStream.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// Most bytes of events (payloads and headers) a host holds for this
    /// plugin, in MiB: pulling pauses above it, so large events cannot
    /// multiply `max-in-flight` into gigabytes.
    #[serde(default = "defaults::max_in_flight_mb")]
    pub max_in_flight_mb: u32,
    /// Events with the same key run one at a time, in stream order; events
    /// of different keys run concurrently. Without it, events run in any
    /// order, up to `concurrency` at once.
    #[serde(default)]
    pub ordering_key: Option<OrderingKey>,
    /// Only one host at a time pulls this plugin's events; when it stops,
    /// another takes over (after about 10 s). Keeps per-key order across a
    /// fleet of hosts, at the cost of spreading this plugin's work.
    #[serde(default)]
    pub exclusive: bool,
    /// `[retry]`: how often and how soon a failed event is tried again.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// `[limits]`: what one call may use.
    #[serde(default)]
    pub limits: Limits,
    /// `[instances]`: whether and how long instances are reused.
    #[serde(default)]
    pub instances: InstancePolicy,
    /// The plugin's own settings, handed to it through the `config` import.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

/// Where a plugin's durable consumer starts when it is first created.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum StartPosition {
    /// Only events published after the consumer is created.
    #[default]
    New,
    /// The whole history held by the stream.
    All,
    /// From this stream sequence on.
    Sequence(u64),
    /// From the first event stored at or after this time (RFC 3339, with an
    /// offset, e.g. `2026-01-31T00:00:00Z`).
    Time(toml::value::Datetime),
}

/// Where an event's ordering key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub enum OrderingKey {
    /// A header, e.g. `{ header = "Customer-Id" }` (matched case-insensitively).
    Header(String),
    /// A token of the subject, counting from 1: `{ subject-token = 3 }` takes
    /// `c-42` from `orders.placed.c-42`.
    SubjectToken(usize),
}

impl OrderingKey {
    /// The key of an event with `subject` and `header` lookup. Events that
    /// lack the key share one lane (the empty key), so they stay ordered
    /// among themselves rather than racing.
    pub fn key_of<'a>(
        &self,
        subject: &'a str,
        header: impl FnOnce(&str) -> Option<&'a str>,
    ) -> &'a str {
        match self {
            OrderingKey::Header(name) => header(name).unwrap_or(""),
            OrderingKey::SubjectToken(n) => {
                subject.split('.').nth(n.saturating_sub(1)).unwrap_or("")
            }
        }
    }
}

/// How failed events are retried.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetryPolicy {
    /// Deliveries before an event that keeps failing is dead-lettered
    /// (counting the first).
    pub max_deliveries: u32,
    /// Delay before the second delivery.
    pub backoff_initial_ms: u64,
    /// Upper bound on the delay.
    pub backoff_max_ms: u64,
    /// Growth of the delay per attempt.
    pub backoff_multiplier: f64,
    /// Random spread applied to each delay, as a fraction (0.2 = ±20%), so
    /// that events failing together do not all come back together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_deliveries: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            backoff_multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay before redelivering after failed attempt `attempt`
    /// (1-based), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let ms = self.backoff_initial_ms as f64 * self.backoff_multiplier.powi(exponent);
        Duration::from_millis(ms.min(self.backoff_max_ms as f64) as u64)
    }

    /// [`backoff`](Self::backoff) spread by the jitter fraction, using
    /// `unit` (uniform in [0, 1)) as the random draw.
    pub fn backoff_with_jitter(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.backoff(attempt).as_secs_f64();
        let spread = base * self.jitter * (2.0 * unit - 1.0);
        Duration::from_secs_f64((base + spread).max(0.0))
    }
}

/// Resource limits for one event's call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Cap on each linear memory of the plugin, in MiB.
    pub memory_mb: u32,
    /// Wall-clock time one call may take, in milliseconds.
    pub timeout_ms: u64,
    /// Events one call may emit.
    pub max_emits: u32,
    /// Largest emitted event, payload and headers, in bytes.
    pub max_emit_bytes: u64,
    /// State keys one call may write or delete.
    pub max_state_writes: u32,
    /// Largest state value, in bytes.
    pub max_state_value_bytes: u64,
}

/// Bytes of each message the host keeps for what it adds (message ids,
/// `Weir-*` and trace headers, commit guards): an emitted event or a state
/// value may use the server's `max_payload` minus this.
pub const HOST_MESSAGE_OVERHEAD: u64 = 4096;

/// The server's default `max_payload` (1 MiB).
const DEFAULT_MAX_PAYLOAD: u64 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: 64,
            timeout_ms: 5_000,
            max_emits: 1_000,
            // What fits one message under NATS's default max_payload.
            max_emit_bytes: DEFAULT_MAX_PAYLOAD - HOST_MESSAGE_OVERHEAD,
            max_state_writes: 1_000,
            max_state_value_bytes: DEFAULT_MAX_PAYLOAD - HOST_MESSAGE_OVERHEAD,
        }
    }
}

impl Limits {
    /// Whether an emitted event and a state value at their limits can be
    /// stored by a server that accepts `max_payload` bytes per message; a
    /// plugin whose limits cannot is refused at load instead of failing on
    /// its first large event.
    pub fn check_fits(&self, max_payload: usize) -> Result<(), String> {
        let room = (max_payload as u64).saturating_sub(HOST_MESSAGE_OVERHEAD);
        for (key, value) in [
            ("max-emit-bytes", self.max_emit_bytes),
            ("max-state-value-bytes", self.max_state_value_bytes),
        ] {
            if value > room {
                return Err(format!(
                    "`limits.{key}` ({value}) does not fit the server's max_payload ({max_payload} bytes, of which the host needs {HOST_MESSAGE_OVERHEAD}); use at most {room}"
                ));
            }
        }
        Ok(())
    }

    /// `memory-mb` in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mb) << 20
    }

    /// `timeout-ms` as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// How a plugin's instances are used across events.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct InstancePolicy {
    /// `isolation`: `instance` (reuse, the default) or `event` (a fresh instance per event).
    pub isolation: Isolation,
    /// An instance is replaced after serving this many events.
    pub recycle_after_events: u64,
    /// An instance is replaced once its linear memory has grown past this
    /// many MiB (default: three quarters of `limits.memory-mb`), so a guest
    /// that leaks is renewed before it runs into its cap.
    pub recycle_above_memory_mb: Option<u32>,
}

impl Default for InstancePolicy {
    fn default() -> Self {
        InstancePolicy {
            isolation: Isolation::Instance,
            recycle_after_events: 10_000,
            recycle_above_memory_mb: None,
        }
    }
}

/// What one event may see of the events before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// An instance serves one event at a time and is reused for the next:
    /// guest globals and heap may survive from one event to another, but
    /// nothing guarantees it (an instance is replaced after a trap, a limit
    /// hit, and by the recycle rules). Durable state goes through `state`.
    #[default]
    Instance,
    /// Every event gets a fresh instance: nothing survives an event.
    Event,
}

impl Manifest {
    /// Bytes of linear memory past which an instance is recycled.
    pub fn recycle_memory_bytes(&self) -> u64 {
        match self.instances.recycle_above_memory_mb {
            Some(mb) => u64::from(mb) << 20,
            None => self.limits.memory_bytes() / 4 * 3,
        }
    }
}

mod defaults {
    pub(super) fn concurrency() -> u32 {
        1
    }

    pub(super) fn max_in_flight() -> u32 {
        1024
    }

    pub(super) fn max_in_flight_mb() -> u32 {
        64
    }
}

/// A manifest that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read plugin manifest {}: {error}", path.display())]
    Read {
        /// The manifest's path.
        path: PathBuf,
        /// Shown in the message, not chained as a source, so `{:#}` prints it once.
        error: std::io::Error,
    },
    /// The file is not a valid manifest.
    #[error("invalid plugin manifest {}: {message}", path.display())]
    Invalid {
        /// The manifest's path.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

impl Manifest {
    /// The manifest path for a plugin's `.wasm` file: same name, `.toml`.
    pub fn path_for(wasm: &Path) -> PathBuf {
        wasm.with_extension("toml")
    }

    /// Read and validate the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|error| ManifestError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text).map_err(|message| ManifestError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parse and validate manifest text; the error says which key is wrong and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        if self.subjects.is_empty() {
            return Err("`subjects` must list at least one subject".into());
        }
        for subject in &self.subjects {
            validate_subject_filter(subject)
                .map_err(|why| format!("`subjects`: {subject:?} {why}"))?;
        }
        validate_stream_name(&self.stream)
            .map_err(|why| format!("`stream`: {:?} {why}", self.stream))?;
        if self.concurrency == 0 {
            return Err("`concurrency` must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            return Err("`max-in-flight` must be at least 1".into());
        }
        if self.max_in_flight_mb == 0 {
            return Err("`max-in-flight-mb` must be at least 1".into());
        }
        match &self.ordering_key {
            Some(OrderingKey::SubjectToken(0)) => {
                return Err("`ordering-key.subject-token` counts from 1".into());
            }
            Some(OrderingKey::Header(h)) if h.trim().is_empty() => {
                return Err("`ordering-key.header` must name a header".into());
            }
            _ => {}
        }
        match &self.start {
            StartPosition::Time(t) => {
                start_time(t).map_err(|why| format!("`start.time`: {why}"))?;
            }
            StartPosition::Sequence(0) => {
                return Err("`start.sequence` counts from 1".into());
            }
            _ => {}
        }
        let r = &self.retry;
        if r.max_deliveries == 0 {
            return Err("`retry.max-deliveries` must be at least 1".into());
        }
        if r.backoff_initial_ms > r.backoff_max_ms {
            return Err(format!(
                "`retry.backoff-initial-ms` ({}) must not exceed `retry.backoff-max-ms` ({})",
                r.backoff_initial_ms, r.backoff_max_ms
            ));
        }
        if !(r.backoff_multiplier.is_finite() && r.backoff_multiplier >= 1.0) {
            return Err(format!(
                "`retry.backoff-multiplier` must be at least 1.0, got {}",
                r.backoff_multiplier
            ));
        }
        if !(0.0..=1.0).contains(&r.jitter) {
            return Err(format!(
                "`retry.jitter` must be between 0.0 and 1.0, got {}",
                r.jitter
            ));
        }
        let l = &self.limits;
        if l.memory_mb == 0 || l.memory_mb > 4096 {
            return Err(format!(
                "`limits.memory-mb` must be between 1 and 4096, got {}",
                l.memory_mb
            ));
        }
        if l.timeout_ms == 0 {
            return Err("`limits.timeout-ms` must be at least 1".into());
        }
        let i = &self.instances;
        if i.recycle_after_events == 0 {
            return Err("`instances.recycle-after-events` must be at least 1".into());
        }
        if i.recycle_above_memory_mb == Some(0) {
            return Err("`instances.recycle-above-memory-mb` must be at least 1".into());
        }
        Ok(())
    }

    /// The `[config]` table as the strings the guest's `config` import hands out.
    pub fn config_strings(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), config_value_string(v)))
            .collect()
    }
}

/// The `start.time` of a manifest as an absolute time.
pub fn start_time(t: &toml::value::Datetime) -> Result<time::OffsetDateTime, String> {
    if t.date.is_none() || t.time.is_none() || t.offset.is_none() {
        return Err(format!(
            "{t} must be a full date and time with an offset, e.g. 2026-01-31T00:00:00Z"
        ));
    }
    time::OffsetDateTime::parse(
        &t.to_string(),
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|e| format!("{t} is not a valid RFC 3339 time: {e}"))
}

fn config_value_string(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            serde_json::to_string(v).unwrap_or_else(|e| format!("<unencodable: {e}>"))
        }
    }
}

impl fmt::Display for StartPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartPosition::New => f.write_str("new"),
            StartPosition::All => f.write_str("all"),
            StartPosition::Sequence(s) => write!(f, "sequence {s}"),
            StartPosition::Time(t) => write!(f, "time {t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "subjects = [\"orders.placed\"]\nstream = \"ORDERS\"\n";

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = Manifest::parse(MINIMAL).unwrap();
        assert_eq!(m.start, StartPosition::New);
        assert_eq!(m.concurrency, 1);
        assert_eq!(m.retry, RetryPolicy::default());
        assert_eq!(m.limits, Limits::default());
        assert_eq!(m.instances.isolation, Isolation::Instance);
        assert_eq!(m.recycle_memory_bytes(), 48 << 20);
        let m = Manifest::parse(&format!(
            "{MINIMAL}[instances]\nisolation = \"event\"\nrecycle-above-memory-mb = 10\n"
        ))
        .unwrap();
        assert_eq!(m.instances.isolation, Isolation::Event);
        assert_eq!(m.recycle_memory_bytes(), 10 << 20);
    }

    #[test]
    fn full_manifest_parses() {
        let m = Manifest::parse(
            r#"
            description = "d"
            subjects = ["orders.*", "inventory.>"]
            stream = "ORDERS"
            start = { time = 2026-01-31T00:00:00Z }
            concurrency = 4
            [retry]
            max-deliveries = 3
            backoff-initial-ms = 10
            backoff-max-ms = 100
            backoff-multiplier = 3.0
            jitter = 0.0
            [limits]
            memory-mb = 8
            timeout-ms = 20
            max-emits = 2
            max-emit-bytes = 3
            max-state-writes = 4
            max-state-value-bytes = 5
            [config]
            threshold = 0.5
            name = "x"
            list = ["a", 1]
            "#,
        )
        .unwrap();
        assert!(matches!(m.start, StartPosition::Time(_)));
        assert_eq!(m.limits.memory_bytes(), 8 << 20);
        let config = m.config_strings();
        assert_eq!(config["threshold"], "0.5");
        assert_eq!(config["name"], "x");
        assert_eq!(config["list"], r#"["a",1]"#);
    }

    #[test]
    fn partial_sections_keep_the_other_defaults() {
        let m = Manifest::parse(&format!(
            "{MINIMAL}[retry]\nmax-deliveries = 2\n[limits]\ntimeout-ms = 9\n"
        ))
        .unwrap();
        assert_eq!(m.retry.max_deliveries, 2);
        assert_eq!(
            m.retry.backoff_max_ms,
            RetryPolicy::default().backoff_max_ms
        );
        assert_eq!(m.limits.timeout_ms, 9);
        assert_eq!(m.limits.memory_mb, Limits::default().memory_mb);
    }

    #[test]
    fn ordering_keys() {
        let m = Manifest::parse(&format!(
            "{MINIMAL}ordering-key = {{ header = \"Customer-Id\" }}\n"
        ))
        .unwrap();
        let key = m.ordering_key.unwrap();
        assert_eq!(
            key.key_of("orders.placed", |h| (h == "Customer-Id").then_some("c-1")),
            "c-1"
        );
        assert_eq!(key.key_of("orders.placed", |_| None), "");
        let m = Manifest::parse(&format!(
            "{MINIMAL}ordering-key = {{ subject-token = 3 }}\n"
        ))
        .unwrap();
        let key = m.ordering_key.unwrap();
        assert_eq!(key.key_of("orders.placed.c-42", |_| None), "c-42");
        assert_eq!(key.key_of("orders.placed", |_| None), "");
        for bad in [
            "{ subject-token = 0 }",
            "{ header = \" \" }",
            "{ field = \"x\" }",
        ] {
            assert!(
                Manifest::parse(&format!("{MINIMAL}ordering-key = {bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn start_positions() {
        for (text, want) in [
            ("\"new\"", StartPosition::New),
            ("\"all\"", StartPosition::All),
            ("{ sequence = 42 }", StartPosition::Sequence(42)),
        ] {
            let m = Manifest::parse(&format!("{MINIMAL}start = {text}\n")).unwrap();
            assert_eq!(m.start, want);
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            Manifest::parse("subjects = [\"a\"]\nstream = \"S\"\nconcurency = 2\n").unwrap_err();
        assert!(err.contains("concurency"), "{err}");
        assert!(
            err.contains("concurrency"),
            "should list the expected keys: {err}"
        );
    }

    #[test]
    fn unknown_key_in_section_is_named() {
        let err = Manifest::parse(&format!("{MINIMAL}[limits]\nmemory = 3\n")).unwrap_err();
        assert!(err.contains("memory"), "{err}");
        assert!(err.contains("memory-mb"), "{err}");
    }

    #[test]
    fn wrong_type_is_explained() {
        let err = Manifest::parse("subjects = \"orders\"\nstream = \"S\"\n").unwrap_err();
        assert!(err.contains("subjects"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        for (extra, needle) in [
            ("concurrency = 0\n", "concurrency"),
            ("max-in-flight = 0\n", "max-in-flight"),
            ("[retry]\nmax-deliveries = 0\n", "max-deliveries"),
            ("[retry]\njitter = 1.5\n", "jitter"),
            (
                "[retry]\nbackoff-initial-ms = 10\nbackoff-max-ms = 5\n",
                "backoff-initial-ms",
            ),
            ("[limits]\nmemory-mb = 0\n", "memory-mb"),
            (
                "[instances]\nrecycle-after-events = 0\n",
                "recycle-after-events",
            ),
            ("[instances]\nisolation = \"none\"\n", "isolation"),
            ("start = { time = 2026-01-31 }\n", "start.time"),
            ("start = \"sometime\"\n", "sometime"),
            ("start = { sequence = 0 }\n", "start.sequence"),
        ] {
            let err = Manifest::parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        let err = Manifest::parse("subjects = [\"a..b\"]\nstream = \"S\"\n").unwrap_err();
        assert!(err.contains("empty token"), "{err}");
        let err = Manifest::parse("subjects = [\"a\"]\nstream = \"S.T\"\n").unwrap_err();
        assert!(err.contains("stream"), "{err}");
        let err = Manifest::parse("subjects = []\nstream = \"S\"\n").unwrap_err();
        assert!(err.contains("at least one"), "{err}");
    }

    #[test]
    fn limits_must_fit_the_servers_max_payload() {
        let defaults = Limits::default();
        assert!(defaults.check_fits(1 << 20).is_ok());
        let err = defaults.check_fits(512 << 10).unwrap_err();
        assert!(err.contains("limits.max-emit-bytes"), "{err}");
        let big = Limits {
            max_state_value_bytes: 2 << 20,
            ..Limits::default()
        };
        let err = big.check_fits(1 << 20).unwrap_err();
        assert!(err.contains("limits.max-state-value-bytes"), "{err}");
        assert!(big.check_fits(8 << 20).is_ok());
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "subjects = [").unwrap();
        let err = Manifest::load(&path).unwrap_err().to_string();
        assert!(err.contains("broken.toml"), "{err}");
        let err = Manifest::load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = RetryPolicy {
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            ..RetryPolicy::default()
        };
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(4), Duration::from_millis(800));
        assert_eq!(r.backoff(5), Duration::from_millis(1000));
        assert_eq!(r.backoff(u32::MAX), Duration::from_millis(1000));
        let low = r.backoff_with_jitter(2, 0.0);
        let high = r.backoff_with_jitter(2, 0.999);
        assert!(
            low >= Duration::from_millis(159) && low <= Duration::from_millis(161),
            "{low:?}"
        );
        assert!(
            high > Duration::from_millis(235) && high <= Duration::from_millis(240),
            "{high:?}"
        );
    }
}
