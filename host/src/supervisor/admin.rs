//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` and
//! `/plugins`, on loopback unless configured otherwise.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::task::JoinHandle;

use super::Handle;
use crate::config::AdminConfig;

/// What the host logs, with `addr=<address>`, once the endpoint is bound.
pub const LISTENING: &str = "admin endpoint listening";

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

struct Admin {
    host: Handle,
    token: Option<String>,
}

/// Bind the endpoint and serve it until the host shuts down. Binding
/// fails start-up: an operator who configured an endpoint must not find
/// out from a missing scrape that it never came up.
pub(crate) async fn spawn(
    config: &AdminConfig,
    host: Handle,
) -> anyhow::Result<(JoinHandle<()>, std::net::SocketAddr)> {
    let addr = config.listen_addr().map_err(anyhow::Error::msg)?;
    let token = config.bearer_token()?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("admin endpoint cannot listen on {addr} (set `admin.listen`, or `admin.enabled = false`)")
    })?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && token.is_none() {
        tracing::warn!(addr = %local, "the admin endpoint is reachable beyond this machine without a token");
    }
    tracing::info!(addr = %local, "{LISTENING}");
    let shutdown = host.shutdown_token();
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/plugins", get(plugins))
        .with_state(Arc::new(Admin { host, token }));
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("admin endpoint stopped: {e}");
        }
    });
    Ok((task, local))
}

/// The process is alive and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when connected to NATS with every plugin of the directory loaded.
async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let reasons = admin.host.unready_reasons().await;
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let body = format!("not ready:\n{}\n", reasons.join("\n"));
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    let metrics = admin.host.metrics();
    let connected =
        admin.host.client().connection_state() == async_nats::connection::State::Connected;
    metrics.set_nats_connected(connected);
    ([(header::CONTENT_TYPE, OPENMETRICS)], metrics.encode()).into_response()
}

async fn plugins(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if !authorized(&admin, &headers) {
        return unauthorized();
    }
    axum::Json(admin.host.plugins().await).into_response()
}

fn authorized(admin: &Admin, headers: &HeaderMap) -> bool {
    let Some(expected) = &admin.token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::secret::bearer_credentials)
        .is_some_and(|given| crate::secret::matches(given, expected))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a bearer token is required\n",
    )
        .into_response()
}
