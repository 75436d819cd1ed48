//! Plugins deployed through a NATS Object Store bucket, for a fleet of
//! hosts: `weir plugins deploy` uploads a version once, and every host
//! configured with `[plugins] bucket` converges on it.
//!
//! The bucket holds
//!
//! - `releases/NAME/RELEASE.toml` and `releases/NAME/RELEASE.wasm`: one
//!   deployed release of a plugin, never changed once written. A release is
//!   the component's version and a digest of its manifest, so a manifest
//!   change is a release too;
//! - `plugins/NAME.json`: the plugin's [`Deployment`]: its current release
//!   and the ones before it, newest first, which `rollback` returns to.
//!
//! A host does not run plugins from the bucket directly: it writes the
//! current release's files into its plugin directory, manifest first, and
//! the directory's usual path (scan, compile through the cache, safe swap)
//! takes it from there. So the directory keeps working beside the bucket,
//! and a plugin's files on disk always say what runs. Beside each plugin it
//! wrote, a host keeps `.NAME.release` naming the release; a plugin whose
//! deployment is gone from the bucket has its files removed only if that
//! marker says the bucket put them there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use async_nats::jetstream::{self, object_store};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::config::PluginsConfig;
use crate::sandbox::plugin::PluginVersion;

/// The metadata key of a pointer object holding its [`Deployment`].
const DEPLOYMENT_KEY: &str = "weir-deployment";

/// Longest one pass over the bucket may take: a read of a release removed
/// meanwhile (a rollback) waits for chunks that are gone, and reads of a
/// replicated stream can stall while its leader moves. The next pass
/// starts over.
const SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Releases kept for rollback, besides the current one.
const KEEP_PREVIOUS: usize = 5;

/// Where a plugin stands in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deployment {
    /// The current release.
    pub release: String,
    /// Its component's version, as hosts report it.
    pub version: String,
    /// Earlier releases, newest first.
    #[serde(default)]
    pub previous: Vec<String>,
    /// When it was deployed (RFC 3339).
    #[serde(default)]
    pub deployed_at: String,
}

/// The release of `wasm` with `manifest`.
pub fn release_of(version: &PluginVersion, manifest: &str) -> String {
    let digest = Sha256::digest(manifest.as_bytes());
    format!("{version}-{}", &hex::encode(digest)[..8])
}

/// The component version a release names.
fn version_in(release: &str) -> &str {
    release
        .rsplit_once('-')
        .map_or(release, |(version, _)| version)
}

/// A deployment's bucket.
pub struct PluginBucket {
    store: object_store::ObjectStore,
    name: String,
}

impl PluginBucket {
    /// Open the bucket `config` names, if it names one; with `create`,
    /// creating it when it does not exist (else `None`).
    pub async fn open(
        js: &jetstream::Context,
        config: &PluginsConfig,
        create: bool,
    ) -> anyhow::Result<Option<Self>> {
        let Some(name) = &config.bucket else {
            return Ok(None);
        };
        let store = match js.get_object_store(name).await {
            Ok(store) => store,
            Err(_) if !create => return Ok(None),
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: name.clone(),
                    description: Some("Weir plugin releases and deployments".into()),
                    num_replicas: config.bucket_replicas,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the plugin bucket {name}"))?,
        };
        Ok(Some(PluginBucket {
            store,
            name: name.clone(),
        }))
    }

    /// The Object Store bucket's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every deployed plugin's deployment.
    pub async fn deployments(&self) -> anyhow::Result<BTreeMap<String, Deployment>> {
        let mut listing = self
            .store
            .list()
            .await
            .with_context(|| format!("listing {}", self.name))?;
        let mut deployments = BTreeMap::new();
        while let Some(info) = listing.next().await {
            let info = info.with_context(|| format!("listing {}", self.name))?;
            if let Some(plugin) = info
                .name
                .strip_prefix("plugins/")
                .and_then(|n| n.strip_suffix(".json"))
                && !info.deleted
            {
                deployments.insert(plugin.to_owned(), self.parse(&info)?);
            }
        }
        Ok(deployments)
    }

