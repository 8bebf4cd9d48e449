//! The HTTP surface: OpenAI inference, vLLM's sleep API, health and metrics.

use std::sync::Arc;

use tokio::time::Instant;

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::{
    AsleepBehavior, SimConfig, endpoints,
    engine::{EngineError, SimEngine},
    openai::{self, InferenceRequest, Kind},
};

type Shared = Arc<SimEngine>;

pub fn router(engine: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/version",
            get(|| async { Json(json!({"version": "greenthread-sim"})) }),
        )
        .route("/v1/models", get(models))
        .route("/is_sleeping", get(is_sleeping))
        .route("/sleep", post(sleep))
        .route("/wake_up", post(wake_up))
        .route("/collective_rpc", post(collective_rpc))
        // SGLang's memory saver (`--enable-memory-saver`), and its native probes.
        .route("/release_memory_occupation", post(release_memory))
        .route("/resume_memory_occupation", post(resume_memory))
        .route("/health_generate", get(health))
        .route("/get_model_info", get(model_info))
        .route(
            "/reset_prefix_cache",
            post(|State(e): State<Shared>| async move {
                e.metrics.prefix_cache_resets.inc();
                StatusCode::OK
            }),
        )
        // vLLM's runtime LoRA API, and SGLang's.
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route("/load_lora_adapter", post(load_adapter))
        .route("/unload_lora_adapter", post(unload_adapter))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(endpoints::embeddings))
        .route("/v1/responses", post(endpoints::responses))
        .route("/v1/messages", post(endpoints::messages))
        .route("/v1/rerank", post(endpoints::rerank))
        .route("/v2/rerank", post(endpoints::rerank))
        .route("/rerank", post(endpoints::rerank))
        .route("/v1/audio/transcriptions", post(endpoints::transcriptions))
        .route("/v1/audio/translations", post(endpoints::transcriptions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route("/debug/last_request_headers", get(last_request_headers))
        // The edge bounds bodies (`--max-body`); axum's own 2 MB default would refuse
        // long prompts first.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            require_api_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            sleep_api_gate,
        ))
        .with_state(engine)
}

