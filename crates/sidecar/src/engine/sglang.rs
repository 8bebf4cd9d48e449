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
use greenthread_api::AdapterSpec;
use serde_json::json;

use super::{EngineAdapter, EngineError, http::EngineHttp};

pub struct SglangAdapter {
    http: EngineHttp,
    released: AtomicBool,
}

impl SglangAdapter {
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

    pub fn new(base: &str) -> Self {
        Self {
            http: EngineHttp::new(base),
            released: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl EngineAdapter for SglangAdapter {
    fn http(&self) -> Option<&EngineHttp> {
        Some(&self.http)
    }

    async fn health(&self) -> Result<(), EngineError> {
        self.http
            .call(
                "health",
                self.http.get("/health").timeout(Duration::from_secs(5)),
            )
            .await
            .map(drop)
    }

    async fn is_sleeping(&self) -> Result<bool, EngineError> {
        Ok(self.released.load(Ordering::SeqCst))
    }

    /// Rendered with `--enable-weights-cpu-backup`: the weights wait in host memory at
    /// any level (SGLang has no level 2 to fall back on).
    fn keeps_weights_in_host(&self, _level: u8) -> bool {
        true
    }

    /// Everything goes: weights (to the CPU backup) and KV cache. The level does not
    /// apply; what comes back intact depends on the server's weights backup.
    async fn sleep(&self, _level: u8) -> Result<(), EngineError> {
        self.http
            .call(
                "release_memory_occupation",
                self.http
                    .post("/release_memory_occupation")
                    .json(&json!({})),
            )
            .await?;
        self.released.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Needs `--enable-lora` (rendered for a Model with adapters).
    async fn load_adapter(&self, adapter: &AdapterSpec) -> Result<(), EngineError> {
        super::load_lora(&self.http, "/load_lora_adapter", adapter).await
    }

    async fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        super::unload_lora(&self.http, "/unload_lora_adapter", name).await
    }

    /// SGLang's OpenAI API names an adapter as `<base>:<adapter>`.
    fn adapter_call(&self, base: &str, adapter: &str) -> Option<super::AdapterCall> {
        Some(super::AdapterCall::Model(format!("{base}:{adapter}")))
    }

    async fn wake(&self, _level: u8) -> Result<(), EngineError> {
        // Weights first, then the KV cache, as SGLang's own examples resume them.
        for tags in [json!(["weights"]), json!(["kv_cache"])] {
            self.http
                .call(
                    "resume_memory_occupation",
                    self.http
                        .post("/resume_memory_occupation")
                        .json(&json!({"tags": tags})),
                )
                .await?;
        }
        self.released.store(false, Ordering::SeqCst);
        Ok(())
    }
}
