//! LoRA adapters on demand, per request (the original product's protocol): a request
//! names its adapter in `lora_adapter_metadata: {lora_model: {id, name, hash, files}}`.
//! An adapter missing from this replica's adapter cache answers 404 until the caller
//! sends its `files` (file name → URL, or a list of URLs); they are downloaded into the
//! cache, the adapter is loaded into the engine under `name`, and the request is served
//! through it. Another `hash` than the cached copy's is a new version: fetched afresh.
//! The engine holds at most `--max-loras` of them, the least recently used unloaded
//! first (never one a request still uses). The cache outlives sleeps: after a wake the
//! first request loads the adapter again from it, without a download.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use greenthread_api::AdapterSpec;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use crate::{
    engine::{AdapterCall, EngineAdapter},
    metrics::SidecarMetrics,
};

/// The request member that names an on-demand adapter.
pub const METADATA: &str = "lora_adapter_metadata";
/// The files a PEFT adapter needs, as vLLM and SGLang load it.
const REQUIRED: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
/// What a cached copy is, written last: a directory without it is not a copy.
const STAMP: &str = ".greenthread-adapter.json";
const MAX_FILE_BYTES: u64 = 8 << 30;
const MAX_FILES: usize = 16;
const MAX_REDIRECTS: usize = 5;

/// The adapter a request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// The cache's key (a directory name).
    pub id: String,
    /// What the engine serves it as, and the answer's `model`.
    pub name: String,
    /// Its version: another hash than the cached copy's is fetched afresh.
    pub hash: Option<String>,
    /// `(file name, URL)` to fetch it from; empty when the caller sent none.
    pub files: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum OnDemandError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "adapter {name:?} (id {id:?}) is not in this replica's adapter cache: send the request again with lora_adapter_metadata.lora_model.files"
    )]
    NotCached { id: String, name: String },
    #[error("downloading adapter {id:?}: {why}")]
    Download { id: String, why: String },
    #[error("loading adapter {name:?} into the engine: {why}")]
    Load { name: String, why: String },
    #[error("model {model} is {why}; try again shortly")]
    Unavailable { model: String, why: &'static str },
}

impl OnDemandError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::NotCached { .. } => StatusCode::NOT_FOUND,
            Self::Download { .. } | Self::Load { .. } => StatusCode::BAD_GATEWAY,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI-style error type, and the metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request_error",
            Self::NotCached { .. } => "not_found",
            Self::Download { .. } => "adapter_download_failed",
            Self::Load { .. } => "adapter_load_failed",
            Self::Unavailable { .. } => "service_unavailable",
        }
    }
}

impl IntoResponse for OnDemandError {
    fn into_response(self) -> Response {
        let mut r = greenthread_edge::api_error(self.status(), self.code(), self.to_string());
        if matches!(self, Self::Unavailable { .. }) {
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
        }
        r
    }
}

fn invalid(message: impl Into<String>) -> OnDemandError {
    OnDemandError::Invalid(message.into())
}

/// A request body's members.
pub type Members = Map<String, Value>;

