//! The sidecar's core: one state machine, one queue, the wake and sleep paths, and the
//! ledger claims that go with them.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use greenthread_gpu::MemoryProbe;
use greenthread_ledger::{Ledger, LedgerError, decide};
use jiff::Timestamp;
use tokio::sync::{Notify, oneshot, watch};

use crate::{
    SidecarConfig,
    engine::{EngineAdapter, EngineError},
    metrics::SidecarMetrics,
    process::EngineProcess,
    state::{Event, State, transition},
};

/// A GPU this sidecar's engine uses: its ledger record name and device index.
#[derive(Debug, Clone)]
pub struct GpuRef {
    pub name: String,
    pub index: u32,
}

/// Why a request was not admitted.
#[derive(Debug, Clone)]
pub enum Rejection {
    QueueFull { depth: usize },
    Deadline { waited: Duration, reason: String },
    Failed(String),
}

type Admission = Result<InFlight, String>;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Admission>,
}

struct Inner {
    state: State,
    boot_ready: bool,
    queue: VecDeque<Waiter>,
    next_waiter: u64,
    in_flight: usize,
    last_activity: Instant,
    serving_since: Option<Instant>,
    /// When the first request of the current wake arrived.
    demand_since: Option<Instant>,
    /// The engine must be cold-started before it can serve again.
    engine_lost: bool,
    /// Set by `shutdown`: no engine is started again.
    shutting_down: bool,
    /// What queued requests are waiting on, for the error they get at their deadline.
    waiting_on: String,
    /// Bytes per GPU to claim on the next wake.
    reserve_bytes: u64,
    /// Bytes per GPU claimed now (0 while sleeping).
    claimed_bytes: u64,
    residual_bytes: Vec<(u32, u64)>,
    serving_bytes: Vec<(u32, u64)>,
}

/// Tries of one ledger write before it is left to the heartbeat's reconcile (about 20 s
/// of backoff in all).
const LEDGER_WRITE_ATTEMPTS: u32 = 8;

pub struct Sidecar {
    pub cfg: SidecarConfig,
    pub pod: String,
    pub metrics: SidecarMetrics,
    engine: Arc<dyn EngineAdapter>,
    process: Option<Arc<EngineProcess>>,
    ledger: Arc<dyn Ledger>,
    gpus: Vec<GpuRef>,
    probe: Option<Arc<dyn MemoryProbe>>,
    heartbeat_started: std::sync::atomic::AtomicBool,
    /// Engine responses that timed out in a row (a wedged engine is restarted).
    engine_timeouts: std::sync::atomic::AtomicU32,
    inner: Mutex<Inner>,
    state_tx: watch::Sender<State>,
    /// Every transition, in order (a watch would coalesce quick ones).
    transitions: tokio::sync::broadcast::Sender<(State, State)>,
    in_flight_tx: watch::Sender<usize>,
    /// Signalled when the queue empties while a wake waits for memory.
    queue_emptied: Notify,
    /// Serializes sleeps (idle, admin, preemption).
    sleep_lock: tokio::sync::Mutex<()>,
    models_cache: Mutex<Option<Bytes>>,
}

/// An admitted request's slot at the engine; released (and the idle clock restarted)
/// when dropped, i.e. when the response body has been sent or abandoned.
pub struct InFlight {
    sidecar: Arc<Sidecar>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.sidecar.inner.lock().unwrap();
        inner.in_flight -= 1;
        inner.last_activity = Instant::now();
        self.sidecar.metrics.in_flight.set(inner.in_flight as i64);
        self.sidecar.publish_in_flight(inner.in_flight);
    }
}

/// Removes a queued request when its client goes away or its deadline passes.
struct QueuedGuard<'a> {
    sidecar: &'a Arc<Sidecar>,
    id: u64,
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.sidecar.inner.lock().unwrap();
        if let Some(pos) = inner.queue.iter().position(|w| w.id == self.id) {
            inner.queue.remove(pos);
            self.sidecar
                .metrics
                .queue_depth
                .set(inner.queue.len() as i64);
            if inner.queue.is_empty() {
                self.sidecar.queue_emptied.notify_waiters();
            }
        }
    }
}

pub struct Parts {
    pub engine: Arc<dyn EngineAdapter>,
    pub process: Option<Arc<EngineProcess>>,
    pub ledger: Arc<dyn Ledger>,
    pub gpus: Vec<GpuRef>,
    pub probe: Option<Arc<dyn MemoryProbe>>,
}

impl Sidecar {
    pub fn new(cfg: SidecarConfig, parts: Parts) -> Arc<Self> {
        Self::with_metrics(cfg, parts, SidecarMetrics::new())
    }

