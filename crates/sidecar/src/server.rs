//! The two ports: public (inference, health, status) and private (metrics, admin).

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
pub use greenthread_edge::api_error;
use greenthread_edge::{ApiError, Gate, PathCheck, check_inference_path, echo, read_body};

use crate::{
    error::Rejection,
    proxy::{ForwardError, Forwarder},
    sidecar::Sidecar,
};

#[derive(Clone)]
pub struct AppState {
    pub sidecar: Arc<Sidecar>,
    pub forwarder: Arc<Forwarder>,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            Rejection::QueueFull { .. } => {
                let mut r = api_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    message,
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Rejection::Deadline { .. } => {
                api_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
            }
            Rejection::Failed(_) => api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                message,
            ),
        }
    }
}

/// The public port: inference paths only (see [`greenthread_edge::INFERENCE_PATHS`]) and
/// the sidecar's own `/health`, `/ready`, `/status`. An engine's control API is never
/// reachable from here.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(health))
        .route("/status", get(status))
        .route("/v1/models", get(models))
        .fallback(infer)
        .with_state(state)
}

/// The private port: metrics for Prometheus (kept private by the network policy), and
/// `/admin/*` behind the admin token when one is configured.
pub fn private_router(state: AppState) -> Router {
    let gate = Gate::tokens(state.sidecar.cfg.admin_token.clone());
    let admin = Router::new()
        .route("/admin/sleep", post(admin_sleep))
        .route("/admin/wake", post(admin_wake));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/engine", get(engine_metrics))
        .route("/status", get(status))
        .merge(greenthread_edge::require(
            admin,
            gate,
            "the sidecar's admin token",
        ))
        .fallback(|| async { ApiError::not_found("no such path on the private port") })
        .with_state(state)
}

/// Whether `path` may be forwarded to the engine from a public port; the error answer
/// when not (400 for a path that could escape, 404 for anything but inference).
pub fn public_path(path: &str, extra: &[String]) -> Result<(), ApiError> {
    match check_inference_path(path, extra)? {
        PathCheck::Inference => Ok(()),
        PathCheck::NotInference => Err(ApiError::not_found(format!(
            "{} is not an inference path: this port serves only inference (OpenAI /v1/…, Anthropic /v1/messages, vLLM's /tokenize, /score, …)",
            echo(path)
        ))),
    }
}

/// Liveness and readiness: up once booted whatever the state, so that a sleeping model
/// keeps receiving the traffic that wakes it.
async fn health(State(s): State<AppState>) -> Response {
    if s.sidecar.boot_ready() {
        StatusCode::OK.into_response()
    } else {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "engine is booting",
        )
    }
}

async fn status(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(s.sidecar.status_json())
}

/// Answered from the copy taken at boot: listing models never wakes one.
async fn models(State(s): State<AppState>) -> Response {
    match s.sidecar.cached_models() {
        Some(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        None => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "engine is booting",
        ),
    }
}

async fn infer(State(s): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(e) = public_path(parts.uri.path(), &s.sidecar.cfg.extra_public_paths) {
        return e.into_response();
    }
    let body = match read_body(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            s.sidecar.metrics.request(false);
            return e.into_response();
        }
    };
    relay(&s.sidecar, &s.forwarder, &parts, body).await
}

/// Admits one inference request through `sidecar` (queueing and waking as needed) and
/// relays it to the engine. A request that could not reach the engine is sent again
/// once the engine is back.
pub async fn relay(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: bytes::Bytes,
) -> Response {
    for _ in 0..3 {
        let slot = match sidecar.admit().await {
            Ok(slot) => slot,
            Err(rejection) => {
                sidecar.metrics.request(false);
                return rejection.into_response();
            }
        };
        match forwarder.forward(parts, body.clone(), slot).await {
            Ok(resp) => {
                sidecar.engine_answered();
                sidecar.metrics.request(resp.status().as_u16() < 400);
                return resp;
            }
            Err(ForwardError::Unreachable(e)) => sidecar.engine_lost(&e),
            Err(ForwardError::Failed(e)) => {
                sidecar.metrics.request(false);
                return api_error(StatusCode::BAD_GATEWAY, "engine_error", e);
            }
            Err(ForwardError::Timeout(after)) => {
                // The slot went with the dropped request; the engine may be wedged.
                sidecar.engine_timed_out(after);
                sidecar.metrics.request(false);
                return api_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "the engine of model {} sent no response within {after:?}",
                        sidecar.cfg.model
                    ),
                );
            }
        }
    }
    sidecar.metrics.request(false);
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        "engine unreachable after restarts",
    )
}

async fn metrics(State(s): State<AppState>) -> Response {
    greenthread_edge::metrics(s.sidecar.metrics.encode())
}

/// The engine's own metrics, re-exported for the vLLM monitor; never counts as traffic.
async fn engine_metrics(State(s): State<AppState>) -> Response {
    reexport_engine_metrics(&s.sidecar).await
}

/// `sidecar`'s engine's exposition as a response (also used by the API server in `local`).
pub async fn reexport_engine_metrics(sidecar: &Sidecar) -> Response {
    match sidecar.engine().metrics().await {
        Ok((content_type, body)) => {
            ([(header::CONTENT_TYPE, content_type)], Body::from(body)).into_response()
        }
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            e.to_string(),
        ),
    }
}

async fn admin_sleep(State(s): State<AppState>) -> Response {
    match s.sidecar.deactivate("admin").await {
        Ok(()) => Json(s.sidecar.status_json()).into_response(),
        Err(e) => api_error(StatusCode::CONFLICT, "conflict", e.to_string()),
    }
}

async fn admin_wake(State(s): State<AppState>) -> Response {
    match s.sidecar.admit().await {
        Ok(slot) => {
            drop(slot);
            Json(s.sidecar.status_json()).into_response()
        }
        Err(r) => r.into_response(),
    }
}