/// The adapter `body` asks for, and the body's members without the metadata; `None`
/// when the body names none (the common case costs one substring search).
pub fn parse(body: &[u8]) -> Result<Option<(Wanted, Members)>, OnDemandError> {
    if memchr::memmem::find(body, METADATA.as_bytes()).is_none() {
        return Ok(None);
    }
    let Ok(mut members) = serde_json::from_slice::<Map<String, Value>>(body) else {
        // Not an object naming it as a member: the engine's to answer.
        return Ok(None);
    };
    let Some(meta) = members.remove(METADATA) else {
        return Ok(None);
    };
    let field = |k: &str| format!("{METADATA}.lora_model.{k}");
    let model = meta
        .get("lora_model")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid(format!("{METADATA}.lora_model is required (an object)")))?;
    // Ids and hashes may come as numbers.
    let text = |k: &str| match model.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let id = text("id").ok_or_else(|| invalid(format!("{} is required", field("id"))))?;
    if !plain_name(&id) {
        return Err(invalid(format!(
            "{} {}: letters, digits, '.', '_' and '-' only, at most 128, not starting with '.'",
            field("id"),
            greenthread_edge::echo(&id)
        )));
    }
    let name = text("name").ok_or_else(|| invalid(format!("{} is required", field("name"))))?;
    greenthread_api::model::adapter_name(&name)
        .map_err(|e| invalid(format!("{} {e}", field("name"))))?;
    let hash = text("hash");
    if hash.as_ref().is_some_and(|h| h.len() > 256) {
        return Err(invalid(format!("{} is longer than 256", field("hash"))));
    }
    let files = match model.get("files") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(file, url)| match url.as_str() {
                Some(u) => Ok((file.clone(), u.to_string())),
                None => Err(invalid(format!("{}.{file} must be a URL", field("files")))),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(list)) => list
            .iter()
            .map(|url| {
                let u = url
                    .as_str()
                    .ok_or_else(|| invalid(format!("{} must list URLs", field("files"))))?;
                let path = u.split(['?', '#']).next().unwrap_or_default();
                let file = path.rsplit('/').next().unwrap_or_default();
                Ok((file.to_string(), u.to_string()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(format!(
                "{} must map file names to URLs, or list URLs",
                field("files")
            )));
        }
    };
    check_files(&files).map_err(|e| invalid(format!("{}: {e}", field("files"))))?;
    Ok(Some((
        Wanted {
            id,
            name,
            hash,
            files,
        },
        members,
    )))
}