    /// A sidecar whose series go to shared families (several sidecars in one process).
    pub fn with_metrics(cfg: SidecarConfig, parts: Parts, metrics: SidecarMetrics) -> Arc<Self> {
        for g in &parts.gpus {
            metrics.set_reserved(g.index, 0);
            metrics.set_serving(g.index, 0);
            metrics.set_residual(g.index, 0);
        }
        Arc::new(Self {
            pod: cfg.pod_name(),
            metrics,
            engine: parts.engine,
            process: parts.process,
            ledger: parts.ledger,
            gpus: parts.gpus,
            probe: parts.probe,
            heartbeat_started: std::sync::atomic::AtomicBool::new(false),
            engine_timeouts: Default::default(),
            inner: Mutex::new(Inner {
                state: State::Sleeping,
                boot_ready: false,
                queue: VecDeque::new(),
                next_waiter: 0,
                in_flight: 0,
                last_activity: Instant::now(),
                serving_since: None,
                demand_since: None,
                engine_lost: false,
                shutting_down: false,
                waiting_on: "the engine is booting".into(),
                reserve_bytes: cfg.memory_bytes.unwrap_or(0),
                claimed_bytes: 0,
                residual_bytes: vec![],
                serving_bytes: vec![],
            }),
            state_tx: watch::Sender::new(State::Sleeping),
            transitions: tokio::sync::broadcast::Sender::new(256),
            in_flight_tx: watch::Sender::new(0),
            queue_emptied: Notify::new(),
            sleep_lock: tokio::sync::Mutex::new(()),
            models_cache: Mutex::new(None),
            cfg,
        })
    }

    pub fn state(&self) -> State {
        self.inner.lock().unwrap().state
    }

