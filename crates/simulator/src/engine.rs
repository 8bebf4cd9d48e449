//! The simulated engine's state: where its weights and KV cache are, what that costs in
//! time (bytes ÷ bandwidth) and in simulated GPU memory, and the faults it injects.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use greenthread_api::feed::{Feed, Subscriber};
use greenthread_gpu::{ProcessMemory, SimGpu};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::{SimConfig, metrics::Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// 0 awake, 1 weights offloaded to CPU, 2 everything discarded.
    pub level: u8,
    pub weights_on_gpu: bool,
    /// False after a level-2 wake until `reload_weights`.
    pub weights_valid: bool,
    pub kv_on_gpu: bool,
    /// Bytes held while asleep that should have been freed (fault injection).
    pub leaked: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Failed(String),
}

pub struct SimEngine {
    pub cfg: SimConfig,
    state: Mutex<State>,
    pub(crate) metrics: Metrics,
    gpu: Option<SimGpu>,
    /// Serializes sleep, wake and reload, as vLLM does.
    transition: tokio::sync::Mutex<()>,
    /// Bumped when running requests must be aborted (sleep with `mode=abort`). Its
    /// subscribers are told in the order they subscribed, so that a fleet simulation
    /// sees the aborted streams end in the same order on every run.
    abort: Feed<u64>,
    seqs: Arc<Semaphore>,
    /// One prefill at a time: the engine's prefill throughput is shared.
    prefill: tokio::sync::Mutex<()>,
    running: AtomicUsize,
    idle: Notify,
    wake_failures_left: AtomicU32,
    /// Wake calls still to hang (never answered), injected at run time.
    wake_hangs_left: AtomicU32,
    /// Wakes completed (for the wedge fault).
    wakes_done: AtomicU32,
    served: AtomicU64,
    /// Inference requests received (for the hang fault).
    received: AtomicU64,
    last_headers: Mutex<std::collections::BTreeMap<String, String>>,
    next_id: AtomicU64,
    /// LoRA adapters loaded now: name to source.
    adapters: Mutex<std::collections::BTreeMap<String, String>>,
    /// A digest of each loaded adapter's weights file, when its source is a directory
    /// holding one: another version of an adapter answers otherwise.
    weights: Mutex<std::collections::BTreeMap<String, String>>,
}

/// Held by every running request; releases its sequence slot when dropped.
pub struct RunGuard {
    engine: Arc<SimEngine>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let now = self.engine.running.fetch_sub(1, Ordering::SeqCst) - 1;
        self.engine.metrics.running.set(now as i64);
        self.engine.update_cache_usage(now);
        self.engine.idle.notify_waiters();
    }
}

impl SimEngine {
    pub fn new(cfg: SimConfig) -> Arc<Self> {
        let gpu = cfg.sim_gpu_dir.clone().map(SimGpu::new);
        Arc::new(Self {
            metrics: Metrics::new(&cfg.model),
            state: Mutex::new(State {
                level: 0,
                weights_on_gpu: true,
                weights_valid: true,
                kv_on_gpu: true,
                leaked: 0,
            }),
            gpu,
            transition: tokio::sync::Mutex::new(()),
            abort: Feed::new(0),
            seqs: Arc::new(Semaphore::new(cfg.max_num_seqs.max(1))),
            prefill: tokio::sync::Mutex::new(()),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
            wake_failures_left: AtomicU32::new(cfg.fail_wakes),
            wake_hangs_left: AtomicU32::new(0),
            wakes_done: AtomicU32::new(0),
            served: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_headers: Mutex::default(),
            next_id: AtomicU64::new(1),
            adapters: Mutex::default(),
            weights: Mutex::default(),
            cfg,
        })
    }

    pub fn state(&self) -> State {
        *self.state.lock().unwrap()
    }

