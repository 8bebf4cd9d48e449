//! A faithful fake Kubernetes API server on loopback, for the real `kube::Client` (and
//! the code built on it) where no real API server can run. It keeps what controllers and
//! CAS-based writers rely on: a global `resourceVersion` bumped on every write, 409
//! `Conflict` on a stale write, 409 `AlreadyExists`, 404 `NotFound` as `Status` objects,
//! the `status` subresource (spec writes leave status alone and the reverse), merge and
//! apply patches, finalizers and `deletionTimestamp`, owner-reference garbage collection,
//! list, and watch from a resource version with bookmarks (410 `Gone` when too old).
//! Server-side apply keeps field ownership by field manager: an apply that would change
//! a field another manager owns answers 409 `Conflict` unless forced, which is what
//! makes Lease-based leader election safe against two candidates racing.
//! Any resource path works: Models, GPUs, Pods, Services, Leases.

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

/// `(resource path, namespace, name)`; the resource path is e.g. `apis/greenthread.ai/v1alpha1/gpus`.
type Key = (String, String, String);

#[derive(Clone, Debug)]
struct Event {
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    /// Field ownership per object: leaf path → field manager.
    owners: BTreeMap<Key, BTreeMap<String, String>>,
    /// Every event with its resource version, for watches that resume (oldest first).
    log: Vec<(u64, Event)>,
    /// Requests served, by `METHOD resource[/subresource]`, for tests that count calls.
    requests: BTreeMap<String, u64>,
    /// Bytes of request and response bodies.
    bytes: u64,
}

pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<(u64, Event)>,
    /// Watch history kept; older resource versions answer 410 Gone.
    history: usize,
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
            inner: Mutex::default(),
            events: broadcast::Sender::new(4096),
            history,
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
        self.inner
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(k, _)| k.contains(filter))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }

    /// Every stored object of `resource` (e.g. `apis/greenthread.ai/v1alpha1/gpus`).
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == resource)
            .map(|(_, v)| v.clone())
            .collect()
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