    /// `plugin`'s deployment, if it has one.
    pub async fn deployment(&self, plugin: &str) -> anyhow::Result<Option<Deployment>> {
        use object_store::InfoErrorKind;
        match self.store.info(pointer(plugin)).await {
            Ok(info) if !info.deleted => Ok(Some(self.parse(&info)?)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("reading {plugin}'s deployment from {}", self.name))
            }
        }
    }

    /// The deployment record lives in the pointer object's metadata, read
    /// in one message with the object's info: reading its content instead
    /// races with a deploy replacing it, whose write purges the chunks
    /// being read.
    fn parse(&self, info: &object_store::ObjectInfo) -> anyhow::Result<Deployment> {
        let record = info
            .metadata
            .get(DEPLOYMENT_KEY)
            .with_context(|| format!("{} in {} has no deployment record", info.name, self.name))?;
        serde_json::from_str(record)
            .with_context(|| format!("{} in {} is not a deployment record", info.name, self.name))
    }

    /// The manifest and component of one release.
    pub async fn release(&self, plugin: &str, release: &str) -> anyhow::Result<(String, Vec<u8>)> {
        let missing = |what: &str| {
            format!(
                "release {release} of {plugin} has no {what} in {}",
                self.name
            )
        };
        let manifest = self
            .read(&release_object(plugin, release, "toml"))
            .await?
            .with_context(|| missing("manifest"))?;
        let wasm = self
            .read(&release_object(plugin, release, "wasm"))
            .await?
            .with_context(|| missing("component"))?;
        let manifest = String::from_utf8(manifest).with_context(|| missing("UTF-8 manifest"))?;
        Ok((manifest, wasm))
    }

    /// Upload a release (unless it is there already) and make it current.
    /// The caller has validated it.
    pub async fn deploy(
        &self,
        plugin: &str,
        version: &PluginVersion,
        manifest: &str,
        wasm: &[u8],
    ) -> anyhow::Result<Deployment> {
        let release = release_of(version, manifest);
        // The manifest first: a host that sees the component finds both.
        self.write(
            &release_object(plugin, &release, "toml"),
            manifest.as_bytes(),
        )
        .await?;
        self.write(&release_object(plugin, &release, "wasm"), wasm)
            .await?;
        let mut previous = Vec::new();
        if let Some(current) = self.deployment(plugin).await? {
            if current.release == release {
                return Ok(current);
            }
            previous.push(current.release);
            previous.extend(current.previous.into_iter().filter(|r| *r != release));
        }
        let dropped = previous.split_off(previous.len().min(KEEP_PREVIOUS));
        let deployment = Deployment {
            version: version_in(&release).to_owned(),
            release,
            previous,
            deployed_at: now(),
        };
        self.set(plugin, &deployment).await?;
        for old in dropped {
            self.delete_release(plugin, &old).await;
        }
        Ok(deployment)
    }

    /// Make the release before the current one current again.
    pub async fn rollback(&self, plugin: &str) -> anyhow::Result<Deployment> {
        let current = self
            .deployment(plugin)
            .await?
            .with_context(|| format!("{plugin} is not deployed in {}", self.name))?;
        let Some((release, older)) = current.previous.split_first() else {
            anyhow::bail!(
                "{plugin} has no earlier release in {} to roll back to (it runs {})",
                self.name,
                current.release
            );
        };
        let deployment = Deployment {
            version: version_in(release).to_owned(),
            release: release.clone(),
            previous: older.to_vec(),
            deployed_at: now(),
        };
        self.set(plugin, &deployment).await?;
        // The rolled-back release cannot be rolled forward to: it goes.
        self.delete_release(plugin, &current.release).await;
        Ok(deployment)
    }

    /// Remove `plugin`'s deployment and releases; whether it had one.
    pub async fn remove(&self, plugin: &str) -> anyhow::Result<bool> {
        let Some(current) = self.deployment(plugin).await? else {
            return Ok(false);
        };
        self.store
            .delete(pointer(plugin))
            .await
            .with_context(|| format!("removing {plugin}'s deployment from {}", self.name))?;
        for release in std::iter::once(current.release).chain(current.previous) {
            self.delete_release(plugin, &release).await;
        }
        Ok(true)
    }

    async fn set(&self, plugin: &str, deployment: &Deployment) -> anyhow::Result<()> {
        let record = serde_json::to_string(deployment)?;
        let meta = object_store::ObjectMetadata {
            name: pointer(plugin),
            metadata: [(DEPLOYMENT_KEY.to_owned(), record.clone())].into(),
            ..Default::default()
        };
        // The same record as content, for people reading the bucket with
        // other tools.
        self.store
            .put(meta, &mut record.as_bytes())
            .await
            .with_context(|| format!("writing {plugin}'s deployment to {}", self.name))?;
        Ok(())
    }

    async fn delete_release(&self, plugin: &str, release: &str) {
        for ext in ["wasm", "toml"] {
            let object = release_object(plugin, release, ext);
            if let Err(e) = self.store.delete(&object).await {
                tracing::debug!(bucket = %self.name, %object, "deleting an old release: {e}");
            }
        }
    }

    async fn write(&self, object: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.store
            .put(object, &mut &bytes[..])
            .await
            .with_context(|| format!("writing {object} to {}", self.name))?;
        Ok(())
    }

    async fn read(&self, object: &str) -> anyhow::Result<Option<Vec<u8>>> {
        use object_store::GetErrorKind;
        let mut reader = match self.store.get(object).await {
            Ok(reader) => reader,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {object} from {}", self.name));
            }
        };
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .await
            .with_context(|| format!("reading {object} from {}", self.name))?;
        Ok(Some(bytes))
    }

    /// A watch of the bucket's changes; `None` when it cannot be set up,
    /// and the caller relies on its periodic check.
    pub async fn changes(&self) -> Option<object_store::Watch> {
        match self.store.watch().await {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!(bucket = %self.name, "cannot watch the plugin bucket, checking it periodically: {e}");
                None
            }
        }
    }
}

