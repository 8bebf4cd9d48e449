use async_trait::async_trait;

use crate::SimGpu;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("reading gpu memory: {0}")]
    Io(#[from] std::io::Error),
}

/// Measures the memory an engine holds on each of its GPUs (index → bytes). The sidecar
/// trusts this, not the engine's word, when it records what a sleeping engine keeps.
#[async_trait]
pub trait MemoryProbe: Send + Sync + 'static {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError>;
}

/// Finds the engine on a [`SimGpu`] by the address it serves on.
pub struct SimGpuProbe {
    pub gpu: SimGpu,
    pub indices: Vec<u32>,
    pub engine_listen: String,
}

#[async_trait]
impl MemoryProbe for SimGpuProbe {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        let mut out = Vec::with_capacity(self.indices.len());
        for &index in &self.indices {
            let bytes = self
                .gpu
                .processes(index)?
                .iter()
                .filter(|p| p.listen == self.engine_listen)
                .map(|p| p.bytes)
                .sum();
            out.push((index, bytes));
        }
        Ok(out)
    }
}