fn matches_selectors(
    obj: &Value,
    label_selector: &Option<String>,
    field_selector: &Option<String>,
) -> bool {
    if let Some(sel) = label_selector {
        for term in sel.split(',').filter(|t| !t.is_empty()) {
            let (k, v) = term
                .split_once('=')
                .map(|(k, v)| (k, v.trim_start_matches('=')))
                .unwrap_or((term, ""));
            if obj["metadata"]["labels"][k].as_str() != Some(v) {
                return false;
            }
        }
    }
    if let Some(sel) = field_selector {
        for term in sel.split(',').filter(|t| !t.is_empty()) {
            if let Some(name) = term.strip_prefix("metadata.name=")
                && obj["metadata"]["name"].as_str() != Some(name.trim_start_matches('='))
            {
                return false;
            }
        }
    }
    true
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// RFC 6902 JSON patch: `test`, `add`, `remove`, `replace`, on RFC 6901 pointers.
/// A failed `test` or a missing path is the 422 a real server answers.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    fn split(path: &str) -> Result<(Vec<String>, String), String> {
        let mut parts: Vec<String> = path
            .strip_prefix('/')
            .ok_or_else(|| format!("invalid pointer {path:?}"))?
            .split('/')
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().unwrap_or_default();
        Ok((parts, last))
    }
    fn parent<'a>(v: &'a mut Value, parts: &[String], path: &str) -> Result<&'a mut Value, String> {
        let mut cur = v;
        for p in parts {
            cur = match cur {
                Value::Object(m) => m.get_mut(p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("path {path} does not exist"))?;
        }
        Ok(cur)
    }
    for op in ops
        .as_array()
        .ok_or("a JSON patch is an array of operations")?
    {
        let path = op["path"].as_str().ok_or("operation without a path")?;
        let value = op.get("value").cloned().unwrap_or(Value::Null);
        match op["op"].as_str().unwrap_or_default() {
            "test" => {
                if target.pointer(path).unwrap_or(&Value::Null) != &value {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            kind @ ("add" | "replace") => {
                if path.is_empty() {
                    *target = value;
                    continue;
                }
                let (parts, last) = split(path)?;
                match parent(target, &parts, path)? {
                    Value::Object(m) => {
                        if kind == "replace" && !m.contains_key(&last) {
                            return Err(format!(
                                "replace operation does not apply: doc is missing key: {path}"
                            ));
                        }
                        m.insert(last, value);
                    }
                    Value::Array(a) if last == "-" && kind == "add" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                        if kind == "add" && i <= a.len() {
                            a.insert(i, value);
                        } else if kind == "replace" && i < a.len() {
                            a[i] = value;
                        } else {
                            return Err(format!("index out of range: {path}"));
                        }
                    }
                    _ => return Err(format!("path {path} does not exist")),
                }
            }
            "remove" => {
                let (parts, last) = split(path)?;
                let removed = match parent(target, &parts, path)? {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => match last.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !removed {
                    return Err(format!(
                        "remove operation does not apply: doc is missing path: {path}"
                    ));
                }
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

/// Leaf fields of an object as `.a.b` paths (arrays are atomic), without the fields the
/// server owns (type and identity metadata).
fn leaves(v: &Value) -> BTreeMap<String, Value> {
    fn walk(v: &Value, prefix: String, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    walk(v, format!("{prefix}.{k}"), out);
                }
            }
            other => {
                out.insert(prefix, other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(v, String::new(), &mut out);
    out.retain(|path, value| {
        !value.is_null()
            && !matches!(path.as_str(), ".apiVersion" | ".kind")
            && (!path.starts_with(".metadata.")
                || path.starts_with(".metadata.labels.")
                || path.starts_with(".metadata.annotations.")
                || path.starts_with(".metadata.finalizers"))
    });
    out
}

/// The 409 a real server gives an apply that would take fields from another manager.
fn apply_conflicts(
    owners: Option<&BTreeMap<String, String>>,
    current: &Value,
    patch: &Value,
    manager: &str,
) -> Vec<String> {
    let Some(owners) = owners else {
        return Vec::new();
    };
    let now = leaves(current);
    leaves(patch)
        .into_iter()
        .filter(|(path, value)| {
            owners.get(path).is_some_and(|owner| owner != manager) && now.get(path) != Some(value)
        })
        .map(|(path, _)| format!("conflict with \"{}\": {path}", owners[&path]))
        .collect()
}

/// Who owns what after a write: an apply takes every field it names; other writes take
/// the fields they changed; fields that are gone have no owner.
fn take_ownership(
    owners: &mut BTreeMap<String, String>,
    before: &Value,
    after: &Value,
    applied: Option<&Value>,
    manager: &str,
) {
    let (old, new) = (leaves(before), leaves(after));
    owners.retain(|path, _| new.contains_key(path));
    let taken: Vec<String> = match applied {
        Some(patch) => leaves(patch).into_keys().collect(),
        None => new
            .iter()
            .filter(|(p, v)| old.get(*p) != Some(v))
            .map(|(p, _)| p.clone())
            .collect(),
    };
    for path in taken {
        if new.contains_key(&path) {
            owners.insert(path, manager.to_string());
        }
    }
}

impl Inner {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, store: &Store, rv: u64, event: Event) {
        self.log.push((rv, event.clone()));
        if self.log.len() > store.history {
            let drop = self.log.len() - store.history;
            self.log.drain(..drop);
        }
        let _ = store.events.send((rv, event));
    }

    /// Writes `obj` at `key` with a new resource version and records the event.
    fn commit(&mut self, store: &Store, key: Key, mut obj: Value, kind: &'static str) -> Value {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), obj.clone());
        self.record(
            store,
            rv,
            Event {
                resource: key.0,
                namespace: key.1,
                kind,
                object: obj.clone(),
            },
        );
        obj
    }

    fn remove(&mut self, store: &Store, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.owners.remove(key);
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            store,
            rv,
            Event {
                resource: key.0.clone(),
                namespace: key.1.clone(),
                kind: "DELETED",
                object: obj.clone(),
            },
        );
        // Garbage collection: dependents whose owner is gone go too.
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for d in dependents {
            self.delete(store, &d);
        }
        Some(obj)
    }

    /// Deletes now, or marks for deletion while finalizers remain.
    fn delete(&mut self, store: &Store, key: &Key) -> Option<Value> {
        let obj = self.objects.get(key)?.clone();
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                let mut marked = obj;
                marked["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
                return Some(self.commit(store, key.clone(), marked, "MODIFIED"));
            }
            return Some(obj);
        }
        self.remove(store, key)
    }
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
        let mut inner = store.inner.lock().unwrap();
        let key = format!(
            "{method} {}{}",
            path.resource,
            path.sub
                .as_ref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        );
        *inner.requests.entry(key).or_default() += 1;
        inner.bytes += body.len() as u64;
    }
    route(&store, method, path, &q, &content_type, body).await
}

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
    match (method, path.name.clone(), path.sub.as_deref()) {
        (Method::GET, None, _)
            if query(q, "watch").as_deref() == Some("true")
                || query(q, "watch").as_deref() == Some("1") =>
        {
            watch(store, &path, q)
        }
        (Method::GET, None, _) => {
            let inner = store.inner.lock().unwrap();
            let (ls, fs) = (query(q, "labelSelector"), query(q, "fieldSelector"));
            let items: Vec<Value> = inner
                .objects
                .iter()
                .filter(|(k, o)| {
                    k.0 == path.resource
                        && (path.namespace.is_none() || k.1 == ns)
                        && matches_selectors(o, &ls, &fs)
                })
                .map(|(_, o)| o.clone())
                .collect();
            let list = json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
            ok(StatusCode::OK, &list)
        }
        (Method::POST, None, _) => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "body is not JSON".into(),
                );
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value".into(),
                );
            };
            let mut inner = store.inner.lock().unwrap();
            let key = (path.resource.clone(), ns.clone(), name.clone());
            if inner.objects.contains_key(&key) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} \"{name}\" already exists", path.resource),
                );
            }
            inner.uid += 1;
            let uid = format!("00000000-0000-0000-0000-{:012}", inner.uid);
            obj["metadata"]["uid"] = json!(uid);
            if path.namespace.is_some() {
                obj["metadata"]["namespace"] = json!(ns);
            }
            obj["metadata"]["creationTimestamp"] = json!(
                jiff::Timestamp::now()
                    .round(jiff::Unit::Second)
                    .unwrap()
                    .to_string()
            );
            obj["metadata"]["generation"] = json!(1);
            // The status subresource: a create sets no status.
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
            let mut owners = BTreeMap::new();
            take_ownership(&mut owners, &Value::Null, &obj, None, &manager);
            inner.owners.insert(key.clone(), owners);
            let created = inner.commit(store, key, obj, "ADDED");
            ok(StatusCode::CREATED, &created)
        }
        (method, Some(name), sub) => {
            let key = (path.resource.clone(), ns.clone(), name.clone());
            let is_status = sub == Some("status");
            let mut inner = store.inner.lock().unwrap();
            let Some(current) = inner.objects.get(&key).cloned() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} \"{name}\" not found", path.resource),
                );
            };
            match method {
                Method::GET => ok(StatusCode::OK, &current),
                Method::DELETE => {
                    let gone = inner.delete(store, &key).unwrap_or(current);
                    ok(StatusCode::OK, &gone)
                }
                Method::PUT | Method::PATCH => {
                    let Ok(incoming) = serde_json::from_slice::<Value>(&body) else {
                        return status(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            "body is not JSON".into(),
                        );
                    };
                    if let Some(rv) = incoming["metadata"]["resourceVersion"].as_str()
                        && rv
                            != current["metadata"]["resourceVersion"]
                                .as_str()
                                .unwrap_or_default()
                    {
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                                path.resource
                            ),
                        );
                    }
                    let is_apply = method == Method::PATCH && content_type.contains("apply-patch");
                    if is_apply && query(q, "force").as_deref() != Some("true") {
                        let conflicts =
                            apply_conflicts(inner.owners.get(&key), &current, &incoming, &manager);
                        if !conflicts.is_empty() {
                            return status(
                                StatusCode::CONFLICT,
                                "Conflict",
                                format!(
                                    "Apply failed with {} conflict{}: {}",
                                    conflicts.len(),
                                    if conflicts.len() == 1 { "" } else { "s" },
                                    conflicts.join(", ")
                                ),
                            );
                        }
                    }
                    let mut next = if method == Method::PUT {
                        incoming.clone()
                    } else if content_type.contains("json-patch") {
                        let mut patched = current.clone();
                        if let Err(e) = json_patch(&mut patched, &incoming) {
                            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e);
                        }
                        patched
                    } else {
                        // merge, strategic merge and apply patches: merged field by field.
                        let mut merged = current.clone();
                        merge_patch(&mut merged, &incoming);
                        merged
                    };
                    // Spec writes leave status alone; status writes leave the rest alone.
                    if is_status {
                        let mut only_status = current.clone();
                        only_status["status"] = next.get("status").cloned().unwrap_or(Value::Null);
                        next = only_status;
                    } else {
                        next["status"] = current.get("status").cloned().unwrap_or(Value::Null);
                        if next["spec"] != current["spec"] {
                            let generation =
                                current["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
                            next["metadata"]["generation"] = json!(generation);
                        }
                    }
                    if next["status"].is_null() {
                        next.as_object_mut().unwrap().remove("status");
                    }
                    for keep in [
                        "uid",
                        "creationTimestamp",
                        "namespace",
                        "name",
                        "deletionTimestamp",
                    ] {
                        if !current["metadata"][keep].is_null() {
                            next["metadata"][keep] = current["metadata"][keep].clone();
                        }
                    }
                    let finalized = !next["metadata"]["deletionTimestamp"].is_null()
                        && next["metadata"]["finalizers"]
                            .as_array()
                            .is_none_or(|f| f.is_empty());
                    let mut owners = inner.owners.remove(&key).unwrap_or_default();
                    take_ownership(
                        &mut owners,
                        &current,
                        &next,
                        is_apply.then_some(&incoming),
                        &manager,
                    );
                    inner.owners.insert(key.clone(), owners);
                    let written = inner.commit(store, key.clone(), next, "MODIFIED");
                    if finalized {
                        inner.remove(store, &key);
                    }
                    ok(StatusCode::OK, &written)
                }
                _ => status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "method not allowed".into(),
                ),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed".into(),
        ),
    }
}