    /// Sequences running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Loads adapter `name` from `source`, as vLLM does: refused without LoRA enabled,
    /// for a name already loaded, or for a path that does not exist (a hub id, anything
    /// not starting with `/`, is taken as found).
    pub fn load_adapter(&self, name: &str, source: &str) -> Result<(), String> {
        if !self.cfg.enable_lora {
            return Err("LoRA is not enabled: start the engine with --enable-lora".into());
        }
        let path = std::path::Path::new(source);
        if source.starts_with('/') && !path.exists() {
            return Err(format!("No adapter found for {source}"));
        }
        // A directory is a PEFT adapter, as vLLM reads it: its config must be there.
        let config = path.join("adapter_config.json");
        if path.is_dir() && !config.is_file() {
            return Err(format!("No adapter found for {source}"));
        }
        let weights = std::fs::read(path.join("adapter_model.safetensors"))
            .ok()
            .map(|bytes| {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                bytes.hash(&mut h);
                format!("{:016x}", h.finish())
            });
        let mut adapters = self.adapters.lock().unwrap();
        if adapters.contains_key(name) {
            return Err(format!(
                "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
            ));
        }
        adapters.insert(name.to_string(), source.to_string());
        self.metrics.adapters.set(adapters.len() as i64);
        let mut w = self.weights.lock().unwrap();
        match weights {
            Some(d) => w.insert(name.to_string(), d),
            None => w.remove(name),
        };
        Ok(())
    }

    /// Whether adapter `name` was loaded (and is no more).
    pub fn unload_adapter(&self, name: &str) -> bool {
        let mut adapters = self.adapters.lock().unwrap();
        let found = adapters.remove(name).is_some();
        self.metrics.adapters.set(adapters.len() as i64);
        self.weights.lock().unwrap().remove(name);
        found
    }

    /// The digest of loaded adapter `name`'s weights file, if it came with one.
    pub fn adapter_weights(&self, name: &str) -> Option<String> {
        self.weights.lock().unwrap().get(name).cloned()
    }

    /// The adapters loaded now, name and source.
    pub fn adapters(&self) -> Vec<(String, String)> {
        let adapters = self.adapters.lock().unwrap();
        adapters
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    /// The adapter a request's `model` names: the adapter's own name (vLLM) or
    /// `<served name>:<adapter>` (SGLang); `None` for the base model or an unknown name.
    pub fn adapter_of(&self, model: &str) -> Option<String> {
        let adapters = self.adapters.lock().unwrap();
        if adapters.contains_key(model) {
            return Some(model.to_string());
        }
        let (base, name) = model.rsplit_once(':')?;
        (self.cfg.names().contains(&base) && adapters.contains_key(name)).then(|| name.to_string())
    }

    pub fn is_sleeping(&self) -> bool {
        self.state().level != 0
    }

    /// Host memory held: the weights, offloaded there by a level-1 sleep (a level-2
    /// sleep drops them; a level-2 wake reloads them from disk, slower).
    pub fn host_bytes(&self) -> u64 {
        let s = self.state();
        if s.level == 1 && !s.weights_on_gpu && s.weights_valid {
            self.cfg.weights_bytes
        } else {
            0
        }
    }

    pub fn held_bytes(&self) -> u64 {
        let s = self.state();
        let mut held = s.leaked;
        if s.weights_on_gpu {
            held += self.cfg.weights_bytes;
        }
        if s.kv_on_gpu {
            held += self.cfg.kv_cache_bytes;
        }
        held
    }

    pub fn record_headers(&self, headers: &axum::http::HeaderMap) {
        *self.last_headers.lock().unwrap() = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
    }

    pub fn last_headers(&self) -> std::collections::BTreeMap<String, String> {
        self.last_headers.lock().unwrap().clone()
    }

    /// Counts an inference request received; returns its number (from 1).
    pub fn count_request(&self) -> u64 {
        self.received.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn set_state(&self, f: impl FnOnce(&mut State)) {
        let state = {
            let mut s = self.state.lock().unwrap();
            f(&mut s);
            *s
        };
        self.metrics
            .set_sleep_state(crate::metrics::SLEEP_STATES[state.level as usize]);
        self.publish_memory();
    }

    /// Writes what this process holds to the simulated GPU.
    pub fn publish_memory(&self) {
        let Some(gpu) = &self.gpu else { return };
        let record = ProcessMemory {
            pid: std::process::id(),
            listen: self.cfg.listen.to_string(),
            model: self.cfg.model.clone(),
            bytes: self.held_bytes(),
            host_bytes: self.host_bytes(),
        };
        if let Err(e) = gpu.record(self.cfg.sim_gpu_index, &record) {
            tracing::warn!(error = %e, "could not record memory on the simulated gpu");
        }
    }

    pub fn forget_memory(&self) {
        if let Some(gpu) = &self.gpu {
            let _ = gpu.remove(self.cfg.sim_gpu_index, std::process::id());
        }
    }

    /// Start-up: fixed cost, then the weights come from disk. With the concurrent-boot
    /// fault, fails if another engine is starting on the same simulated GPU.
    pub async fn boot(&self) -> Result<(), EngineError> {
        let marker = self.cfg.sim_gpu_dir.as_ref().map(|dir| {
            dir.join(format!(
                "booting-{}-{}",
                self.cfg.sim_gpu_index,
                std::process::id()
            ))
        });
        if self.cfg.fail_concurrent_boot
            && let Some(m) = &marker
        {
            let _ = std::fs::write(m, b"");
            self.check_alone_booting()?;
        }
        let load = SimConfig::transfer_time(self.cfg.weights_bytes, self.cfg.disk_bandwidth);
        tokio::time::sleep(self.cfg.boot_time + load).await;
        let alone = if self.cfg.fail_concurrent_boot {
            self.check_alone_booting()
        } else {
            Ok(())
        };
        if let Some(m) = &marker {
            let _ = std::fs::remove_file(m);
        }
        alone?;
        self.publish_memory();
        Ok(())
    }

    /// Another live engine's boot marker on this GPU means a concurrent start-up.
    fn check_alone_booting(&self) -> Result<(), EngineError> {
        let Some(dir) = &self.cfg.sim_gpu_dir else {
            return Ok(());
        };
        let prefix = format!("booting-{}-", self.cfg.sim_gpu_index);
        let me = std::process::id();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(&prefix)
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != me && std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(EngineError::Failed(format!(
                    "CUDA out of memory while profiling: engine {pid} is starting on GPU {} at the same time",
                    self.cfg.sim_gpu_index
                )));
            }
        }
        Ok(())
    }

