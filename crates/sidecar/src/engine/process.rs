//! Engines with no sleep API — any OpenAI-compatible server, and llama.cpp's
//! `llama-server` — put to sleep by stopping their process and woken by starting it.
//! The sidecar owns the process; a wake counts only once the engine has answered a real
//! one-token completion, and what the process held is measured, not assumed.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use greenthread_api::AdapterSpec;

use super::{EngineAdapter, EngineError, http::EngineHttp};
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
    http: EngineHttp,
    process: Arc<EngineProcess>,
    flavor: Flavor,
    /// How long a stopping engine gets before SIGKILL.
    stop_grace: Duration,
    /// How long a starting engine gets to load and answer.
    start_timeout: Duration,
}

impl ProcessAdapter {
    /// Sends the engine's own API key on every call the adapter makes.
    pub fn with_api_key(mut self, key: Option<&str>) -> Self {
        self.http = self.http.with_api_key(key);
        self
    }

    /// Reaches the engine through `connector` (an in-memory pipe in a simulated fleet).
    pub fn with_connector(mut self, connector: greenthread_edge::Connector) -> Self {
        self.http = self.http.with_connector(connector);
        self
    }

    pub fn new(
        base: &str,
        process: Arc<EngineProcess>,
        flavor: Flavor,
        start_timeout: Duration,
    ) -> Self {
        Self {
            http: EngineHttp::new(base),
            process,
            flavor,
            stop_grace: Duration::from_secs(10),
            start_timeout,
        }
    }
}

#[async_trait]
impl EngineAdapter for ProcessAdapter {
    fn http(&self) -> Option<&EngineHttp> {
        Some(&self.http)
    }

    async fn health(&self) -> Result<(), EngineError> {
        if !self.process.is_running() {
            return Err(EngineError::Unreachable(
                "engine process is stopped (asleep)".into(),
            ));
        }
        let (call, path) = match self.flavor {
            Flavor::LlamaCpp => ("health", "/health"),
            Flavor::Process => ("models", "/v1/models"),
        };
        self.http
            .call(call, self.http.get(path).timeout(Duration::from_secs(5)))
            .await
            .map(drop)
    }

    /// Asleep means the process is not running: nothing else holds memory.
    async fn is_sleeping(&self) -> Result<bool, EngineError> {
        Ok(!self.process.is_running())
    }

    async fn sleep(&self, _level: u8) -> Result<(), EngineError> {
        self.process.stop(self.stop_grace).await;
        Ok(())
    }

    /// llama-server loads adapters only when it starts: `--lora` each (with
    /// `--lora-init-without-apply`, so that none applies unless a request asks), for the
    /// next start; a sleeping llama.cpp is stopped, so its next wake takes them.
    fn adapters_at_start(&self, adapters: &[AdapterSpec]) {
        if self.flavor != Flavor::LlamaCpp {
            return;
        }
        let mut extra = crate::process::Extra::default();
        if !adapters.is_empty() {
            extra.args.push("--lora-init-without-apply".into());
            for a in adapters {
                extra.args.extend(["--lora".to_string(), a.source.clone()]);
                extra.labels.push(a.name.clone());
            }
        }
        self.process.set_extra(extra);
    }

    fn loads_at_run_time(&self) -> bool {
        self.flavor != Flavor::LlamaCpp
    }

    /// llama.cpp: loaded when the engine started with it.
    async fn load_adapter(&self, adapter: &AdapterSpec) -> Result<(), EngineError> {
        if self.flavor != Flavor::LlamaCpp {
            return Err(EngineError::Protocol(
                "this engine cannot load LoRA adapters".into(),
            ));
        }
        if self.process.started_with().labels.contains(&adapter.name) {
            Ok(())
        } else {
            Err(EngineError::Protocol(format!(
                "llama.cpp loads adapters when it starts: {} comes with its next start",
                adapter.name
            )))
        }
    }

    /// Requests stop naming it; llama-server keeps it until it stops.
    async fn unload_adapter(&self, _name: &str) -> Result<(), EngineError> {
        Ok(())
    }

    /// llama-server answers any `model`; an adapter is its position among the `--lora`
    /// flags the engine started with, applied through the request's `lora` list.
    fn adapter_call(&self, base: &str, adapter: &str) -> Option<super::AdapterCall> {
        if self.flavor != Flavor::LlamaCpp {
            return Some(super::AdapterCall::Model(adapter.to_string()));
        }
        let id = self
            .process
            .started_with()
            .labels
            .iter()
            .position(|n| n == adapter)?;
        Some(super::AdapterCall::Lora {
            base: base.to_string(),
            id,
        })
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

    /// The engine's exposition while it runs (llama-server needs `--metrics`); nothing
    /// while it is stopped, which is what a stopped engine has to say.
    async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        let empty = || Ok(("text/plain; version=0.0.4".to_string(), Bytes::new()));
        if !self.process.is_running() {
            return empty();
        }
        match self.http.metrics().await {
            Err(EngineError::Status {
                status: 404 | 501, ..
            }) => empty(),
            other => other,
        }
    }
}
