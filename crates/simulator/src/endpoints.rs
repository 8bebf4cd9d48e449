//! The rest of the inference API, in the shapes real servers answer: OpenAI's embeddings,
//! responses and audio transcriptions, Anthropic's messages, and the rerank API (Cohere's,
//! as vLLM serves it). Each answer names the model that produced it, and is a pure
//! function of the request, so that tests can tell who answered what. Streaming is
//! simulated for chat and completions only; the others answer whole.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    engine::SimEngine,
    openai::{self, InferenceRequest},
    server::{arrive, error, parse, ready, record_finished},
};

type Shared = Arc<SimEngine>;

/// The text of anything a client may send as input: strings as they are, everything
/// else (content blocks, token ids) as its JSON.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A JSON request as the endpoints read it.
pub(crate) trait Request: serde::de::DeserializeOwned {
    fn model(&self) -> Option<&str>;

    /// What it is, when it asks for a stream this endpoint does not simulate.
    fn unsupported_stream(&self) -> Option<&'static str> {
        None
    }
}

/// What every JSON endpoint does first: note the headers, count the request (and hang it
/// when told to), parse it, refuse a stream it cannot simulate, and check that the engine
/// can answer for its model now.
pub(crate) async fn accept<T: Request>(
    e: &SimEngine,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, Box<Response>> {
    e.record_headers(headers);
    arrive(e, body).await;
    let req: T = parse(body)?;
    if let Some(what) = req.unsupported_stream() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the simulator does not stream {what}; ask without `stream`"),
        )));
    }
    ready(e, req.model()).await.map_err(Box::new)?;
    Ok(req)
}

impl Request for InferenceRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// `n` tokens of the answer to `prompt`, produced at the engine's speed (prefill, then
/// one decode step a token) in one of its sequence slots. `Err` when the engine was put
/// to sleep meanwhile, as vLLM aborts.
async fn generate(e: &Shared, prompt: &str, n: u32) -> Result<(String, u32), Response> {
    let start = Instant::now();
    let guard = e.admit().await;
    let prompt_tokens = openai::count_tokens(prompt);
    e.metrics.prompt_tokens.inc_by(u64::from(prompt_tokens));
    let mut abort = e.abort_signal();
    abort.borrow_and_update();
    let per_token = if e.cfg.tokens_per_second > 0.0 {
        f64::from(n) / e.cfg.tokens_per_second
    } else {
        0.0
    };
    tokio::select! {
        biased;
        _ = abort.changed() => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "request aborted: engine is going to sleep")),
        () = async {
            e.prefill(prompt_tokens).await;
            tokio::time::sleep(std::time::Duration::from_secs_f64(per_token)).await;
        } => {}
    }
    let h = openai::prompt_hash(prompt);
    let text: Vec<&str> = (0..n).map(|i| openai::token_of(h, i)).collect();
    record_finished(e, start, n);
    drop(guard);
    Ok((text.join(" "), prompt_tokens))
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: Option<String>,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

impl Request for EmbeddingsRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// A unit vector that depends only on `text`: equal texts embed equally.
fn embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let h = openai::prompt_hash(text);
    let raw: Vec<f32> = (0..dimensions as u64)
        .map(|j| {
            let x = (h ^ j.wrapping_mul(0x9e3779b97f4a7c15)).wrapping_mul(0x100000001b3);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    raw.into_iter().map(|x| x / norm).collect()
}

/// `POST /v1/embeddings`: one vector per input (a string, strings, token ids or lists of
/// them), as floats or as base64 of little-endian f32 (what the openai SDK asks for).
pub async fn embeddings(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: EmbeddingsRequest = match accept(&e, &headers, &body).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let inputs: Vec<String> = match &req.input {
        Value::Array(items) if items.iter().all(|i| !i.is_number()) => {
            items.iter().map(text_of).collect()
        }
        one => vec![text_of(one)],
    };
    let dimensions = req.dimensions.unwrap_or(32).clamp(1, 4096);
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("encoding_format {other:?} is not float or base64"),
            );
        }
    };
    let start = Instant::now();
    let guard = e.admit().await;
    let tokens: u32 = inputs.iter().map(|t| openai::count_tokens(t)).sum();
    e.metrics.prompt_tokens.inc_by(u64::from(tokens));
    e.prefill(tokens).await;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let v = embedding(text, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    record_finished(&e, start, 0);
    drop(guard);
    Json(json!({
        "object": "list",
        "model": e.cfg.model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
}

impl Request for ResponsesRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn unsupported_stream(&self) -> Option<&'static str> {
        self.stream.then_some("responses")
    }
}

/// `POST /v1/responses`: one assistant message of output text.
pub async fn responses(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: ResponsesRequest = match accept(&e, &headers, &body).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let prompt = format!(
        "{}\n{}",
        req.instructions.unwrap_or_default(),
        text_of(&req.input)
    );
    let n = req.max_output_tokens.unwrap_or(e.cfg.default_max_tokens);
    let (text, input_tokens) = match generate(&e, &prompt, n).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = e.next_id();
    Json(json!({
        "id": format!("resp_sim{id}"),
        "object": "response",
        "created_at": openai::created(),
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "model": e.cfg.model,
        "output": [{
            "type": "message",
            "id": format!("msg_sim{id}"),
            "status": "incomplete",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }],
        "parallel_tool_calls": false,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + n,
        },
    }))
    .into_response()
}

