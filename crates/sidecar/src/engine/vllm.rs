use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;

use super::{EngineAdapter, EngineError};

/// vLLM's sleep-mode API (also spoken by `greenthread sim-engine`).
pub struct VllmAdapter {
    base: String,
    http: reqwest::Client,
}

impl VllmAdapter {
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("a plain http client builds");
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
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
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(EngineError::Status {
            call,
            status: status.as_u16(),
            body,
        })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.base))
    }
}

#[async_trait]
impl EngineAdapter for VllmAdapter {
    async fn health(&self) -> Result<(), EngineError> {
        self.call(
            "health",
            self.get("/health").timeout(Duration::from_secs(5)),
        )
        .await
        .map(drop)
    }

    /// From `/is_sleeping`, or where it is missing (404) from `vllm:engine_sleep_state`:
    /// never from `/health`, which says nothing about sleep.
    async fn is_sleeping(&self) -> Result<bool, EngineError> {
        let resp = match self
            .call(
                "is_sleeping",
                self.get("/is_sleeping").timeout(Duration::from_secs(10)),
            )
            .await
        {
            Err(EngineError::Status { status: 404, .. }) => {
                let (_, body) = self.metrics().await?;
                return super::sleeping_from_metrics(&String::from_utf8_lossy(&body)).ok_or_else(
                    || {
                        EngineError::Protocol(
                            "no /is_sleeping and no vllm:engine_sleep_state metric".into(),
                        )
                    },
                );
            }
            other => other?,
        };
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| EngineError::Protocol(format!("is_sleeping: {e}")))?;
        v["is_sleeping"]
            .as_bool()
            .ok_or_else(|| EngineError::Protocol(format!("is_sleeping answered {v}")))
    }

    async fn sleep(&self, level: u8) -> Result<(), EngineError> {
        // The sidecar has drained what it could; `mode=wait` lets requests still running
        // finish instead of being aborted (engines without modes ignore it).
        self.call(
            "sleep",
            self.post(&format!("/sleep?level={level}&mode=wait")),
        )
        .await
        .map(drop)
    }

    async fn wake(&self, level: u8) -> Result<(), EngineError> {
        if level < 2 {
            return self.call("wake_up", self.post("/wake_up")).await.map(drop);
        }
        // Level 2 discarded the weights: allocate them, reload from disk, then the KV
        // cache, and drop prefix-cache entries computed with the old weights.
        self.call("wake_up(weights)", self.post("/wake_up?tags=weights"))
            .await?;
        self.call(
            "reload_weights",
            self.post("/collective_rpc")
                .json(&json!({"method": "reload_weights"})),
        )
        .await?;
        self.call("wake_up(kv_cache)", self.post("/wake_up?tags=kv_cache"))
            .await?;
        self.call("reset_prefix_cache", self.post("/reset_prefix_cache"))
            .await
            .map(drop)
    }

    async fn models(&self) -> Result<Bytes, EngineError> {
        let resp = self
            .call(
                "models",
                self.get("/v1/models").timeout(Duration::from_secs(10)),
            )
            .await?;
        resp.bytes()
            .await
            .map_err(|e| EngineError::Protocol(format!("models: {e}")))
    }

    async fn warm_up(&self, model: &str) -> Result<(), EngineError> {
        self.call(
            "warm-up completion",
            self.post("/v1/completions")
                .json(&super::warm_up_body(model)),
        )
        .await
        .map(drop)
    }

    async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        let resp = self
            .call(
                "metrics",
                self.get("/metrics").timeout(Duration::from_secs(10)),
            )
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
            .map_err(|e| EngineError::Protocol(format!("metrics: {e}")))?;
        Ok((content_type, body))
    }
}
