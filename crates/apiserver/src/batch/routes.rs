//! The Batch API's HTTP routes, in OpenAI's shapes: `/v1/files` and `/v1/batches`. Every
//! file and batch belongs to the API key that made it, and only that key sees it.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use greenthread_edge::{ApiError, read_body};
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Batches, now, plan,
    store::{self, BatchRecord, LineError, Status, StoreError},
};
use crate::{ApiServer, Lookup, keys::Identity};

type Shared = Arc<ApiServer>;

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/v1/files", post(upload).get(list_files))
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel))
}

/// The Batch API, or why there is none.
fn batches(api: &ApiServer) -> Result<Arc<Batches>, ApiError> {
    api.batches.get().cloned().ok_or_else(|| {
        ApiError::not_found(
            "the Batch API is off on this server (greenthread local keeps batches in its data directory; the API server needs --batch-dir)",
        )
    })
}

fn who(req_parts: &http::request::Parts) -> String {
    req_parts
        .extensions
        .get::<Identity>()
        .map_or("none", |i| i.label())
        .to_string()
}

fn stored(e: StoreError) -> ApiError {
    if let StoreError::Quota(why) = &e {
        return ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", why.clone());
    }
    tracing::error!(error = %e, reason = e.metric_label(), "batch store");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "the batch store failed; see the server's log",
    )
}

/// The caller's rate limit, for the calls that write (uploads, new batches, deletions,
/// cancellations): 429 past it, as for inference. Reads are not counted (SDKs poll).
fn limited(parts: &http::request::Parts) -> Result<(), ApiError> {
    if let Some(Identity(Some(caller))) = parts.extensions.get::<Identity>() {
        caller
            .admit(tokio::time::Instant::now())
            .map_err(|after| crate::keys::limited(&caller.key.name, after))?;
    }
    Ok(())
}

fn field(name: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("{name}: {message}"))
}

fn no_such(what: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("No such {what}: {}", greenthread_edge::echo(id)))
}

/// Runs a store call off the async threads (it writes and syncs files).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?
        .map_err(stored)
}