#[derive(Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    system: Value,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
}

impl Request for MessagesRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn unsupported_stream(&self) -> Option<&'static str> {
        self.stream.then_some("messages")
    }
}

/// `POST /v1/messages`, Anthropic's: one text block, stopped at `max_tokens`.
pub async fn messages(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: MessagesRequest = match accept(&e, &headers, &body).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let mut prompt = text_of(&req.system);
    for m in &req.messages {
        prompt.push('\n');
        prompt.push_str(&text_of(&m["content"]));
    }
    let n = req.max_tokens.unwrap_or(e.cfg.default_max_tokens);
    let (text, input_tokens) = match generate(&e, &prompt, n).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    Json(json!({
        "id": format!("msg_sim{}", e.next_id()),
        "type": "message",
        "role": "assistant",
        "model": e.cfg.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "max_tokens",
        "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": n},
    }))
    .into_response()
}

#[derive(Deserialize)]
struct RerankRequest {
    model: Option<String>,
    query: String,
    documents: Vec<Value>,
    top_n: Option<usize>,
}

impl Request for RerankRequest {
    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// `POST /v1/rerank` (and `/rerank`, `/v2/rerank`): the documents by a relevance score
/// that depends only on the query and the document.
pub async fn rerank(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: RerankRequest = match accept(&e, &headers, &body).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let start = Instant::now();
    let guard = e.admit().await;
    let docs: Vec<String> = req
        .documents
        .iter()
        .map(|d| d.get("text").map_or_else(|| text_of(d), text_of))
        .collect();
    let tokens: u32 = openai::count_tokens(&req.query) * docs.len() as u32
        + docs.iter().map(|d| openai::count_tokens(d)).sum::<u32>();
    e.prefill(tokens).await;
    let mut results: Vec<(usize, f64)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let h = openai::prompt_hash(&format!("{}\n{d}", req.query));
            (i, (h >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1));
    results.truncate(req.top_n.unwrap_or(docs.len()));
    record_finished(&e, start, 0);
    drop(guard);
    let results: Vec<Value> = results
        .into_iter()
        .map(|(index, score)| json!({"index": index, "document": {"text": docs[index]}, "relevance_score": score}))
        .collect();
    Json(json!({
        "id": format!("rerank-sim-{}", e.next_id()),
        "model": e.cfg.model,
        "usage": {"total_tokens": tokens},
        "results": results,
    }))
    .into_response()
}

/// `POST /v1/audio/transcriptions` (and `translations`): a form with `model` and `file`;
/// the "transcript" is a pure function of the file's bytes.
pub async fn transcriptions(State(e): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    use greenthread_edge::multipart;
    e.record_headers(&headers);
    arrive(&e, &body).await;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let boundary = match multipart::boundary(content_type) {
        Some(Ok(b)) => b,
        Some(Err(err)) => return bad(err.to_string()),
        None => return bad("audio requests are multipart/form-data".into()),
    };
    let field = |name| multipart::field(&body, boundary, name).map(|at| at.map(|at| &body[at]));
    let (model, file, format) = match (field("model"), field("file"), field("response_format")) {
        (Ok(m), Ok(Some(f)), Ok(r)) => (m, f, r),
        (Ok(_), Ok(None), Ok(_)) => return bad("the form has no `file`".into()),
        (Err(err), ..) | (_, Err(err), _) | (.., Err(err)) => return bad(err.to_string()),
    };
    let model = model.map(String::from_utf8_lossy);
    if let Err(r) = ready(&e, model.as_deref()).await {
        return r;
    }
    // A token a kilobyte of audio, at least one.
    let (text, _) = match generate(
        &e,
        &String::from_utf8_lossy(file),
        (file.len() / 1024).max(1) as u32,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    match format.map(String::from_utf8_lossy).as_deref() {
        Some("text") => text.into_response(),
        _ => Json(json!({"text": text, "model": e.cfg.model})).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_unit_vectors_that_depend_only_on_the_text() {
        let a = embedding("hello", 32);
        assert_eq!(a, embedding("hello", 32));
        assert_ne!(a, embedding("goodbye", 32));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert!(a.iter().all(|x| (-1.0..=1.0).contains(x)));
    }
}
