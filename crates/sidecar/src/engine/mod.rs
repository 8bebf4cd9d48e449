//! Engine adapters: how to ask an engine whether it is up, put it to sleep and wake it.

mod http;
mod process;
mod sglang;
mod vllm;

use async_trait::async_trait;
use bytes::Bytes;
use greenthread_api::AdapterSpec;

pub use http::EngineHttp;
pub use process::{Flavor, ProcessAdapter};
pub use sglang::SglangAdapter;
pub use vllm::VllmAdapter;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("engine unreachable: {0}")]
    Unreachable(String),
    #[error("engine answered {status} to {call}: {body}")]
    Status {
        call: &'static str,
        status: u16,
        body: String,
    },
    #[error("engine call {0} timed out")]
    Timeout(&'static str),
    #[error("engine misbehaved: {0}")]
    Protocol(String),
}

#[async_trait]
pub trait EngineAdapter: Send + Sync + 'static {
    /// Liveness of the engine's server (not whether it is awake).
    async fn health(&self) -> Result<(), EngineError>;
    async fn is_sleeping(&self) -> Result<bool, EngineError>;
    async fn sleep(&self, level: u8) -> Result<(), EngineError>;
    async fn wake(&self, level: u8) -> Result<(), EngineError>;
    /// Whether a sleep at `level` leaves the weights in host memory (vLLM's level 1,
    /// SGLang's CPU backup): what counts against the node's host memory for sleepers.
    fn keeps_weights_in_host(&self, _level: u8) -> bool {
        false
    }
    /// Brings the weights back alone, where the engine can (vLLM's tagged wake), so that
    /// what they take on the GPU is measured before the rest follows with
    /// [`EngineAdapter::wake_after_weights`]; whether it did.
    async fn wake_weights(&self) -> Result<bool, EngineError> {
        Ok(false)
    }
    /// The rest of a wake whose weights [`EngineAdapter::wake_weights`] brought back.
    async fn wake_after_weights(&self, level: u8) -> Result<(), EngineError> {
        self.wake(level).await
    }
    /// Whether the engine can sleep at level 2 instead (weights dropped, reloaded from
    /// disk at the next wake) when host memory is short.
    fn can_drop_weights(&self) -> bool {
        false
    }
    /// The engine's OpenAI-style HTTP API, if it has one: the calls every such engine
    /// answers alike (model list, metrics, warm-up) go through it by default.
    fn http(&self) -> Option<&EngineHttp> {
        None
    }
    /// The engine's `/v1/models` answer, cached to answer while asleep.
    async fn models(&self) -> Result<Bytes, EngineError> {
        no_http(self.http())?.models().await
    }
    /// The engine's own Prometheus exposition.
    async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        no_http(self.http())?.metrics().await
    }
    /// Proves the engine serves, not just answers health checks: one greedy token of
    /// `model`. The sidecar bounds it with a deadline; a wedged engine misses it. An
    /// engine without an HTTP API has nothing to prove it with.
    async fn warm_up(&self, model: &str) -> Result<(), EngineError> {
        match self.http() {
            Some(http) => http.warm_up(model).await,
            None => Ok(()),
        }
    }
    /// Loads LoRA adapter `adapter` into the running engine.
    async fn load_adapter(&self, adapter: &AdapterSpec) -> Result<(), EngineError> {
        let _ = adapter;
        Err(no_adapters())
    }
    /// Unloads adapter `name`; one the engine does not hold is not an error.
    async fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        let _ = name;
        Err(no_adapters())
    }
    /// How a request asks for adapter `adapter` of `base`: by the adapter's own name as
    /// `model` (vLLM) unless the engine says otherwise; `None` when the engine does not
    /// hold it.
    fn adapter_call(&self, base: &str, adapter: &str) -> Option<AdapterCall> {
        let _ = base;
        Some(AdapterCall::Model(adapter.to_string()))
    }
    /// The adapters the engine must start with, for engines that load adapters only when
    /// they start (llama.cpp): kept for its next start.
    fn adapters_at_start(&self, adapters: &[AdapterSpec]) {
        let _ = adapters;
    }
    /// Whether adapters load into the running engine (else only when it starts).
    fn loads_at_run_time(&self) -> bool {
        true
    }
    /// One token through an adapter: the proof that it serves.
    async fn warm_up_adapter(&self, call: &AdapterCall) -> Result<(), EngineError> {
        match self.http() {
            Some(http) => http.complete(&call.warm_up_body()).await,
            None => Ok(()),
        }
    }
}