fn respond(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/files`: a `multipart/form-data` form with `purpose` (`batch`) and `file`.
async fn upload(State(api): State<Shared>, req: Request) -> Response {
    respond(upload_file(api, req).await)
}

async fn upload_file(api: Shared, req: Request) -> Result<Value, ApiError> {
    let batches = batches(&api)?;
    let (parts, body) = req.into_parts();
    limited(&parts)?;
    let owner = who(&parts);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = match greenthread_edge::multipart::boundary(content_type) {
        Some(Ok(b)) => b.to_string(),
        Some(Err(e)) => return Err(ApiError::bad_request(e.to_string())),
        None => {
            return Err(ApiError::bad_request(
                "a file is uploaded as multipart/form-data with the fields purpose and file",
            ));
        }
    };
    let body = read_body(body, usize::MAX).await?;
    let value = |name: &str| {
        greenthread_edge::multipart::part(&body, &boundary, name)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    };
    let purpose = value("purpose")?
        .map(|p| String::from_utf8_lossy(&body[p.value]).trim().to_string())
        .ok_or_else(|| field("purpose", "is required"))?;
    if purpose != "batch" {
        return Err(field(
            "purpose",
            format!(
                "{} is not supported here; only batch",
                greenthread_edge::echo(&purpose)
            ),
        ));
    }
    let file = value("file")?.ok_or_else(|| field("file", "is required"))?;
    let content = body.slice(file.value.clone());
    if std::str::from_utf8(&content).is_err() {
        return Err(field("file", "a batch's input is JSONL: UTF-8 text"));
    }
    let filename = file
        .filename
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "upload.jsonl".to_string());
    let (store, quota) = (batches.store.clone(), batches.quota);
    let meta =
        blocking(move || store.put_upload(&filename, &purpose, &content, now(), &owner, quota))
            .await?;
    Ok(meta.to_openai())
}

#[derive(Deserialize)]
struct ListFiles {
    purpose: Option<String>,
}

async fn list_files(
    State(api): State<Shared>,
    Query(q): Query<ListFiles>,
    req: Request,
) -> Response {
    let owner = who(&req.into_parts().0);
    respond(
        async {
            let store = batches(&api)?.store.clone();
            let files = blocking(move || store.files()).await?;
            let data: Vec<Value> = files
                .iter()
                .filter(|f| f.owner == owner)
                .filter(|f| q.purpose.as_ref().is_none_or(|p| *p == f.purpose))
                .map(store::FileMeta::to_openai)
                .collect();
            Ok(json!({"object": "list", "data": data, "has_more": false}))
        }
        .await,
    )
}

/// The file `id` if the caller made it.
async fn owned_file(api: &ApiServer, id: &str, owner: &str) -> Result<store::FileMeta, ApiError> {
    let store = batches(api)?.store.clone();
    let key = id.to_string();
    blocking(move || store.file(&key))
        .await?
        .filter(|f| f.owner == owner)
        .ok_or_else(|| no_such("file", id))
}

async fn get_file(State(api): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let owner = who(&req.into_parts().0);
    respond(owned_file(&api, &id, &owner).await.map(|f| f.to_openai()))
}

async fn file_content(State(api): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let owner = who(&req.into_parts().0);
    let content = async {
        owned_file(&api, &id, &owner).await?;
        let store = batches(&api)?.store.clone();
        blocking(move || store.content(&id))
            .await?
            .ok_or_else(|| ApiError::not_found("the file's content is gone"))
    }
    .await;
    match content {
        Ok(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_file(State(api): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let parts = req.into_parts().0;
    let owner = who(&parts);
    respond(
        async {
            limited(&parts)?;
            owned_file(&api, &id, &owner).await?;
            let batches = batches(&api)?;
            // A running batch reads its input again when it resumes.
            if let Some(b) = batches
                .records
                .lock()
                .unwrap()
                .values()
                .find(|b| b.input_file_id == id && b.status.active())
            {
                return Err(ApiError::bad_request(format!(
                    "file {id} is the input of batch {}, still {}: cancel it or let it end first",
                    b.id,
                    b.status.as_str()
                )));
            }
            let store = batches.store.clone();
            let key = id.clone();
            blocking(move || store.delete_file(&key)).await?;
            Ok(json!({"id": id, "object": "file", "deleted": true}))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
    /// Sent by newer SDKs; output files do not expire here.
    #[serde(default)]
    #[allow(dead_code)]
    output_expires_after: Option<Value>,
}

/// `POST /v1/batches`: checks the request, then the input; a batch whose input is wrong
/// is kept as `failed` with each problem, as OpenAI does.
async fn create(State(api): State<Shared>, req: Request) -> Response {
    respond(create_batch(api, req).await)
}

async fn create_batch(api: Shared, req: Request) -> Result<Value, ApiError> {
    let batches = batches(&api)?;
    let (parts, body) = req.into_parts();
    limited(&parts)?;
    let owner = who(&parts);
    let identity = parts.extensions.get::<Identity>().cloned();
    let body = read_body(body, 1 << 20).await?;
    let new: NewBatch = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a batch request: {e}")))?;
    let input_file_id = new
        .input_file_id
        .ok_or_else(|| field("input_file_id", "is required"))?;
    let endpoint = new
        .endpoint
        .ok_or_else(|| field("endpoint", "is required"))?;
    if !plan::ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(field(
            "endpoint",
            format!(
                "{} is not one a batch runs: {}",
                greenthread_edge::echo(&endpoint),
                plan::ENDPOINTS.join(", ")
            ),
        ));
    }
    let completion_window = new.completion_window.unwrap_or_else(|| "24h".to_string());
    let window = plan::window(&completion_window).map_err(ApiError::bad_request)?;
    if let Some(m) = &new.metadata
        && (m.len() > 16 || m.values().any(|v| v.as_str().is_none_or(|s| s.len() > 512)))
    {
        return Err(field(
            "metadata",
            "at most 16 keys, each a string of at most 512 characters",
        ));
    }
    owned_file(&api, &input_file_id, &owner)
        .await
        .map_err(|_| field("input_file_id", format!("no such file: {input_file_id}")))?;
    let store = batches.store.clone();
    let key = input_file_id.clone();
    let content = blocking(move || store.content(&key))
        .await?
        .unwrap_or_default();
    let created_at = now();
    let mut record = BatchRecord {
        id: store::new_id("batch_"),
        endpoint: endpoint.clone(),
        input_file_id,
        completion_window,
        status: Status::Validating,
        model: String::new(),
        owner,
        created_at,
        expires_at: created_at + window.as_secs() as i64,
        in_progress_at: None,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        output_file_id: None,
        error_file_id: None,
        errors: Vec::new(),
        total: 0,
        completed: 0,
        failed: 0,
        metadata: new.metadata,
    };
    match plan::parse_input(&content, &endpoint) {
        Err(errors) => record.errors = errors,
        Ok(input) => {
            record.total = input.lines.len() as u64;
            record.model.clone_from(&input.model);
            if let Some(e) = model_problem(&api, &input.model, &endpoint, identity.as_ref()) {
                record.errors.push(e);
            }
        }
    }
    if !record.errors.is_empty() {
        record.status = Status::Failed;
        record.failed_at = Some(created_at);
    }
    let record = {
        let batches = batches.clone();
        blocking(move || batches.create(record)).await?
    };
    tracing::info!(batch = %record.id, model = %record.model, requests = record.total, status = record.status.as_str(), "batch created");
    Ok(record.to_openai())
}

/// Why a batch's requests could not go to `model` on `endpoint` for this caller.
fn model_problem(
    api: &ApiServer,
    model: &str,
    endpoint: &str,
    identity: Option<&Identity>,
) -> Option<LineError> {
    let route = match api.lookup(model) {
        Lookup::Found(r) | Lookup::Adapter(r, _) => r,
        Lookup::Unknown => {
            return Some(LineError {
                code: "model_not_found".into(),
                message: format!(
                    "The model {model:?} does not exist. Known models: {}",
                    api.known_models()
                ),
                param: Some("body.model".into()),
                line: None,
            });
        }
        Lookup::Ambiguous(c) => {
            return Some(LineError {
                code: "model_ambiguous".into(),
                message: format!(
                    "{model:?} names a Model in several namespaces: {}",
                    c.join(", ")
                ),
                param: Some("body.model".into()),
                line: None,
            });
        }
    };
    if identity.is_some_and(|i| !i.may_use(&route)) {
        return Some(LineError {
            code: "model_not_allowed".into(),
            message: format!("this API key may not use the model {model:?}"),
            param: Some("body.model".into()),
            line: None,
        });
    }
    if !route.serves(endpoint) {
        return Some(LineError {
            code: "endpoint_not_served".into(),
            message: format!(
                "the model {model:?} does not serve {endpoint}; it serves {}",
                route.endpoints.as_deref().unwrap_or_default().join(", ")
            ),
            param: Some("endpoint".into()),
            line: None,
        });
    }
    None
}

#[derive(Deserialize)]
struct ListBatches {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_batches(
    State(api): State<Shared>,
    Query(q): Query<ListBatches>,
    req: Request,
) -> Response {
    let owner = who(&req.into_parts().0);
    respond(batches(&api).map(|b| {
        let mut mine: Vec<BatchRecord> = b
            .records
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.owner == owner)
            .cloned()
            .collect();
        mine.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        let start = q
            .after
            .as_ref()
            .and_then(|a| mine.iter().position(|r| &r.id == a).map(|i| i + 1))
            .unwrap_or(0);
        let limit = q.limit.unwrap_or(20).clamp(1, 100);
        let page: Vec<&BatchRecord> = mine.iter().skip(start).take(limit).collect();
        json!({
            "object": "list",
            "data": page.iter().map(|r| r.to_openai()).collect::<Vec<_>>(),
            "first_id": page.first().map(|r| &r.id),
            "last_id": page.last().map(|r| &r.id),
            "has_more": start + page.len() < mine.len(),
        })
    }))
}

fn owned_batch(
    api: &ApiServer,
    id: &str,
    owner: &str,
) -> Result<(Arc<Batches>, BatchRecord), ApiError> {
    let batches = batches(api)?;
    let record = batches
        .record(id)
        .filter(|b| b.owner == owner)
        .ok_or_else(|| no_such("batch", id))?;
    Ok((batches, record))
}

async fn get_batch(State(api): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let owner = who(&req.into_parts().0);
    respond(owned_batch(&api, &id, &owner).map(|(_, b)| b.to_openai()))
}

/// `POST /v1/batches/{id}/cancel`: requests in flight finish, no more are sent, and the
/// batch ends `cancelled` with what it finished.
async fn cancel(State(api): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let parts = req.into_parts().0;
    let owner = who(&parts);
    respond(
        async {
            limited(&parts)?;
            let (batches, record) = owned_batch(&api, &id, &owner)?;
            match record.status {
                Status::Validating | Status::InProgress => {}
                Status::Cancelling | Status::Cancelled => return Ok(record.to_openai()),
                other => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid_request_error",
                        format!(
                            "batch {id} is {}: only a batch in progress can be cancelled",
                            other.as_str()
                        ),
                    ));
                }
            }
            let b = blocking(move || {
                batches.update(&id, |b| {
                    if matches!(b.status, Status::Validating | Status::InProgress) {
                        b.status = Status::Cancelling;
                        b.cancelling_at = Some(now());
                    }
                })
            })
            .await?;
            Ok(b.to_openai())
        }
        .await,
    )
}