    /// Every state transition `(from, to)` from now on.
    pub fn transitions(&self) -> tokio::sync::broadcast::Receiver<(State, State)> {
        self.transitions.subscribe()
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    pub fn cached_models(&self) -> Option<Bytes> {
        self.models_cache.lock().unwrap().clone()
    }

    pub fn engine(&self) -> &Arc<dyn EngineAdapter> {
        &self.engine
    }

    pub fn status_json(&self) -> serde_json::Value {
        let inner = self.inner.lock().unwrap();
        serde_json::json!({
            "model": self.cfg.model,
            "pod": self.pod,
            "state": inner.state.as_str(),
            "bootReady": inner.boot_ready,
            "queue": {
                "depth": inner.queue.len(),
                "inFlight": inner.in_flight,
                "barriered": inner.state == State::Deactivating,
            },
            "memory": {
                "reservedBytes": inner.claimed_bytes,
                "servingBytes": inner.serving_bytes.iter().map(|(g, b)| serde_json::json!({"gpu": g, "bytes": b})).collect::<Vec<_>>(),
                "residualBytes": inner.residual_bytes.iter().map(|(g, b)| serde_json::json!({"gpu": g, "bytes": b})).collect::<Vec<_>>(),
            },
        })
    }

    pub fn boot_ready(&self) -> bool {
        self.inner.lock().unwrap().boot_ready
    }

    /// Watchers only care whether anything is in flight: wake them on 0 ↔ busy alone,
    /// not on every request.
    fn publish_in_flight(&self, n: usize) {
        self.in_flight_tx.send_if_modified(|current| {
            let crossed = (*current == 0) != (n == 0);
            *current = n;
            crossed
        });
    }

    /// Applies `event` to the state machine; an illegal event is a bug, logged and ignored.
    fn apply(&self, inner: &mut Inner, event: Event) -> bool {
        match transition(inner.state, event) {
            Ok(to) => {
                let from = inner.state;
                inner.state = to;
                self.metrics.set_state(to);
                self.state_tx.send_replace(to);
                let _ = self.transitions.send((from, to));
                tracing::info!(model = %self.cfg.model, %from, %to, ?event, "state changed");
                true
            }
            Err(e) => {
                tracing::error!(model = %self.cfg.model, error = %e, "ignored");
                false
            }
        }
    }

    fn admit_locked(self: &Arc<Self>, inner: &mut Inner) -> InFlight {
        inner.in_flight += 1;
        inner.last_activity = Instant::now();
        self.metrics.in_flight.set(inner.in_flight as i64);
        self.publish_in_flight(inner.in_flight);
        InFlight {
            sidecar: self.clone(),
        }
    }

    /// Starts a wake if the model sleeps and is booted; the caller holds the lock.
    fn demand_locked(self: &Arc<Self>, inner: &mut Inner) {
        if inner.state == State::Sleeping && inner.boot_ready && !inner.queue.is_empty() {
            inner.demand_since.get_or_insert_with(Instant::now);
            inner.waiting_on = "waiting for GPU memory".into();
            if self.apply(inner, Event::Demand) {
                tokio::spawn(self.clone().run_wake());
            }
        }
    }

    /// Admits a request at once when serving; otherwise queues it until the model
    /// serves, its deadline passes, or its client goes away (the future is dropped).
    pub async fn admit(self: &Arc<Self>) -> Result<InFlight, Rejection> {
        let arrived = Instant::now();
        let (id, rx) = {
            let mut inner = self.inner.lock().unwrap();
            if inner.state == State::Serving && inner.queue.is_empty() {
                return Ok(self.admit_locked(&mut inner));
            }
            if inner.queue.len() >= self.cfg.max_queue {
                self.metrics.rejection("queue_full");
                return Err(Rejection::QueueFull {
                    depth: inner.queue.len(),
                });
            }
            let (tx, rx) = oneshot::channel();
            let id = inner.next_waiter;
            inner.next_waiter += 1;
            inner.queue.push_back(Waiter { id, tx });
            self.metrics.queue_depth.set(inner.queue.len() as i64);
            match inner.state {
                State::Sleeping if inner.boot_ready => {
                    inner.demand_since = Some(arrived);
                    self.demand_locked(&mut inner);
                }
                State::Pending | State::Waking => {
                    self.metrics.wake_dedups.inc();
                }
                // Held by the barrier (or boot) and served after the next wake.
                _ => {}
            }
            (id, rx)
        };
        let _queued = QueuedGuard { sidecar: self, id };
        match tokio::time::timeout(self.cfg.queue_timeout, rx).await {
            Ok(Ok(Ok(slot))) => Ok(slot),
            Ok(Ok(Err(reason))) => {
                self.metrics.rejection("failed");
                Err(Rejection::Failed(reason))
            }
            Ok(Err(_)) => {
                self.metrics.rejection("failed");
                Err(Rejection::Failed("the sidecar is shutting down".into()))
            }
            Err(_) => {
                self.metrics.rejection("deadline");
                let inner = self.inner.lock().unwrap();
                Err(Rejection::Deadline {
                    waited: arrived.elapsed(),
                    reason: format!(
                        "model {} is {}: {}",
                        self.cfg.model, inner.state, inner.waiting_on
                    ),
                })
            }
        }
    }

    /// Releases every queued request in arrival order (the model serves now).
    fn release_queue_locked(self: &Arc<Self>, inner: &mut Inner) {
        while let Some(w) = inner.queue.pop_front() {
            let slot = self.admit_locked(inner);
            // A waiter that left drops its slot with the unsent value.
            let _ = w.tx.send(Ok(slot));
        }
        self.metrics.queue_depth.set(0);
    }

    fn fail_queue_locked(&self, inner: &mut Inner, reason: &str) {
        while let Some(w) = inner.queue.pop_front() {
            let _ = w.tx.send(Err(reason.to_string()));
        }
        self.metrics.queue_depth.set(0);
    }

    // ----- ledger -----

    fn claim_for(&self, bytes: u64) -> decide::Claim {
        decide::Claim {
            pod: self.pod.clone(),
            model: self.cfg.model.clone(),
            bytes,
            popular: self.cfg.popular,
            min_runtime: self.cfg.min_runtime,
        }
    }

    /// Read-modify-write of one GPU record. A write the backend failed (the API server
    /// unreachable, contention past the bound) is retried with capped exponential backoff
    /// and jitter; what still fails is corrected later by the heartbeat's reconcile.
    async fn ledger_update<T: Send>(
        &self,
        gpu: &str,
        mut decide: impl FnMut(
            &greenthread_api::Gpu,
        ) -> Result<(Option<greenthread_api::GpuStatus>, T), ClaimError>
        + Send,
    ) -> Result<T, ClaimError> {
        let conflicts = &self.metrics.cas_conflicts;
        let mut backoff =
            greenthread_ledger::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = greenthread_ledger::update(
                &*self.ledger,
                gpu,
                &|| {
                    conflicts.inc();
                },
                &mut decide,
            )
            .await;
            match r {
                Err(ClaimError::Ledger(e))
                    if e.is_transient()
                        && attempt < LEDGER_WRITE_ATTEMPTS
                        && !self.inner.lock().unwrap().shutting_down =>
                {
                    tracing::warn!(gpu, attempt, error = %e, reason = e.metric_label(), "ledger write failed; retrying");
                    backoff.wait().await;
                }
                other => return other,
            }
        }
    }

    /// Takes the wake lock and claims `bytes` on every GPU. While it does not fit, it
    /// declares an intent, waits up to `maxWaitTime` for memory to free by itself, then
    /// names a victim; every wait reacts to ledger changes at once. `None` if nobody
    /// waits any more (when `abandonable`).
    async fn claim_all(&self, bytes: u64, abandonable: bool) -> Result<Option<()>, ClaimError> {
        let mut claimed: Vec<&GpuRef> = Vec::new();
        for gpu in &self.gpus {
            match self.claim_one(gpu, bytes, abandonable).await {
                Ok(Some(())) => claimed.push(gpu),
                other => {
                    self.withdraw(gpu).await;
                    // Undo: what the engine holds while asleep is charged again.
                    let residual = self.inner.lock().unwrap().residual_bytes.clone();
                    for g in claimed {
                        let r = residual
                            .iter()
                            .find(|(i, _)| *i == g.index)
                            .map_or(0, |(_, b)| *b);
                        self.release_gpu(g, r).await;
                    }
                    return other;
                }
            }
        }
        Ok(Some(()))
    }

