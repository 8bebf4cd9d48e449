//! The engine driver: brings the engine up (boot, wake, cold restart), proves it serves,
//! and puts it to sleep, each bounded in time, with a typed error when it cannot.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use greenthread_gpu::MemoryProbe;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    SidecarConfig,
    adapters::{Adapters, Check},
    engine::{EngineAdapter, EngineError},
    error::{DriverError, WaitReason},
    metrics::SidecarMetrics,
    process::EngineProcess,
};

pub struct EngineDriver {
    engine: Arc<dyn EngineAdapter>,
    process: Option<Arc<EngineProcess>>,
    probe: Option<Arc<dyn MemoryProbe>>,
    cfg: SidecarConfig,
    metrics: Arc<SidecarMetrics>,
    /// The engine must be cold-started before it can serve again.
    lost: AtomicBool,
    /// Engine responses that timed out in a row (a wedged engine is restarted).
    timeouts: AtomicU32,
    models: Mutex<Option<Bytes>>,
    stop: CancellationToken,
    adapters: Arc<Adapters>,
    /// The level the engine last went to sleep at (the sidecar chooses it per sleep:
    /// level 2 where host memory is short), which its next wake undoes.
    asleep_at: AtomicU8,
    /// What the engine held per GPU with its weights back and its KV cache not yet: the
    /// weights (and what it holds asleep), measured during the last wake.
    with_weights: Mutex<Option<Vec<(u32, u64)>>>,
}

impl EngineDriver {
    pub fn new(
        engine: Arc<dyn EngineAdapter>,
        process: Option<Arc<EngineProcess>>,
        probe: Option<Arc<dyn MemoryProbe>>,
        cfg: SidecarConfig,
        metrics: Arc<SidecarMetrics>,
        stop: CancellationToken,
    ) -> Self {
        // Whether requests for adapters must be rewritten for this engine (not for vLLM,
        // which takes an adapter's own name as `model`).
        let renames = !matches!(
            engine.adapter_call("base", "adapter"),
            Some(crate::engine::AdapterCall::Model(m)) if m == "adapter"
        );
        let mut adapters = Adapters::new(cfg.adapters.clone(), cfg.adapters_file.clone(), renames);
        if cfg.lora_on_demand {
            match crate::ondemand::OnDemand::new(
                cfg.lora_cache_dir.clone(),
                cfg.lora_download_timeout,
                cfg.max_loras,
            ) {
                Ok(od) => {
                    metrics.on_demand_init();
                    adapters = adapters.with_on_demand(od);
                }
                Err(e) => {
                    tracing::error!(model = %cfg.model, error = %e, "on-demand adapters off: no TLS client")
                }
            }
        }
        if let Err(e) = adapters.reread() {
            tracing::warn!(model = %cfg.model, error = %e, "adapters file not taken");
        }
        engine.adapters_at_start(&adapters.wanted());
        Self {
            engine,
            process,
            probe,
            metrics,
            lost: AtomicBool::new(false),
            timeouts: AtomicU32::new(0),
            models: Mutex::new(None),
            stop,
            adapters: Arc::new(adapters),
            asleep_at: AtomicU8::new(cfg.sleep_level),
            with_weights: Mutex::new(None),
            cfg,
        }
    }

    pub fn adapters(&self) -> &Arc<Adapters> {
        &self.adapters
    }

