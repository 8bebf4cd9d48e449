//! Engine adapters: how to ask an engine whether it is up, put it to sleep and wake it.

mod process;
mod vllm;

use async_trait::async_trait;
use bytes::Bytes;

pub use process::{Flavor, ProcessAdapter};
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
    /// The engine's `/v1/models` answer, cached to answer while asleep.
    async fn models(&self) -> Result<Bytes, EngineError>;
    /// The engine's own Prometheus exposition.
    async fn metrics(&self) -> Result<(String, Bytes), EngineError>;
}
