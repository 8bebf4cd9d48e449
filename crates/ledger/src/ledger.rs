use async_trait::async_trait;
use greenthread_api::{Gpu, GpuStatus};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("gpu {0:?} is not in the ledger")]
    NotFound(String),
    #[error("gpu {gpu:?} changed since version {version} was read")]
    Conflict { gpu: String, version: String },
    #[error("ledger backend: {0}")]
    Backend(String),
}

/// Storage for GPU records with compare-and-swap on the status.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError>;

    async fn list(&self) -> Result<Vec<Gpu>, LedgerError>;

    /// Replaces the status if the record is still at `resource_version`; otherwise
    /// [`LedgerError::Conflict`].
    async fn replace_status(
        &self,
        gpu: &str,
        resource_version: &str,
        status: GpuStatus,
    ) -> Result<Gpu, LedgerError>;

    /// The latest record, updated on every change.
    fn watch(&self, gpu: &str) -> Result<watch::Receiver<Gpu>, LedgerError>;
}

/// Read-modify-write with compare-and-swap: `decide` sees the current record and returns
/// the new status to write (or `None` to leave it) together with its result. A conflict
/// re-reads and decides again; `on_conflict` is called once per conflict.
pub async fn update<T, E>(
    ledger: &dyn Ledger,
    gpu: &str,
    on_conflict: &(dyn Fn() + Send + Sync),
    mut decide: impl FnMut(&Gpu) -> Result<(Option<GpuStatus>, T), E> + Send,
) -> Result<T, E>
where
    E: From<LedgerError>,
    T: Send,
{
    loop {
        let current = ledger.get(gpu).await?;
        let (next, out) = decide(&current)?;
        let Some(mut next) = next else { return Ok(out) };
        next.available_memory_bytes =
            Some(crate::decide::available_bytes(&current.spec, &next, None));
        if next == current.status {
            return Ok(out);
        }
        match ledger
            .replace_status(gpu, &current.resource_version, next)
            .await
        {
            Ok(_) => return Ok(out),
            Err(LedgerError::Conflict { .. }) => {
                on_conflict();
                tokio::task::yield_now().await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