/// How a request names an adapter to its engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterCall {
    /// As its `model` (vLLM: the adapter's name; SGLang: `<base>:<adapter>`).
    Model(String),
    /// The base as `model`, and the adapter by its position in a `lora` list
    /// (`[{"id": N, "scale": 1.0}]`, llama.cpp's).
    Lora { base: String, id: usize },
}

impl AdapterCall {
    /// A one-token completion through the adapter: the proof that it serves.
    pub fn warm_up_body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({"prompt": "Hello", "max_tokens": 1, "temperature": 0});
        match self {
            AdapterCall::Model(m) => body["model"] = m.as_str().into(),
            AdapterCall::Lora { base, id } => {
                body["model"] = base.as_str().into();
                body["lora"] = serde_json::json!([{"id": id, "scale": 1.0}]);
            }
        }
        body
    }
}

fn no_adapters() -> EngineError {
    EngineError::Protocol("this engine cannot load LoRA adapters at run time".into())
}

/// `{"lora_name", "lora_path"}` to `path`, as vLLM and SGLang load adapters.
pub(crate) async fn load_lora(
    http: &EngineHttp,
    path: &str,
    adapter: &AdapterSpec,
) -> Result<(), EngineError> {
    let body = serde_json::json!({"lora_name": adapter.name, "lora_path": adapter.source});
    http.call(
        "load_lora_adapter",
        http.post(path).json(&body).timeout(ADAPTER_CALL_TIMEOUT),
    )
    .await
    .map(drop)
}

/// `{"lora_name"}` to `path`; an adapter the engine does not hold (404, or a 400 that says
/// it cannot be found) is already unloaded.
pub(crate) async fn unload_lora(
    http: &EngineHttp,
    path: &str,
    name: &str,
) -> Result<(), EngineError> {
    let body = serde_json::json!({"lora_name": name});
    match http
        .call(
            "unload_lora_adapter",
            http.post(path).json(&body).timeout(ADAPTER_CALL_TIMEOUT),
        )
        .await
    {
        Ok(_) | Err(EngineError::Status { status: 404, .. }) => Ok(()),
        Err(EngineError::Status {
            status: 400, body, ..
        }) if body.contains("cannot be found") || body.contains("not found") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Longest an adapter load may take: a hub id is downloaded on its first load.
const ADAPTER_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn no_http(http: Option<&EngineHttp>) -> Result<&EngineHttp, EngineError> {
    http.ok_or_else(|| EngineError::Protocol("this engine has no HTTP API".into()))
}

/// Whether vLLM's `vllm:engine_sleep_state` exposition says the engine sleeps: the
/// `awake` series is 0. `None` when the metric is absent.
pub(crate) fn sleeping_from_metrics(exposition: &str) -> Option<bool> {
    exposition
        .lines()
        .filter(|l| l.starts_with("vllm:engine_sleep_state{"))
        .find(|l| l.contains("sleep_state=\"awake\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|awake| awake == 0.0)
}

#[cfg(test)]
mod tests {
    use super::sleeping_from_metrics;

    #[test]
    fn the_sleep_state_metric_tells_awake_from_asleep() {
        let awake = "# TYPE vllm:engine_sleep_state gauge\nvllm:engine_sleep_state{engine=\"0\",model_name=\"m\",sleep_state=\"awake\"} 1\nvllm:engine_sleep_state{engine=\"0\",model_name=\"m\",sleep_state=\"weights_offloaded\"} 0\n";
        let asleep = awake.replace("} 1\n", "} 0\n");
        assert_eq!(sleeping_from_metrics(awake), Some(false));
        assert_eq!(sleeping_from_metrics(&asleep), Some(true));
        assert_eq!(sleeping_from_metrics("vllm:num_requests_running 0\n"), None);
    }
}