/// vLLM serves its sleep API only with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`;
/// without them these paths are not found.
async fn sleep_api_gate(
    State(e): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    const SLEEP_API: [&str; 4] = ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc"];
    if e.cfg.no_sleep_api && SLEEP_API.contains(&req.uri().path()) {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    next.run(req).await
}

/// vLLM's `--api-key`: every `/v1` path needs `Authorization: Bearer <key>`.
async fn require_api_key(
    State(e): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &e.cfg.api_key
        && req.uri().path().starts_with("/v1")
        && greenthread_edge::bearer(req.headers()) != Some(key.as_str())
    {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    next.run(req).await
}

/// Boots (weights load before the port opens, as in vLLM), then serves until Ctrl-C or
/// SIGTERM, releasing its simulated GPU memory on the way out.
pub async fn bind_and_serve(cfg: SimConfig) -> anyhow::Result<()> {
    let engine = SimEngine::new(cfg.clone());
    tracing::info!(model = %cfg.model, weights = cfg.weights_bytes, "sim engine loading");
    if let Err(e) = engine.boot().await {
        engine.forget_memory();
        anyhow::bail!("engine start-up failed: {e}");
    }
    if cfg.print_invalid_utf8 {
        use std::io::Write;
        let _ = std::io::stdout().write_all(b"weights: \xff\xfe loaded\n");
        let _ = std::io::stdout().flush();
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, model = %cfg.model, "sim engine ready");
    let app = router(engine.clone());
    let shutdown = greenthread_edge::Shutdown::new();
    shutdown.on_signals();
    let result = greenthread_edge::serve(listener, app, cfg.edge.clone(), shutdown).await;
    engine.forget_memory();
    result.map_err(Into::into)
}

pub(crate) fn error(status: StatusCode, message: impl AsRef<str>) -> Response {
    let kind = if status.is_client_error() {
        "BadRequestError"
    } else {
        "InternalServerError"
    };
    (
        status,
        Json(openai::error_body(message.as_ref(), kind, status.as_u16())),
    )
        .into_response()
}

impl IntoResponse for EngineError {
    fn into_response(self) -> Response {
        error(StatusCode::INTERNAL_SERVER_ERROR, self.to_string())
    }
}

/// Every served name, then each adapter with its base as `parent`, as vLLM lists them.
async fn models(State(e): State<Shared>) -> Json<Value> {
    let names = e.cfg.names();
    let mut data: Vec<Value> = names
        .iter()
        .map(|n| json!({"id": n, "object": "model", "owned_by": "greenthread-sim", "root": e.cfg.model, "parent": null, "max_model_len": 8192}))
        .collect();
    data.extend(e.adapters().into_iter().map(|(name, source)| {
        json!({"id": name, "object": "model", "owned_by": "greenthread-sim", "root": source, "parent": names[0], "max_model_len": 8192})
    }));
    Json(json!({"object": "list", "data": data}))
}

/// `{"lora_name", "lora_path"}`, as vLLM's and SGLang's load calls take.
#[derive(serde::Deserialize)]
struct LoraCall {
    lora_name: String,
    #[serde(default)]
    lora_path: String,
}

async fn load_adapter(State(e): State<Shared>, body: Bytes) -> Response {
    let call: LoraCall = match parse(&body) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    match e.load_adapter(&call.lora_name, &call.lora_path) {
        Ok(()) => format!(
            "Success: LoRA adapter '{}' added successfully.",
            call.lora_name
        )
        .into_response(),
        Err(why) => error(StatusCode::BAD_REQUEST, why),
    }
}

async fn unload_adapter(State(e): State<Shared>, body: Bytes) -> Response {
    let call: LoraCall = match parse(&body) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if e.unload_adapter(&call.lora_name) {
        format!(
            "Success: LoRA adapter '{}' removed successfully.",
            call.lora_name
        )
        .into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("The lora adapter '{}' cannot be found.", call.lora_name),
        )
    }
}

async fn health(State(e): State<Shared>) -> StatusCode {
    if e.cfg.unhealthy_while_asleep && e.is_sleeping() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn is_sleeping(State(e): State<Shared>) -> Response {
    if e.cfg.no_is_sleeping {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(json!({"is_sleeping": e.is_sleeping()})).into_response()
}

fn query_values<'a>(query: &'a Option<String>, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(move |kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn sleep(State(e): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let level = match query_values(&q, "level").next().map(str::parse::<u8>) {
        None => 1,
        Some(Ok(l)) => l,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "level must be 1 or 2"),
    };
    let wait = query_values(&q, "mode").next() == Some("wait");
    match e.sleep(level, wait).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

async fn wake_up(State(e): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let tags: Vec<String> = query_values(&q, "tags").map(str::to_string).collect();
    match e.wake(&tags).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(err) => err.into_response(),
    }
}

/// SGLang's tags: `weights`, `kv_cache` (none: everything).
fn sglang_tags(body: &Bytes) -> Result<Vec<String>, String> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    Ok(v["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

async fn release_memory(State(e): State<Shared>, body: Bytes) -> Response {
    e.metrics.release_calls.inc();
    if let Err(e) = sglang_tags(&body) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    // With a CPU backup the weights come back intact (level 1); without, discarded.
    let level = if e.cfg.no_weights_cpu_backup { 2 } else { 1 };
    match e.sleep(level, true).await {
        Ok(()) => Json(json!({"success": true, "message": "released"})).into_response(),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

async fn resume_memory(State(e): State<Shared>, body: Bytes) -> Response {
    e.metrics.resume_calls.inc();
    let tags = match sglang_tags(&body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match e.wake(&tags).await {
        Ok(()) => Json(json!({"success": true, "message": "resumed"})).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn model_info(State(e): State<Shared>) -> Json<Value> {
    Json(json!({"model_path": e.cfg.model, "is_generation": true}))
}

async fn collective_rpc(State(e): State<Shared>, body: Bytes) -> Response {
    let method = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["method"].as_str().map(str::to_string));
    match method.as_deref() {
        Some("reload_weights") => match e.reload_weights().await {
            Ok(()) => Json(json!({"results": [null]})).into_response(),
            Err(err) => err.into_response(),
        },
        other => error(
            StatusCode::BAD_REQUEST,
            format!("unsupported collective_rpc method {other:?}"),
        ),
    }
}

async fn tokenize(State(e): State<Shared>, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON");
    };
    let text = v["prompt"].as_str().unwrap_or("");
    let tokens: Vec<usize> = text.split_whitespace().map(str::len).collect();
    Json(json!({"count": tokens.len(), "max_model_len": 8192, "tokens": tokens, "model": e.cfg.model})).into_response()
}

async fn detokenize(body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body must be JSON");
    };
    let n = v["tokens"].as_array().map_or(0, Vec::len);
    Json(json!({"prompt": vec!["tok"; n].join(" ")})).into_response()
}

async fn metrics(State(e): State<Shared>) -> Response {
    greenthread_edge::metrics(e.metrics.encode())
}

async fn chat(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    infer(e, Kind::Chat, headers, body).await
}

async fn completions(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    infer(e, Kind::Completion, headers, body).await
}

/// The headers of the last inference request, as this engine received them: what tests
/// check to prove that clients' credentials never reach an engine.
async fn last_request_headers(State(e): State<Shared>) -> Response {
    Json(e.last_headers()).into_response()
}

/// What every inference request goes through before its answer: counted, then the
/// faults that hang it (`--hang-after-requests`).
pub(crate) async fn arrive(e: &SimEngine, body: &Bytes) {
    e.metrics.inference_requests.inc();
    let served = e.count_request();
    if e.cfg.print_requests {
        // Panics when stdout is gone (EPIPE), failing the request as a real engine would.
        println!("request {served}: {} bytes", body.len());
    }
    if let Some(path) = &e.cfg.request_log {
        // One write of the whole line to a file opened for appending: lines of requests
        // in flight together never interleave.
        let mut line = body.to_vec();
        line.retain(|b| *b != b'\n');
        line.push(b'\n');
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &line));
        if let Err(err) = appended {
            tracing::warn!(path = %path.display(), error = %err, "request log");
        }
    }
    if e.cfg.hang_after_requests.is_some_and(|n| served > n) {
        std::future::pending::<()>().await;
    }
}

/// Whether the engine can answer a request for `model` now: an unknown model is 404, a
/// sleeping engine errs (or hangs), a wedged one never answers, one woken without its
/// weights errs, as vLLM does.
pub(crate) async fn ready(e: &SimEngine, model: Option<&str>) -> Result<(), Response> {
    if let Some(m) = model
        && !e.cfg.names().contains(&m)
        && e.adapter_of(m).is_none()
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist."),
        ));
    }
    if e.is_sleeping() {
        match e.cfg.asleep_behavior {
            AsleepBehavior::Error => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "engine is sleeping; wake it up first",
                ));
            }
            AsleepBehavior::Hang => std::future::pending::<()>().await,
        }
    }
    if e.wedged() {
        // Health and sleep state look fine; the request is never answered.
        std::future::pending::<()>().await;
    }
    if !e.state().weights_valid {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "model weights are not loaded (woken from level 2 without reload_weights)",
        ));
    }
    Ok(())
}

