//! A Hugging Face hub on loopback, speaking the file API the hub's tools (and ours) use:
//! a revision's files with sizes and checksums (`/api/models/{repo}/revision/{rev}`), and
//! each file (`/{repo}/resolve/{rev}/{file}`) with `Range`. Reached through `HF_ENDPOINT`.
//! Faults for tests: a token it demands (a gated model), a file served corrupted its
//! first N times, a file whose first transfer stops after N bytes and hangs (a download
//! to kill in the middle).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::StreamExt;
use serde_json::json;

/// The commit every revision resolves to.
pub const HUB_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A file of a fake repository; `lfs` files carry a SHA-256 (weights), the others a git
/// blob id (configs).
#[derive(Debug, Clone)]
pub struct HubFileSpec {
    pub name: String,
    pub content: Vec<u8>,
    pub lfs: bool,
}

/// What the fake hub does wrong, on purpose.
#[derive(Debug, Clone, Default)]
pub struct HubFaults {
    /// Files need `Authorization: Bearer <token>` (a gated model).
    pub token: Option<String>,
    /// Files served with a byte flipped, this many times each.
    pub corrupt: BTreeMap<String, u32>,
    /// The first transfer of this file stops after this many bytes and never ends.
    pub stall_after: Option<(String, u64)>,
}

struct Hub {
    repos: BTreeMap<String, Vec<HubFileSpec>>,
    faults: Mutex<HubFaults>,
    /// Bytes sent, by file name.
    served: Mutex<BTreeMap<String, u64>>,
    /// Each file request's range start, by file name.
    starts: Mutex<Vec<(String, u64)>>,
}

pub struct FakeHub {
    pub url: String,
    hub: Arc<Hub>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn checksum(content: &[u8], lfs: bool) -> String {
    greenthread_weights::content_checksum(content, lfs)
}

impl FakeHub {
    pub async fn start(repos: Vec<(&str, Vec<HubFileSpec>)>, faults: HubFaults) -> Self {
        let hub = Arc::new(Hub {
            repos: repos
                .into_iter()
                .map(|(id, files)| (id.to_string(), files))
                .collect(),
            faults: Mutex::new(faults),
            served: Mutex::default(),
            starts: Mutex::default(),
        });
        let app = Router::new()
            .route("/api/models/{org}/{name}/revision/{rev}", get(info))
            .route("/{org}/{name}/resolve/{rev}/{*file}", get(file))
            .with_state(hub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, hub, task }
    }

    /// Bytes of `file` sent so far, all transfers together.
    pub fn served(&self, file: &str) -> u64 {
        self.hub
            .served
            .lock()
            .unwrap()
            .get(file)
            .copied()
            .unwrap_or(0)
    }

    /// Where each transfer of `file` started (0, or a resumed download's `Range`).
    pub fn starts(&self, file: &str) -> Vec<u64> {
        self.hub
            .starts
            .lock()
            .unwrap()
            .iter()
            .filter(|(f, _)| f == file)
            .map(|(_, s)| *s)
            .collect()
    }
}

fn authorized(hub: &Hub, headers: &HeaderMap) -> bool {
    let want = hub.faults.lock().unwrap().token.clone();
    want.is_none_or(|t| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {t}").as_str())
    })
}

fn refuse() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "Access to model is restricted. You must have access to it and be authenticated."})),
    )
        .into_response()
}

async fn info(
    State(hub): State<Arc<Hub>>,
    Path((org, name, _rev)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&hub, &headers) {
        return refuse();
    }
    let Some(files) = hub.repos.get(&format!("{org}/{name}")) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "Repository not found"})),
        )
            .into_response();
    };
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let mut s = json!({
                "rfilename": f.name,
                "size": f.content.len(),
                "blobId": checksum(&f.content, false),
            });
            if f.lfs {
                s["lfs"] = json!({"sha256": checksum(&f.content, true), "size": f.content.len(), "pointerSize": 134});
            }
            s
        })
        .collect();
    Json(json!({"id": format!("{org}/{name}"), "sha": HUB_COMMIT, "siblings": siblings}))
        .into_response()
}

async fn file(
    State(hub): State<Arc<Hub>>,
    Path((org, name, _rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&hub, &headers) {
        return refuse();
    }
    let Some(f) = hub
        .repos
        .get(&format!("{org}/{name}"))
        .and_then(|files| files.iter().find(|f| f.name == path))
    else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let start: u64 = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    hub.starts.lock().unwrap().push((f.name.clone(), start));
    let mut content = f.content.clone();
    let (corrupt, stall) = {
        let mut faults = hub.faults.lock().unwrap();
        let corrupt = match faults.corrupt.get_mut(&f.name) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        let stall = match &faults.stall_after {
            Some((name, n)) if *name == f.name => {
                let n = *n;
                faults.stall_after = None;
                Some(n)
            }
            _ => None,
        };
        (corrupt, stall)
    };
    if corrupt && let Some(last) = content.last_mut() {
        *last ^= 0xff;
    }
    let body: Vec<u8> = content[(start as usize).min(content.len())..].to_vec();
    let etag = checksum(&f.content, f.lfs);
    let status = if start > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let total = content.len();
    let mut resp = match stall {
        Some(n) => {
            let first = body[..(n as usize).min(body.len())].to_vec();
            *hub.served
                .lock()
                .unwrap()
                .entry(f.name.clone())
                .or_default() += first.len() as u64;
            let stream = futures_util::stream::once(async move {
                Ok::<_, std::io::Error>(bytes::Bytes::from(first))
            })
            .chain(futures_util::stream::pending());
            Response::new(Body::from_stream(stream))
        }
        None => {
            *hub.served
                .lock()
                .unwrap()
                .entry(f.name.clone())
                .or_default() += body.len() as u64;
            Response::new(Body::from(body))
        }
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ETAG, format!("\"{etag}\"").parse().unwrap());
    h.insert("x-repo-commit", HUB_COMMIT.parse().unwrap());
    h.insert(
        header::CONTENT_LENGTH,
        (total as u64 - start.min(total as u64)).into(),
    );
    if start > 0 {
        h.insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total.saturating_sub(1))
                .parse()
                .unwrap(),
        );
    }
    resp
}