fn check_files(files: &[(String, String)]) -> Result<(), String> {
    if files.is_empty() {
        return Ok(());
    }
    if files.len() > MAX_FILES {
        return Err(format!("more than {MAX_FILES} files"));
    }
    for (file, url) in files {
        if !plain_name(file) {
            return Err(format!(
                "{} is not a plain file name",
                greenthread_edge::echo(file)
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || url.parse::<http::Uri>().is_err()
        {
            return Err(format!("{file}: {} is not an http(s) URL", shown(url)));
        }
    }
    for r in REQUIRED {
        if !files.iter().any(|(f, _)| f == r) {
            return Err(format!(
                "{r} is missing (an adapter needs {})",
                REQUIRED.join(" and ")
            ));
        }
    }
    Ok(())
}

/// A name safe as one path component.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `url` as errors and logs show it: without its query, which may hold a signature.
fn shown(url: &str) -> String {
    let cut = url.split(['?', '#']).next().unwrap_or_default();
    greenthread_edge::echo(cut)
}

/// What a cached copy's stamp says.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Stamp {
    id: String,
    name: String,
    hash: Option<String>,
}

/// An on-demand adapter as the engine holds it.
struct Held {
    id: String,
    hash: Option<String>,
    /// When it last served (a counter): the least recent goes first.
    used: u64,
    /// Cloned by each request it serves, until its answer ends: in use while shared.
    users: Arc<()>,
}

/// The adapter cache and the on-demand adapters the engine holds.
pub struct OnDemand {
    dir: PathBuf,
    timeout: Duration,
    max_loras: usize,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// One download per adapter id at a time; the others wait for it.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    held: Mutex<BTreeMap<String, Held>>,
    /// One load or unload at a time.
    engine_ops: tokio::sync::Mutex<()>,
    tick: AtomicU64,
}

impl OnDemand {
    pub fn new(dir: PathBuf, timeout: Duration, max_loras: u32) -> anyhow::Result<Self> {
        Ok(Self {
            dir,
            timeout,
            max_loras: max_loras.max(1) as usize,
            // The weights' client: the system's roots, plain HTTP for mirrors.
            client: greenthread_weights::https_client(),
            fetching: Mutex::default(),
            held: Mutex::default(),
            engine_ops: tokio::sync::Mutex::new(()),
            tick: AtomicU64::new(0),
        })
    }

    /// The cached copy of `w`, downloaded first when the cache lacks it (or holds
    /// another hash) and `w` brings its files.
    pub async fn cached(
        &self,
        w: &Wanted,
        metrics: &SidecarMetrics,
    ) -> Result<PathBuf, OnDemandError> {
        let at = self.dir.join(&w.id);
        if self.is_cached(&at, w).await {
            return Ok(at);
        }
        if w.files.is_empty() {
            return Err(OnDemandError::NotCached {
                id: w.id.clone(),
                name: w.name.clone(),
            });
        }
        let lock = self
            .fetching
            .lock()
            .unwrap()
            .entry(w.id.clone())
            .or_default()
            .clone();
        let one = lock.lock().await;
        let fetched = self.fetch_once(w, at, metrics).await;
        drop(one);
        // The last one out removes the entry: ids are the callers' and unbounded. (Clones
        // are taken under the map's lock, so none appears between the count and the
        // removal.)
        let mut fetching = self.fetching.lock().unwrap();
        if Arc::strong_count(&lock) == 2 {
            fetching.remove(&w.id);
        }
        fetched
    }

    /// The download itself, under the adapter's own lock.
    async fn fetch_once(
        &self,
        w: &Wanted,
        at: PathBuf,
        metrics: &SidecarMetrics,
    ) -> Result<PathBuf, OnDemandError> {
        // Another request may have fetched it meanwhile.
        if self.is_cached(&at, w).await {
            return Ok(at);
        }
        tracing::info!(adapter = %w.name, id = %w.id, files = w.files.len(), "downloading adapter");
        let fetched = match tokio::time::timeout(self.timeout, self.download(w, &at)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "took over {:?} (lora.downloadTimeout)",
                self.timeout
            )),
        };
        metrics.adapter_download(fetched.as_ref().ok().copied());
        match fetched {
            Ok(bytes) => {
                tracing::info!(adapter = %w.name, id = %w.id, bytes, "adapter downloaded");
                Ok(at)
            }
            Err(why) => {
                tracing::warn!(adapter = %w.name, id = %w.id, error = %why, "adapter download failed");
                Err(OnDemandError::Download {
                    id: w.id.clone(),
                    why,
                })
            }
        }
    }

    async fn is_cached(&self, at: &Path, w: &Wanted) -> bool {
        let Ok(stamp) = tokio::fs::read(at.join(STAMP)).await else {
            return false;
        };
        let Ok(stamp) = serde_json::from_slice::<Stamp>(&stamp) else {
            return false;
        };
        if w.hash.is_some() && stamp.hash != w.hash {
            return false;
        }
        for r in REQUIRED {
            if !tokio::fs::try_exists(at.join(r)).await.unwrap_or(false) {
                return false;
            }
        }
        true
    }

    /// Fetches every file into a fresh directory beside `at`, checks it, stamps it and
    /// puts it in `at`'s place; the bytes fetched. A failure leaves the cache as it was.
    async fn download(&self, w: &Wanted, at: &Path) -> Result<u64, String> {
        let seq = self.tick.fetch_add(1, Ordering::Relaxed);
        let partial = self
            .dir
            .join(format!(".partial-{}-{}-{seq}", w.id, std::process::id()));
        let fetched = async {
            tokio::fs::create_dir_all(&partial)
                .await
                .map_err(|e| format!("creating {}: {e}", partial.display()))?;
            let mut bytes = 0;
            for (file, url) in &w.files {
                bytes += self.fetch(url, &partial.join(file)).await?;
            }
            // A corrupt config would fail in the engine, later and less clearly.
            let config = tokio::fs::read(partial.join("adapter_config.json"))
                .await
                .map_err(|e| e.to_string())?;
            if serde_json::from_slice::<Map<String, Value>>(&config).is_err() {
                return Err("adapter_config.json is not a JSON object".to_string());
            }
            let stamp = serde_json::to_vec(&Stamp {
                id: w.id.clone(),
                name: w.name.clone(),
                hash: w.hash.clone(),
            })
            .expect("a stamp serializes");
            tokio::fs::write(partial.join(STAMP), stamp)
                .await
                .map_err(|e| e.to_string())?;
            Ok(bytes)
        }
        .await;
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&partial).await;
                return Err(e);
            }
        };
        // The old copy steps aside before the new one takes its place: a directory
        // cannot be renamed over a non-empty one.
        let old = self
            .dir
            .join(format!(".old-{}-{}-{seq}", w.id, std::process::id()));
        let had_old = tokio::fs::rename(at, &old).await.is_ok();
        let placed = tokio::fs::rename(&partial, at).await;
        if had_old {
            let _ = tokio::fs::remove_dir_all(&old).await;
        }
        placed.map_err(|e| format!("placing it in {}: {e}", at.display()))?;
        Ok(bytes)
    }

    /// One file, following redirects (the hub's resolve URLs redirect to its CDN).
    async fn fetch(&self, url: &str, to: &Path) -> Result<u64, String> {
        let mut uri: http::Uri = url.parse().map_err(|e| format!("{}: {e}", shown(url)))?;
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .client
                .get(uri.clone())
                .await
                .map_err(|e| format!("{}: {}", shown(&uri.to_string()), error_chain(&e)))?;
            let status = resp.status();
            if status.is_redirection() {
                let next = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| format!("{} redirected without a location", shown(url)))?;
                uri = resolve(&uri, next)
                    .ok_or_else(|| format!("{} redirected to {}", shown(url), shown(next)))?;
                continue;
            }
            if !status.is_success() {
                return Err(format!("{} answered {status}", shown(&uri.to_string())));
            }
            let expected = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if expected.is_some_and(|n| n > MAX_FILE_BYTES) {
                return Err(format!(
                    "{} is larger than {MAX_FILE_BYTES} bytes",
                    shown(url)
                ));
            }
            let mut file = tokio::fs::File::create(to)
                .await
                .map_err(|e| format!("creating {}: {e}", to.display()))?;
            let mut body = resp.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("{}: {e}", shown(url)))?;
                if let Ok(data) = frame.into_data() {
                    n += data.len() as u64;
                    if n > MAX_FILE_BYTES {
                        return Err(format!(
                            "{} is larger than {MAX_FILE_BYTES} bytes",
                            shown(url)
                        ));
                    }
                    file.write_all(&data)
                        .await
                        .map_err(|e| format!("writing {}: {e}", to.display()))?;
                }
            }
            if let Some(expected) = expected
                && expected != n
            {
                return Err(format!("{}: {n} of {expected} bytes", shown(url)));
            }
            file.sync_all()
                .await
                .map_err(|e| format!("writing {}: {e}", to.display()))?;
            return Ok(n);
        }
        Err(format!(
            "{}: more than {MAX_REDIRECTS} redirects",
            shown(url)
        ))
    }

    /// Loads the cached copy at `path` into the engine as `w.name` unless it holds it
    /// already; how requests name it, and the token that marks it in use until the
    /// answer ends.
    pub async fn load(
        &self,
        engine: &dyn EngineAdapter,
        base: &str,
        w: &Wanted,
        path: &Path,
        metrics: &SidecarMetrics,
    ) -> Result<(AdapterCall, Arc<()>), OnDemandError> {
        let load_error = |why: String| OnDemandError::Load {
            name: w.name.clone(),
            why,
        };
        let _one = self.engine_ops.lock().await;
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let held_now = {
            let mut held = self.held.lock().unwrap();
            match held.get_mut(&w.name) {
                Some(h) if h.id == w.id && (w.hash.is_none() || h.hash == w.hash) => {
                    h.used = tick;
                    Some(h.users.clone())
                }
                _ => None,
            }
        };
        if let Some(users) = held_now {
            let call = engine
                .adapter_call(base, &w.name)
                .ok_or_else(|| load_error("the engine does not list it".into()))?;
            return Ok((call, users));
        }
        // The same name for another adapter or version: the old one goes.
        if self.held.lock().unwrap().contains_key(&w.name) {
            let _ = engine.unload_adapter(&w.name).await;
            let n = {
                let mut held = self.held.lock().unwrap();
                held.remove(&w.name);
                held.len()
            };
            metrics.on_demand_held(n);
        }
        // Room: the least recently used that no answer still uses.
        loop {
            let victim = {
                let held = self.held.lock().unwrap();
                if held.len() < self.max_loras {
                    None
                } else {
                    held.iter()
                        .filter(|(_, h)| Arc::strong_count(&h.users) == 1)
                        .min_by_key(|(_, h)| h.used)
                        .map(|(name, _)| name.clone())
                }
            };
            let Some(victim) = victim else { break };
            match engine.unload_adapter(&victim).await {
                Ok(()) => {
                    tracing::info!(model = base, adapter = %victim, "adapter unloaded to make room")
                }
                Err(e) => {
                    tracing::warn!(model = base, adapter = %victim, error = %e, "adapter unload failed")
                }
            }
            let n = {
                let mut held = self.held.lock().unwrap();
                held.remove(&victim);
                held.len()
            };
            metrics.on_demand_eviction(n);
        }
        let spec = AdapterSpec {
            name: w.name.clone(),
            source: path.to_string_lossy().into_owned(),
        };
        let loaded = async {
            engine
                .load_adapter(&spec)
                .await
                .map_err(|e| e.to_string())?;
            engine
                .adapter_call(base, &w.name)
                .ok_or_else(|| "loaded, but the engine does not list it".to_string())
        }
        .await;
        let call = match loaded {
            Ok(call) => call,
            Err(why) => {
                metrics.on_demand_load(false, self.held.lock().unwrap().len());
                tracing::warn!(model = base, adapter = %w.name, id = %w.id, error = %why, "adapter failed to load");
                return Err(load_error(why));
            }
        };
        let users = Arc::new(());
        let n = {
            let mut held = self.held.lock().unwrap();
            held.insert(
                w.name.clone(),
                Held {
                    id: w.id.clone(),
                    hash: w.hash.clone(),
                    used: tick,
                    users: users.clone(),
                },
            );
            held.len()
        };
        metrics.on_demand_load(true, n);
        tracing::info!(model = base, adapter = %w.name, id = %w.id, "adapter loaded on demand");
        Ok((call, users))
    }

    /// The engine went to sleep or away: it holds none of them now (the cache stays).
    pub fn forget(&self, metrics: &SidecarMetrics) {
        self.held.lock().unwrap().clear();
        metrics.on_demand_held(0);
    }

    /// `/status`'s view: the on-demand adapters the engine holds.
    pub fn status_json(&self) -> Value {
        let held = self.held.lock().unwrap();
        Value::Array(
            held.iter()
                .map(|(name, h)| {
                    serde_json::json!({
                        "name": name,
                        "id": h.id,
                        "hash": h.hash,
                        "in_use": Arc::strong_count(&h.users) - 1,
                    })
                })
                .collect(),
        )
    }
}