    fn check(&self) -> Check<'_> {
        Check {
            timeout: self.cfg.warmup_timeout,
            metrics: &self.metrics,
        }
    }

    /// While the engine serves: loads and unloads what changed in the wanted adapters.
    pub async fn sync_adapters(&self) {
        self.adapters
            .sync(&*self.engine, &self.cfg.model, self.check())
            .await;
    }

    pub fn engine(&self) -> &Arc<dyn EngineAdapter> {
        &self.engine
    }

    /// The engine's `/v1/models` answer, taken when it last came up.
    pub fn cached_models(&self) -> Option<Bytes> {
        self.models.lock().unwrap().clone()
    }

    /// Marks the engine lost; whether it was not already.
    pub fn mark_lost(&self) -> bool {
        !self.lost.swap(true, Ordering::SeqCst)
    }

    /// Whether the engine is gone for good after a failed wake (an owned process was
    /// stopped; an external one may still come back by itself).
    pub fn owns_process(&self) -> bool {
        self.process.is_some()
    }

    /// The engine answered a request: it is not wedged.
    pub fn answered(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
    }

    /// A response timed out; whether enough did in a row to call the engine wedged.
    pub fn timed_out(&self) -> Option<u32> {
        let n = self.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        (n >= self.cfg.engine_timeouts_before_restart).then(|| {
            self.timeouts.store(0, Ordering::Relaxed);
            n
        })
    }

    /// What the engine holds per GPU, as measured (never assumed).
    pub async fn measure(&self) -> Option<Vec<(u32, u64)>> {
        let probe = self.probe.as_ref()?;
        match probe.engine_memory().await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "could not measure engine memory");
                None
            }
        }
    }

    /// Stops an owned engine (it holds nothing afterwards).
    pub async fn stop_process(&self, grace: Duration) {
        if let Some(p) = &self.process {
            p.stop(grace).await;
        }
    }

    async fn wait_up(&self) -> Result<(), DriverError> {
        let start = Instant::now();
        let mut last_report = start;
        loop {
            match self.engine.health().await {
                Ok(()) => return Ok(()),
                // An engine we started that exited will not come up: say so now.
                Err(e) if self.process.as_ref().is_some_and(|p| !p.is_running()) => {
                    return Err(DriverError::ExitedDuringStart(e));
                }
                Err(last) if start.elapsed() > self.cfg.boot_timeout => {
                    return Err(DriverError::BootTimeout {
                        after: self.cfg.boot_timeout,
                        last,
                    });
                }
                Err(_) => {
                    if last_report.elapsed() > Duration::from_secs(10) {
                        tracing::info!(model = %self.cfg.model, elapsed = ?start.elapsed(), "engine still booting");
                        last_report = Instant::now();
                    }
                    // The engine offers no readiness notification; its port opens when ready.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn cache_models(&self) {
        if let Ok(models) = self.engine.models().await {
            *self.models.lock().unwrap() = Some(models);
        }
    }

    /// Boot: starts an owned engine and waits until it answers. Whether it came up awake.
    pub async fn start(&self) -> Result<bool, DriverError> {
        if let Some(p) = &self.process {
            p.start()
                .await
                .map_err(|e| DriverError::Start(e.to_string()))?;
        }
        self.wait_up().await?;
        self.cache_models().await;
        Ok(!self.engine.is_sleeping().await?)
    }

    /// Stops (if owned) and starts the engine, and waits until it answers.
    async fn cold_start(&self) -> Result<(), DriverError> {
        if let Some(p) = &self.process {
            p.restart(Duration::from_secs(10))
                .await
                .map_err(|e| DriverError::Start(e.to_string()))?;
        }
        self.adapters.forget(&self.metrics);
        self.wait_up().await?;
        self.cache_models().await;
        self.lost.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Awake by its own account (`/is_sleeping` or its sleep-state metric, never
    /// `/health`), and serving: one token within the warm-up deadline.
    async fn verify_awake(&self) -> Result<(), DriverError> {
        if self.engine.is_sleeping().await? {
            return Err(DriverError::StillAsleep);
        }
        match tokio::time::timeout(
            self.cfg.warmup_timeout,
            self.engine.warm_up(&self.cfg.model),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(DriverError::WarmUp(e)),
            Err(_) => return Err(DriverError::Wedged(self.cfg.warmup_timeout)),
        }
        // The base serves; its adapters are loaded afresh before any request reaches it.
        // One that fails is reported, and the base serves regardless.
        self.adapters
            .load_all(&*self.engine, &self.cfg.model, self.check())
            .await;
        Ok(())
    }

    /// Wakes the engine: retries the wake call, then cold restarts; the restart budget
    /// bounds how long queued requests wait on a broken engine.
    pub async fn bring_up(
        &self,
        waiting: &(dyn Fn(WaitReason) + Send + Sync),
    ) -> Result<(), DriverError> {
        let mut attempts = 0;
        let mut restarts = 0;
        let mut last_error = DriverError::Lost;
        loop {
            if self.stop.is_cancelled() {
                return Err(DriverError::ShuttingDown);
            }
            if self.lost.load(Ordering::SeqCst) || attempts >= self.cfg.wake_attempts {
                if restarts >= self.cfg.max_restarts {
                    return Err(DriverError::GaveUp {
                        restarts,
                        last: Box::new(last_error),
                    });
                }
                restarts += 1;
                self.metrics.engine_restarts.inc();
                self.metrics
                    .notice(crate::metrics::Notice::EngineRestarted {
                        reason: last_error.to_string(),
                    });
                tracing::warn!(model = %self.cfg.model, restarts, error = %last_error, reason = last_error.metric_label(), "cold restart of the engine");
                waiting(WaitReason::ColdRestart {
                    restarts,
                    after: last_error.to_string(),
                });
                if let Err(e) = self.cold_start().await {
                    last_error = e;
                    continue;
                }
                attempts = 0;
                // A fresh vLLM boots awake; one that booted asleep still needs a wake.
                match self.engine.is_sleeping().await {
                    Ok(false) => match self.verify_awake().await {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            self.metrics.wake_failures.inc();
                            last_error = e;
                            attempts = self.cfg.wake_attempts;
                            continue;
                        }
                    },
                    Ok(true) => {}
                    Err(e) => {
                        last_error = e.into();
                        continue;
                    }
                }
            }
            attempts += 1;
            waiting(WaitReason::EngineWaking);
            let woke = match tokio::time::timeout(
                self.cfg.wake_timeout,
                self.wake_engine(self.asleep_at.load(Ordering::SeqCst)),
            )
            .await
            {
                Ok(Ok(())) => {
                    waiting(WaitReason::WarmingUp);
                    self.verify_awake().await
                }
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(EngineError::Timeout("wake_up").into()),
            };
            match woke {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.metrics.wake_failures.inc();
                    tracing::warn!(model = %self.cfg.model, attempt = attempts, error = %e, reason = e.metric_label(), "wake failed");
                    last_error = e;
                }
            }
        }
    }

    /// A wake at `level`, weights first where the engine can: what they take on each GPU
    /// is measured between the two steps, which is what a level-1 sleep keeps in host
    /// memory (the KV cache is never kept).
    async fn wake_engine(&self, level: u8) -> Result<(), EngineError> {
        // Only when nothing says what the weights take (`staging.hostMemory`): otherwise
        // one call, as before.
        if self.cfg.host_memory_bytes.is_none()
            && self.probe.is_some()
            && self.engine.wake_weights().await?
        {
            if let Some(m) = self.measure().await {
                *self.with_weights.lock().unwrap() = Some(m);
            }
            return self.engine.wake_after_weights(level).await;
        }
        self.engine.wake(level).await
    }

    /// What the engine held per GPU between the weights and the KV cache of its last
    /// wake (taken: each measurement counts once).
    pub fn take_with_weights(&self) -> Option<Vec<(u32, u64)>> {
        self.with_weights.lock().unwrap().take()
    }

    /// The level the engine last went to sleep at.
    pub fn asleep_at(&self) -> u8 {
        self.asleep_at.load(Ordering::SeqCst)
    }

    /// Puts the engine to sleep at `level` within the wake timeout (`what` names the
    /// call in the error: a sleep at boot runs under the GPU's wake lock).
    pub async fn sleep(&self, what: &'static str, level: u8) -> Result<(), DriverError> {
        // Recorded first: whatever the call's outcome, the next wake undoes this level.
        self.asleep_at.store(level, Ordering::SeqCst);
        match tokio::time::timeout(self.cfg.wake_timeout, self.engine.sleep(level)).await {
            Ok(r) => {
                r?;
                self.adapters.forget(&self.metrics);
                Ok(())
            }
            Err(_) => Err(EngineError::Timeout(what).into()),
        }
    }
}
