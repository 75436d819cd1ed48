//! Replaying dead letters through a plugin's current version (`weir dlq
//! replay`), with the pipeline's exactly-once effects.
//!
//! The event is rebuilt from the dead letter (its original id, subject,
//! headers, payload, stream and sequence) and run by the version now in
//! the plugin directory. Its effects are committed through the plugin's
//! store exactly as the pipeline commits them, with the done mark of the
//! *original* event (its stream incarnation and sequence, or its producer
//! id), so a replay that runs twice, or runs after a crash between commit
//! and clean-up, finds the mark and only re-publishes the committed outbox
//! (JetStream drops the duplicates). Nothing is published to the input
//! stream: the plugin's fellow subscribers never see the event again.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use prometheus_client::metrics::histogram::Histogram;

use crate::config::HostConfig;
use crate::event::{Emitted, Event, Header};
use crate::jetstream::dlq_store::Letter;
use crate::jetstream::outbox::Outgoing;
use crate::jetstream::store::{Commit, CommitRequest, EventEffects, PluginStore, Read, Scope};
use crate::sandbox::plugin::Plugin;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::state::CommittedState;

/// Runs before a replay gives up on state keys that keep moving under it.
const MAX_CONFLICTS: usize = 5;

/// What became of one replayed dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// It ran and its effects were committed and published.
    Processed,
    /// Its effects had been committed before (an earlier replay): they were
    /// published again, nothing ran.
    AlreadyDone,
    /// The plugin failed on it again: a new dead letter (this id) with the
    /// new reason replaces it. The caller removes the old one.
    FailedAgain {
        /// The new outcome.
        why: String,
        /// The new dead letter's id.
        new_letter: u64,
    },
    /// It could not be run, for this reason; the dead letter stays as it is.
    Failed(String),
}

/// One plugin's current version and store, for replays.
pub struct Replayer {
    js: jetstream::Context,
    dlq_prefix: String,
    plugin: Plugin,
    store: Arc<PluginStore>,
    publish_timeout: Duration,
}

impl Replayer {
    /// Load `name` from the plugin directory of `config`, as a host would.
    pub async fn open(
        config: &HostConfig,
        js: &jetstream::Context,
        name: &str,
    ) -> anyhow::Result<Self> {
        let wasm = config.plugins.dir.join(format!("{name}.wasm"));
        anyhow::ensure!(
            wasm.is_file(),
            "plugin {name} is not in the plugin directory {} (replays run its current version)",
            config.plugins.dir.display()
        );
        let mut sandbox_config = SandboxConfig::with_default_cache();
        if let Some(dir) = &config.runtime.cache_dir {
            sandbox_config.cache_dir = Some(dir.clone());
        }
        let plugin = tokio::task::spawn_blocking(move || -> anyhow::Result<Plugin> {
            let sandbox = Sandbox::new(sandbox_config)?;
            Ok(sandbox.load(&wasm)?)
        })
        .await
        .context("loading the plugin")??;
        // A replay runs outside any host's /metrics: its groups are not exported.
        let unexported = Histogram::new(std::iter::empty());
        let store = PluginStore::open(js, &config.state, name, unexported).await?;
        Ok(Replayer {
            js: js.clone(),
            dlq_prefix: config.dead_letter.subject_prefix.clone(),
            plugin,
            store: Arc::new(store),
            publish_timeout: Duration::from_secs(10),
        })
    }

    /// The version letters are replayed through.
    pub fn version(&self) -> &str {
        self.plugin.version().as_str()
    }