    /// Whether the wedge fault has struck (after the configured number of wakes).
    pub fn wedged(&self) -> bool {
        self.cfg
            .wedge_after_wakes
            .is_some_and(|n| self.wakes_done.load(Ordering::SeqCst) >= n)
    }

    pub async fn sleep(&self, level: u8, wait: bool) -> Result<(), EngineError> {
        self.metrics.sleep_calls.inc();
        if !(1..=2).contains(&level) {
            return Err(EngineError::Failed(format!(
                "invalid sleep level {level}: expected 1 or 2"
            )));
        }
        let _t = self.transition.lock().await;
        if self.is_sleeping() {
            return Ok(());
        }
        if wait {
            self.wait_idle().await;
        } else {
            self.abort.send_if_modified(|n| {
                *n += 1;
                true
            });
        }
        let offload = if level == 1 {
            SimConfig::transfer_time(self.cfg.weights_bytes, self.cfg.d2h_bandwidth)
        } else {
            Duration::ZERO
        };
        let took = offload + self.cfg.sleep_fixed;
        if !took.is_zero() {
            tokio::time::sleep(took).await;
        }
        let leak = self
            .cfg
            .leak_on_sleep
            .min(self.cfg.weights_bytes + self.cfg.kv_cache_bytes);
        self.set_state(|s| {
            s.level = level;
            s.weights_on_gpu = false;
            s.kv_on_gpu = false;
            s.weights_valid = level == 1;
            s.leaked = leak;
        });
        // The worst vLLM does with adapters across a sleep: they are gone.
        self.adapters.lock().unwrap().clear();
        self.weights.lock().unwrap().clear();
        self.metrics.adapters.set(0);
        Ok(())
    }

    /// The next `n` wake calls fail (a fault injected while the engine runs).
    pub fn fail_next_wakes(&self, n: u32) {
        self.wake_failures_left.fetch_add(n, Ordering::SeqCst);
    }

    /// The next `n` wake calls are never answered (a fault injected while it runs).
    pub fn hang_next_wakes(&self, n: u32) {
        self.wake_hangs_left.fetch_add(n, Ordering::SeqCst);
    }

