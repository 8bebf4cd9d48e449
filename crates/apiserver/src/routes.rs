use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::{Body, Bytes, to_bytes},
    extract::{Path, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use greenthread_sidecar::api_error;
use serde_json::{Value, json};

use crate::{ApiServer, ModelRoute};

type Shared = Arc<ApiServer>;

const MAX_BODY: usize = 64 << 20;

pub fn router(api: Shared) -> Router {
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics))
        .route("/metrics/engine/{pod}", get(engine_metrics))
        .route("/prometheus/targets", get(scrape_targets))
        .route("/v1/models", get(list_models))
        .route("/v1/{*rest}", post(by_body))
        .route("/{model}/v1/{*rest}", post(by_prefix).get(by_prefix))
        .route("/api/v1/models", get(admin_models))
        .route("/api/v1/models/{name}", get(admin_model))
        .route("/api/v1/models/{name}/sleep", post(admin_sleep))
        .route("/api/v1/models/{name}/wake", post(admin_wake))
        .route("/api/v1/gpus", get(admin_gpus))
        .route("/api/v1/gpus/{name}", get(admin_gpu))
        .route("/api/v1/events", get(events))
        .with_state(api)
}

fn unauthorized(admin: bool) -> Response {
    let what = if admin {
        "a valid admin token"
    } else {
        "a valid API key"
    };
    api_error(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        format!("this endpoint needs {what} as `Authorization: Bearer …`"),
    )
}

fn unknown_model(api: &ApiServer, model: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "The model `{model}` does not exist. Known models: {}",
            api.known_models()
        ),
    )
}

/// A known model with no replica running yet (its pods are still being scheduled).
fn no_replica(model: &str) -> Response {
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        format!("no replica of model `{model}` is running yet"),
    )
}

async fn by_body(State(api): State<Shared>, req: Request) -> Response {
    if !api.auth.api_allowed(req.headers()) {
        return unauthorized(false);
    }
    let (parts, body) = req.into_parts();
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("reading request body: {e}"),
            );
        }
    };
    let mut json: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("request body is not valid JSON: {e}"),
            );
        }
    };
    let Some(model) = json
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the request body has no `model` field (a string)",
        );
    };
    let Some(route) = api.route(&model) else {
        api.metrics.observe("unknown", 404, 0.0);
        return unknown_model(&api, &model);
    };
    // The engine knows its model by its own id.
    let body = if model != route.model_name {
        json["model"] = Value::String(route.model_name.clone());
        Bytes::from(serde_json::to_vec(&json).expect("a JSON value serializes"))
    } else {
        body
    };
    send(&api, &route, parts, body).await
}

async fn by_prefix(
    State(api): State<Shared>,
    Path((model, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    if !api.auth.api_allowed(req.headers()) {
        return unauthorized(false);
    }
    let Some(route) = api.route(&model) else {
        return unknown_model(&api, &model);
    };
    if rest == "models" {
        return Json(json!({"object": "list", "data": [model_entry(&route)]})).into_response();
    }
    let (mut parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = match format!("/v1/{rest}{query}").parse() {
        Ok(u) => u,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("bad path: {e}"),
            );
        }
    };
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("reading request body: {e}"),
            );
        }
    };
    send(&api, &route, parts, body).await
}

async fn send(
    api: &ApiServer,
    route: &ModelRoute,
    parts: http::request::Parts,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    let resp = match route.pick() {
        Some(replica) => replica.relay(&parts, body).await,
        None => no_replica(&route.name),
    };
    api.metrics.observe(
        &route.name,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    resp
}

fn model_entry(route: &ModelRoute) -> Value {
    json!({
        "id": route.name,
        "object": "model",
        "owned_by": "greenthread",
        "root": route.model_name,
        "state": route.state(),
    })
}

/// Every model with its state, from the sidecars: listing never wakes anything.
async fn list_models(State(api): State<Shared>, req: Request) -> Response {
    if !api.auth.api_allowed(req.headers()) {
        return unauthorized(false);
    }
    let data: Vec<Value> = api.models().values().map(|m| model_entry(m)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(api): State<Shared>) -> Response {
    (api.refresh)();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        api.families.encode(&api.registry),
    )
        .into_response()
}

/// One engine's own metrics (vLLM's names), re-exported as the sidecar does on its
/// private port; scraping never counts as traffic.
async fn engine_metrics(State(api): State<Shared>, Path(pod): Path<String>) -> Response {
    let models = api.models();
    let Some(replica) = models
        .values()
        .flat_map(|m| m.replicas.iter())
        .find(|r| r.pod == pod)
    else {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no pod {pod:?}"),
        );
    };
    replica.engine_metrics().await
}

