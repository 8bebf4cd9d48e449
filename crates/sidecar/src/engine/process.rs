//! Engines with no sleep API — any OpenAI-compatible server, and llama.cpp's
//! `llama-server` — put to sleep by stopping their process and woken by starting it.
//! The sidecar owns the process; a wake counts only once the engine has answered a real
//! one-token completion, and what the process held is measured, not assumed.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use super::{EngineAdapter, EngineError};
use crate::process::EngineProcess;

/// What kind of server runs in the process: how to tell it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Any OpenAI-compatible server: up when `/v1/models` answers.
    Process,
    /// `llama-server`: `/health` answers 503 while the model loads, 200 once it is ready.
    LlamaCpp,
}

pub struct ProcessAdapter {
    base: String,
    http: reqwest::Client,
    process: Arc<EngineProcess>,
    flavor: Flavor,
    /// How long a stopping engine gets before SIGKILL.
    stop_grace: Duration,
    /// How long a starting engine gets to load and answer.
    start_timeout: Duration,
}

impl ProcessAdapter {
    pub fn new(
        base: &str,
        process: Arc<EngineProcess>,
        flavor: Flavor,
        start_timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("a plain http client builds");
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            process,
            flavor,
            stop_grace: Duration::from_secs(10),
            start_timeout,
        }
    }

    async fn get(&self, call: &'static str, path: &str) -> Result<reqwest::Response, EngineError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| EngineError::Unreachable(format!("{call}: {e}")))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            let status = resp.status().as_u16();
            Err(EngineError::Status {
                call,
                status,
                body: resp.text().await.unwrap_or_default(),
            })
        }
    }
}

#[async_trait]
impl EngineAdapter for ProcessAdapter {
    async fn health(&self) -> Result<(), EngineError> {
        if !self.process.is_running() {
            return Err(EngineError::Unreachable(
                "engine process is stopped (asleep)".into(),
            ));
        }
        match self.flavor {
            Flavor::LlamaCpp => self.get("health", "/health").await.map(drop),
            Flavor::Process => self.get("models", "/v1/models").await.map(drop),
        }
    }

    /// Asleep means the process is not running: nothing else holds memory.
    async fn is_sleeping(&self) -> Result<bool, EngineError> {
        Ok(!self.process.is_running())
    }

    async fn sleep(&self, _level: u8) -> Result<(), EngineError> {
        self.process.stop(self.stop_grace).await;
        Ok(())
    }

    async fn wake(&self, _level: u8) -> Result<(), EngineError> {
        self.process
            .start()
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        loop {
            match self.health().await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) if !self.process.is_running() => {
                    return Err(EngineError::Unreachable(
                        "engine process exited while starting".into(),
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        Ok(())
    }

    /// One greedy token: the proof that the engine serves, not just listens.
    async fn warm_up(&self, model: &str) -> Result<(), EngineError> {
        let resp = self
            .http
            .post(format!("{}/v1/completions", self.base))
            .json(&super::warm_up_body(model))
            .send()
            .await
            .map_err(|e| EngineError::Unreachable(format!("warm-up completion: {e}")))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            let status = resp.status().as_u16();
            Err(EngineError::Status {
                call: "warm-up completion",
                status,
                body: resp.text().await.unwrap_or_default(),
            })
        }
    }

    async fn models(&self) -> Result<Bytes, EngineError> {
        self.get("models", "/v1/models")
            .await?
            .bytes()
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))
    }

    /// The engine's exposition while it runs (llama-server needs `--metrics`); nothing
    /// while it is stopped, which is what a stopped engine has to say.
    async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        let empty = || Ok(("text/plain; version=0.0.4".to_string(), Bytes::new()));
        if !self.process.is_running() {
            return empty();
        }
        match self.get("metrics", "/metrics").await {
            Ok(resp) => {
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
            Err(EngineError::Status {
                status: 404 | 501, ..
            }) => empty(),
            Err(e) => Err(e),
        }
    }
}
