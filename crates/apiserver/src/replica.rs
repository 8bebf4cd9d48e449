//! One replica of a model, wherever its sidecar runs: in this process (`local`), or in a
//! pod (Kubernetes), reached over HTTP on its public and private ports.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{
    body::{Body, Bytes, to_bytes},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use greenthread_sidecar::{Forwarder, Sidecar, api_error, reexport_engine_metrics, relay};
use serde_json::{Value, json};

/// The state of remote sidecars by pod, as their GPU records show it.
#[derive(Clone, Default)]
pub struct StateBoard(Arc<RwLock<HashMap<String, &'static str>>>);

impl StateBoard {
    pub fn get(&self, pod: &str) -> Option<&'static str> {
        self.0.read().unwrap().get(pod).copied()
    }

    /// Sets `pod`'s state; returns the previous one if it changed.
    pub fn set(&self, pod: &str, state: &'static str) -> Option<Option<&'static str>> {
        let previous = self.0.write().unwrap().insert(pod.to_string(), state);
        (previous != Some(state)).then_some(previous)
    }

    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.write().unwrap().retain(|pod, _| keep(pod));
    }
}

pub enum Backend {
    /// A sidecar in this process.
    Local(Arc<Sidecar>),
    /// A sidecar in a pod: its private port (admin, engine metrics) and its state.
    Remote {
        admin: Arc<Forwarder>,
        states: StateBoard,
    },
}

/// One replica: its pod name, the connection pool for its requests (to the engine for a
/// local sidecar, which admits them in process; to the sidecar's public port for a
/// remote one, which admits them itself), and how to reach its sidecar.
pub struct Replica {
    pub pod: String,
    pub forwarder: Arc<Forwarder>,
    pub backend: Backend,
    /// Requests this server has sent here whose answers have not ended.
    pub outstanding: Arc<AtomicUsize>,
}

/// One outstanding request on a replica, until dropped.
struct Outstanding(Arc<AtomicUsize>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that counts as outstanding until it ends or is dropped: a stream is
/// outstanding for as long as it runs, not only until its headers.
struct Tracked {
    inner: Body,
    guard: Option<Outstanding>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        // Both fields are Unpin (axum's body is boxed).
        let this = self.get_mut();
        let frame = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = frame {
            this.guard.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a remote sidecar is before its GPU record shows it.
const UNREPORTED: &str = "starting";

async fn call(forwarder: &Forwarder, method: http::Method, path: &str) -> Response {
    let (parts, ()) = http::Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .expect("static request parts are valid")
        .into_parts();
    match forwarder.forward(&parts, Bytes::new(), ()).await {
        Ok(resp) => resp.into_response(),
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("sidecar unreachable: {e}"),
        ),
    }
}

impl Replica {
    pub fn local(pod: String, sidecar: Arc<Sidecar>, forwarder: Arc<Forwarder>) -> Self {
        Self {
            pod,
            forwarder,
            backend: Backend::Local(sidecar),
            outstanding: Arc::default(),
        }
    }

    /// What the balancer sees of this replica.
    pub fn load(&self) -> crate::balance::Load {
        crate::balance::Load {
            state: self.state(),
            outstanding: self.outstanding.load(Ordering::Relaxed),
        }
    }

    /// The sidecar's state, or `booting` while its engine has not come up yet (a real
    /// engine's first boot can take minutes: weights, compilation, CUDA graphs).
    pub fn state(&self) -> &'static str {
        match &self.backend {
            Backend::Local(s) if !s.boot_ready() => "booting",
            Backend::Local(s) => s.state().as_str(),
            Backend::Remote { states, .. } => states.get(&self.pod).unwrap_or(UNREPORTED),
        }
    }

    pub fn status_json(&self) -> Value {
        match &self.backend {
            Backend::Local(s) => s.status_json(),
            Backend::Remote { .. } => json!({"pod": self.pod, "state": self.state()}),
        }
    }

    /// Sends one inference request through this replica (waking it as needed); it is
    /// outstanding here until its answer ends.
    pub async fn relay(&self, parts: &http::request::Parts, body: Bytes) -> Response {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let guard = Outstanding(self.outstanding.clone());
        let resp = self.relay_untracked(parts, body).await;
        resp.map(|inner| {
            Body::new(Tracked {
                inner,
                guard: Some(guard),
            })
        })
    }

    /// Sends one batch request through this replica. Not counted as outstanding: batch
    /// work is not load that wakes more replicas or that an autoscaler scales on.
    pub async fn relay_batch(&self, parts: &http::request::Parts, body: Bytes) -> Response {
        self.relay_untracked(parts, body).await
    }

    async fn relay_untracked(&self, parts: &http::request::Parts, body: Bytes) -> Response {
        match &self.backend {
            Backend::Local(s) => relay(s, &self.forwarder, parts, body).await,
            Backend::Remote { .. } => match self.forwarder.forward(parts, body, ()).await {
                Ok(resp) => resp.into_response(),
                Err(e) => api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    format!("replica {} unreachable: {e}", self.pod),
                ),
            },
        }
    }

    /// Puts a serving replica to sleep now.
    pub async fn sleep(&self) -> Result<(), SleepFailed> {
        match &self.backend {
            Backend::Local(s) => Ok(s.deactivate("admin").await?),
            Backend::Remote { admin, .. } => {
                let resp = call(admin, http::Method::POST, "/admin/sleep").await;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    let body = to_bytes(resp.into_body(), 1 << 16)
                        .await
                        .unwrap_or_default();
                    Err(SleepFailed::Remote(
                        String::from_utf8_lossy(&body).into_owned(),
                    ))
                }
            }
        }
    }

    /// Wakes the replica without sending it a request.
    pub async fn wake(&self) -> Result<(), Response> {
        match &self.backend {
            Backend::Local(s) => match s.admit_as(greenthread_api::Priority::Critical).await {
                Ok(slot) => {
                    drop(slot);
                    Ok(())
                }
                Err(rejection) => Err(rejection.into_response()),
            },
            Backend::Remote { admin, .. } => {
                let resp = call(admin, http::Method::POST, "/admin/wake").await;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(resp)
                }
            }
        }
    }

    /// The engine's own metrics (vLLM's names); never counts as traffic.
    pub async fn engine_metrics(&self) -> Response {
        match &self.backend {
            Backend::Local(s) => reexport_engine_metrics(s).await,
            Backend::Remote { admin, .. } => {
                let resp = call(admin, http::Method::GET, "/metrics/engine").await;
                let (parts, body) = resp.into_parts();
                Response::from_parts(parts, Body::new(body))
            }
        }
    }
}

/// Why a replica did not go to sleep when asked.
#[derive(Debug, thiserror::Error)]
pub enum SleepFailed {
    #[error(transparent)]
    Local(#[from] greenthread_sidecar::SleepError),
    /// The remote sidecar's answer, as it gave it.
    #[error("{0}")]
    Remote(String),
}