fn watch(store: &Arc<Store>, path: &Path, q: &str) -> Response {
    let since: u64 = query(q, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query(q, "allowWatchBookmarks").as_deref() == Some("true");
    let timeout = query(q, "timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(290);
    let (ls, fs) = (query(q, "labelSelector"), query(q, "fieldSelector"));
    let (resource, namespace) = (path.resource.clone(), path.namespace.clone());
    let wanted = move |e: &Event| {
        e.resource == resource
            && namespace.as_ref().is_none_or(|n| *n == e.namespace)
            && matches_selectors(&e.object, &ls, &fs)
    };
    let (backlog, mut live, current_rv) = {
        let inner = store.inner.lock().unwrap();
        let oldest = inner.log.first().map_or(inner.rv + 1, |(rv, _)| *rv);
        if since != 0 && since + 1 < oldest {
            return status(
                StatusCode::GONE,
                "Expired",
                format!("too old resource version: {since} ({})", oldest - 1),
            );
        }
        let backlog: Vec<(u64, Event)> = if since == 0 {
            // No version: the current state as ADDED events, then changes.
            inner
                .objects
                .iter()
                .map(|(k, o)| {
                    (
                        inner.rv,
                        Event {
                            resource: k.0.clone(),
                            namespace: k.1.clone(),
                            kind: "ADDED",
                            object: o.clone(),
                        },
                    )
                })
                .collect()
        } else {
            inner
                .log
                .iter()
                .filter(|(rv, _)| *rv > since)
                .cloned()
                .collect()
        };
        (backlog, store.events.subscribe(), inner.rv)
    };
    let kind_of_bookmark = path.resource.clone();
    // Bookmarks carry the watched kind, as the real server's do.
    let (bookmark_api_version, bookmark_kind) = {
        let inner = store.inner.lock().unwrap();
        inner
            .objects
            .iter()
            .find(|(k, _)| k.0 == path.resource)
            .map(|(_, o)| {
                (
                    o["apiVersion"].as_str().unwrap_or("v1").to_string(),
                    o["kind"].as_str().unwrap_or("Unknown").to_string(),
                )
            })
            .unwrap_or_else(|| ("v1".into(), "Unknown".into()))
    };
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
