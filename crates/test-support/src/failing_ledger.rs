//! A ledger whose writes fail on demand (the API server unreachable, a write rejected),
//! around a real [`MemoryLedger`], for the paths that must survive a lost write.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU32, Ordering},
};

use async_trait::async_trait;
use greenthread_api::{Gpu, GpuStatus};
use greenthread_ledger::{Ledger, LedgerError, MemoryLedger};

type Matcher = Box<dyn Fn(&GpuStatus, &GpuStatus) -> bool + Send + Sync>;

pub struct FailingLedger {
    pub inner: Arc<MemoryLedger>,
    /// Writes (current status, next status) that match fail while `remaining` > 0.
    rule: Mutex<Option<Matcher>>,
    remaining: AtomicU32,
    /// Writes failed so far.
    pub failed: AtomicU32,
}

impl FailingLedger {
    pub fn new(inner: Arc<MemoryLedger>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            rule: Mutex::new(None),
            remaining: AtomicU32::new(0),
            failed: AtomicU32::new(0),
        })
    }

    /// The next `times` writes for which `matches(current, next)` holds fail.
    pub fn fail_writes(
        &self,
        times: u32,
        matches: impl Fn(&GpuStatus, &GpuStatus) -> bool + Send + Sync + 'static,
    ) {
        *self.rule.lock().unwrap() = Some(Box::new(matches));
        self.remaining.store(times, Ordering::SeqCst);
    }
}

#[async_trait]
impl Ledger for FailingLedger {
    async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError> {
        self.inner.get(gpu).await
    }

    async fn list(&self) -> Result<Vec<Gpu>, LedgerError> {
        self.inner.list().await
    }

    async fn replace_status(
        &self,
        gpu: &str,
        resource_version: &str,
        status: GpuStatus,
    ) -> Result<Gpu, LedgerError> {
        let current = self.inner.get(gpu).await?;
        let fail = self
            .rule
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|m| m(&current.status, &status))
            && self
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if fail {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(LedgerError::Backend(
                "injected: the API server is unreachable".into(),
            ));
        }
        self.inner
            .replace_status(gpu, resource_version, status)
            .await
    }

    fn watch(&self, gpu: &str) -> Result<greenthread_ledger::Subscriber<Gpu>, LedgerError> {
        self.inner.watch(gpu)
    }
}
