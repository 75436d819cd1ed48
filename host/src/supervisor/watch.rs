//! Watching the plugin directory: file events are debounced, then the host
//! reconciles the running plugins with what the directory holds.
//!
//! Debouncing absorbs the bursts one deployment makes (write `.toml`, write
//! `.wasm` in chunks, rename a temp file into place). A half-written
//! component fails to compile; the rejection is logged, the running version
//! keeps serving, and the write that completes the file triggers another
//! reconcile that succeeds. A periodic rescan covers missed notifications.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use tokio::task::JoinHandle;

use super::Handle;

/// A full rescan of the plugin directory this often, whatever the watcher says.
pub const RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Quiet time after the last file event before reconciling.
const DEBOUNCE: Duration = Duration::from_millis(300);

pub(crate) fn spawn(dir: PathBuf, host: Handle) -> anyhow::Result<JoinHandle<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(e) => !e.kind.is_access(),
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })
    .context("starting the plugin directory watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let shutdown = host.shutdown_token();
    Ok(tokio::spawn(async move {
        // Keep the watcher alive as long as this task.
        let _watcher = watcher;
        let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
        rescan.tick().await;
        loop {
            // A failed start to retry, or a lone file to report, comes due
            // without any file event.
            let due = host.next_wakeup().await;
            let due = async move {
                match due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = due => {}
                event = rx.recv() => {
                    if event.is_none() {
                        break;
                    }
                    // Wait for the burst to settle.
                    loop {
                        tokio::select! {
                            more = rx.recv() => if more.is_none() { break },
                            _ = tokio::time::sleep(DEBOUNCE) => break,
                        }
                    }
                }
                _ = rescan.tick() => {}
            }
            if let Err(e) = host.reconcile().await {
                tracing::error!(dir = %dir.display(), "reconciling plugins: {e:#}");
            }
        }
    }))
}
