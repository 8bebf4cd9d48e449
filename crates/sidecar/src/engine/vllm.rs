use std::time::Duration;

use async_trait::async_trait;
use greenthread_api::AdapterSpec;
use serde_json::json;

use super::{
    EngineAdapter, EngineError,
    http::{Answer, Call, EngineHttp},
};

/// vLLM's sleep-mode API (also spoken by `greenthread sim-engine`).
pub struct VllmAdapter {
    http: EngineHttp,
}

impl VllmAdapter {
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
        }
    }

    async fn call(&self, call: &'static str, req: Call) -> Result<Answer, EngineError> {
        self.http.call(call, req).await
    }

    fn post(&self, path: &str) -> Call {
        self.http.post(path)
    }

    fn get(&self, path: &str) -> Call {
        self.http.get(path)
    }
}

#[async_trait]
impl EngineAdapter for VllmAdapter {
    fn http(&self) -> Option<&EngineHttp> {
        Some(&self.http)
    }

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
        let v = resp.json("is_sleeping")?;
        v["is_sleeping"]
            .as_bool()
            .ok_or_else(|| EngineError::Protocol(format!("is_sleeping answered {v}")))
    }

    fn keeps_weights_in_host(&self, level: u8) -> bool {
        level == 1
    }

    fn can_drop_weights(&self) -> bool {
        true
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

    /// Needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (both rendered
    /// for a Model with adapters).
    async fn load_adapter(&self, adapter: &AdapterSpec) -> Result<(), EngineError> {
        super::load_lora(&self.http, "/v1/load_lora_adapter", adapter).await
    }

    async fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        super::unload_lora(&self.http, "/v1/unload_lora_adapter", name).await
    }

    async fn wake(&self, level: u8) -> Result<(), EngineError> {
        self.wake_weights().await?;
        self.wake_after_weights(level).await
    }

    /// `wake_up?tags=weights`: the weights' memory back, with their contents from host
    /// memory after a level-1 sleep (uninitialized after level 2).
    async fn wake_weights(&self) -> Result<bool, EngineError> {
        self.call("wake_up(weights)", self.post("/wake_up?tags=weights"))
            .await
            .map(|_| true)
    }

    async fn wake_after_weights(&self, level: u8) -> Result<(), EngineError> {
        if level >= 2 {
            // Level 2 discarded the weights: reload them from disk.
            self.call(
                "reload_weights",
                self.post("/collective_rpc")
                    .json(&json!({"method": "reload_weights"})),
            )
            .await?;
        }
        self.call("wake_up(kv_cache)", self.post("/wake_up?tags=kv_cache"))
            .await?;
        if level >= 2 {
            // Prefix-cache entries were computed with the old weights.
            self.call("reset_prefix_cache", self.post("/reset_prefix_cache"))
                .await?;
        }
        Ok(())
    }
}