    async fn claim_one(
        &self,
        gpu: &GpuRef,
        bytes: u64,
        abandonable: bool,
    ) -> Result<Option<()>, ClaimError> {
        let mut changes = self.ledger.watch(&gpu.name)?;
        let ttl = self.cfg.wake_lock_ttl;
        let claim = self.claim_for(bytes);
        let pod = self.pod.clone();
        // When this wake started waiting for memory on this GPU (the fairness clock).
        let mut short_since: Option<Instant> = None;
        loop {
            changes.borrow_and_update();
            let result = self
                .ledger_update(&gpu.name, |g| {
                    let now = Timestamp::now();
                    let locked = decide::acquire_wake_lock(
                        &decide::register(&g.status, &claim, now),
                        &pod,
                        ttl,
                        now,
                    )?;
                    Ok((Some(decide::claim(&g.spec, &locked, &claim, now)?), ()))
                })
                .await;
            // Lock expiry is a matter of time; so is a victim's minRuntime and maxWaitTime.
            let mut recheck = tokio::time::Instant::now() + ttl;
            match result {
                Ok(()) => return Ok(Some(())),
                Err(ClaimError::Refused(decide::Refusal::DoesNotFit { .. })) => {
                    let since = *short_since.get_or_insert_with(Instant::now);
                    let waiting = self.preempt_or_wait(gpu, bytes, since).await?;
                    self.inner.lock().unwrap().waiting_on =
                        format!("gpu {}: {}", gpu.index, waiting.0);
                    if let Some(at) = waiting.1 {
                        recheck = recheck.min(at);
                    }
                }
                Err(ClaimError::Refused(why)) => {
                    self.inner.lock().unwrap().waiting_on = format!("gpu {}: {why}", gpu.index);
                }
                Err(e) => return Err(e),
            }
            let emptied = self.queue_emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if abandonable && self.inner.lock().unwrap().queue.is_empty() {
                return Ok(None);
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = &mut emptied => {}
                _ = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// Declares the intent, and once `maxWaitTime` has passed names a victim. Returns what
    /// the wake waits on, and when to look again if only time can change it.
    async fn preempt_or_wait(
        &self,
        gpu: &GpuRef,
        bytes: u64,
        since: Instant,
    ) -> Result<(String, Option<tokio::time::Instant>), ClaimError> {
        let pod = self.pod.clone();
        let model = self.cfg.model.clone();
        let max_wait = self.cfg.max_wait_time;
        let fairness_over = since.elapsed() >= max_wait;
        let (named, waiting, next) = self
            .ledger_update(&gpu.name, |g| {
                let now = Timestamp::now();
                let with_intent = decide::write_intent(&g.status, &pod, &model, bytes, now);
                if !fairness_over {
                    let msg =
                        format!("waiting up to {max_wait:?} for memory to free before preempting");
                    return Ok((Some(with_intent), (None, msg, None)));
                }
                match decide::choose_victims(&g.spec, &with_intent, &pod, bytes, now) {
                    Ok(victims) => match victims.first() {
                        Some(v) => {
                            let already = with_intent.preemption_intents.iter().any(|i| {
                                i.pod_name == pod && i.victim_pod_name.as_deref() == Some(v)
                            });
                            let next = decide::name_victim(&with_intent, &pod, v);
                            let named = (!already).then(|| v.clone());
                            Ok((Some(next), (named, format!("preempting {v}"), None)))
                        }
                        None => Ok((
                            Some(with_intent),
                            (None, "memory is free; claiming".into(), None),
                        )),
                    },
                    Err(why) => {
                        let next = decide::next_eligibility(&with_intent, &pod, now);
                        Ok((Some(with_intent), (None, why.to_string(), next)))
                    }
                }
            })
            .await?;
        if let Some(victim) = named {
            self.metrics.preemption("preemptor");
            tracing::info!(model = %self.cfg.model, gpu = %gpu.name, %victim, "preempting");
        }
        let deadline = if fairness_over {
            next.map(|t: Timestamp| {
                let wait = Timestamp::now().duration_until(t).unsigned_abs();
                tokio::time::Instant::now() + wait
            })
        } else {
            Some(tokio::time::Instant::from_std(since + max_wait))
        };
        Ok((waiting, deadline))
    }

    /// Sleeps this model when another sidecar names it as its victim.
    pub async fn run_preemption_watch(self: Arc<Self>) {
        let mut watches = Vec::new();
        for gpu in &self.gpus {
            match self.ledger.watch(&gpu.name) {
                Ok(w) => watches.push(w),
                Err(e) => tracing::error!(gpu = %gpu.name, error = %e, "cannot watch the ledger"),
            }
        }
        if watches.is_empty() {
            return;
        }
        loop {
            let chosen = watches
                .iter_mut()
                .any(|w| decide::is_victim(&w.borrow_and_update().status, &self.pod));
            if chosen && self.state() == State::Serving {
                match self.deactivate("preempted").await {
                    Ok(()) => self.metrics.preemption("preempted"),
                    Err(e) => tracing::debug!(error = %e, "preemption found nothing to sleep"),
                }
                continue;
            }
            let changed =
                futures_util::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed())))
                    .await;
            if changed.0.is_err() {
                return;
            }
        }
    }