    pub async fn wake(&self, tags: &[String]) -> Result<(), EngineError> {
        self.metrics.wake_calls.inc();
        let hang = self
            .wake_hangs_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if self.cfg.wake_hang || hang {
            std::future::pending::<()>().await;
        }
        if let Some(gate) = &self.cfg.wake_gate {
            while !gate.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let _t = self.transition.lock().await;
        let left = self.wake_failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.wake_failures_left.store(left - 1, Ordering::SeqCst);
            return Err(EngineError::Failed(
                "CUDA error: out of memory (simulated wake failure)".into(),
            ));
        }
        let all = tags.is_empty();
        let want_weights = all || tags.iter().any(|t| t == "weights");
        let want_kv = all || tags.iter().any(|t| t == "kv_cache");
        if let Some(bad) = tags.iter().find(|t| *t != "weights" && *t != "kv_cache") {
            return Err(EngineError::Failed(format!("unknown wake_up tag {bad:?}")));
        }
        let s = self.state();
        if s.level != 0 && !self.cfg.wake_fixed.is_zero() {
            tokio::time::sleep(self.cfg.wake_fixed).await;
        }
        if want_weights && !s.weights_on_gpu {
            if s.level == 1 {
                tokio::time::sleep(SimConfig::transfer_time(
                    self.cfg.weights_bytes,
                    self.cfg.h2d_bandwidth,
                ))
                .await;
            }
            self.set_state(|s| {
                s.weights_on_gpu = true;
                // Level 2 discarded the weights: the buffers come back uninitialized.
                s.weights_valid = s.level == 1;
            });
        }
        if want_kv {
            self.set_state(|s| s.kv_on_gpu = true);
        }
        self.set_state(|s| {
            if s.weights_on_gpu && s.kv_on_gpu {
                s.level = 0;
                s.leaked = 0;
            }
        });
        if !self.is_sleeping() {
            self.wakes_done.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    pub async fn reload_weights(&self) -> Result<(), EngineError> {
        let _t = self.transition.lock().await;
        if !self.state().weights_on_gpu {
            return Err(EngineError::Failed(
                "reload_weights: weights are not allocated; wake_up(tags=[\"weights\"]) first"
                    .into(),
            ));
        }
        tokio::time::sleep(SimConfig::transfer_time(
            self.cfg.weights_bytes,
            self.cfg.disk_bandwidth,
        ))
        .await;
        self.set_state(|s| s.weights_valid = true);
        Ok(())
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn update_cache_usage(&self, running: usize) {
        self.metrics
            .cache_usage
            .set(running as f64 / self.cfg.max_num_seqs.max(1) as f64);
    }

    /// Waits for a sequence slot, counting the wait as vLLM does.
    pub async fn admit(self: &Arc<Self>) -> RunGuard {
        self.metrics.waiting.inc();
        let permit = self
            .seqs
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        self.metrics.waiting.dec();
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.running.set(now as i64);
        self.update_cache_usage(now);
        RunGuard {
            engine: self.clone(),
            _permit: permit,
        }
    }

    /// Prefills `tokens` prompt tokens, queued behind the prefills before it. Returns
    /// when the first token can be sent.
    pub async fn prefill(&self, tokens: u32) {
        let rate = self.cfg.prefill_tokens_per_second;
        if rate > 0.0 {
            let _lane = self.prefill.lock().await;
            tokio::time::sleep(Duration::from_secs_f64(f64::from(tokens) / rate)).await;
        }
        if !self.cfg.ttft.is_zero() {
            tokio::time::sleep(self.cfg.ttft).await;
        }
    }

    /// Aborts every running request, as vLLM does for requests whose client went away.
    pub fn abort_running(&self) {
        self.abort.send_if_modified(|n| {
            *n += 1;
            true
        });
    }

    pub fn abort_signal(&self) -> Subscriber<u64> {
        self.abort.subscribe()
    }

    /// A request finished; the crash fault fires after the configured count.
    pub fn finished(&self) {
        let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        if self
            .cfg
            .crash_after_requests
            .is_some_and(|limit| n >= limit)
        {
            tracing::warn!(requests = n, "simulated crash");
            tokio::spawn(async {
                // Let the last response reach the client before dying.
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::process::exit(70);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn injected_wake_faults_strike_the_next_wakes_then_wakes_work_again() {
        let e = SimEngine::new(SimConfig::for_model("m"));
        e.sleep(1, false).await.unwrap();
        e.fail_next_wakes(2);
        assert!(e.wake(&[]).await.is_err());
        assert!(e.wake(&[]).await.is_err());
        assert!(e.is_sleeping());
        e.hang_next_wakes(1);
        let hung = tokio::time::timeout(Duration::from_secs(600), e.wake(&[])).await;
        assert!(hung.is_err(), "the hung wake never answers");
        assert!(e.is_sleeping());
        e.wake(&[]).await.unwrap();
        assert!(!e.is_sleeping());
    }

    #[tokio::test(start_paused = true)]
    async fn aborting_running_requests_signals_every_one_of_them() {
        let e = SimEngine::new(SimConfig::for_model("m"));
        let mut signals = [e.abort_signal(), e.abort_signal()];
        e.abort_running();
        for signal in &mut signals {
            tokio::time::timeout(std::time::Duration::from_secs(1), signal.changed())
                .await
                .expect("signalled")
                .expect("the engine is alive");
        }
    }
}
