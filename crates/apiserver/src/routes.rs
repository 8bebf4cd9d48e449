use std::sync::Arc;

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use greenthread_edge::{ApiError, echo, named::named, read_body, require};
use greenthread_sidecar::{api_error, public_path};
use serde_json::{Value, json};

use greenthread_api::{PRIORITY_HEADER, Priority};

use crate::{
    ApiServer, Lookup, ModelRoute,
    keys::{self, Identity},
    usage,
};

type Shared = Arc<ApiServer>;

/// The API server's routes, each part behind its gate: `/health` and the status page's
/// files (they hold no data; the page reads the admin API) open; metrics behind
/// the metrics token (if any); the OpenAI API behind the API keys; `/api/v1` behind the
/// admin token.
pub fn router(api: Shared) -> Router {
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/engine/{*pod}", get(engine_metrics))
        .route("/prometheus/targets", get(scrape_targets));
    let openai = Router::new()
        .merge(crate::batch::router())
        .route("/v1/models", get(list_models))
        .route("/v1/{*rest}", post(by_body))
        .route("/{model}/v1/{*rest}", post(by_prefix).get(by_prefix))
        .route(
            "/{namespace}/{model}/v1/{*rest}",
            post(by_prefix).get(by_prefix),
        );
    let admin = Router::new()
        .route("/api/v1/models", get(admin_models).post(add_model))
        .route(
            "/api/v1/models/{a}",
            get(admin_model)
                .put(replace_model)
                .delete(remove_model)
                .patch(patch_model),
        )
        .route("/api/v1/models/{a}/{b}", get(admin_model))
        .route("/api/v1/models/{a}/sleep", post(admin_sleep))
        .route("/api/v1/models/{a}/{b}/sleep", post(admin_sleep))
        .route("/api/v1/models/{a}/wake", post(admin_wake))
        .route("/api/v1/models/{a}/{b}/wake", post(admin_wake))
        .route("/api/v1/gpus", get(admin_gpus))
        .route("/api/v1/gpus/{name}", get(admin_gpu))
        .route("/api/v1/events", get(events))
        .route("/api/v1/keys", get(list_keys).post(create_key))
        .route("/api/v1/keys/{name}", axum::routing::delete(revoke_key));
    let auth = api.auth.clone();
    let keys = auth.keys.clone();
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .merge(crate::ui::router())
        .merge(require(metrics, auth.metrics, "the metrics token"))
        .merge(
            openai.route_layer(axum::middleware::from_fn(move |req, next| {
                keys.clone().layer(req, next)
            })),
        )
        .merge(require(admin, auth.admin, "a valid admin token"))
        .fallback(|| async { ApiError::not_found("no such path") })
        .with_state(api)
}

fn unknown_model(api: &ApiServer, model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "The model {} does not exist. Known models: {}",
            echo(model),
            api.known_models()
        ),
    )
}

fn ambiguous(model: &str, candidates: &[String]) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "model_ambiguous",
        format!(
            "{} names a Model in several namespaces; say which as namespace/name: {}",
            echo(model),
            candidates.join(", ")
        ),
    )
}

/// The route `model` names, and the adapter when it names one; or why there is none.
fn resolve(api: &ApiServer, model: &str) -> Result<Target, ApiError> {
    match api.lookup(model) {
        Lookup::Found(route) => Ok((route, None)),
        Lookup::Adapter(route, adapter) => Ok((route, Some(adapter))),
        Lookup::Unknown => Err(unknown_model(api, model)),
        Lookup::Ambiguous(c) => Err(ambiguous(model, &c)),
    }
}

/// A Model's route, and the adapter of it a request names (if any).
type Target = (Arc<ModelRoute>, Option<String>);

/// A route the Model does not serve (its `endpoints`, or its `modelType`'s), naming
/// those it does.
fn not_served(route: &ModelRoute, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "endpoint_not_served",
        format!(
            "The model {} does not serve {}; it serves {}",
            echo(&route.name),
            echo(path),
            route.endpoints.as_deref().unwrap_or_default().join(", ")
        ),
    )
}

/// A known model with no replica running yet (its pods are still being scheduled).
fn no_replica(model: &str) -> ApiError {
    ApiError::unavailable(format!(
        "no replica of model {} is running yet",
        echo(model)
    ))
}