    /// Gives up waiting on a GPU: drops this pod's intent and (if held) the wake lock.
    async fn withdraw(&self, gpu: &GpuRef) {
        let pod = self.pod.clone();
        let r = self
            .ledger_update(&gpu.name, |g| {
                let next = decide::release_wake_lock(&decide::clear_intent(&g.status, &pod), &pod);
                Ok((Some(next), ()))
            })
            .await;
        if let Err(e) = r {
            tracing::error!(gpu = %gpu.name, error = %e, "could not withdraw the intent");
        }
    }

    async fn release_gpu(&self, gpu: &GpuRef, residual: u64) {
        let pod = self.pod.clone();
        let r = self
            .ledger_update(&gpu.name, |g| {
                Ok((
                    Some(decide::release(&g.status, &pod, residual, Timestamp::now())),
                    (),
                ))
            })
            .await;
        if let Err(e) = r {
            tracing::error!(gpu = %gpu.name, error = %e, "could not release reservation");
        }
    }

    async fn release_all(&self, residual: &[(u32, u64)]) {
        for gpu in &self.gpus {
            let r = residual
                .iter()
                .find(|(i, _)| *i == gpu.index)
                .map_or(0, |(_, b)| *b);
            self.release_gpu(gpu, r).await;
            self.metrics.set_reserved(gpu.index, 0);
            self.metrics.set_residual(gpu.index, r);
        }
        let mut inner = self.inner.lock().unwrap();
        inner.claimed_bytes = 0;
        inner.residual_bytes = residual.to_vec();
    }

    async fn mark_serving(&self) {
        let pod = self.pod.clone();
        for gpu in &self.gpus {
            let r = self
                .ledger_update(&gpu.name, |g| {
                    let now = Timestamp::now();
                    let serving = decide::mark_serving(&g.status, &pod, now)?;
                    Ok((Some(decide::release_wake_lock(&serving, &pod)), ()))
                })
                .await;
            if let Err(e) = r {
                tracing::error!(gpu = %gpu.name, error = %e, "could not mark serving");
            }
        }
    }

