//! Controlling running hosts over NATS: `weir plugins list` and `weir
//! plugins remove` send a request on [`SUBJECT`]; every host answers for
//! itself, so one command sees a whole fleet.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::runtime::{HostHandle, PluginInfo};

/// Where hosts listen for control requests.
pub const SUBJECT: &str = "weir.control.plugins";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    List,
    Remove { name: String },
}

/// One host's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub host: String,
    #[serde(default)]
    pub plugins: Vec<PluginInfo>,
    /// For `remove`: the stream of the removed plugin, if this host ran it.
    #[serde(default)]
    pub removed_from_stream: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A name for this host process in answers: hostname and pid.
pub fn host_id() -> String {
    let hostname = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    format!("{hostname}:{}", std::process::id())
}

pub(crate) async fn spawn_responder(host: HostHandle) -> anyhow::Result<JoinHandle<()>> {
    let mut requests = host.client().subscribe(SUBJECT).await?;
    let shutdown = host.shutdown_token();
    let id = host_id();
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = requests.next() => match m { Some(m) => m, None => break },
            };
            let Some(reply) = message.reply else { continue };
            let response = match serde_json::from_slice::<Request>(&message.payload) {
                Ok(Request::List) => Response {
                    host: id.clone(),
                    plugins: host.plugins().await,
                    removed_from_stream: None,
                    error: None,
                },
                Ok(Request::Remove { name }) => match host.remove(&name).await {
                    Ok(removed) => {
                        if removed.is_some() {
                            tracing::info!(plugin = %name, "plugin removed by request; its consumer is kept");
                        }
                        Response {
                            host: id.clone(),
                            plugins: host.plugins().await,
                            removed_from_stream: removed.and_then(|r| r.stream),
                            error: None,
                        }
                    }
                    Err(e) => Response {
                        host: id.clone(),
                        plugins: Vec::new(),
                        removed_from_stream: None,
                        error: Some(format!("{e:#}")),
                    },
                },
                Err(e) => Response {
                    host: id.clone(),
                    plugins: Vec::new(),
                    removed_from_stream: None,
                    error: Some(format!("bad request: {e}")),
                },
            };
            match serde_json::to_vec(&response) {
                Ok(body) => {
                    if let Err(e) = host.client().publish(reply, body.into()).await {
                        tracing::warn!("answering a control request: {e}");
                    }
                }
                Err(e) => tracing::warn!("encoding a control answer: {e}"),
            }
        }
    }))
}

/// Ask every host, collecting answers for `wait`.
pub async fn ask(
    client: &async_nats::Client,
    request: &Request,
    wait: std::time::Duration,
) -> anyhow::Result<Vec<Response>> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(SUBJECT, inbox, serde_json::to_vec(request)?.into())
        .await?;
    client.flush().await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await {
        // Not every reply comes from a host: a stream capturing the control
        // subject acknowledges the request too. Only host answers count.
        match serde_json::from_slice::<Response>(&message.payload) {
            Ok(response) if !response.host.is_empty() => out.push(response),
            _ => tracing::debug!(
                "ignoring a reply that is not a host's answer: {}",
                String::from_utf8_lossy(&message.payload)
            ),
        }
    }
    out.sort_by(|a: &Response, b: &Response| a.host.cmp(&b.host));
    Ok(out)
}
