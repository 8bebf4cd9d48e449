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
    Preemption,
    error::Rejection,
    proxy::{ForwardError, Forwarder, is_event_stream},
    resume,
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
            Rejection::QueueFull { .. } | Rejection::Shed { .. } => {
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
            Rejection::NotIdle { .. } => {
                let mut r = api_error(StatusCode::SERVICE_UNAVAILABLE, "batch_deferred", message);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
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

/// Answered from the copy taken at boot, with the adapters served (`parent`: the base
/// model, as vLLM lists them): listing models never wakes one.
async fn models(State(s): State<AppState>) -> Response {
    match s.sidecar.cached_models() {
        Some(body) => {
            let body = with_adapters(body, &s.sidecar.cfg.model, &s.sidecar.adapters().wanted());
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        None => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "engine is booting",
        ),
    }
}

/// The engine's model list with an entry for each of `adapters` it does not list itself
/// (an engine lists only what it holds now, and a sleeping one holds nothing).
fn with_adapters(
    list: bytes::Bytes,
    base: &str,
    adapters: &[greenthread_api::AdapterSpec],
) -> bytes::Bytes {
    if adapters.is_empty() {
        return list;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&list) else {
        return list;
    };
    let Some(data) = v.get_mut("data").and_then(|d| d.as_array_mut()) else {
        return list;
    };
    for a in adapters {
        if !data.iter().any(|m| m["id"] == a.name.as_str()) {
            data.push(serde_json::json!({
                "id": a.name, "object": "model", "owned_by": "greenthread",
                "root": a.source, "parent": base,
            }));
        }
    }
    bytes::Bytes::from(v.to_string())
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
/// once the engine is back. Under `--preemption resume`, a streamed request that can be
/// continued is stopped when its model is preempted and continued once it serves again.
pub async fn relay(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: bytes::Bytes,
) -> Response {
    let every = sidecar.cfg.wake_feedback;
    if !every.is_zero() && !sidecar.serving() && wants_stream(&body) {
        // Boxed, as below.
        return Box::pin(relay_with_feedback(sidecar, forwarder, parts, body, every)).await;
    }
    relay_request(sidecar, forwarder, parts, body).await
}

/// Whether a JSON body asks for a streamed answer (`"stream": true`).
fn wants_stream(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Stream {
        #[serde(default)]
        stream: bool,
    }
    serde_json::from_slice::<Stream>(body).is_ok_and(|s| s.stream)
}

/// [`relay`] for a streamed request that may wait for a wake: an answer that is not
/// ready within `every` is started at once as an event stream of SSE comment lines
/// (`: waking org/model, 3.0 s`), one every `every`, so that clients and proxies with
/// idle timeouts keep the request, then carries the engine's events. SSE clients (the
/// openai SDK among them) skip comments. A refusal after that point can no longer be a
/// status: it ends the stream as an `error` event, as OpenAI's streams carry errors.
async fn relay_with_feedback(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: bytes::Bytes,
    every: std::time::Duration,
) -> Response {
    let started = tokio::time::Instant::now();
    let mut answer = {
        let (sidecar, forwarder, parts) = (sidecar.clone(), forwarder.clone(), parts.clone());
        tokio::spawn(async move { relay_request(&sidecar, &forwarder, &parts, body).await })
    };
    // Aborts the request (its queue place, or its engine exchange) when the client goes.
    let abort = AbortOnDrop(answer.abort_handle());
    tokio::select! {
        done = &mut answer => return done.unwrap_or_else(|e| lost(&e)),
        () = tokio::time::sleep(every) => {}
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let sidecar = sidecar.clone();
    tokio::spawn(async move {
        let _abort = abort;
        let mut tick = tokio::time::interval_at(started + every, every);
        let resp = loop {
            tokio::select! {
                () = tx.closed() => return,
                done = &mut answer => break done.unwrap_or_else(|e| lost(&e)),
                _ = tick.tick() => {
                    let doing = if sidecar.serving() { "waiting for" } else { "waking" };
                    let line = format!(": {doing} {}, {:.1} s\n\n", sidecar.cfg.model, started.elapsed().as_secs_f64());
                    if tx.send(line.into()).await.is_err() {
                        return;
                    }
                }
            }
        };
        if resp.status() != StatusCode::OK || !is_event_stream(resp.headers()) {
            let error = error_of(resp).await;
            let _ = tx.send(resume::error_event(&error).into()).await;
            return;
        }
        let mut upstream = resp.into_body();
        use http_body_util::BodyExt;
        loop {
            let frame = tokio::select! {
                // The client went away: dropping the engine's stream aborts it there.
                () = tx.closed() => return,
                frame = upstream.frame() => frame,
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && tx.send(data).await.is_err()
                    {
                        return;
                    }
                }
                // The engine's stream broke: the client's ends too, as it would have.
                Some(Err(_)) | None => return,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(channel_body(rx))
        .expect("static headers are valid")
}

/// A body of what a task sends on `rx`, ending when the task drops its sender.
fn channel_body(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The answer to a request whose relaying task panicked.
fn lost(e: &tokio::task::JoinError) -> Response {
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        format!("the request was lost: {e}"),
    )
}

/// The OpenAI-style error a refusal carries (ours or the engine's), or ours naming its
/// status when its body is not one.
async fn error_of(resp: Response) -> serde_json::Value {
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .filter(|v| v.get("error").is_some())
        .unwrap_or_else(|| {
            ApiError::new(
                status,
                "engine_error",
                format!("the engine answered {status}"),
            )
            .body()
        })
}

/// [`relay`] without wake feedback.
async fn relay_request(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: bytes::Bytes,
) -> Response {
    if let Some(od) = sidecar.adapters().on_demand() {
        match crate::ondemand::parse(&body) {
            Ok(None) => {}
            Ok(Some((wanted, members))) => {
                // Boxed: the common path's future stays as small as it was.
                return Box::pin(relay_on_demand(
                    sidecar, forwarder, parts, od, wanted, members,
                ))
                .await;
            }
            Err(e) => {
                sidecar.metrics.request(false);
                return e.into_response();
            }
        }
    }
    if sidecar.cfg.preemption == Preemption::Resume
        && let Some(r) = resume::resumable(parts.uri.path(), &body)
    {
        // Boxed: the common path's future stays as small as it was.
        return Box::pin(relay_resumable(sidecar, forwarder, parts, body, r)).await;
    }
    relay_leg(sidecar, forwarder, parts, body, Leg::Plain).await
}

/// A request for an on-demand adapter: found in the adapter cache (or downloaded into
/// it) before it waits for the engine, loaded into the engine once admitted.
async fn relay_on_demand(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    od: &crate::ondemand::OnDemand,
    wanted: crate::ondemand::Wanted,
    members: serde_json::Map<String, serde_json::Value>,
) -> Response {
    use crate::ondemand::OnDemandError;
    let refused = |e: OnDemandError| {
        sidecar.metrics.request(false);
        e.into_response()
    };
    let unavailable = |why| OnDemandError::Unavailable {
        model: sidecar.cfg.model.clone(),
        why,
    };
    if !sidecar.boot_ready() {
        return refused(unavailable("booting"));
    }
    if sidecar.state() == crate::state::State::Deactivating {
        return refused(unavailable("draining"));
    }
    if sidecar.adapters().serves(&wanted.name) {
        return refused(OnDemandError::Invalid(format!(
            "{}.lora_model.name {:?} is an adapter the Model declares: name it as model instead",
            crate::ondemand::METADATA,
            wanted.name
        )));
    }
    let path = match od.cached(&wanted, &sidecar.metrics).await {
        Ok(p) => p,
        Err(e) => return refused(e),
    };
    let leg = OnDemandLeg {
        od,
        wanted,
        path,
        members,
    };
    relay_leg(
        sidecar,
        forwarder,
        parts,
        bytes::Bytes::new(),
        Leg::OnDemand(&leg),
    )
    .await
}

/// What an on-demand request needs once admitted.
struct OnDemandLeg<'a> {
    od: &'a crate::ondemand::OnDemand,
    wanted: crate::ondemand::Wanted,
    path: std::path::PathBuf,
    members: serde_json::Map<String, serde_json::Value>,
}

/// What kind of exchange [`relay_leg`] makes.
enum Leg<'a, 'b> {
    /// A request as it came.
    Plain,
    /// A request for an on-demand adapter, loaded into the engine once admitted.
    OnDemand(&'a OnDemandLeg<'b>),
    /// The first leg of an answer that can be continued: the preemption signal is marked
    /// seen as it is admitted, and a preemption after that stops it.
    Resumable(&'a mut greenthread_ledger::Subscriber<u64>),
    /// The continuation of an answer already under way: admitted as no new arrival, and
    /// stopped like a first leg.
    Continuation(&'a mut greenthread_ledger::Subscriber<u64>),
}

/// One admission and exchange with the engine.
async fn relay_leg(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: bytes::Bytes,
    mut leg: Leg<'_, '_>,
) -> Response {
    // Set by the API server from the caller's key (a client may only lower it there).
    let priority = parts
        .headers
        .get(greenthread_api::PRIORITY_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or_default();
    // Set by the API server's batch runner alone (clients' copies are removed there).
    let batch = parts.headers.contains_key(greenthread_api::BATCH_HEADER);
    // How the request counts: a continuation is no new arrival, a resumable first leg
    // one a preemption stops rather than waits for; the rest must finish.
    let enter: crate::admission::Enter = match leg {
        Leg::Continuation(_) => crate::admission::Admission::enter_continuation,
        Leg::Resumable(_) => crate::admission::Admission::enter_stoppable,
        Leg::Plain | Leg::OnDemand(_) => crate::admission::Admission::enter,
    };
    for _ in 0..3 {
        let admitted = if batch {
            sidecar.admit_batch(enter).await
        } else {
            sidecar.admit_with(priority, enter).await
        };
        let slot = match admitted {
            Ok(slot) => slot,
            Err(rejection) => {
                sidecar.metrics.request(false);
                return rejection.into_response();
            }
        };
        if let Leg::Resumable(pause) | Leg::Continuation(pause) = &mut leg {
            pause.borrow_and_update();
        }
        // An adapter named as the engine serving now names it (SGLang's
        // `<base>:<adapter>`; llama.cpp's `lora` list, by what it started with).
        let (sent, in_use) = match &leg {
            Leg::Plain | Leg::Resumable(_) | Leg::Continuation(_) => {
                (sidecar.engine_request(&parts.headers, body.clone()), None)
            }
            // Loaded now, while the slot keeps the engine awake; marked in use until
            // the answer ends, so that no other load unloads it meanwhile.
            Leg::OnDemand(leg) => match leg
                .od
                .load(
                    &**sidecar.engine(),
                    &sidecar.cfg.model,
                    &leg.wanted,
                    &leg.path,
                    &sidecar.metrics,
                )
                .await
            {
                Ok((call, users)) => (
                    crate::ondemand::engine_body(leg.members.clone(), &call),
                    Some(users),
                ),
                Err(e) => {
                    sidecar.metrics.request(false);
                    return e.into_response();
                }
            },
        };
        match forwarder.forward(parts, sent, (slot, in_use)).await {
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

/// Continuations one answer may take before it is given up (each after a preemption or
/// an engine lost mid-answer).
const MAX_LEGS: u32 = 16;

async fn relay_resumable(
    sidecar: &Arc<Sidecar>,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: bytes::Bytes,
    r: resume::Resumable,
) -> Response {
    let mut pause = sidecar.pause_signal();
    let first = relay_leg(sidecar, forwarder, parts, body, Leg::Resumable(&mut pause)).await;
    if first.status() != StatusCode::OK || !is_event_stream(first.headers()) {
        return first;
    }
    let (head, upstream) = first.into_parts();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(32);
    tokio::spawn(pump(
        sidecar.clone(),
        forwarder.clone(),
        parts.clone(),
        r,
        upstream,
        pause,
        tx,
    ));
    Response::from_parts(head, channel_body(rx))
}

/// Carries one resumable answer to its client across the engine's sleeps.
async fn pump(
    sidecar: Arc<Sidecar>,
    forwarder: Forwarder,
    parts: http::request::Parts,
    r: resume::Resumable,
    mut upstream: Body,
    mut pause: greenthread_ledger::Subscriber<u64>,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
) {
    use http_body_util::BodyExt;
    let mut splice = resume::Splice::new(r.kind());
    let mut legs = 0;
    // When the answer was stopped, until its continuation's first event goes out.
    let mut stopped_at: Option<tokio::time::Instant> = None;
    loop {
        // A first leg admitted at a wake can reach here after its model was named a
        // victim: the stop came between its admission and its subscription to the
        // signal, which then missed it. It is read from the model's state instead
        // (nothing wakes the model again before this slot is given back); without this
        // the victim drains the answer in full before it sleeps.
        let stopped = if legs == 0 && !sidecar.serving() {
            true
        } else {
            loop {
                let frame = tokio::select! {
                    biased;
                    // The client went away: dropping the engine's stream aborts it there.
                    () = tx.closed() => return,
                    // An answer is stopped once: its continuation drains like an answer that
                    // cannot be continued. Stopped again and again, a long answer would take
                    // a share of every wake of its model and outlive its queue deadline
                    // (on the conversation trace, 86 answers a seed were cut off so); a
                    // crash still stops a continuation, below.
                    changed = pause.changed(), if legs == 0 => {
                        if changed.is_err() {
                            return;
                        }
                        break true;
                    }
                    frame = upstream.frame() => frame,
                };
                match frame {
                    None => break false,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let out = splice.feed(&data);
                            if out.is_empty() {
                                continue;
                            }
                            if let Some(at) = stopped_at.take() {
                                sidecar.metrics.pauses.observe(at.elapsed().as_secs_f64());
                            }
                            if tx.send(out.into()).await.is_err() {
                                return;
                            }
                        }
                    }
                    // The engine went away mid-answer (it crashed): continued as after a
                    // preemption, on the engine that comes back.
                    Some(Err(_)) => break true,
                }
            }
        };
        if !stopped || splice.finished {
            return;
        }
        // Gives back the slot (the drain does not wait for it) and the connection.
        drop(std::mem::replace(&mut upstream, Body::empty()));
        stopped_at.get_or_insert_with(tokio::time::Instant::now);
        legs += 1;
        if legs > MAX_LEGS {
            let error = ApiError::unavailable("the answer was stopped too many times");
            let _ = tx.send(resume::error_event(&error.body()).into()).await;
            return;
        }
        sidecar.metrics.resumed.inc();
        let Some(next) = r.continuation(&splice.text, splice.tokens) else {
            let _ = tx.send(splice.finish_for_length().into()).await;
            return;
        };
        let resp = relay_leg(
            &sidecar,
            &forwarder,
            &parts,
            next.into(),
            Leg::Continuation(&mut pause),
        )
        .await;
        if resp.status() != StatusCode::OK || !is_event_stream(resp.headers()) {
            // The refusal goes to the client as it came (ours or the engine's).
            let error = error_of(resp).await;
            let _ = tx.send(resume::error_event(&error).into()).await;
            return;
        }
        splice.next_leg();
        upstream = resp.into_body();
    }
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
    // An operator's wake is never shed.
    match s
        .sidecar
        .admit_as(greenthread_api::Priority::Critical)
        .await
    {
        Ok(slot) => {
            drop(slot);
            Json(s.sidecar.status_json()).into_response()
        }
        Err(r) => r.into_response(),
    }
}