/// `location` relative to `base` (an absolute URL, or an absolute path on its host).
fn resolve(base: &http::Uri, location: &str) -> Option<http::Uri> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().ok();
    }
    if location.starts_with('/') {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(location.parse().ok()?);
        return http::Uri::from_parts(parts).ok();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// `members` as the engine must see them: `model` set to how the engine names the
/// adapter (the metadata is gone already).
pub fn engine_body(mut members: Map<String, Value>, call: &AdapterCall) -> Bytes {
    match call {
        AdapterCall::Model(model) => {
            members.insert("model".into(), Value::String(model.clone()));
        }
        AdapterCall::Lora { base, id } => {
            members.insert("model".into(), Value::String(base.clone()));
            members.insert("lora".into(), serde_json::json!([{"id": id, "scale": 1.0}]));
        }
    }
    Bytes::from(serde_json::to_vec(&members).expect("a JSON map serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(meta: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"model": "base", "prompt": "x", METADATA: meta}))
            .unwrap()
    }

    #[test]
    fn metadata_is_read_checked_and_taken_out_of_the_body() {
        assert!(
            parse(br#"{"model": "base", "prompt": "x"}"#)
                .unwrap()
                .is_none()
        );
        let (w, rest) = parse(&body(serde_json::json!({"lora_model": {
            "id": 42, "name": "sql", "hash": "abc",
            "files": {"adapter_config.json": "http://h/c.json", "adapter_model.safetensors": "https://h/m?sig=s"}
        }})))
        .unwrap()
        .unwrap();
        assert_eq!(
            (w.id.as_str(), w.name.as_str(), w.hash.as_deref()),
            ("42", "sql", Some("abc"))
        );
        assert_eq!(w.files.len(), 2);
        assert!(!rest.contains_key(METADATA) && rest["prompt"] == "x");
        // A list of URLs names each file by its last path segment.
        let (w, _) = parse(&body(serde_json::json!({"lora_model": {
            "id": "a", "name": "sql",
            "files": ["http://h/x/adapter_config.json", "http://h/x/adapter_model.safetensors?t=1"]
        }})))
        .unwrap()
        .unwrap();
        assert_eq!(w.files[1].0, "adapter_model.safetensors");
    }

    #[test]
    fn bad_metadata_is_a_400_naming_the_field() {
        for (meta, field) in [
            (serde_json::json!({}), "lora_model"),
            (
                serde_json::json!({"lora_model": {"name": "sql"}}),
                "lora_model.id",
            ),
            (
                serde_json::json!({"lora_model": {"id": "1"}}),
                "lora_model.name",
            ),
            (
                serde_json::json!({"lora_model": {"id": "../x", "name": "sql"}}),
                "lora_model.id",
            ),
            (
                serde_json::json!({"lora_model": {"id": "1", "name": "a/b"}}),
                "lora_model.name",
            ),
            (
                serde_json::json!({"lora_model": {"id": "1", "name": "sql", "files": {"adapter_config.json": "http://h/c"}}}),
                "adapter_model.safetensors is missing",
            ),
            (
                serde_json::json!({"lora_model": {"id": "1", "name": "sql", "files": {"../adapter_config.json": "http://h/c", "adapter_model.safetensors": "http://h/m"}}}),
                "not a plain file name",
            ),
            (
                serde_json::json!({"lora_model": {"id": "1", "name": "sql", "files": {"adapter_config.json": "file:///etc/passwd", "adapter_model.safetensors": "http://h/m"}}}),
                "not an http(s) URL",
            ),
        ] {
            let e = parse(&body(meta.clone())).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{meta}");
            assert!(e.to_string().contains(field), "{meta}: {e}");
        }
    }

    #[test]
    fn urls_are_shown_without_their_query() {
        assert_eq!(shown("https://h/m?sig=secret"), "\"https://h/m\"");
    }

    #[test]
    fn redirects_resolve_absolute_urls_and_paths() {
        let base: http::Uri = "http://hub:8080/a/b?x=1".parse().unwrap();
        assert_eq!(
            resolve(&base, "/cdn/f?s=2").unwrap().to_string(),
            "http://hub:8080/cdn/f?s=2"
        );
        assert_eq!(
            resolve(&base, "https://cdn/f").unwrap().to_string(),
            "https://cdn/f"
        );
        assert!(resolve(&base, "f").is_none());
    }

    #[test]
    fn the_engine_sees_the_adapter_as_it_names_it() {
        let mut m = Map::new();
        m.insert("model".into(), "base".into());
        let b = engine_body(m.clone(), &AdapterCall::Model("sql".into()));
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["model"], "sql");
        let b = engine_body(
            m,
            &AdapterCall::Lora {
                base: "b".into(),
                id: 1,
            },
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (v["model"].as_str(), v["lora"][0]["id"].as_u64()),
            (Some("b"), Some(1))
        );
    }

    /// Finding: every adapter id ever asked for kept an entry (a lock) in `fetching`,
    /// without bound. Concurrent fetches of one id share it; once the last is done,
    /// whether it downloaded or failed, the entry is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_locks_do_not_outlive_their_fetches() {
        let app = axum::Router::new()
            .route("/c.json", axum::routing::get(|| async { r#"{"r": 8}"# }))
            .route("/m", axum::routing::get(|| async { "weights" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let dir = tempfile::tempdir().unwrap();
        let od = OnDemand::new(dir.path().into(), Duration::from_secs(10), 4).unwrap();
        let metrics = SidecarMetrics::new();
        let wanted = |id: &str, model: &str| {
            parse(&body(
                serde_json::json!({"lora_model": {"id": id, "name": id, "files": {
                    "adapter_config.json": format!("http://{at}/c.json"),
                    "adapter_model.safetensors": format!("http://{at}/{model}"),
                }}}),
            ))
            .unwrap()
            .unwrap()
            .0
        };
        let (good, bad) = (wanted("good", "m"), wanted("bad", "missing"));
        let (a, b, c) = tokio::join!(
            od.cached(&good, &metrics),
            od.cached(&good, &metrics),
            od.cached(&bad, &metrics)
        );
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        assert!(matches!(c, Err(OnDemandError::Download { .. })), "{c:?}");
        assert!(od.fetching.lock().unwrap().is_empty());
    }
}
