//! A faithful fake Kubernetes API server on loopback, for the real `kube::Client` (and
//! the code built on it) where no real API server can run. It keeps what controllers and
//! CAS-based writers rely on: a global `resourceVersion` bumped on every write, 409
//! `Conflict` on a stale write, 409 `AlreadyExists`, 404 `NotFound` as `Status` objects,
//! the `status` subresource (spec writes leave status alone and the reverse), `scale`
//! (`autoscaling/v1` Scale over `spec.replicas`), merge and
//! apply patches, finalizers and `deletionTimestamp`, owner-reference garbage collection,
//! list, and watch from a resource version with bookmarks (410 `Gone` when too old).
//! Server-side apply keeps field ownership by field manager: an apply that would change
//! a field another manager owns answers 409 `Conflict` unless forced, which is what
//! makes Lease-based leader election safe against two candidates racing.
//! Any resource path works: Models, GPUs, Pods, Services, Leases.

mod patch;
pub mod store;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub use store::{Event, Key, ObjectStore, Refusal, Selectors, Write};

/// The objects behind the HTTP layer, with what the tests count.
pub struct Store {
    objects: Mutex<ObjectStore>,
    /// Requests served, by `METHOD resource[/subresource]`, and bytes of bodies.
    counts: Mutex<(BTreeMap<String, u64>, u64)>,
    events: broadcast::Sender<(u64, Event)>,
    /// What each pod's containers wrote, by (namespace, pod, container): the kubelet's
    /// part of `pods/{name}/log`, which a test plays.
    logs: Mutex<BTreeMap<(String, String, String), String>>,
}

/// The running fake; dropped, it stops serving.
pub struct FakeApiServer {
    pub url: String,
    pub store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    pub async fn start() -> Self {
        Self::start_with_history(10_000).await
    }

    /// Keeps only `history` events for watches to resume from (older ones get 410).
    pub async fn start_with_history(history: usize) -> Self {
        let store = Arc::new(Store {
            objects: Mutex::new(ObjectStore::new(history)),
            counts: Mutex::default(),
            events: broadcast::Sender::new(4096),
            logs: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new().fallback(handle).with_state(store.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, store, task }
    }

    /// A kubeconfig for processes that should talk to this server (`KUBECONFIG=…`).
    pub fn write_kubeconfig(&self, path: &std::path::Path, namespace: &str) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: {namespace}}}\ncurrent-context: fake\n",
            self.url
        );
        std::fs::write(path, config).unwrap();
    }

    /// A real `kube::Client` pointed at this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }
}

impl Store {
    /// Requests served so far whose `METHOD path` key contains `filter`.
    pub fn requests(&self, filter: &str) -> u64 {
        self.counts
            .lock()
            .unwrap()
            .0
            .iter()
            .filter(|(k, _)| k.contains(filter))
            .map(|(_, n)| n)
            .sum()
    }

    /// `text` written by `container` of pod `namespace/pod`, after what it wrote before.
    pub fn append_log(&self, namespace: &str, pod: &str, container: &str, text: &str) {
        self.logs
            .lock()
            .unwrap()
            .entry((namespace.into(), pod.into(), container.into()))
            .or_default()
            .push_str(text);
    }

    /// `GET pods/{name}/log`: the container's output (its last `tailLines` lines), as
    /// text. The container is required when the pod has more than one, as the real
    /// API server requires it; a pod that does not exist is 404.
    fn log(&self, ns: &str, pod: &str, q: &str) -> Response {
        let key = Key::new("api/v1/pods", ns, pod);
        let object = match self.objects.lock().unwrap().get(&key) {
            Ok(o) => o,
            Err(r) => return refused(r),
        };
        let containers: Vec<String> = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| object["spec"][k].as_array().cloned().unwrap_or_default())
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        let container = match query(q, "container") {
            Some(c) if containers.contains(&c) => c,
            Some(c) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("container {c} is not valid for pod {pod}"),
                );
            }
            None if containers.len() == 1 => containers[0].clone(),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("a container name must be specified for pod {pod}"),
                );
            }
        };
        let text = self
            .logs
            .lock()
            .unwrap()
            .get(&(ns.to_string(), pod.to_string(), container))
            .cloned()
            .unwrap_or_default();
        let text = match query(q, "tailLines").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => {
                let lines: Vec<&str> = text.lines().collect();
                let mut tail = lines[lines.len().saturating_sub(n)..].join("\n");
                if !tail.is_empty() {
                    tail.push('\n');
                }
                tail
            }
            None => text,
        };
        (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], text).into_response()
    }

    pub fn bytes(&self) -> u64 {
        self.counts.lock().unwrap().1
    }

    /// Every stored object of `resource` (e.g. `apis/greenthread.ai/v1alpha1/gpus`).
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.objects
            .lock()
            .unwrap()
            .list(resource, None, &Selectors::default())
    }

    /// Runs `op` on the objects, then hands the events it made to the live watches.
    fn with<T>(&self, op: impl FnOnce(&mut ObjectStore) -> T) -> T {
        let mut objects = self.objects.lock().unwrap();
        let out = op(&mut objects);
        for e in objects.take_new_events() {
            let _ = self.events.send(e);
        }
        out
    }
}