    /// What the engine holds per GPU, as measured (never assumed).
    async fn measure(&self) -> Option<Vec<(u32, u64)>> {
        let probe = self.probe.as_ref()?;
        match probe.engine_memory().await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "could not measure engine memory");
                None
            }
        }
    }

    // ----- engine -----

    async fn wait_engine_up(&self) -> Result<(), String> {
        let start = Instant::now();
        let mut last_report = start;
        loop {
            match self.engine.health().await {
                Ok(()) => return Ok(()),
                // An engine we started that exited will not come up: say so now.
                Err(e) if self.process.as_ref().is_some_and(|p| !p.is_running()) => {
                    return Err(format!("engine process exited during start-up: {e}"));
                }
                Err(e) if start.elapsed() > self.cfg.boot_timeout => {
                    return Err(format!(
                        "engine did not come up within {:?}: {e}",
                        self.cfg.boot_timeout
                    ));
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

    /// Stops (if owned) and starts the engine, and waits until it answers.
    async fn cold_start(&self) -> Result<(), String> {
        if let Some(p) = &self.process {
            p.restart(Duration::from_secs(10))
                .await
                .map_err(|e| e.to_string())?;
        }
        self.wait_engine_up().await?;
        if let Ok(models) = self.engine.models().await {
            *self.models_cache.lock().unwrap() = Some(models);
        }
        self.inner.lock().unwrap().engine_lost = false;
        Ok(())
    }

    /// Awake by its own account (`/is_sleeping` or its sleep-state metric, never
    /// `/health`), and serving: one token within the warm-up deadline.
    async fn verify_awake(&self) -> Result<(), String> {
        match self.engine.is_sleeping().await {
            Ok(false) => {}
            Ok(true) => return Err("engine still reports is_sleeping=true after waking".into()),
            Err(e) => return Err(e.to_string()),
        }
        match tokio::time::timeout(
            self.cfg.warmup_timeout,
            self.engine.warm_up(&self.cfg.model),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("warm-up failed: {e}")),
            Err(_) => Err(format!(
                "engine is wedged: a one-token warm-up got no answer within {:?}",
                self.cfg.warmup_timeout
            )),
        }
    }

    /// Wakes the engine: retries the wake call, then cold restarts; the restart budget
    /// bounds how long queued requests wait on a broken engine.
    async fn bring_engine_up(&self) -> Result<(), String> {
        let mut attempts = 0;
        let mut restarts = 0;
        let mut last_error = String::from("engine was lost");
        loop {
            let (lost, shutting_down) = {
                let inner = self.inner.lock().unwrap();
                (inner.engine_lost, inner.shutting_down)
            };
            if shutting_down {
                return Err("the sidecar is shutting down".into());
            }
            if lost || attempts >= self.cfg.wake_attempts {
                if restarts >= self.cfg.max_restarts {
                    return Err(format!(
                        "engine failed to wake after {restarts} cold restarts: {last_error}"
                    ));
                }
                restarts += 1;
                self.metrics.engine_restarts.inc();
                tracing::warn!(model = %self.cfg.model, restarts, error = %last_error, "cold restart of the engine");
                self.inner.lock().unwrap().waiting_on =
                    format!("engine cold restart #{restarts} after: {last_error}");
                match self.cold_start().await {
                    Ok(()) => {}
                    Err(e) => {
                        last_error = e;
                        continue;
                    }
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
                        last_error = e.to_string();
                        continue;
                    }
                }
            }
            attempts += 1;
            self.inner.lock().unwrap().waiting_on = "the engine is waking".into();
            let woke = match tokio::time::timeout(
                self.cfg.wake_timeout,
                self.engine.wake(self.cfg.sleep_level),
            )
            .await
            {
                Ok(Ok(())) => self.verify_awake().await,
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(EngineError::Timeout("wake_up").to_string()),
            };
            match woke {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.metrics.wake_failures.inc();
                    tracing::warn!(model = %self.cfg.model, attempt = attempts, error = %e, "wake failed");
                    last_error = e;
                }
            }
        }
    }

    async fn run_wake(self: Arc<Self>) {
        let bytes = self.inner.lock().unwrap().reserve_bytes;
        match self.claim_all(bytes, true).await {
            Ok(Some(())) => {}
            Ok(None) => {
                let mut inner = self.inner.lock().unwrap();
                inner.demand_since = None;
                self.apply(&mut inner, Event::Abandoned);
                return;
            }
            Err(e) => {
                let mut inner = self.inner.lock().unwrap();
                let reason = format!("could not claim GPU memory: {e}");
                self.fail_queue_locked(&mut inner, &reason);
                inner.demand_since = None;
                self.apply(&mut inner, Event::Abandoned);
                return;
            }
        }
        {
            let mut inner = self.inner.lock().unwrap();
            inner.claimed_bytes = bytes;
            self.apply(&mut inner, Event::Claimed);
        }
        for g in &self.gpus {
            self.metrics.set_reserved(g.index, bytes);
            self.metrics.set_residual(g.index, 0);
        }
        match self.bring_engine_up().await {
            Ok(()) => {
                self.mark_serving().await;
                {
                    let mut inner = self.inner.lock().unwrap();
                    if let Some(since) = inner.demand_since.take() {
                        self.metrics
                            .wake_duration
                            .observe(since.elapsed().as_secs_f64());
                    }
                    inner.serving_since = Some(Instant::now());
                    inner.last_activity = Instant::now();
                    inner.residual_bytes.clear();
                    inner.waiting_on = String::new();
                    self.apply(&mut inner, Event::Awake);
                    self.release_queue_locked(&mut inner);
                }
                if let Some(m) = self.measure().await {
                    self.record_serving(&m);
                }
            }
            Err(reason) => {
                tracing::error!(model = %self.cfg.model, %reason, "wake failed for good");
                // The engine is in an unknown state: stop it so it holds nothing.
                if let Some(p) = &self.process {
                    p.stop(Duration::from_secs(5)).await;
                }
                self.release_all(&[]).await;
                let mut inner = self.inner.lock().unwrap();
                inner.engine_lost = self.process.is_some();
                inner.demand_since = None;
                self.fail_queue_locked(&mut inner, &reason);
                self.apply(&mut inner, Event::WakeFailed);
            }
        }
    }

    fn record_serving(&self, measured: &[(u32, u64)]) {
        for (gpu, bytes) in measured {
            self.metrics.set_serving(*gpu, *bytes);
        }
        let mut inner = self.inner.lock().unwrap();
        inner.serving_bytes = measured.to_vec();
        if self.cfg.memory_bytes.is_none()
            && let Some(max) = measured.iter().map(|(_, b)| *b).max()
            && max > 0
        {
            inner.reserve_bytes = max;
        }
    }

    /// Raises the barrier, drains (at most `drainTimeout`), puts the engine to sleep,
    /// measures what it still holds and releases the reservation.
    pub async fn deactivate(self: &Arc<Self>, why: &str) -> Result<(), String> {
        let _one_at_a_time = self.sleep_lock.lock().await;
        let started = Instant::now();
        {
            let mut inner = self.inner.lock().unwrap();
            if inner.state != State::Serving {
                return Err(format!("model is {}, not serving", inner.state));
            }
            inner.waiting_on = "the model is going to sleep; held until the next wake".into();
            self.apply(&mut inner, Event::Deactivate);
        }
        tracing::info!(model = %self.cfg.model, why, "deactivating");
        let mut in_flight = self.in_flight_tx.subscribe();
        let drained = tokio::time::timeout(self.cfg.drain_timeout, in_flight.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !drained {
            self.metrics.barrier_timeouts.inc();
            tracing::warn!(model = %self.cfg.model, timeout = ?self.cfg.drain_timeout, "drain timed out; sleeping anyway");
        }
        let slept = tokio::time::timeout(
            self.cfg.wake_timeout,
            self.engine.sleep(self.cfg.sleep_level),
        )
        .await;
        if let Err(e) = slept
            .map_err(|_| EngineError::Timeout("sleep"))
            .and_then(|r| r)
        {
            // An engine that cannot sleep cannot be trusted with memory: stop it.
            tracing::error!(model = %self.cfg.model, error = %e, "engine sleep failed; stopping it");
            if let Some(p) = &self.process {
                p.stop(Duration::from_secs(5)).await;
            }
            self.inner.lock().unwrap().engine_lost = true;
        }
        let residual = self.measure().await.unwrap_or_default();
        self.release_all(&residual).await;
        let mut inner = self.inner.lock().unwrap();
        inner.serving_since = None;
        self.metrics
            .sleep_duration
            .observe(started.elapsed().as_secs_f64());
        self.apply(&mut inner, Event::Slept);
        self.demand_locked(&mut inner);
        Ok(())
    }

    /// The engine died (process exit) or stopped answering connections.
    pub fn engine_lost(self: &Arc<Self>, why: &str) {
        let mut inner = self.inner.lock().unwrap();
        if inner.engine_lost {
            return;
        }
        inner.engine_lost = true;
        tracing::warn!(model = %self.cfg.model, state = %inner.state, why, "engine lost");
        if inner.state == State::Serving && self.apply(&mut inner, Event::EngineLost) {
            inner.serving_since = None;
            drop(inner);
            let me = self.clone();
            tokio::spawn(async move {
                // A dead process holds nothing; measure anyway rather than assume.
                let residual = me.measure().await.unwrap_or_default();
                me.release_all(&residual).await;
                let mut inner = me.inner.lock().unwrap();
                me.demand_locked(&mut inner);
            });
        }
    }

    /// The engine answered a request: it is not wedged.
    pub fn engine_answered(&self) {
        self.engine_timeouts
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// A request got no response headers within `after`. Enough of them in a row mean a
    /// wedged engine (it takes connections, never answers): restart it as if lost.
    pub fn engine_timed_out(self: &Arc<Self>, after: Duration) {
        let n = self
            .engine_timeouts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::warn!(model = %self.cfg.model, timeouts = n, ?after, "engine response timed out");
        if n >= self.cfg.engine_timeouts_before_restart {
            self.engine_timeouts
                .store(0, std::sync::atomic::Ordering::Relaxed);
            self.engine_lost(&format!(
                "engine wedged: {n} responses in a row timed out after {after:?}"
            ));
        }
    }

    /// Boot: claim memory under the wake lock, start the engine, measure it serving,
    /// put it to sleep, measure what it keeps, release. Then `sleeping` and ready.
    pub async fn boot(self: &Arc<Self>) -> anyhow::Result<()> {
        // A boot holds the GPU's wake lock for as long as the engine takes to start
        // (minutes for vLLM): heartbeats keep it from lapsing, so that no other engine
        // starts beside it (concurrent start-ups on one GPU fail).
        self.start_heartbeat();
        let boot_bytes = match self.cfg.memory_bytes {
            Some(b) => b,
            None => {
                // Unknown until measured: reserve what is free, as vLLM takes its share.
                let mut free = u64::MAX;
                for g in &self.gpus {
                    let rec = self.ledger.get(&g.name).await?;
                    free = free.min(decide::available_bytes(
                        &rec.spec,
                        &rec.status,
                        Some(&self.pod),
                    ));
                }
                free
            }
        };
        self.claim_all(boot_bytes, false).await?;
        // Whatever fails from here on, the claim and the wake lock are given back.
        let booted = async {
            if let Some(p) = &self.process {
                p.start().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            self.wait_engine_up()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Ok(models) = self.engine.models().await {
                *self.models_cache.lock().unwrap() = Some(models);
            }
            if !self.engine.is_sleeping().await? {
                if let Some(m) = self.measure().await {
                    self.record_serving(&m);
                }
                // Bounded like a wake: a boot holds the GPU's wake lock while it runs.
                tokio::time::timeout(
                    self.cfg.wake_timeout,
                    self.engine.sleep(self.cfg.sleep_level),
                )
                .await
                .map_err(|_| EngineError::Timeout("sleep at boot"))??;
            }
            anyhow::Ok(())
        };
        if let Err(e) = booted.await {
            self.release_all(&[]).await;
            return Err(e);
        }
        let residual = self.measure().await.unwrap_or_default();
        self.release_all(&residual).await;
        let mut inner = self.inner.lock().unwrap();
        if inner.reserve_bytes == 0 {
            tracing::warn!(model = %self.cfg.model, "no memory probe and no --memory-bytes: wakes reserve nothing");
        }
        inner.boot_ready = true;
        inner.last_activity = Instant::now();
        tracing::info!(model = %self.cfg.model, reserve = inner.reserve_bytes, "booted; sleeping until the first request");
        self.demand_locked(&mut inner);
        Ok(())
    }

    /// Sleeps the model after `idleTimeout` without inference (and `minRuntime` served).
    /// It wakes only at deadlines and state changes, never per request: a finishing
    /// request moves `last_activity`, so the deadline is recomputed when it comes.
    pub async fn run_idle_timer(self: Arc<Self>) {
        let mut states = self.subscribe();
        loop {
            let (state, busy, deadline) = {
                let inner = self.inner.lock().unwrap();
                let idle_at = inner.last_activity + self.cfg.idle_timeout;
                let deadline = inner
                    .serving_since
                    .map_or(idle_at, |s| idle_at.max(s + self.cfg.min_runtime));
                (
                    inner.state,
                    inner.in_flight > 0 || !inner.queue.is_empty(),
                    deadline,
                )
            };
            if state != State::Serving {
                if states.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline && !busy {
                let _ = self.deactivate("idle").await;
                continue;
            }
            // Busy at the deadline: the request's end restarts the clock, look again then.
            let next = if now >= deadline {
                now + self.cfg.idle_timeout
            } else {
                deadline
            };
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = states.changed() => {}
            }
        }
    }

    /// The loops a booted sidecar runs: idle sleep, heartbeat, preemption watch.
    pub fn spawn_background(self: &Arc<Self>) {
        tokio::spawn(self.clone().run_idle_timer());
        self.start_heartbeat();
        tokio::spawn(self.clone().run_preemption_watch());
    }

    fn start_heartbeat(self: &Arc<Self>) {
        if !self
            .heartbeat_started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tokio::spawn(self.clone().run_heartbeat());
        }
    }

    /// Keeps this pod's ledger records alive (a silent holder's wake lock lapses), and
    /// brings them in line with what the sidecar knows when it is neither waking nor
    /// sleeping: a write that failed for good (marking serving, a release) is repaired
    /// here, so that no lock or reservation outlives its reason.
    pub async fn run_heartbeat(self: Arc<Self>) {
        let period = (self.cfg.wake_lock_ttl / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(period).await;
            let accessed = {
                let inner = self.inner.lock().unwrap();
                let ago = inner.last_activity.elapsed();
                Timestamp::now()
                    .checked_sub(jiff::SignedDuration::try_from(ago).unwrap_or_default())
                    .ok()
            };
            for gpu in &self.gpus {
                let pod = self.pod.clone();
                let _ = self
                    .ledger_update(&gpu.name, |g| {
                        if g.status.occupant(&pod).is_none() {
                            return Ok((None, ()));
                        }
                        let now = Timestamp::now();
                        let mut next = decide::touch(&g.status, &pod, accessed, now);
                        // Read inside the compare-and-swap: a wake or sleep that starts
                        // meanwhile changes the record, and this runs again.
                        if let Some(settled) = self.settled(gpu.index) {
                            next = decide::reconcile_own(&next, &pod, settled, now);
                        }
                        Ok((Some(next), ()))
                    })
                    .await;
            }
        }
    }

    /// What this pod's entry on GPU `index` must say, when no wake or sleep is under way.
    fn settled(&self, index: u32) -> Option<decide::Settled> {
        let inner = self.inner.lock().unwrap();
        if !inner.boot_ready || inner.shutting_down {
            return None;
        }
        match inner.state {
            State::Sleeping => Some(decide::Settled::Asleep {
                residual: inner
                    .residual_bytes
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or(0, |(_, b)| *b),
            }),
            State::Serving => Some(decide::Settled::Serving),
            _ => None,
        }
    }

    /// Shutdown: release the ledger and stop an owned engine.
    pub async fn shutdown(&self) {
        self.inner.lock().unwrap().shutting_down = true;
        if let Some(p) = &self.process {
            p.stop(Duration::from_secs(10)).await;
        }
        for gpu in &self.gpus {
            let pod = self.pod.clone();
            let _ = self
                .ledger_update(&gpu.name, |g| {
                    Ok((Some(decide::remove_pod(&g.status, &pod)), ()))
                })
                .await;
        }
        let mut inner = self.inner.lock().unwrap();
        self.fail_queue_locked(&mut inner, "the sidecar is shutting down");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Refused(#[from] decide::Refusal),
}