/// A request body as `T`, or the 400 that says why not (boxed: a response is large).
pub(crate) fn parse<'a, T: serde::Deserialize<'a>>(body: &'a Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|err| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {err}"),
        ))
    })
}

async fn infer(e: Shared, kind: Kind, headers: HeaderMap, body: Bytes) -> Response {
    let req: InferenceRequest = match endpoints::accept(&e, &headers, &body).await {
        Ok(r) => r,
        Err(r) => return *r,
    };

    let start = Instant::now();
    let guard = e.admit().await;
    let prompt = req.prompt_text();
    let prompt_tokens = openai::count_tokens(&prompt);
    // An adapter answers differently from its base, and says which it is (the answer's
    // `model`, as vLLM's, and a header), so that tests can tell.
    let adapter = req
        .model
        .as_deref()
        .and_then(|m| e.adapter_of(m))
        .or_else(|| req.lora_applied(&e.cfg.start_loras).cloned());
    let weights = adapter.as_deref().and_then(|a| e.adapter_weights(a));
    let answer = match (&adapter, &weights) {
        (Some(a), Some(w)) => openai::prompt_hash(&format!("{a}#{w}\n{prompt}")),
        (Some(a), None) => openai::prompt_hash(&format!("{a}\n{prompt}")),
        (None, _) => openai::prompt_hash(&prompt),
    };
    drop(prompt);
    // An adapter's answer names the model as the request did (`sql`, or SGLang's
    // `org/base:sql`).
    let model = match (&adapter, &req.model) {
        (Some(_), Some(asked)) => asked.clone(),
        _ => e.cfg.model.clone(),
    };
    let marked = |mut r: Response| {
        if let Some(a) = adapter
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            r.headers_mut().insert(ADAPTER_HEADER, a);
        }
        if let Some(w) = weights
            .as_deref()
            .and_then(|w| HeaderValue::from_str(w).ok())
        {
            r.headers_mut().insert(WEIGHTS_HEADER, w);
        }
        r
    };
    let n = req.max_tokens(e.cfg.default_max_tokens);
    let id = format!(
        "{}-sim-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        e.next_id()
    );
    let per_token = if e.cfg.tokens_per_second > 0.0 {
        1.0 / e.cfg.tokens_per_second
    } else {
        0.0
    };
    // Token `i` is due `i` decode steps after the first, which comes after the prefill.
    let token_at = move |first: Instant, i: u32| {
        first + std::time::Duration::from_secs_f64(per_token * f64::from(i))
    };
    let mut abort = e.abort_signal();
    abort.borrow_and_update();
    e.metrics.prompt_tokens.inc_by(u64::from(prompt_tokens));

    if !req.stream {
        tokio::select! {
            biased;
            _ = abort.changed() => return error(StatusCode::INTERNAL_SERVER_ERROR, "request aborted: engine is going to sleep"),
            _ = async {
                e.prefill(prompt_tokens).await;
                wait_until(token_at(Instant::now(), n)).await;
            } => {}
        }
        let text: String = (0..n)
            .map(|i| format!("{} ", openai::token_of(answer, i)))
            .collect();
        record_finished(&e, start, n);
        drop(guard);
        return marked(
            Json(openai::completion_body(
                kind,
                &id,
                &model,
                &text,
                prompt_tokens,
                n,
            ))
            .into_response(),
        );
    }

    let coalesce = e.cfg.coalesce_stream;
    let include_usage = req.include_usage();
    // (next token, when the first was due, the sequence slot, the abort signal)
    let stream = futures_util::stream::unfold(
        (0u32, None::<Instant>, Some(guard), abort),
        move |(i, first, guard, mut abort)| {
            let (e, id, model) = (e.clone(), id.clone(), model.clone());
            async move {
                let guard = guard?;
                if i > n {
                    return None;
                }
                if i == n {
                    let last = openai::chunk(kind, &id, &model, None, Some("length"));
                    record_finished(&e, start, n);
                    drop(guard);
                    let usage = if include_usage {
                        let u = openai::usage_chunk(kind, &id, &model, prompt_tokens, n);
                        format!("data: {u}\n\n")
                    } else {
                        String::new()
                    };
                    let frame = format!("data: {last}\n\n{usage}data: [DONE]\n\n");
                    return Some((
                        Ok::<_, std::io::Error>(Bytes::from(frame)),
                        (i + 1, first, None, abort),
                    ));
                }
                // The rest of the answer in one frame, when its last token is due.
                let upto = if coalesce && i > 0 { n } else { i + 1 };
                let due = async {
                    match first {
                        Some(first) => {
                            wait_until(token_at(first, upto - 1)).await;
                            first
                        }
                        None => {
                            e.prefill(prompt_tokens).await;
                            Instant::now()
                        }
                    }
                };
                let first = tokio::select! {
                    biased;
                    _ = abort.changed() => {
                        // vLLM aborts running requests when put to sleep without mode=wait.
                        return Some((Err(std::io::Error::other("aborted: engine is going to sleep")), (n + 1, first, None, abort)));
                    }
                    first = due => first,
                };
                let text: String = (i..upto)
                    .map(|t| format!("{} ", openai::token_of(answer, t)))
                    .collect();
                let chunk = openai::chunk(kind, &id, &model, Some(&text), None);
                Some((
                    Ok(Bytes::from(format!("data: {chunk}\n\n"))),
                    (upto, Some(first), Some(guard), abort),
                ))
            }
        },
    );
    marked(
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .expect("static headers are valid"),
    )
}

/// The header the simulator marks an adapter's answers with, naming the adapter.
pub const ADAPTER_HEADER: &str = "x-sim-lora-adapter";
/// And with a digest of the adapter's weights file, when it came with one.
pub const WEIGHTS_HEADER: &str = "x-sim-lora-weights";

/// Sleeps until `deadline`, without a timer (and its millisecond rounding) when it has
/// already passed: an engine configured to answer at once does.
async fn wait_until(deadline: tokio::time::Instant) {
    if deadline > tokio::time::Instant::now() {
        tokio::time::sleep_until(deadline).await;
    }
}

pub(crate) fn record_finished(e: &SimEngine, start: Instant, n: u32) {
    let elapsed = start.elapsed().as_secs_f64();
    e.metrics.request_duration.observe(elapsed);
    e.metrics.e2e_latency.observe(elapsed);
    e.metrics.ttft.observe(e.cfg.ttft.as_secs_f64());
    if n > 1 {
        e.metrics
            .tpot
            .observe(1.0 / e.cfg.tokens_per_second.max(f64::MIN_POSITIVE));
    }
    e.metrics.generation_tokens.inc_by(u64::from(n));
    e.metrics.success("length");
    e.finished();
}