async fn by_body(State(api): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Err(e) = public_path(parts.uri.path(), &[]) {
        return e.into_response();
    }
    let body = match read_body(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let named = match named(&parts.headers, &body) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let who = identity(&parts);
    let (route, adapter) = match admit(&api, &who, named.model()) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    // The engine knows its model by its own id, and an adapter by the adapter's name
    // (the sidecar turns it into what its engine expects).
    let engine_name = adapter.as_deref().unwrap_or(&route.model_name);
    let body = if named.model() != engine_name {
        named.rename(&body, engine_name)
    } else {
        body
    };
    send(&api, &who, &route, parts, body).await
}

/// Who sent the request (the key layer put it there).
fn identity(parts: &http::request::Parts) -> Identity {
    parts
        .extensions
        .get::<Identity>()
        .cloned()
        .unwrap_or(Identity(None))
}

/// The route `model` names if `who` may use it now: 404 for an unknown model, 403 for
/// one outside the key's models, 429 past its limits, each counted for the key.
/// A key that may use a Model may use its adapters (they run on its replicas).
fn admit(api: &ApiServer, who: &Identity, model: &str) -> Result<Target, Box<Response>> {
    let (route, adapter) =
        resolve(api, model).map_err(|e| Box::new(refused(api, who, "unknown", e)))?;
    if let Some(caller) = &who.0 {
        if !who.may_use(&route) {
            let e = keys::forbidden(&caller.key.name, model);
            return Err(Box::new(refused(api, who, &route.name, e)));
        }
        if let Err(after) = caller.admit(tokio::time::Instant::now()) {
            let e = keys::limited(&caller.key.name, after);
            return Err(Box::new(refused(api, who, &route.name, e)));
        }
    }
    Ok((route, adapter))
}

async fn by_prefix(State(api): State<Shared>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    // The raw path, not the decoded parameters: `%2F..` must not become `/..` here.
    let raw = parts.uri.path().to_string();
    let mut segments = raw[1..].splitn(3, '/');
    let first = segments.next().unwrap_or_default();
    let second = segments.next().unwrap_or_default();
    let (model, forwarded) = if second == "v1" {
        (first.to_string(), &raw[1 + first.len()..])
    } else {
        (
            format!("{first}/{second}"),
            &raw[2 + first.len() + second.len()..],
        )
    };
    if let Err(e) = public_path(forwarded, &[]) {
        return e.into_response();
    }
    let who = identity(&parts);
    let (route, adapter) = match admit(&api, &who, &model) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    if forwarded == "/v1/models" {
        let routes = api.models();
        let entry = match &adapter {
            Some(a) => adapter_entry(&api, &routes, &route, a),
            None => model_entry(&api, &routes, &route),
        };
        return Json(json!({"object": "list", "data": [entry]})).into_response();
    }
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = match format!("{forwarded}{query}").parse() {
        Ok(u) => u,
        Err(e) => return ApiError::bad_request(format!("bad path: {e}")).into_response(),
    };
    let body = match read_body(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    send(&api, &who, &route, parts, body).await
}

/// An OpenAI request refused before it went anywhere, counted for `model` (`unknown`
/// when it names none we know).
fn refused(api: &ApiServer, who: &Identity, model: &str, e: ApiError) -> Response {
    api.metrics
        .observe(who.label(), model, e.status.as_u16(), 0.0);
    e.into_response()
}

/// A request's priority: its key's (`ceiling`), which the client's header may lower,
/// never raise; a header that names no class is ignored.
fn request_priority(headers: &http::HeaderMap, ceiling: Priority) -> Priority {
    headers
        .get(PRIORITY_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<Priority>().ok())
        .map_or(ceiling, |asked| asked.min(ceiling))
}

async fn send(
    api: &Arc<ApiServer>,
    who: &Identity,
    route: &Arc<ModelRoute>,
    mut parts: http::request::Parts,
    body: Bytes,
) -> Response {
    if !route.serves(parts.uri.path()) {
        let e = not_served(route, parts.uri.path());
        return refused(api, who, &route.name, e);
    }
    let start = tokio::time::Instant::now();
    // The sidecar queues by it.
    let ceiling = who
        .0
        .as_ref()
        .map_or(Priority::Standard, |c| c.key.priority);
    let priority = request_priority(&parts.headers, ceiling);
    // Only the batch runner marks batch requests.
    parts.headers.remove(greenthread_api::BATCH_HEADER);
    parts.headers.insert(
        PRIORITY_HEADER,
        http::HeaderValue::from_static(priority.as_str()),
    );
    // A stream counts its tokens only if the engine reports them: asked for when the
    // client did not say, and taken out again on the way back.
    let asked = usage::ask_for_usage(parts.uri.path(), &body);
    let strip = asked.is_some();
    let body = asked.unwrap_or(body);
    let resp = match route.pick() {
        Some(replica) => replica.relay(&parts, body).await,
        None => no_replica(&route.name).into_response(),
    };
    api.metrics.observe(
        who.label(),
        &route.name,
        resp.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    if !resp.status().is_success() {
        return resp;
    }
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (api, who, model) = (api.clone(), who.clone(), route.name.clone());
    resp.map(|inner| {
        Body::new(usage::Metered::new(inner, &content_type, strip, move |u| {
            if let Some(u) = u {
                api.metrics
                    .tokens(who.label(), &model, u.prompt, u.completion);
                if let Some(caller) = &who.0 {
                    caller.spend_tokens(tokio::time::Instant::now(), u.prompt + u.completion);
                }
            }
        }))
    })
}

fn model_entry(api: &ApiServer, routes: &BTreeRoutes, route: &ModelRoute) -> Value {
    json!({
        "id": api.display_name(routes, route),
        "object": "model",
        "owned_by": "greenthread",
        "root": route.model_name,
        "state": route.state(),
    })
}

/// An adapter, listed as vLLM lists one: `parent` names its base Model.
fn adapter_entry(api: &ApiServer, routes: &BTreeRoutes, route: &ModelRoute, name: &str) -> Value {
    json!({
        "id": api.adapter_display(routes, route, name),
        "object": "model",
        "owned_by": "greenthread",
        "root": route.model_name,
        "parent": api.display_name(routes, route),
        "state": route.state(),
    })
}

type BTreeRoutes = Arc<std::collections::BTreeMap<String, Arc<ModelRoute>>>;

/// Every model the key may use, with its state, from the sidecars: listing never wakes
/// anything.
async fn list_models(State(api): State<Shared>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let who = identity(&parts);
    let routes = api.models();
    let data: Vec<Value> = routes
        .values()
        .filter(|m| who.may_use(m))
        .flat_map(|m| {
            std::iter::once(model_entry(&api, &routes, m)).chain(
                m.adapters
                    .iter()
                    .map(|a| adapter_entry(&api, &routes, m, a)),
            )
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(api): State<Shared>) -> Response {
    (api.refresh)();
    let routes = api.models();
    api.metrics.set_in_flight(routes.values().map(|m| {
        let n = m
            .replicas
            .iter()
            .map(|r| r.outstanding.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        (m.namespace.as_str(), m.name.as_str(), n)
    }));
    greenthread_edge::metrics(api.families.encode(&api.registry))
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
        return ApiError::not_found(format!("no pod {}", echo(&pod))).into_response();
    };
    replica.engine_metrics().await
}

/// Prometheus HTTP service discovery: one target per engine, labeled with its model and
/// pod, so that the vLLM dashboard works in `local` mode as on Kubernetes. The target is
/// the address this server was configured with, never the request's `Host`.
async fn scrape_targets(State(api): State<Shared>) -> Response {
    let host = api.advertise.read().unwrap().clone();
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
    let count = |state: &str| route.replicas.iter().filter(|r| r.state() == state).count();
    json!({
        "name": route.name,
        "namespace": route.namespace,
        "modelName": route.model_name,
        "state": route.state(),
        "replicas": route.replicas.len(),
        "servingReplicas": count("serving"),
        "sleepingReplicas": count("sleeping"),
        "pods": replicas,
        "adapters": route.adapters,
        "endpoints": route.endpoints,
    })
}

/// `name` or `namespace/name` from the admin paths.
fn admin_target(
    api: &ApiServer,
    Path(p): Path<Vec<(String, String)>>,
) -> Result<Arc<ModelRoute>, ApiError> {
    let name = p.into_iter().map(|(_, v)| v).collect::<Vec<_>>().join("/");
    // An adapter's name stands for the Model that serves it.
    resolve(api, &name).map(|(route, _)| route)
}

async fn admin_models(State(api): State<Shared>) -> Response {
    let items: Vec<Value> = api.models().values().map(|m| model_status(m)).collect();
    Json(json!({"items": items})).into_response()
}

async fn admin_model(State(api): State<Shared>, path: Path<Vec<(String, String)>>) -> Response {
    match admin_target(&api, path) {
        Ok(m) => Json(model_status(&m)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn admin_sleep(
    State(api): State<Shared>,
    by: By,
    path: Path<Vec<(String, String)>>,
) -> Response {
    let route = match admin_target(&api, path) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    tracing::info!(target: "greenthread::audit", who = admin_caller(&by), action = "sleep", model = %route.key(), "model put to sleep");
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
    by: By,
    path: Path<Vec<(String, String)>>,
) -> Response {
    let route = match admin_target(&api, path) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    tracing::info!(target: "greenthread::audit", who = admin_caller(&by), action = "wake", model = %route.key(), "model woken");
    let Some(replica) = route.pick() else {
        return no_replica(&route.name).into_response();
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

fn ledger_unavailable(e: impl std::fmt::Display) -> Response {
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        e.to_string(),
    )
}

async fn admin_gpus(State(api): State<Shared>) -> Response {
    match api.ledger.list().await {
        Ok(gpus) => Json(json!({
            "apiVersion": "greenthread.ai/v1alpha1",
            "kind": "GPUList",
            "items": gpus.iter().map(gpu_object).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => ledger_unavailable(e),
    }
}

async fn admin_gpu(State(api): State<Shared>, Path(name): Path<String>) -> Response {
    match api.ledger.get(&name).await {
        Ok(g) => Json(gpu_object(&g)).into_response(),
        Err(greenthread_ledger::LedgerError::NotFound(_)) => {
            ApiError::not_found(format!("gpu {} does not exist", echo(&name))).into_response()
        }
        Err(e) => ledger_unavailable(e),
    }
}

/// Server-sent events: a `system_state` snapshot and the current state of every replica,
/// then every event as it happens, each with its id. A client that reconnects with
/// `Last-Event-ID` gets what it missed instead of the snapshot, while the buffer holds
/// it. The stream ends when the server shuts down, or when its client falls too far
/// behind (it reconnects and catches up); subscribers at once are capped.
async fn events(State(api): State<Shared>, headers: http::HeaderMap) -> Response {
    let Ok(permit) = api.subscribers.clone().try_acquire_owned() else {
        return ApiError::unavailable(format!(
            "too many event subscribers ({}); retry later",
            crate::MAX_EVENT_SUBSCRIBERS
        ))
        .with_retry_after(5)
        .into_response();
    };
    let (rx, upto) = api.events.subscribe();
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let head: Vec<String> = match last.map(|last| api.events.since(last, upto)) {
        Some(crate::events::Missed::Events(missed)) => missed.iter().map(|e| e.frame()).collect(),
        // A first connection, or one that missed more than is kept: where everything
        // stands (without ids: they are not events a client could have missed).
        _ => {
            let at = jiff::Timestamp::now().to_string();
            let routes = api.models();
            let models: Vec<Value> = routes.values().map(|m| model_status(m)).collect();
            let system = json!({"models": models, "lastEventId": upto, "at": at});
            std::iter::once(crate::events::frame(None, "system_state", &system))
                .chain(routes.values().flat_map(|m| {
                    m.replicas.iter().map(|r| {
                        let e = json!({"model": m.name, "pod": r.pod, "from": null, "to": r.state(), "at": at});
                        crate::events::frame(None, "state", &e)
                    })
                }))
                .collect()
        }
    };
    let live = futures_util::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        match rx.recv().await {
            Ok(e) => Some((e.frame(), (rx, permit))),
            // Behind by more than the channel holds: end, so that the client reconnects
            // with its Last-Event-ID and replays from the buffer, rather than skip events.
            Err(_) => None,
        }
    });
    let stream = futures_util::stream::iter(head)
        .chain(live)
        .map(|s| Ok::<_, std::io::Error>(Bytes::from(s)));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(greenthread_edge::end_on_shutdown(
            stream,
            &api.shutdown,
        )))
        .expect("static headers are valid")
}

/// The manager that changes Models at run time, or the answer saying there is none here.
fn manager(api: &ApiServer) -> Result<Arc<dyn crate::ModelManager>, ApiError> {
    api.manager.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "Models are changed through the Model resource here (kubectl apply / delete)",
        )
    })
}

fn managed(by: &By, action: &str, what: &str, done: crate::Managed, ok: StatusCode) -> Response {
    match done {
        Ok(v) => {
            tracing::info!(target: "greenthread::audit", who = admin_caller(by), action, model = %what, "model {action}");
            (ok, Json(v)).into_response()
        }
        Err((status, message)) => {
            let kind = if status == StatusCode::BAD_REQUEST {
                "invalid_request_error"
            } else if status == StatusCode::NOT_FOUND {
                "not_found"
            } else {
                "conflict"
            };
            ApiError::new(status, kind, message).into_response()
        }
    }
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))
}

/// A change of the Models at run time, as the admin API asks for it.
enum Change {
    Add,
    Replace(String),
    Patch(String),
    Remove(String),
}

/// Carries `change` out through the manager (where there is one), with the request's
/// JSON `body` (none for a DELETE), audited.
async fn change_models(api: &ApiServer, by: &By, change: Change, body: Option<Bytes>) -> Response {
    let m = match manager(api) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let body = match body.as_ref().map(json_body).transpose() {
        Ok(b) => b.unwrap_or(Value::Null),
        Err(e) => return e.into_response(),
    };
    let (action, name, ok, done) = match change {
        Change::Add => {
            let name = body["name"].as_str().unwrap_or_default().to_string();
            ("added", name, StatusCode::CREATED, m.add(body).await)
        }
        Change::Replace(name) => (
            "replaced",
            name.clone(),
            StatusCode::OK,
            m.replace(name, body).await,
        ),
        Change::Patch(name) => (
            "patched",
            name.clone(),
            StatusCode::OK,
            m.patch(name, body).await,
        ),
        Change::Remove(name) => (
            "removed",
            name.clone(),
            StatusCode::OK,
            m.remove(name).await,
        ),
    };
    managed(by, action, &name, done, ok)
}

/// Adds a Model (`{name, spec}`, as in the config file) while the others serve.
async fn add_model(State(api): State<Shared>, by: By, body: Bytes) -> Response {
    change_models(&api, &by, Change::Add, Some(body)).await
}

/// Replaces a Model's spec: only it restarts, drained first.
async fn replace_model(
    State(api): State<Shared>,
    by: By,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    change_models(&api, &by, Change::Replace(name), Some(body)).await
}

/// Changes what a Model can change without a restart (`fairness.popular`).
async fn patch_model(
    State(api): State<Shared>,
    by: By,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    change_models(&api, &by, Change::Patch(name), Some(body)).await
}

/// Removes a Model: drained, asleep, stopped, its memory released.
async fn remove_model(State(api): State<Shared>, by: By, Path(name): Path<String>) -> Response {
    change_models(&api, &by, Change::Remove(name), None).await
}

fn key_error(e: crate::issued::IssueError) -> Response {
    ApiError::new(e.status(), e.kind(), e.to_string()).into_response()
}

/// Who changed something through the admin API (the name of the admin token they held),
/// for the audit log and the events.
type By = Option<axum::Extension<greenthread_edge::Holder>>;

fn admin_caller(by: &By) -> String {
    match by {
        Some(axum::Extension(greenthread_edge::Holder(Some(name)))) => name.clone(),
        _ => "anyone (the admin API is open)".into(),
    }
}

/// Every API key by name — the configuration's and those issued through the API, with
/// their prefixes and creation times — never a key.
async fn list_keys(State(api): State<Shared>) -> Response {
    let keys = &api.auth.keys;
    let mut items: Vec<Value> = keys
        .fixed()
        .map(|k| {
            json!({"name": k.name, "source": "config", "models": k.models,
                   "priority": k.priority, "rateLimit": k.rate_limit})
        })
        .collect();
    items.extend(keys.issued().list().into_iter().map(|r| {
        json!({"name": r.name, "source": "api", "prefix": r.prefix, "created": r.created,
               "models": r.models, "priority": r.priority, "rateLimit": r.rate_limit})
    }));
    Json(json!({"items": items})).into_response()
}

/// Issues a key (`{name, models?, priority?, rateLimit?}`): the answer shows it, once.
async fn create_key(State(api): State<Shared>, by: By, body: Bytes) -> Response {
    use crate::issued::{IssueError, NewKey};
    if !api.auth.may_issue {
        return key_error(IssueError::AdminOpen);
    }
    let new: NewKey = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return ApiError::bad_request(format!("the key's description is not valid: {e}"))
                .into_response();
        }
    };
    let keys = &api.auth.keys;
    let configured = |name: &str| keys.fixed().any(|k| k.name == name);
    match keys.issued().issue(new, &configured).await {
        Ok((key, r)) => {
            tracing::info!(target: "greenthread::audit", who = admin_caller(&by), action = "key_created", key = %r.name, prefix = %r.prefix, models = ?r.models, "API key issued");
            api.events.emit(
                "key_created",
                json!({"name": r.name, "prefix": r.prefix, "by": admin_caller(&by), "at": r.created}),
            );
            let body = json!({"name": r.name, "key": key, "prefix": r.prefix,
                              "created": r.created, "models": r.models,
                              "priority": r.priority, "rateLimit": r.rate_limit});
            (StatusCode::CREATED, Json(body)).into_response()
        }
        Err(e) => key_error(e),
    }
}

/// Revokes a key issued through the API: refused from the next request on.
async fn revoke_key(State(api): State<Shared>, by: By, Path(name): Path<String>) -> Response {
    use crate::issued::IssueError;
    let keys = &api.auth.keys;
    if keys.fixed().any(|k| k.name == name) {
        return key_error(IssueError::Configured(name));
    }
    match keys.issued().revoke(&name).await {
        Ok(r) => {
            tracing::info!(target: "greenthread::audit", who = admin_caller(&by), action = "key_revoked", key = %r.name, prefix = %r.prefix, "API key revoked");
            api.events.emit(
                "key_revoked",
                json!({"name": r.name, "prefix": r.prefix, "by": admin_caller(&by)}),
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => key_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_may_lower_its_keys_priority_never_raise_it() {
        use Priority::{Critical as C, Sheddable as D, Standard as S};
        for (ceiling, header, want) in [
            (S, None, S),
            (S, Some("critical"), S),
            (S, Some("sheddable"), D),
            (C, Some("standard"), S),
            (C, None, C),
            (D, Some("critical"), D),
            (C, Some("urgent"), C),
        ] {
            let mut h = http::HeaderMap::new();
            if let Some(v) = header {
                h.insert(PRIORITY_HEADER, v.parse().unwrap());
            }
            assert_eq!(request_priority(&h, ceiling), want, "{ceiling} {header:?}");
        }
    }

    #[test]
    fn the_model_is_replaced_in_place_and_nothing_else_moves() {
        let json = http::HeaderMap::new();
        let body = Bytes::from_static(
            br#"{"messages":[{"role":"user","content":"\"model\": x"}], "model" : "alpha","stream":true}"#,
        );
        let n = named(&json, &body).unwrap();
        assert_eq!(n.model(), "alpha");
        let out = n.rename(&body, "org/\"alpha\"");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"messages":[{"role":"user","content":"\"model\": x"}], "model" : "org/\"alpha\"","stream":true}"#
        );
        let error = |h: &http::HeaderMap, b: &'static [u8]| {
            named(h, &Bytes::from_static(b)).err().unwrap().message
        };
        assert!(error(&json, br#"{"model":"a","model":"b"}"#).contains("duplicate field"));
        // `null` is a model that is not a string, not a missing one.
        assert!(error(&json, br#"{"model": null}"#).contains("must be a string"));
        assert!(error(&json, b"{}").contains("no `model` field"));

        // A form: the field's bytes, and only them, change.
        let mut form = http::HeaderMap::new();
        form.insert(
            header::CONTENT_TYPE,
            "multipart/form-data; boundary=XyZ".parse().unwrap(),
        );
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF model\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nalpha\r\n--XyZ--\r\n",
        );
        let n = named(&form, &body).unwrap();
        assert_eq!(n.model(), "alpha");
        assert_eq!(
            n.rename(&body, "org/alpha"),
            Bytes::from_static(
                b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF model\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\norg/alpha\r\n--XyZ--\r\n"
            )
        );
        assert!(error(&form, b"--XyZ--\r\n").contains("no `model` field"));
        assert!(error(&form, b"{\"model\":\"alpha\"}").contains("not a valid form"));
    }
}