    /// Run `letter`'s event again and make its effects durable and
    /// published. The caller removes the dead letter when this succeeds.
    pub async fn replay(&self, letter: &Letter) -> anyhow::Result<Replayed> {
        if letter.truncated {
            return Ok(Replayed::Failed(format!(
                "the dead letter holds only part of the event; it is whole in {} at sequence {}",
                letter.stream, letter.sequence
            )));
        }
        let event = Event {
            id: letter.event_id.clone(),
            subject: letter.subject.clone(),
            headers: letter
                .headers
                .iter()
                .map(|(k, v)| Header::new(k.clone(), v.clone()))
                .collect(),
            payload: letter.payload.to_vec(),
            sequence: letter.sequence,
            attempt: letter.attempts.saturating_add(1),
            timestamp_ms: 0,
        };
        let (scope, msg_id) = self.origin(letter).await?;
        for _ in 0..MAX_CONFLICTS {
            let state: Arc<dyn CommittedState> = self.store.clone();
            let invocation = self.plugin.invoke(&event, state).await;
            if !invocation.outcome.is_ok() {
                return self.supersede(letter, &event, &invocation.outcome).await;
            }
            let reads = invocation
                .state_reads
                .iter()
                .map(|(key, revision)| (key.clone(), Read::Committed(*revision)))
                .collect();
            let request = CommitRequest::new(
                scope.clone(),
                vec![EventEffects::new(
                    event.sequence,
                    msg_id.clone(),
                    &invocation.emitted,
                )],
                invocation.state_changes.clone(),
                reads,
            );
            match self.store.commit(request).await? {
                Commit::Committed => {
                    self.publish(&scope, letter.generation, &event, &invocation.emitted)
                        .await?;
                    return Ok(Replayed::Processed);
                }
                Commit::AlreadyDone(done) => {
                    let outbox = done
                        .into_iter()
                        .find(|(seq, _)| *seq == event.sequence)
                        .map(|(_, outbox)| outbox)
                        .unwrap_or_default();
                    self.publish(&scope, letter.generation, &event, &outbox)
                        .await?;
                    return Ok(Replayed::AlreadyDone);
                }
                Commit::Conflict => continue,
                Commit::TooLarge { bytes, limit } => {
                    return Ok(Replayed::Failed(format!(
                        "its outputs ({bytes} bytes) do not fit one message ({limit})"
                    )));
                }
            }
        }
        Ok(Replayed::Failed(format!(
            "its state keys kept changing under it ({MAX_CONFLICTS} tries)"
        )))
    }

    /// Store a dead letter saying how the replay of `letter` failed (the
    /// version that ran, the new reason, one more attempt) to take its
    /// place: stream messages cannot be edited.
    async fn supersede(
        &self,
        letter: &Letter,
        event: &Event,
        outcome: &crate::outcome::Outcome,
    ) -> anyhow::Result<Replayed> {
        let again = crate::jetstream::dlq::DeadLetter {
            plugin: self.plugin.name(),
            version: self.version(),
            stream: &letter.stream,
            generation: letter.generation,
            replaces: Some(letter.id),
            event,
            outcome,
            trace: Vec::new(),
            raw_headers: None,
        };
        let new_letter = crate::jetstream::dlq::publish(
            &self.js,
            &self.dlq_prefix,
            &again,
            self.publish_timeout,
        )
        .await
        .context("storing the dead letter with its new reason")?;
        Ok(Replayed::FailedAgain {
            why: outcome.to_string(),
            new_letter,
        })
    }

    /// The done-mark scope of the original event, and its producer id if
    /// it had one.
    async fn origin(&self, letter: &Letter) -> anyhow::Result<(Scope, Option<String>)> {
        // Ids the host made are `<stream>:<created ns>:<sequence>`.
        let made_by_host = letter
            .event_id
            .strip_prefix(&format!("{}:", letter.stream))
            .and_then(|rest| rest.split_once(':'))
            .filter(|(_, seq)| *seq == letter.sequence.to_string())
            .and_then(|(created, _)| created.parse::<i128>().ok());
        let generation = crate::jetstream::generation::Generation {
            number: letter.generation,
            ..Default::default()
        };
        if let Some(created) = made_by_host {
            return Ok((Scope::new(&letter.stream, created, generation.number), None));
        }
        let mut stream = self
            .js
            .get_stream(&letter.stream)
            .await
            .with_context(|| format!("opening the event's stream {}", letter.stream))?;
        let created = stream.info().await?.created.unix_timestamp_nanos();
        Ok((
            Scope::new(&letter.stream, created, generation.number),
            Some(generation.scoped_id(letter.event_id.clone())),
        ))
    }

    async fn publish(
        &self,
        scope: &Scope,
        generation: u64,
        event: &Event,
        outbox: &[Emitted],
    ) -> anyhow::Result<()> {
        if outbox.is_empty() {
            return Ok(());
        }
        let outgoing = [Outgoing {
            event,
            emitted: outbox,
            trace: &[],
        }];
        if let Err(e) = crate::jetstream::outbox::publish(
            &self.js,
            self.plugin.name(),
            self.version(),
            generation,
            &outgoing,
            self.publish_timeout,
        )
        .await
        {
            bail!("outputs committed but not all published (a replay again publishes them): {e}");
        }
        self.store.published(scope, vec![event.sequence]);
        Ok(())
    }
}
