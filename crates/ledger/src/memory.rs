use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use greenthread_api::{Gpu, GpuSpec, GpuStatus};
use tokio::sync::broadcast;

use crate::{Feed, Ledger, LedgerError, Subscriber};

/// In-process ledger with the same semantics as the Kubernetes one: every write bumps a
/// resource version, stale writes conflict, and watchers see every committed record.
pub struct MemoryLedger {
    gpus: Mutex<BTreeMap<String, Feed<Gpu>>>,
    version: Mutex<u64>,
    /// Every committed record, in commit order (a watch keeps only the latest). Made on
    /// the first `commits()`: its 65,536 slots are 20 MB, which a sidecar or `local`
    /// that nobody observes should not carry (a receiver sees only what is sent after
    /// it subscribed, so nothing is lost by sending nothing before).
    commits: std::sync::OnceLock<broadcast::Sender<Gpu>>,
    conflicts: AtomicU64,
    /// Simulated round trip of a remote store: a read is stale by the time it returns.
    latency: std::time::Duration,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self {
            gpus: Mutex::default(),
            version: Mutex::default(),
            commits: std::sync::OnceLock::new(),
            conflicts: AtomicU64::new(0),
            latency: std::time::Duration::ZERO,
        }
    }
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger whose reads and writes take `latency`, like a store across a network, so
    /// that concurrent read-modify-writes really interleave and conflict.
    pub fn with_latency(latency: std::time::Duration) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }

    async fn round_trip(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// Every record committed from now on, for observers that must see each change.
    pub fn commits(&self) -> broadcast::Receiver<Gpu> {
        self.commits
            .get_or_init(|| broadcast::Sender::new(1 << 16))
            .subscribe()
    }

    /// The record of `gpu` as it is now, without waiting (for observers).
    pub fn gpu(&self, gpu: &str) -> Option<Gpu> {
        let gpus = self.gpus.lock().unwrap();
        gpus.get(gpu).map(|tx| (*tx.borrow()).clone())
    }

    /// Stale writes refused so far.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::SeqCst)
    }

    fn next_version(&self) -> String {
        let mut v = self.version.lock().unwrap();
        *v += 1;
        v.to_string()
    }

    /// Adds a GPU with an empty status, or leaves an existing record alone.
    pub fn add_gpu(&self, name: &str, spec: GpuSpec) {
        let version = self.next_version();
        let mut gpus = self.gpus.lock().unwrap();
        gpus.entry(name.to_string()).or_insert_with(|| {
            Feed::new(Gpu {
                name: name.to_string(),
                spec,
                status: GpuStatus::default(),
                resource_version: version,
            })
        });
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError> {
        let record = self
            .gpu(gpu)
            .ok_or_else(|| LedgerError::NotFound(gpu.to_string()));
        self.round_trip().await;
        record
    }

    async fn list(&self) -> Result<Vec<Gpu>, LedgerError> {
        let gpus = self.gpus.lock().unwrap();
        Ok(gpus.values().map(|tx| (*tx.borrow()).clone()).collect())
    }

    async fn replace_status(
        &self,
        gpu: &str,
        resource_version: &str,
        status: GpuStatus,
    ) -> Result<Gpu, LedgerError> {
        self.round_trip().await;
        let version = self.next_version();
        let gpus = self.gpus.lock().unwrap();
        let tx = gpus
            .get(gpu)
            .ok_or_else(|| LedgerError::NotFound(gpu.to_string()))?;
        let mut result = Err(LedgerError::Conflict {
            gpu: gpu.to_string(),
            version: resource_version.to_string(),
        });
        tx.send_if_modified(|record| {
            if record.resource_version != resource_version {
                return false;
            }
            record.status = status;
            record.resource_version = version;
            result = Ok(record.clone());
            true
        });
        match &result {
            Ok(record) => {
                if let Some(commits) = self.commits.get() {
                    let _ = commits.send(record.clone());
                }
            }
            Err(_) => {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
            }
        }
        result
    }

    fn watch(&self, gpu: &str) -> Result<Subscriber<Gpu>, LedgerError> {
        let gpus = self.gpus.lock().unwrap();
        gpus.get(gpu)
            .map(|tx| tx.subscribe())
            .ok_or_else(|| LedgerError::NotFound(gpu.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> MemoryLedger {
        let l = MemoryLedger::new();
        l.add_gpu(
            "node-0",
            GpuSpec {
                memory_bytes: 100,
                ..Default::default()
            },
        );
        l
    }

    #[tokio::test]
    async fn stale_writes_conflict_and_fresh_ones_bump_the_version() {
        let l = ledger();
        let first = l.get("node-0").await.unwrap();
        let written = l
            .replace_status("node-0", &first.resource_version, GpuStatus::default())
            .await
            .unwrap();
        assert_ne!(written.resource_version, first.resource_version);
        let err = l
            .replace_status("node-0", &first.resource_version, GpuStatus::default())
            .await
            .unwrap_err();
        assert!(matches!(err, LedgerError::Conflict { .. }));
        assert!(matches!(l.get("nope").await, Err(LedgerError::NotFound(_))));
    }

    #[tokio::test]
    async fn watchers_see_committed_writes() {
        let l = ledger();
        let mut rx = l.watch("node-0").unwrap();
        let v = l.get("node-0").await.unwrap().resource_version;
        let status = GpuStatus {
            wake_lock: None,
            ..Default::default()
        };
        l.replace_status("node-0", &v, status).await.unwrap();
        rx.changed().await.unwrap();
        assert_ne!(rx.borrow().resource_version, v);
    }
}
