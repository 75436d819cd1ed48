//! Controlling running hosts over NATS: `weir plugins list` and `weir
//! plugins remove` send a request on `<control.subject-prefix>.plugins`;
//! every host answers for itself, so one command sees a whole fleet.
//!
//! Who may do what: a request carries a token in an `Authorization:
//! Bearer` header. Removing a plugin needs the host's control token, and a
//! host with none configured refuses every removal. Listing shows what
//! `/plugins` shows, so it needs what `/plugins` needs: nothing when the
//! host has no admin token, else the admin or the control token. NATS
//! permissions on the subject are the first line (see the README); the
//! token keeps a client that may publish there from changing the fleet.

use async_nats::HeaderMap;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{Handle, PluginInfo};
use crate::secret;

/// What a control request asks every host for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The plugins each host serves (what `/plugins` shows).
    List,
    /// Remove a plugin: stop it and delete its files.
    Remove {
        /// The plugin's name.
        name: String,
    },
}

/// One host's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Which host answers (see [`host_id`]).
    pub host: String,
    /// Where its admin endpoint listens, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// The plugins it serves, after the request took effect.
    #[serde(default)]
    pub plugins: Vec<PluginInfo>,
    /// For `remove`: the stream of the removed plugin, if this host ran it.
    #[serde(default)]
    pub removed_from_stream: Option<String>,
    /// Why the request was refused or failed on this host.
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

/// The tokens a host checks control requests against.
#[derive(Debug, Clone, Default)]
pub struct Authority {
    /// Allows everything.
    pub control: Option<String>,
    /// Allows listing, as it allows `/plugins`.
    pub admin: Option<String>,
}

impl Authority {
    /// Whether a request presenting `token` may do `request`; the reason
    /// when it may not.
    pub fn check(&self, request: &Request, token: Option<&str>) -> Result<(), String> {
        let is = |expected: &Option<String>| matches!((token, expected), (Some(t), Some(e)) if secret::matches(t, e));
        match request {
            Request::List if self.admin.is_none() || is(&self.control) || is(&self.admin) => Ok(()),
            Request::List => Err("not authorised: listing needs the admin or the control token".into()),
            Request::Remove { .. } if self.control.is_none() => Err(
                "this host accepts no changes over NATS: configure `control.token` (or `control.token-file`) to allow them"
                    .into(),
            ),
            Request::Remove { .. } if is(&self.control) => Ok(()),
            Request::Remove { .. } => Err("not authorised: removing a plugin needs the control token".into()),
        }
    }
}

/// The token an `Authorization: Bearer` header of a request carries.
fn presented(headers: Option<&HeaderMap>) -> Option<&str> {
    headers?
        .get("Authorization")
        .and_then(|v| secret::bearer_credentials(v.as_str()))
}

/// This host, as its answers name it.
struct Answerer {
    host: String,
    admin: Option<String>,
}

impl Answerer {
    fn answer(&self, plugins: Vec<PluginInfo>, removed_from_stream: Option<String>) -> Response {
        Response {
            host: self.host.clone(),
            admin: self.admin.clone(),
            plugins,
            removed_from_stream,
            error: None,
        }
    }

    fn refuse(&self, why: String) -> Response {
        Response {
            error: Some(why),
            ..self.answer(Vec::new(), None)
        }
    }
}

/// Answer control requests on `subject` until the host shuts down; the
/// answers carry `admin`, the address the host's admin endpoint bound.
pub(crate) async fn spawn_responder(
    host: Handle,
    subject: String,
    authority: Authority,
    admin: Option<std::net::SocketAddr>,
) -> anyhow::Result<JoinHandle<()>> {
    let mut requests = host.client().subscribe(subject).await?;
    let shutdown = host.shutdown_token();
    let me = Answerer {
        host: host_id(),
        admin: admin.map(|a| a.to_string()),
    };
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = requests.next() => match m { Some(m) => m, None => break },
            };
            let Some(reply) = message.reply else { continue };
            let request = serde_json::from_slice::<Request>(&message.payload);
            let allowed = match &request {
                Ok(request) => authority.check(request, presented(message.headers.as_ref())),
                Err(_) => Ok(()),
            };
            let response = match (request, allowed) {
                (Ok(request), Err(why)) => {
                    tracing::warn!(?request, "control request refused: {why}");
                    me.refuse(why)
                }
                (Ok(Request::List), Ok(())) => me.answer(host.plugins().await, None),
                (Ok(Request::Remove { name }), Ok(())) => match host.remove(&name).await {
                    Ok(removed) => {
                        if removed.is_some() {
                            tracing::info!(plugin = %name, "plugin removed by request; its consumer is kept");
                        }
                        me.answer(host.plugins().await, removed.and_then(|r| r.stream))
                    }
                    Err(e) => me.refuse(format!("{e:#}")),
                },
                (Err(e), _) => me.refuse(format!("bad request: {e}")),
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

/// Ask every host listening on `subject`, presenting `token`, collecting
/// answers for `wait`.
pub async fn ask(
    client: &async_nats::Client,
    subject: &str,
    request: &Request,
    token: Option<&str>,
    wait: std::time::Duration,
) -> anyhow::Result<Vec<Response>> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    let mut headers = HeaderMap::new();
    if let Some(token) = token {
        headers.insert("Authorization", format!("Bearer {token}").as_str());
    }
    client
        .publish_with_reply_and_headers(
            subject.to_owned(),
            inbox,
            headers,
            serde_json::to_vec(request)?.into(),
        )
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

#[cfg(test)]
mod tests {
    use super::{Authority, Request};

    fn remove() -> Request {
        Request::Remove { name: "p".into() }
    }

    #[test]
    fn without_a_control_token_nothing_can_be_removed() {
        let open = Authority::default();
        assert!(open.check(&Request::List, None).is_ok());
        let why = open.check(&remove(), Some("anything")).unwrap_err();
        assert!(why.contains("control.token"), "{why}");
    }

    #[test]
    fn removing_needs_the_control_token() {
        let host = Authority {
            control: Some("c0ntrol".into()),
            admin: Some("adm1n".into()),
        };
        assert!(host.check(&remove(), Some("c0ntrol")).is_ok());
        assert!(host.check(&remove(), Some("adm1n")).is_err());
        assert!(host.check(&remove(), Some("c0ntro")).is_err());
        assert!(host.check(&remove(), None).is_err());
    }

    #[test]
    fn listing_needs_what_plugins_endpoint_needs() {
        let guarded = Authority {
            control: Some("c0ntrol".into()),
            admin: Some("adm1n".into()),
        };
        assert!(guarded.check(&Request::List, None).is_err());
        assert!(guarded.check(&Request::List, Some("wrong")).is_err());
        assert!(guarded.check(&Request::List, Some("adm1n")).is_ok());
        assert!(guarded.check(&Request::List, Some("c0ntrol")).is_ok());
        // No admin token: /plugins is open, and so is listing.
        let open_admin = Authority {
            control: Some("c0ntrol".into()),
            admin: None,
        };
        assert!(open_admin.check(&Request::List, None).is_ok());
    }
}
