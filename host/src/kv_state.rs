//! Durable plugin state in a JetStream KV bucket, one bucket per plugin.

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use futures::future::BoxFuture;

use crate::config::StateConfig;
use crate::state::{StateChange, StateStore};

/// The bucket of `plugin`: `<prefix>_<plugin>`. Plugin names may contain
/// `-`, which bucket names allow.
pub fn bucket_name(config: &StateConfig, plugin: &str) -> String {
    format!("{}_{plugin}", config.bucket_prefix)
}

/// One plugin's state bucket.
pub struct KvState {
    store: kv::Store,
}

impl KvState {
    /// Open the plugin's bucket, creating it on first use.
    pub async fn open(
        js: &jetstream::Context,
        config: &StateConfig,
        plugin: &str,
    ) -> anyhow::Result<Self> {
        let bucket = bucket_name(config, plugin);
        let store = match js.get_key_value(&bucket).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: format!("Weir state of plugin {plugin}"),
                    history: 1,
                    num_replicas: config.replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating state bucket {bucket}"))?,
        };
        Ok(KvState { store })
    }

    /// Apply a successful call's changes.
    pub async fn commit(&self, changes: &[StateChange]) -> anyhow::Result<()> {
        for change in changes {
            match change {
                StateChange::Set { key, value } => {
                    self.store
                        .put(key, value.clone().into())
                        .await
                        .with_context(|| format!("state put {key}"))?;
                }
                StateChange::Delete { key } => {
                    self.store
                        .delete(key)
                        .await
                        .with_context(|| format!("state delete {key}"))?;
                }
            }
        }
        Ok(())
    }
}

impl StateStore for KvState {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Vec<u8>>>> {
        Box::pin(async move {
            let value = self
                .store
                .get(key)
                .await
                .with_context(|| format!("state get {key}"))?;
            Ok(value.map(|b| b.to_vec()))
        })
    }
}