fn refused(r: Refusal) -> Response {
    status(
        StatusCode::from_u16(r.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        r.reason,
        r.message,
    )
}

fn answer(code: StatusCode, result: Result<Value, Refusal>) -> Response {
    match result {
        Ok(v) => ok(code, &v),
        Err(r) => refused(r),
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// `/api/v1/...` and `/apis/{group}/{version}/...`, namespaced or not.
struct Path {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Path> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (parts[..2].join("/"), &parts[2..]),
        "apis" if parts.len() >= 3 => (parts[..3].join("/"), &parts[3..]),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let plural = rest.first()?;
    Some(Path {
        resource: format!("{prefix}/{plural}"),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    })
}

fn query(q: &str, key: &str) -> Option<String> {
    let raw = q
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?;
    // Selectors arrive percent-encoded.
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let Ok(b) = u8::from_str_radix(&raw[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

async fn handle(State(store): State<Arc<Store>>, req: Request) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let q = uri.query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let Some(path) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        );
    };
    let body = axum::body::to_bytes(req.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    {
        let mut counts = store.counts.lock().unwrap();
        let key = format!(
            "{method} {}{}",
            path.resource,
            path.sub
                .as_ref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        );
        *counts.0.entry(key).or_default() += 1;
        counts.1 += body.len() as u64;
    }
    route(&store, method, path, &q, &content_type, body).await
}

/// Maps a request to the object store: the HTTP verbs and content types to its
/// operations, its answers and refusals to JSON.
async fn route(
    store: &Arc<Store>,
    method: Method,
    path: Path,
    q: &str,
    content_type: &str,
    body: Bytes,
) -> Response {
    let ns = path.namespace.clone().unwrap_or_default();
    let manager = query(q, "fieldManager").unwrap_or_else(|| "unknown".into());
    let json_body = || {
        serde_json::from_slice::<Value>(&body).map_err(|_| Refusal {
            code: 400,
            reason: "BadRequest",
            message: "body is not JSON".into(),
        })
    };
    let watching = matches!(query(q, "watch").as_deref(), Some("true" | "1"));
    match (method, path.name.clone()) {
        (Method::GET, None) if watching => watch(store, &path, q),
        (Method::GET, None) => {
            let sel = Selectors {
                labels: query(q, "labelSelector"),
                fields: query(q, "fieldSelector"),
            };
            let objects = store.objects.lock().unwrap();
            let items = objects.list(&path.resource, path.namespace.as_deref(), &sel);
            let rv = objects.resource_version().to_string();
            ok(
                StatusCode::OK,
                &json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        (Method::POST, None) => answer(
            StatusCode::CREATED,
            json_body().and_then(|obj| {
                store.with(|s| {
                    s.create(
                        &path.resource,
                        path.namespace.as_deref(),
                        obj,
                        &manager,
                        jiff::Timestamp::now(),
                    )
                })
            }),
        ),
        (Method::GET, Some(name))
            if path.sub.as_deref() == Some("log") && path.resource == "api/v1/pods" =>
        {
            store.log(&ns, &name, q)
        }
        (method, Some(name)) if path.sub.as_deref() == Some("scale") => {
            let key = Key::new(&path.resource, &ns, &name);
            let result = match method {
                Method::GET => store.objects.lock().unwrap().get(&key),
                Method::PUT | Method::PATCH => json_body().and_then(|incoming| {
                    // A Scale carries only replicas (and, for a PUT, the version it
                    // read): written into the object's spec as its CRD's
                    // specReplicasPath says.
                    let Some(replicas) = incoming["spec"]["replicas"].as_i64() else {
                        return Err(Refusal::new(422, "Invalid", "spec.replicas is required"));
                    };
                    let mut write = json!({"spec": {"replicas": replicas}});
                    if let Some(rv) = incoming["metadata"]["resourceVersion"].as_str() {
                        write["metadata"] = json!({"resourceVersion": rv});
                    }
                    store.with(|s| s.write(&key, false, Write::Merge(write), &manager))
                }),
                _ => return method_not_allowed(),
            };
            answer(StatusCode::OK, result.map(|o| scale_of(&o)))
        }
        (method, Some(name)) => {
            let key = Key::new(&path.resource, &ns, &name);
            let is_status = path.sub.as_deref() == Some("status");
            let result = match method {
                Method::GET => store.objects.lock().unwrap().get(&key),
                Method::DELETE => store.with(|s| s.delete(&key, jiff::Timestamp::now())),
                Method::PUT | Method::PATCH => json_body().and_then(|incoming| {
                    let write = if method == Method::PUT {
                        Write::Put(incoming)
                    } else if content_type.contains("apply-patch") {
                        Write::Apply {
                            patch: incoming,
                            force: query(q, "force").as_deref() == Some("true"),
                        }
                    } else if content_type.contains("json-patch") {
                        Write::JsonPatch(incoming)
                    } else {
                        // Merge and strategic merge patches: merged field by field.
                        Write::Merge(incoming)
                    };
                    store.with(|s| s.write(&key, is_status, write, &manager))
                }),
                _ => return method_not_allowed(),
            };
            answer(StatusCode::OK, result)
        }
        _ => method_not_allowed(),
    }
}

/// The `autoscaling/v1` Scale of an object whose CRD declares the conventional paths
/// (`.spec.replicas`, `.status.replicas`, `.status.selector`), as Model's does.
fn scale_of(o: &Value) -> Value {
    let m = &o["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": m["name"], "namespace": m["namespace"],
            "resourceVersion": m["resourceVersion"], "uid": m["uid"],
        },
        "spec": {"replicas": o["spec"]["replicas"]},
        "status": {"replicas": o["status"]["replicas"].as_i64().unwrap_or(0), "selector": o["status"]["selector"]},
    })
}

fn method_not_allowed() -> Response {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "method not allowed".into(),
    )
}

fn watch(store: &Arc<Store>, path: &Path, q: &str) -> Response {
    let since: u64 = query(q, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query(q, "allowWatchBookmarks").as_deref() == Some("true");
    let timeout = query(q, "timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(290);
    let sel = Selectors {
        labels: query(q, "labelSelector"),
        fields: query(q, "fieldSelector"),
    };
    let (resource, namespace) = (path.resource.clone(), path.namespace.clone());
    let wanted = move |e: &Event| {
        e.resource == resource
            && namespace.as_ref().is_none_or(|n| *n == e.namespace)
            && sel.matches(&e.object)
    };
    let (backlog, mut live, current_rv, (bookmark_api_version, bookmark_kind)) = {
        let objects = store.objects.lock().unwrap();
        let backlog = match objects.events_since(since) {
            Ok(b) => b,
            Err(r) => return refused(r),
        };
        // Subscribed under the lock: no event falls between the backlog and the stream.
        (
            backlog,
            store.events.subscribe(),
            objects.resource_version(),
            // Bookmarks carry the watched kind, as the real server's do.
            objects.kind_of(&path.resource),
        )
    };
    let kind_of_bookmark = path.resource.clone();
    let stream = async_stream_like(backlog, wanted, move |tx| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut last_rv = current_rv;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                e = live.recv() => match e {
                    Ok((rv, ev)) => {
                        last_rv = rv;
                        if tx.send(Some((rv, ev))).await.is_err() { return; }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let ev = Event {
                        resource: kind_of_bookmark.clone(),
                        namespace: String::new(),
                        kind: "BOOKMARK",
                        object: json!({"apiVersion": bookmark_api_version, "kind": bookmark_kind, "metadata": {"resourceVersion": last_rv.to_string()}}),
                    };
                    if tx.send(Some((last_rv, ev))).await.is_err() { return; }
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Backlog first, then what `live` produces; one JSON line per event.
fn async_stream_like<F, Fut>(
    backlog: Vec<(u64, Event)>,
    wanted: impl Fn(&Event) -> bool + Send + Sync + 'static,
    live: F,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Option<(u64, Event)>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let backlog_tx = tx.clone();
    tokio::spawn(async move {
        for e in backlog {
            if backlog_tx.send(Some(e)).await.is_err() {
                return;
            }
        }
        live(backlog_tx).await;
    });
    drop(tx);
    futures_util::stream::unfold((rx, wanted), |(mut rx, wanted)| async move {
        loop {
            let (_, ev) = rx.recv().await??;
            if ev.kind != "BOOKMARK" && !wanted(&ev) {
                continue;
            }
            let line = format!("{}\n", json!({"type": ev.kind, "object": ev.object}));
            return Some((Ok(Bytes::from(line)), (rx, wanted)));
        }
    })
}