/// Prometheus HTTP service discovery: one target per engine, labeled with its model and
/// pod, so that the vLLM dashboard works in `local` mode as on Kubernetes.
async fn scrape_targets(State(api): State<Shared>, headers: http::HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1:8000")
        .to_string();
    let groups: Vec<Value> = api
        .models()
        .values()
        .flat_map(|m| {
            let host = host.clone();
            m.replicas.iter().map(move |r| {
                json!({
                    "targets": [host],
                    "labels": {"__metrics_path__": format!("/metrics/engine/{}", r.pod), "model": m.name, "pod": r.pod},
                })
            })
        })
        .collect();
    Json(groups).into_response()
}

fn model_status(route: &ModelRoute) -> Value {
    let replicas: Vec<Value> = route.replicas.iter().map(|r| r.status_json()).collect();
    let serving = route
        .replicas
        .iter()
        .filter(|r| r.state() == "serving")
        .count();
    let sleeping = route
        .replicas
        .iter()
        .filter(|r| r.state() == "sleeping")
        .count();
    json!({
        "name": route.name,
        "modelName": route.model_name,
        "state": route.state(),
        "replicas": route.replicas.len(),
        "servingReplicas": serving,
        "sleepingReplicas": sleeping,
        "pods": replicas,
    })
}

macro_rules! admin_guard {
    ($api:expr, $headers:expr) => {
        if !$api.auth.admin_allowed($headers) {
            return unauthorized(true);
        }
    };
}

async fn admin_models(State(api): State<Shared>, headers: http::HeaderMap) -> Response {
    admin_guard!(api, &headers);
    let items: Vec<Value> = api.models().values().map(|m| model_status(m)).collect();
    Json(json!({"items": items})).into_response()
}

async fn admin_model(
    State(api): State<Shared>,
    Path(name): Path<String>,
    headers: http::HeaderMap,
) -> Response {
    admin_guard!(api, &headers);
    match api.models().get(&name) {
        Some(m) => Json(model_status(m)).into_response(),
        None => unknown_model(&api, &name),
    }
}

async fn admin_sleep(
    State(api): State<Shared>,
    Path(name): Path<String>,
    headers: http::HeaderMap,
) -> Response {
    admin_guard!(api, &headers);
    let Some(route) = api.models().get(&name).cloned() else {
        return unknown_model(&api, &name);
    };
    let mut errors = Vec::new();
    for r in &route.replicas {
        if r.state() == "serving"
            && let Err(e) = r.sleep().await
        {
            errors.push(format!("{}: {e}", r.pod));
        }
    }
    if !errors.is_empty() {
        return api_error(StatusCode::CONFLICT, "conflict", errors.join("; "));
    }
    Json(model_status(&route)).into_response()
}

async fn admin_wake(
    State(api): State<Shared>,
    Path(name): Path<String>,
    headers: http::HeaderMap,
) -> Response {
    admin_guard!(api, &headers);
    let Some(route) = api.models().get(&name).cloned() else {
        return unknown_model(&api, &name);
    };
    let Some(replica) = route.pick() else {
        return no_replica(&name);
    };
    match replica.wake().await {
        Ok(()) => Json(model_status(&route)).into_response(),
        Err(resp) => resp,
    }
}

/// A GPU record shaped like the `GPU` resource.
fn gpu_object(g: &greenthread_api::Gpu) -> Value {
    json!({
        "apiVersion": "greenthread.ai/v1alpha1",
        "kind": "GPU",
        "metadata": {"name": g.name, "namespace": "local", "resourceVersion": g.resource_version},
        "spec": g.spec,
        "status": g.status,
    })
}

async fn admin_gpus(State(api): State<Shared>, headers: http::HeaderMap) -> Response {
    admin_guard!(api, &headers);
    match api.ledger.list().await {
        Ok(gpus) => Json(json!({
            "apiVersion": "greenthread.ai/v1alpha1",
            "kind": "GPUList",
            "items": gpus.iter().map(gpu_object).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
    }
}

async fn admin_gpu(
    State(api): State<Shared>,
    Path(name): Path<String>,
    headers: http::HeaderMap,
) -> Response {
    admin_guard!(api, &headers);
    match api.ledger.get(&name).await {
        Ok(g) => Json(gpu_object(&g)).into_response(),
        Err(greenthread_ledger::LedgerError::NotFound(_)) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("gpu {name:?} does not exist"),
        ),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ),
    }
}

/// Server-sent events: the current state of every replica, then every transition.
async fn events(State(api): State<Shared>, headers: http::HeaderMap) -> Response {
    admin_guard!(api, &headers);
    let rx = api.events.subscribe();
    let snapshot: Vec<String> = api
        .models()
        .values()
        .flat_map(|m| {
            m.replicas.iter().map(|r| {
                let e = json!({"model": m.name, "pod": r.pod, "from": null, "to": r.state(), "at": jiff::Timestamp::now().to_string()});
                format!("event: state\ndata: {e}\n\n")
            })
        })
        .collect();
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let frame = format!(
                        "event: state\ndata: {}\n\n",
                        serde_json::to_string(&e).expect("events serialize")
                    );
                    return Some((frame, rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures_util::stream::iter(snapshot)
        .chain(live)
        .map(|s| Ok::<_, std::io::Error>(Bytes::from(s)));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}