fn pointer(plugin: &str) -> String {
    format!("plugins/{plugin}.json")
}

fn release_object(plugin: &str, release: &str, ext: &str) -> String {
    format!("releases/{plugin}/{release}.{ext}")
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The marker beside a plugin the bucket put in `dir`.
fn marker(dir: &Path, plugin: &str) -> PathBuf {
    dir.join(format!(".{plugin}.release"))
}

/// Bring `dir` in line with the bucket: write the files of each deployed
/// plugin whose release changed, remove those of plugins this host got from
/// the bucket and that are no longer deployed. Returns whether anything
/// changed.
pub async fn materialize(bucket: &PluginBucket, dir: &Path) -> anyhow::Result<bool> {
    let deployed = bucket.deployments().await?;
    let mut changed = false;
    for (plugin, deployment) in &deployed {
        let here = std::fs::read_to_string(marker(dir, plugin)).ok();
        if here.as_deref() == Some(deployment.release.as_str()) {
            continue;
        }
        let (manifest, wasm) = bucket.release(plugin, &deployment.release).await?;
        write_atomically(dir, &format!("{plugin}.toml"), manifest.as_bytes())?;
        write_atomically(dir, &format!("{plugin}.wasm"), &wasm)?;
        write_atomically(
            dir,
            &format!(".{plugin}.release"),
            deployment.release.as_bytes(),
        )?;
        tracing::info!(%plugin, release = %deployment.release, bucket = %bucket.name(), "plugin release written from the bucket");
        changed = true;
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let Some(plugin) = name
            .to_str()
            .and_then(|n| n.strip_prefix('.'))
            .and_then(|n| n.strip_suffix(".release"))
        else {
            continue;
        };
        if deployed.contains_key(plugin) {
            continue;
        }
        for file in [
            dir.join(format!("{plugin}.wasm")),
            dir.join(format!("{plugin}.toml")),
            marker(dir, plugin),
        ] {
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
            }
        }
        tracing::info!(%plugin, bucket = %bucket.name(), "plugin no longer deployed in the bucket; its files are removed");
        changed = true;
    }
    Ok(changed)
}

/// Keep `dir` in line with the bucket until `stop` fires: on every change
/// the bucket's watch reports, and every `period` in case one was missed
/// (or the watch broke with the connection). After a change, `changed` is
/// awaited: the host's reconcile, which serves what the directory now holds.
pub fn spawn_sync<F, Fut>(
    bucket: PluginBucket,
    dir: PathBuf,
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    changed: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut check = tokio::time::interval(period);
        check.tick().await;
        let mut watch = bucket.changes().await;
        loop {
            let watched = async {
                match watch.as_mut() {
                    Some(w) => w.next().await.map(|r| r.is_ok()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = check.tick() => {
                    tracing::debug!(bucket = %bucket.name(), "periodic check of the plugin bucket");
                    if watch.is_none() {
                        watch = bucket.changes().await;
                    }
                }
                event = watched => {
                    tracing::debug!(bucket = %bucket.name(), ?event, "the plugin bucket changed");
                    if event != Some(true) {
                        // The watch ended or failed: set it up again.
                        watch = bucket.changes().await;
                    }
                }
            }
            match tokio::time::timeout(SYNC_TIMEOUT, materialize(&bucket, &dir)).await {
                Ok(Ok(true)) => changed().await,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(bucket = %bucket.name(), "syncing plugins from the bucket, trying again: {e:#}")
                }
                Err(_) => {
                    tracing::warn!(bucket = %bucket.name(), "syncing plugins from the bucket took over {SYNC_TIMEOUT:?}; trying again")
                }
            }
        }
    })
}

/// Write beside the target and rename into place, so a scan never reads a
/// half-written file.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let target = dir.join(name);
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &target).with_context(|| format!("writing {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_the_version_and_the_manifest() {
        let version = PluginVersion::of(b"component");
        let one = release_of(&version, "subjects = [\"a\"]");
        let two = release_of(&version, "subjects = [\"b\"]");
        assert_ne!(one, two);
        assert_eq!(version_in(&one), version.as_str());
        assert!(
            one.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{one}"
        );
    }
}
