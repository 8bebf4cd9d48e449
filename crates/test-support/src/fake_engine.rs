//! An in-process engine for tests that run many sidecars at once: it answers the sleep
//! API at once (or after a set delay) and reports its memory through a probe, so the
//! real sidecar and ledger code run without a process per engine.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use greenthread_gpu::{MemoryProbe, ProbeError};
use greenthread_ledger::{Clock, Ledger};
use greenthread_sidecar::{
    GpuRef, Parts,
    engine::{EngineAdapter, EngineError},
};

pub struct FakeEngine {
    pub model: String,
    pub bytes: u64,
    pub gpu: u32,
    pub sleep_time: Duration,
    pub wake_time: Duration,
    asleep: AtomicBool,
    pub wakes: AtomicU64,
    pub sleeps: AtomicU64,
    /// Every sleep and wake call as the engine saw it: when it began and ended, so a
    /// benchmark measures the engine's share of a switch rather than assume it.
    calls: Mutex<Vec<Call>>,
}

/// One sleep or wake call, as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub wake: bool,
    pub began: Instant,
    pub ended: Instant,
}

impl FakeEngine {
    pub fn new(model: &str, bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            model: model.into(),
            bytes,
            gpu: 0,
            sleep_time: Duration::ZERO,
            wake_time: Duration::ZERO,
            asleep: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn with_times(
        model: &str,
        bytes: u64,
        sleep_time: Duration,
        wake_time: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            sleep_time,
            wake_time,
            ..Arc::into_inner(Self::new(model, bytes)).unwrap()
        })
    }

    pub fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::SeqCst)
    }

    /// The last sleep (`wake` false) or wake call that ended after `since`.
    pub fn last_call(&self, wake: bool, since: Instant) -> Option<Call> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .rev()
            .find(|c| c.wake == wake && c.ended >= since)
            .copied()
    }

    fn record(&self, wake: bool, began: Instant) {
        let call = Call {
            wake,
            began,
            ended: Instant::now(),
        };
        self.calls.lock().unwrap().push(call);
    }

    /// An in-process sidecar's parts in front of this engine on one GPU of `ledger`:
    /// no process to run, and the engine is its own memory probe.
    pub fn parts(self: &Arc<Self>, ledger: Arc<dyn Ledger>, gpu: GpuRef, clock: Clock) -> Parts {
        Parts {
            engine: self.clone(),
            process: None,
            ledger,
            gpus: vec![gpu],
            probe: Some(self.clone()),
            clock,
        }
    }
}

#[async_trait]
impl EngineAdapter for FakeEngine {
    async fn health(&self) -> Result<(), EngineError> {
        Ok(())
    }

    async fn is_sleeping(&self) -> Result<bool, EngineError> {
        Ok(self.is_asleep())
    }

    async fn sleep(&self, _level: u8) -> Result<(), EngineError> {
        let began = Instant::now();
        tokio::time::sleep(self.sleep_time).await;
        self.sleeps.fetch_add(1, Ordering::SeqCst);
        self.asleep.store(true, Ordering::SeqCst);
        self.record(false, began);
        Ok(())
    }

    async fn wake(&self, _level: u8) -> Result<(), EngineError> {
        let began = Instant::now();
        tokio::time::sleep(self.wake_time).await;
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.asleep.store(false, Ordering::SeqCst);
        self.record(true, began);
        Ok(())
    }

    async fn models(&self) -> Result<Bytes, EngineError> {
        Ok(Bytes::from(format!(
            r#"{{"object":"list","data":[{{"id":"{}","object":"model"}}]}}"#,
            self.model
        )))
    }

    async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        Ok(("text/plain".into(), Bytes::new()))
    }
}

#[async_trait]
impl MemoryProbe for FakeEngine {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        Ok(vec![(
            self.gpu,
            if self.is_asleep() { 0 } else { self.bytes },
        )])
    }
}
