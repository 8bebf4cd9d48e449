//! OpenAI's Batch API, run in idle capacity: files (`/v1/files`), batches
//! (`/v1/batches`), and the runner that sends a batch's requests to its Model's
//! replicas. Batch requests are the lowest priority there is: while the model serves,
//! they queue behind everything else (sheddable); while it sleeps, its sidecar wakes it
//! for them only when nobody else waits for those GPUs and the memory is free
//! ([`greenthread_api::BATCH_HEADER`]) — they never preempt anyone — unless the batch is
//! in the last tenth of its completion window, when its requests go as interactive ones.
//! Each batch has a bounded number of requests in flight. Everything is kept in a
//! directory ([`store`]): a restart resumes unfinished batches, and a request whose
//! answer was recorded is never sent again.

pub mod plan;
mod routes;
pub mod store;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use greenthread_api::{BATCH_HEADER, PRIORITY_HEADER, Priority};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use plan::Outcome;
pub use routes::router;
pub use store::Quota;
use store::{BatchRecord, Done, Status, Store, StoreError};

use crate::{ApiServer, Lookup};

/// Requests of one batch in flight at once, unless configured.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// The largest answer kept for one batch request.
const MAX_ANSWER: usize = 16 << 20;

/// The Batch API of one server: its store and its runners.
pub struct Batches {
    store: Store,
    api: Weak<ApiServer>,
    /// Every batch as last written (the store's copy, read once at start).
    records: Mutex<BTreeMap<String, BatchRecord>>,
    concurrency: usize,
    /// What one API key may keep in the store.
    pub(crate) quota: store::Quota,
    /// Set at shutdown: runners send nothing more, record what is in flight, and stop.
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl Batches {
    /// The Batch API over the store in `dir`, for `api`'s routes; unfinished batches
    /// resume at once.
    pub fn start(
        dir: &std::path::Path,
        api: &Arc<ApiServer>,
        concurrency: usize,
        quota: store::Quota,
    ) -> Result<Arc<Self>, StoreError> {
        let store = Store::open(dir)?;
        let records: BTreeMap<String, BatchRecord> = store
            .batches()?
            .into_iter()
            .map(|b| (b.id.clone(), b))
            .collect();
        let me = Arc::new(Self {
            store,
            api: Arc::downgrade(api),
            records: Mutex::new(records),
            concurrency: concurrency.max(1),
            quota,
            stop: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        let active: Vec<String> = me
            .records
            .lock()
            .unwrap()
            .values()
            .filter(|b| b.status.active())
            .map(|b| b.id.clone())
            .collect();
        if !active.is_empty() {
            tracing::info!(batches = active.len(), "resuming unfinished batches");
        }
        for id in active {
            me.spawn(id);
        }
        Ok(me)
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let me = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = me.clone().run(&id).await {
                tracing::error!(batch = %id, error = %e, reason = e.metric_label(), "batch stopped");
            }
        });
    }

    /// Stops every runner: nothing more is sent, what is in flight is answered and
    /// recorded (for at most `grace`; past it, those requests are sent again after the
    /// restart).
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "batch requests still in flight at shutdown: they run again after the restart"
            );
        }
    }

    fn record(&self, id: &str) -> Option<BatchRecord> {
        self.records.lock().unwrap().get(id).cloned()
    }

    /// A batch's status now (what the runner checks between requests).
    fn status(&self, id: &str) -> Option<Status> {
        self.records.lock().unwrap().get(id).map(|b| b.status)
    }

    /// Changes a batch's record, on disk first.
    fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut BatchRecord),
    ) -> Result<BatchRecord, StoreError> {
        let mut records = self.records.lock().unwrap();
        let Some(current) = records.get(id) else {
            return Err(StoreError::Io(
                id.to_string(),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        };
        let mut next = current.clone();
        change(&mut next);
        self.store.put_batch(&next)?;
        records.insert(id.to_string(), next.clone());
        Ok(next)
    }

    /// Keeps a new batch and starts it (unless it failed validation).
    fn create(self: &Arc<Self>, record: BatchRecord) -> Result<BatchRecord, StoreError> {
        self.store.put_batch(&record)?;
        self.records
            .lock()
            .unwrap()
            .insert(record.id.clone(), record.clone());
        if record.status.active() {
            self.spawn(record.id.clone());
        }
        Ok(record)
    }

    /// One batch, to its end or to shutdown.
    async fn run(self: Arc<Self>, id: &str) -> Result<(), StoreError> {
        let Some(record) = self.record(id) else {
            return Ok(());
        };
        let content = self
            .store
            .content(&record.input_file_id)?
            .unwrap_or_default();
        let input = match plan::parse_input(&content, &record.endpoint) {
            Ok(input) => input,
            Err(errors) => {
                // Its input is gone or changed since it was accepted.
                self.update(id, |b| {
                    b.status = Status::Failed;
                    b.failed_at = Some(now());
                    b.errors = errors;
                })?;
                return Ok(());
            }
        };
        let mut done: BTreeMap<u64, Done> = self
            .store
            .done(id)?
            .into_iter()
            .map(|d| (d.line, d))
            .collect();
        let completed = done.values().filter(|d| d.ok).count() as u64;
        let failed = done.len() as u64 - completed;
        self.update(id, |b| {
            b.total = input.lines.len() as u64;
            b.completed = completed;
            b.failed = failed;
            if b.status == Status::Validating {
                b.status = Status::InProgress;
                b.in_progress_at = Some(now());
            }
        })?;
        let mut pending: std::collections::VecDeque<u64> = (0..input.lines.len() as u64)
            .filter(|n| !done.contains_key(n))
            .collect();
        let lines = Arc::new(input.lines);
        let record = Arc::new(record);
        let mut in_flight = tokio::task::JoinSet::new();
        // Which line each task sends: a task that panics comes back without its own.
        let mut sending: std::collections::HashMap<tokio::task::Id, u64> = Default::default();
        loop {
            let open = self.status(id) == Some(Status::InProgress)
                && !self.stop.is_cancelled()
                && now() < record.expires_at;
            while open && in_flight.len() < self.concurrency {
                let Some(n) = pending.pop_front() else { break };
                let me = self.clone();
                let (lines, record) = (lines.clone(), record.clone());
                let task = in_flight.spawn(async move {
                    let line = &lines[n as usize];
                    me.send_line(&record, n, line).await
                });
                sending.insert(task.id(), n);
            }
            let Some(joined) = in_flight.join_next_with_id().await else {
                break;
            };
            let (n, answer) = match joined {
                Ok((task, answer)) => (sending.remove(&task).expect("spawned above"), answer),
                // A bug, not the engine's answer: the line fails with a record saying so
                // (sending it again would fail again, forever).
                Err(e) => {
                    let n = sending.remove(&e.id()).expect("spawned above");
                    tracing::error!(batch = %id, line = n, error = %e, "a batch request's task failed");
                    if let Some(api) = self.api.upgrade() {
                        api.metrics.batch_request(&record.model, "failed");
                    }
                    (
                        n,
                        Some(unsent(
                            n,
                            &lines[n as usize],
                            "internal_error",
                            &format!("the request was not sent: {e}"),
                        )),
                    )
                }
            };
            match answer {
                Some(d) => {
                    // Synced to disk before it counts (off the async threads).
                    let (store, batch, kept) = (self.store.clone(), id.to_string(), d.clone());
                    tokio::task::spawn_blocking(move || store.append_done(&batch, &kept))
                        .await
                        .map_err(|e| StoreError::Io(id.to_string(), std::io::Error::other(e)))??;
                    // Counted in memory; the record on disk gets them at its next write
                    // (and a restart counts them again from the finished requests).
                    if let Some(b) = self.records.lock().unwrap().get_mut(id) {
                        if d.ok {
                            b.completed += 1;
                        } else {
                            b.failed += 1;
                        }
                    }
                    done.insert(n, d);
                }
                // Not sent (shutdown, cancel or expiry came first): still pending.
                None => pending.push_back(n),
            }
        }
        if self.stop.is_cancelled() {
            // Resumed after the restart, from the finished requests on disk.
            let _ = self.update(id, |_| {});
            return Ok(());
        }
        let (end, expired) = match self.status(id) {
            Some(Status::Cancelling) => (Status::Cancelled, false),
            _ if !pending.is_empty() => (Status::Expired, true),
            _ => (Status::Completed, false),
        };
        self.finalize(id, &lines, &done, &pending, end, expired)
    }

    /// Writes the output and error files and ends the batch as `end`. An expired batch's
    /// unsent requests are errors of their own (`batch_expired`).
    fn finalize(
        &self,
        id: &str,
        lines: &[plan::Line],
        done: &BTreeMap<u64, Done>,
        pending: &std::collections::VecDeque<u64>,
        end: Status,
        expired: bool,
    ) -> Result<(), StoreError> {
        self.update(id, |b| {
            b.status = Status::Finalizing;
            b.finalizing_at = Some(now());
        })?;
        let mut output = Vec::new();
        let mut errors = Vec::new();
        for d in done.values() {
            let out = if d.ok { &mut output } else { &mut errors };
            serde_json::to_writer(&mut *out, &d.record).expect("a record serializes");
            out.push(b'\n');
        }
        if expired {
            let mut unsent: Vec<u64> = pending.iter().copied().collect();
            unsent.sort_unstable();
            for n in unsent {
                let record = json!({
                    "id": store::new_id("batch_req_"),
                    "custom_id": lines[n as usize].custom_id,
                    "response": null,
                    "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."},
                });
                serde_json::to_writer(&mut errors, &record).expect("a record serializes");
                errors.push(b'\n');
            }
        }
        let t = now();
        let owner = self.record(id).map(|b| b.owner).unwrap_or_default();
        let keep = |name: &str, content: &[u8]| -> Result<Option<String>, StoreError> {
            if content.is_empty() {
                return Ok(None);
            }
            Ok(Some(
                self.store
                    .put_file(
                        &format!("{id}_{name}.jsonl"),
                        "batch_output",
                        content,
                        t,
                        &owner,
                    )?
                    .id,
            ))
        };
        let output_file_id = keep("output", &output)?;
        let error_file_id = keep("error", &errors)?;
        let unsent = if expired { pending.len() as u64 } else { 0 };
        self.update(id, |b| {
            b.output_file_id = output_file_id;
            b.error_file_id = error_file_id;
            b.failed += unsent;
            b.status = end;
            match end {
                Status::Cancelled => b.cancelled_at = Some(t),
                Status::Expired => b.expired_at = Some(t),
                _ => b.completed_at = Some(t),
            }
        })?;
        tracing::info!(batch = %id, status = end.as_str(), "batch ended");
        Ok(())
    }

    /// Sends one request until it has an answer to record (`None`: stopped, cancelled or
    /// expired first). Refusals that mean "not now" are tried again, backing off.
    async fn send_line(&self, record: &BatchRecord, n: u64, line: &plan::Line) -> Option<Done> {
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.stop.is_cancelled()
                || self.status(&record.id) != Some(Status::InProgress)
                || now() >= record.expires_at
            {
                return None;
            }
            let api = self.api.upgrade()?;
            // The key that made the batch: its token budget holds its lines back as it
            // holds its other requests (they wait rather than fail), and their tokens
            // count against it. A batch whose key was revoked sends nothing more.
            let caller = if api.auth.keys.is_open() {
                None
            } else {
                match api.auth.keys.by_name(&record.owner) {
                    Some(c) => Some(c),
                    None => {
                        api.metrics.batch_request(&record.model, "failed");
                        return Some(unsent(
                            n,
                            line,
                            "key_revoked",
                            "the API key that made this batch was revoked",
                        ));
                    }
                }
            };
            if let Some(c) = &caller
                && let Err(after) = c.tokens_left(tokio::time::Instant::now())
            {
                api.metrics.batch_request(&record.model, "deferred");
                drop(api);
                tokio::select! {
                    () = tokio::time::sleep(after.min(Duration::from_secs(5))) => {}
                    () = self.stop.cancelled() => return None,
                }
                continue;
            }
            let urgent = plan::urgent(now(), record.created_at, record.expires_at);
            let (code, body) = self.send(record, line, urgent).await;
            match plan::outcome(code) {
                Outcome::Later => {
                    api.metrics.batch_request(&record.model, "deferred");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.stop.cancelled() => return None,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                outcome => {
                    let ok = outcome == Outcome::Completed;
                    api.metrics
                        .batch_request(&record.model, if ok { "completed" } else { "failed" });
                    let body: Value = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                    if let Some(u) = crate::usage::usage_of(&body) {
                        api.metrics
                            .tokens(&record.owner, &record.model, u.prompt, u.completion);
                        if let Some(c) = &caller {
                            c.spend_tokens(tokio::time::Instant::now(), u.prompt + u.completion);
                        }
                    }
                    let response = json!({
                        "status_code": code,
                        "request_id": store::new_id("req_"),
                        "body": body,
                    });
                    let error = (!ok).then(|| {
                        json!({
                            "code": body["error"]["type"].as_str().unwrap_or("request_failed"),
                            "message": body["error"]["message"].as_str().unwrap_or("the request failed"),
                        })
                    });
                    return Some(Done {
                        line: n,
                        ok,
                        record: json!({
                            "id": store::new_id("batch_req_"),
                            "custom_id": line.custom_id,
                            "response": response,
                            "error": error,
                        }),
                    });
                }
            }
        }
    }

    /// One attempt: to the least loaded replica of the batch's Model, as a batch request
    /// (idle capacity only) or, when urgent, as an interactive one. Its status and body.
    async fn send(&self, record: &BatchRecord, line: &plan::Line, urgent: bool) -> (u16, Bytes) {
        let Some(api) = self.api.upgrade() else {
            return (503, Bytes::new());
        };
        let (route, adapter) = match api.lookup(&record.model) {
            Lookup::Found(route) => (route, None),
            Lookup::Adapter(route, adapter) => (route, Some(adapter)),
            // Gone since the batch was accepted: an answer of its own for each request.
            _ => {
                let e = greenthread_edge::ApiError::not_found(format!(
                    "model {:?} no longer exists",
                    record.model
                ));
                return (404, Bytes::from(e.body().to_string()));
            }
        };
        let mut body = line.body.clone();
        body["model"] = Value::String(adapter.unwrap_or_else(|| route.model_name.clone()));
        let mut req = http::Request::post(record.endpoint.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                PRIORITY_HEADER,
                if urgent {
                    Priority::Standard.as_str()
                } else {
                    Priority::Sheddable.as_str()
                },
            );
        if !urgent {
            req = req.header(BATCH_HEADER, "idle");
        }
        let (parts, ()) = req
            .body(())
            .expect("static request parts are valid")
            .into_parts();
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON serializes"));
        let resp = if urgent {
            match route.pick() {
                Some(replica) => replica.relay(&parts, body).await,
                None => return (503, Bytes::new()),
            }
        } else {
            match route.pick_for_batch() {
                Some(replica) => replica.relay_batch(&parts, body).await,
                None => return (503, Bytes::new()),
            }
        };
        let code = resp.status().as_u16();
        match axum::body::to_bytes(resp.into_body(), MAX_ANSWER).await {
            Ok(b) => (code, b),
            // Cut short: not an answer to keep.
            Err(_) => (502, Bytes::new()),
        }
    }
}

/// The record of a line whose request was not sent: `code` and `message` say why.
fn unsent(n: u64, line: &plan::Line, code: &str, message: &str) -> Done {
    Done {
        line: n,
        ok: false,
        record: json!({
            "id": store::new_id("batch_req_"),
            "custom_id": line.custom_id,
            "response": null,
            "error": {"code": code, "message": message},
        }),
    }
}
