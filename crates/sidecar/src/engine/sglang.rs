//! SGLang's memory saver: `/release_memory_occupation` frees the GPU memory of weights and
//! KV cache, `/resume_memory_occupation` takes it back. The server must run with
//! `--enable-memory-saver`, and with `--enable-weights-cpu-backup` for the weights to
//! come back intact (without it they come back uninitialized, which the wake's one-token
//! warm-up detects). SGLang has no sleep-state endpoint: the adapter remembers what it
//! asked for, and the sidecar measures what the engine actually holds.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;

use super::{EngineAdapter, EngineError};

pub struct SglangAdapter {
    base: String,
    http: reqwest::Client,
    released: AtomicBool,
}

impl SglangAdapter {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("a plain http client builds");
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            released: AtomicBool::new(false),
        }
    }

    async fn call(
        &self,
        call: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, EngineError> {
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                EngineError::Timeout(call)
            } else {
                EngineError::Unreachable(format!("{call}: {e}"))
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        Err(EngineError::Status {
            call,
            status,
            body: resp.text().await.unwrap_or_default(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

#[async_trait]
impl EngineAdapter for SglangAdapter {
    async fn health(&self) -> Result<(), EngineError> {
        self.call(
            "health",
            self.http
                .get(self.url("/health"))
                .timeout(Duration::from_secs(5)),
        )
        .await
        .map(drop)
    }

    async fn is_sleeping(&self) -> Result<bool, EngineError> {
        Ok(self.released.load(Ordering::SeqCst))
    }

    /// Everything goes: weights (to the CPU backup) and KV cache. The level does not
    /// apply; what comes back intact depends on the server's weights backup.
    async fn sleep(&self, _level: u8) -> Result<(), EngineError> {
        self.call(
            "release_memory_occupation",
            self.http
                .post(self.url("/release_memory_occupation"))
                .json(&json!({})),
        )
        .await?;
        self.released.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn wake(&self, _level: u8) -> Result<(), EngineError> {
        // Weights first, then the KV cache, as SGLang's own examples resume them.
        for tags in [json!(["weights"]), json!(["kv_cache"])] {
            self.call(
                "resume_memory_occupation",
                self.http
                    .post(self.url("/resume_memory_occupation"))
                    .json(&json!({"tags": tags})),
            )
            .await?;
        }
        self.released.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn warm_up(&self, model: &str) -> Result<(), EngineError> {
        self.call(
            "warm-up completion",
            self.http
                .post(self.url("/v1/completions"))
                .json(&super::warm_up_body(model)),
        )
        .await
        .map(drop)
    }

    async fn models(&self) -> Result<Bytes, EngineError> {
        self.call("models", self.http.get(self.url("/v1/models")))
            .await?
            .bytes()
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))
    }

    async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        let resp = self
            .call("metrics", self.http.get(self.url("/metrics")))
            .await?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/plain; version=0.0.4")
            .to_string();
        let body = resp
            .bytes()
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))?;
        Ok((content_type, body))
    }
}
