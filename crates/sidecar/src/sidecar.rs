//! The lifecycle: owns the state and drives the parts through wakes and sleeps —
//! [`Admission`] (who reaches the engine), [`LedgerClient`] (this pod's GPU records) and
//! [`EngineDriver`] (the engine itself). Its background loops are owned in one set and
//! cancelled together at shutdown.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use greenthread_api::Priority;
use greenthread_gpu::MemoryProbe;
use greenthread_ledger::{Clock, Ledger, decide};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    SidecarConfig,
    admission::{Admission, Enter, Entry, InFlight, Waited},
    driver::EngineDriver,
    engine::EngineAdapter,
    error::{BootError, Failure, Rejection, SleepError, Stalled, WaitReason},
    ledger_client::{Claimed, GpuRef, LedgerClient},
    metrics::SidecarMetrics,
    process::EngineProcess,
    state::{Event, State, transition},
};

/// What a sidecar is made of besides its configuration.
pub struct Parts {
    pub engine: Arc<dyn EngineAdapter>,
    pub process: Option<Arc<EngineProcess>>,
    pub ledger: Arc<dyn Ledger>,
    pub gpus: Vec<GpuRef>,
    pub probe: Option<Arc<dyn MemoryProbe>>,
    /// What ledger records are stamped with ([`Clock::Wall`] but in virtual time).
    pub clock: Clock,
}

/// What the lifecycle knows; one lock, never held across an await.
struct Life {
    state: State,
    boot_ready: bool,
    serving_since: Option<Instant>,
    /// When the first request of the current wake arrived.
    demand_since: Option<Instant>,
    /// What queued requests wait on, for the error they get at their deadline.
    waiting: WaitReason,
    /// Bytes per GPU to claim on the next wake.
    reserve_bytes: u64,
    /// Bytes per GPU claimed now (0 while sleeping).
    claimed_bytes: u64,
    residual_bytes: Vec<(u32, u64)>,
    serving_bytes: Vec<(u32, u64)>,
    /// Host memory per GPU the engine's weights hold (asleep at level 1, or pinned).
    host_bytes: u64,
    /// The weights' bytes per GPU, as measured during the last wake.
    weights_bytes: Option<u64>,
    /// The last wake that served: how long it took from the first request, and where.
    last_wake: Option<(Duration, Vec<(&'static str, Duration)>)>,
}

/// Where a wake's time goes, phase by phase, as the reasons its requests wait change.
#[derive(Default)]
struct Phases {
    current: Option<(&'static str, Instant)>,
    spent: Vec<(&'static str, Duration)>,
}

impl Phases {
    /// The wake is in `phase` from now on (a repeated phase goes on).
    fn enter(&mut self, phase: &'static str) {
        if self.current.is_some_and(|(p, _)| p == phase) {
            return;
        }
        self.close();
        self.current = Some((phase, Instant::now()));
    }

    fn close(&mut self) {
        if let Some((phase, since)) = self.current.take() {
            let d = since.elapsed();
            match self.spent.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, total)) => *total += d,
                None => self.spent.push((phase, d)),
            }
        }
    }

    fn finish(mut self) -> Vec<(&'static str, Duration)> {
        self.close();
        self.spent
    }
}

/// The phase of a wake whose requests wait for `why`.
fn phase(why: &WaitReason) -> &'static str {
    use decide::GpuWait;
    match why {
        WaitReason::Gpu { why, .. } => match why {
            GpuWait::Refused(_) => "lock wait",
            GpuWait::Fairness { .. } => "fairness wait",
            GpuWait::Preempting { .. } => "victim drain and sleep",
            GpuWait::Claiming => "claim",
            GpuWait::NoVictim(_) => "waiting for memory",
        },
        WaitReason::EngineWaking => "engine wake",
        WaitReason::WarmingUp => "warm-up",
        WaitReason::ColdRestart { .. } => "cold restart",
        WaitReason::Booting => "boot",
        WaitReason::Memory | WaitReason::Nothing | WaitReason::GoingToSleep => "claim",
    }
}

pub struct Sidecar {
    pub cfg: SidecarConfig,
    pub pod: String,
    pub metrics: Arc<SidecarMetrics>,
    admission: Arc<Admission>,
    ledger: LedgerClient,
    driver: EngineDriver,
    life: Mutex<Life>,
    state_tx: watch::Sender<State>,
    /// Every transition, in order (a watch would coalesce quick ones).
    transitions: broadcast::Sender<(State, State)>,
    /// Bumped when the engine is about to sleep under `--preemption resume`: the
    /// generations that can be continued stop now and wait for the next wake.
    /// (An ordered feed: a fleet simulation wakes the stopped ones in the same order
    /// on every run; a tokio watch wakes its receivers in a random order.)
    pause: greenthread_ledger::Feed<u64>,
    /// Serializes sleeps (idle, admin, preemption).
    sleep_lock: tokio::sync::Mutex<()>,
    /// Held while a wake brings the engine up, and while an engine found awake in a
    /// sleeping model is put back to sleep: the two never cross.
    engine_op: tokio::sync::Mutex<()>,
    /// Every background task (wakes, loops, releases), ended together by `shutdown`.
    tasks: Mutex<JoinSet<()>>,
    stop: CancellationToken,
    heartbeat_started: AtomicBool,
    /// Whether the state is Serving: read by every request, so an atomic (the state's
    /// watch takes a lock that all requests would contend for).
    serving_now: AtomicBool,
}

/// How often the adapters file is read again.
const ADAPTERS_FILE_PERIOD: Duration = Duration::from_secs(2);

/// The shortest time between two reports of a model going busy or idle.
const EDGE_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// `t + d`, or far in the future when that overflows (an idle timeout of years).
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(100 * 365 * 24 * 3600))
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
            metrics.set_host(g.index, 0);
        }
        let metrics = Arc::new(metrics);
        let stop = CancellationToken::new();
        let pod = cfg.pod_name();
        let admission = Admission::new(
            cfg.max_queue,
            metrics.queue_depth.clone(),
            metrics.in_flight.clone(),
        );
        let ledger = LedgerClient::new(
            parts.ledger,
            parts.gpus,
            pod.clone(),
            &cfg,
            parts.clock,
            metrics.clone(),
            stop.clone(),
        );
        let driver = EngineDriver::new(
            parts.engine,
            parts.process,
            parts.probe,
            cfg.clone(),
            metrics.clone(),
            stop.clone(),
        );
        Arc::new(Self {
            pod,
            metrics,
            admission,
            ledger,
            driver,
            life: Mutex::new(Life {
                state: State::Sleeping,
                boot_ready: false,
                serving_since: None,
                demand_since: None,
                waiting: WaitReason::Booting,
                reserve_bytes: cfg.memory_bytes.unwrap_or(0),
                claimed_bytes: 0,
                residual_bytes: vec![],
                serving_bytes: vec![],
                host_bytes: 0,
                weights_bytes: None,
                last_wake: None,
            }),
            state_tx: watch::Sender::new(State::Sleeping),
            transitions: broadcast::Sender::new(256),
            pause: greenthread_ledger::Feed::new(0),
            sleep_lock: tokio::sync::Mutex::new(()),
            engine_op: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(JoinSet::new()),
            stop,
            heartbeat_started: AtomicBool::new(false),
            serving_now: AtomicBool::new(false),
            cfg,
        })
    }

    pub fn state(&self) -> State {
        self.life.lock().unwrap().state
    }

    /// Changes when resumable generations must stop (see [`crate::Preemption`]).
    pub(crate) fn pause_signal(&self) -> greenthread_ledger::Subscriber<u64> {
        self.pause.subscribe()
    }

    /// Every state transition `(from, to)` from now on.
    pub fn transitions(&self) -> broadcast::Receiver<(State, State)> {
        self.transitions.subscribe()
    }

    /// Whether the model serves now, without a lock: cheap enough for every request.
    pub fn serving(&self) -> bool {
        self.serving_now.load(Ordering::Acquire)
    }

    /// Wakes when requests start being in flight and when none is any more (inside the
    /// admission that starts them, before the admitted requests go on).
    pub fn busy_changes(&self) -> greenthread_ledger::Subscriber<usize> {
        self.admission.busy_changes()
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    pub fn cached_models(&self) -> Option<Bytes> {
        self.driver.cached_models()
    }

    pub fn engine(&self) -> &Arc<dyn EngineAdapter> {
        self.driver.engine()
    }

    /// Whether this model is never chosen as a preemption victim (`fairness.popular`),
    /// changed without a restart.
    pub async fn set_popular(&self, popular: bool) {
        self.ledger.set_popular(popular).await;
    }

    /// The LoRA adapters this sidecar serves.
    pub fn adapters(&self) -> &Arc<crate::Adapters> {
        self.driver.adapters()
    }

    /// The request as the engine must see it: an adapter named as the engine names it.
    pub fn engine_request(&self, headers: &http::HeaderMap, body: Bytes) -> Bytes {
        self.adapters()
            .engine_request(&**self.engine(), &self.cfg.model, headers, body)
    }

    pub fn status_json(&self) -> serde_json::Value {
        let (depth, in_flight) = self.admission.counts();
        let life = self.life.lock().unwrap();
        let per_gpu = |v: &[(u32, u64)]| {
            v.iter()
                .map(|(g, b)| serde_json::json!({"gpu": g, "bytes": b}))
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "model": self.cfg.model,
            "pod": self.pod,
            "state": life.state.as_str(),
            "bootReady": life.boot_ready,
            "queue": {
                "depth": depth,
                "inFlight": in_flight,
                "barriered": life.state == State::Deactivating,
            },
            "memory": {
                "reservedBytes": life.claimed_bytes,
                "servingBytes": per_gpu(&life.serving_bytes),
                "residualBytes": per_gpu(&life.residual_bytes),
                "hostBytes": life.host_bytes,
                "weightsBytes": life.weights_bytes,
            },
            "sleepLevel": (life.state == State::Sleeping).then(|| self.driver.asleep_at()),
            "adapters": self.adapters().status_json(),
            "adaptersOnDemand": self.adapters().on_demand().map(|od| od.status_json()),
            "adaptersFileError": self.adapters().file_error(),
            "lastWake": life.last_wake.as_ref().map(|(total, phases)| serde_json::json!({
                "seconds": total.as_secs_f64(),
                "phases": phases
                    .iter()
                    .map(|(p, d)| serde_json::json!({"phase": p, "seconds": d.as_secs_f64()}))
                    .collect::<Vec<_>>(),
            })),
        })
    }

    /// The level the engine last went to sleep at (2 where host memory was short).
    pub fn asleep_at(&self) -> u8 {
        self.driver.asleep_at()
    }

    pub fn boot_ready(&self) -> bool {
        self.life.lock().unwrap().boot_ready
    }

    /// Background tasks still running (none once `shutdown` returned).
    pub fn tasks_running(&self) -> usize {
        let mut tasks = self.tasks.lock().unwrap();
        while tasks.try_join_next().is_some() {}
        tasks.len()
    }

    /// Runs `task` in the background until it ends or the sidecar shuts down.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap();
        while tasks.try_join_next().is_some() {}
        if self.stop.is_cancelled() {
            return;
        }
        let stop = self.stop.clone();
        tasks.spawn(async move {
            stop.run_until_cancelled(task).await;
        });
    }

    /// The single funnel for a state change: state, admission gate, gauge, watch,
    /// broadcast and log together. An illegal event is a bug, logged and ignored.
    fn apply(&self, life: &mut Life, event: Event) -> bool {
        match transition(life.state, event) {
            Ok(to) => {
                let from = life.state;
                life.state = to;
                if to == State::Serving {
                    self.admission.open();
                } else if from == State::Serving {
                    self.admission.close();
                }
                self.metrics.set_state(to);
                self.serving_now
                    .store(to == State::Serving, Ordering::Release);
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

    fn set_waiting(&self, why: WaitReason) {
        self.life.lock().unwrap().waiting = why;
    }

    /// Starts a wake if the model sleeps, is booted and requests wait.
    fn demand_locked(self: &Arc<Self>, life: &mut Life) {
        if life.state == State::Sleeping && life.boot_ready && self.admission.has_waiters() {
            life.demand_since.get_or_insert_with(Instant::now);
            life.waiting = WaitReason::Memory;
            if self.apply(life, Event::Demand) {
                self.spawn(self.clone().run_wake());
            }
        }
    }

    /// Admits a request at once when serving; otherwise queues it until the model
    /// serves, its deadline passes, or its client goes away (the future is dropped).
    pub async fn admit(self: &Arc<Self>) -> Result<InFlight, Rejection> {
        self.admit_as(Priority::Standard).await
    }

    /// [`Sidecar::admit`] for a request of `priority`: the queue admits the most
    /// important first and, under pressure, refuses the least important first.
    pub async fn admit_as(self: &Arc<Self>, priority: Priority) -> Result<InFlight, Rejection> {
        self.admit_with(priority, Admission::enter).await
    }

    /// [`Sidecar::admit_as`] for a request that `enter` counts as its kind:
    /// `Admission::enter_stoppable` for the first leg of an answer that a preemption
    /// stops, to be continued after the next wake (`--preemption resume`), rather than
    /// waits for; `Admission::enter_continuation` for that continuation, which is not
    /// counted among the model's recent requests (its first token is out, so it is no
    /// fresh demand: counted, a model would stand on its own stopped answers and preempt
    /// back the waker that stopped them).
    pub async fn admit_with(
        self: &Arc<Self>,
        priority: Priority,
        enter: Enter,
    ) -> Result<InFlight, Rejection> {
        // Someone besides batches wants the model: its wake claims as the model does.
        self.ledger.set_batch_only(false);
        self.admit_queued(priority, enter).await
    }

    /// Admits a request of a batch ([`greenthread_api::BATCH_HEADER`]) to capacity that
    /// interactive traffic leaves idle alone. While the model serves or a wake is under
    /// way, it queues behind everything else (`sheddable`). While the model sleeps, it
    /// wakes it only when every GPU has the memory free and nobody else waits for it or
    /// is waking there ([`greenthread_ledger::decide::idle_room`]), and that wake preempts
    /// nobody; otherwise it is refused at once ([`Rejection::NotIdle`]) and its batch
    /// tries again later. `enter` counts it as any request of its kind is counted (a
    /// continuation, a resumable first leg, an answer that must finish).
    pub async fn admit_batch(self: &Arc<Self>, enter: Enter) -> Result<InFlight, Rejection> {
        let (state, boot_ready, bytes) = {
            let life = self.life.lock().unwrap();
            (life.state, life.boot_ready, life.reserve_bytes)
        };
        match state {
            State::Serving | State::Pending | State::Waking => {}
            State::Sleeping if boot_ready => {
                if let Err(why) = self.ledger.idle_room(bytes).await {
                    return Err(self.rejected(Rejection::NotIdle { why }));
                }
                let life = self.life.lock().unwrap();
                // Still asleep: the wake this starts is the batch's alone. (A wake that
                // started meanwhile is someone else's; the request joins it.)
                if life.state == State::Sleeping {
                    self.ledger.set_batch_only(true);
                }
            }
            other => {
                let why = if boot_ready {
                    format!("the model is {other}")
                } else {
                    "the engine is booting".to_string()
                };
                return Err(self.rejected(Rejection::NotIdle { why }));
            }
        }
        self.admit_queued(Priority::Sheddable, enter).await
    }

    /// Queues a request (`enter` counts it as its kind: see [`Sidecar::admit_with`]) and
    /// waits for its admission.
    async fn admit_queued(
        self: &Arc<Self>,
        priority: Priority,
        enter: Enter,
    ) -> Result<InFlight, Rejection> {
        let arrived = Instant::now();
        let entered = enter(&self.admission, priority).map_err(|full| {
            if full.priority == Priority::Sheddable && full.depth < self.cfg.max_queue {
                Rejection::Shed {
                    why: format!(
                        "the request queue is past half full ({} waiting): sheddable requests are refused; retry later",
                        full.depth
                    ),
                }
            } else {
                Rejection::QueueFull { depth: full.depth }
            }
        });
        let ticket = match entered {
            Ok(Entry::Admitted(slot)) => return Ok(slot),
            Ok(Entry::Queued(ticket)) => ticket,
            Err(r) => return Err(self.rejected(r)),
        };
        {
            let mut life = self.life.lock().unwrap();
            match life.state {
                State::Sleeping if life.boot_ready => {
                    life.demand_since = Some(arrived);
                    self.demand_locked(&mut life);
                }
                State::Pending | State::Waking => {
                    self.metrics.wake_dedups.inc();
                }
                // Held by the barrier (or boot) and served after the next wake.
                _ => {}
            }
        }
        match ticket.wait(self.cfg.queue_timeout).await {
            Ok(slot) => Ok(slot),
            Err(Waited::Failed(Failure::Shed(p))) => Err(self.rejected(Rejection::Shed {
                why: Failure::Shed(p).to_string(),
            })),
            Err(Waited::Failed(why)) => Err(self.rejected(Rejection::Failed(why))),
            Err(Waited::Deadline) => {
                let reason = {
                    let life = self.life.lock().unwrap();
                    Stalled {
                        model: self.cfg.model.clone(),
                        state: life.state,
                        waiting: life.waiting.clone(),
                    }
                };
                Err(self.rejected(Rejection::Deadline {
                    waited: arrived.elapsed(),
                    reason,
                }))
            }
        }
    }

    fn rejected(&self, r: Rejection) -> Rejection {
        self.metrics.rejection(r.metric_label());
        r
    }

    /// Releases the reservation on every GPU, recording what the engine still holds.
    async fn release_all(&self, residual: &[(u32, u64)]) {
        self.ledger.release_all(residual).await;
        let mut life = self.life.lock().unwrap();
        life.claimed_bytes = 0;
        life.residual_bytes = residual.to_vec();
    }

    /// Ends a wake that will not serve: the queue is failed (when `failed`), and
    /// requests that arrived meanwhile start the next wake.
    fn wake_ended(self: &Arc<Self>, event: Event, failed: Option<Failure>) {
        let mut life = self.life.lock().unwrap();
        if let Some(why) = failed {
            self.admission.fail_all(&why);
        }
        life.demand_since = None;
        self.apply(&mut life, event);
        self.demand_locked(&mut life);
    }

    async fn run_wake(self: Arc<Self>) {
        let (bytes, residual) = {
            let life = self.life.lock().unwrap();
            (life.reserve_bytes, life.residual_bytes.clone())
        };
        let phases = Mutex::new(Phases::default());
        phases.lock().unwrap().enter("claim");
        let waiting = |why: WaitReason| {
            phases.lock().unwrap().enter(phase(&why));
            self.set_waiting(why)
        };
        let claimed = self
            .ledger
            .claim_all(bytes, &residual, Some(&self.admission), &waiting)
            .await;
        self.ledger.set_batch_only(false);
        match claimed {
            Ok(Claimed::All) => {}
            Ok(Claimed::Abandoned) => return self.wake_ended(Event::Abandoned, None),
            Err(e) => {
                tracing::warn!(model = %self.cfg.model, error = %e, reason = e.metric_label(), "could not claim GPU memory");
                let why = Failure::Claim(Arc::new(e));
                return self.wake_ended(Event::Abandoned, Some(why));
            }
        }
        {
            let mut life = self.life.lock().unwrap();
            life.claimed_bytes = bytes;
            self.apply(&mut life, Event::Claimed);
        }
        for g in &self.ledger.gpus {
            self.metrics.set_reserved(g.index, bytes);
            self.metrics.set_residual(g.index, 0);
        }
        let bring_up = async {
            let _op = self.engine_op.lock().await;
            self.driver.bring_up(&waiting).await
        };
        match bring_up.await {
            Ok(()) => {
                self.ledger.mark_serving().await;
                let spent = std::mem::take(&mut *phases.lock().unwrap()).finish();
                {
                    let mut life = self.life.lock().unwrap();
                    if let Some(since) = life.demand_since.take() {
                        let took = since.elapsed();
                        self.metrics.wake_duration.observe(took.as_secs_f64());
                        if took >= self.cfg.log_slow_wakes {
                            let detail: Vec<String> = spent
                                .iter()
                                .map(|(p, d)| format!("{p} {:.2} s", d.as_secs_f64()))
                                .collect();
                            tracing::info!(model = %self.cfg.model, seconds = took.as_secs_f64(), phases = %detail.join(", "), "slow wake");
                        }
                        life.last_wake = Some((took, spent));
                    }
                    life.serving_since = Some(Instant::now());
                    // The weights: what the engine held with them back, less what it
                    // held asleep.
                    if let Some(m) = self.driver.take_with_weights() {
                        life.weights_bytes = m
                            .iter()
                            .map(|(g, b)| {
                                b.saturating_sub(crate::ledger_client::held(
                                    &life.residual_bytes,
                                    *g,
                                ))
                            })
                            .max()
                            .filter(|b| *b > 0);
                    }
                    life.residual_bytes.clear();
                    if !self.cfg.pinned {
                        life.host_bytes = 0;
                    }
                    life.waiting = WaitReason::Nothing;
                    // Opens admission: the queue is released in arrival order.
                    self.apply(&mut life, Event::Awake);
                }
                if let Some(m) = self.driver.measure().await {
                    self.record_serving(&m);
                }
            }
            Err(e) => {
                tracing::error!(model = %self.cfg.model, error = %e, reason = e.metric_label(), "wake failed for good");
                // The engine is in an unknown state: stop it so it holds nothing.
                self.driver.stop_process(Duration::from_secs(5)).await;
                self.release_all(&[]).await;
                self.host_gone().await;
                if self.driver.owns_process() {
                    self.driver.mark_lost();
                }
                self.wake_ended(Event::WakeFailed, Some(Failure::Wake(Arc::new(e))));
            }
        }
    }

    fn record_serving(&self, measured: &[(u32, u64)]) {
        for (gpu, bytes) in measured {
            self.metrics.set_serving(*gpu, *bytes);
        }
        let mut life = self.life.lock().unwrap();
        life.serving_bytes = measured.to_vec();
        if self.cfg.memory_bytes.is_none()
            && let Some(max) = measured.iter().map(|(_, b)| *b).max()
            && max > 0
        {
            life.reserve_bytes = max;
        }
    }

    /// Raises the barrier, drains (at most `drainTimeout`), puts the engine to sleep,
    /// measures what it still holds and releases the reservation.
    pub async fn deactivate(self: &Arc<Self>, why: &str) -> Result<(), SleepError> {
        let _one_at_a_time = self.sleep_lock.lock().await;
        let started = Instant::now();
        {
            let mut life = self.life.lock().unwrap();
            if life.state != State::Serving {
                return Err(SleepError::NotServing(life.state));
            }
            life.waiting = WaitReason::GoingToSleep;
            self.apply(&mut life, Event::Deactivate);
        }
        tracing::info!(model = %self.cfg.model, why, "deactivating");
        if self.cfg.preemption == crate::Preemption::Resume {
            // Stopped now, continued after the next wake: only the rest is drained.
            self.pause.send_if_modified(|n| {
                *n += 1;
                true
            });
        }
        if !self.admission.drained(self.cfg.drain_timeout).await {
            self.metrics.barrier_timeouts.inc();
            tracing::warn!(model = %self.cfg.model, timeout = ?self.cfg.drain_timeout, "drain timed out; sleeping anyway");
        }
        if let Err(e) = self.sleep_engine("sleep").await {
            // An engine that cannot sleep cannot be trusted with memory: stop it.
            tracing::error!(model = %self.cfg.model, error = %e, reason = e.metric_label(), "engine sleep failed; stopping it");
            self.driver.stop_process(Duration::from_secs(5)).await;
            self.driver.mark_lost();
            self.host_gone().await;
        }
        let residual = self.driver.measure().await.unwrap_or_default();
        self.release_all(&residual).await;
        let mut life = self.life.lock().unwrap();
        life.serving_since = None;
        self.metrics
            .sleep_duration
            .observe(started.elapsed().as_secs_f64());
        self.apply(&mut life, Event::Slept);
        self.demand_locked(&mut life);
        Ok(())
    }

    /// Host memory per GPU the weights take asleep at level 1: `staging.hostMemory`, or
    /// the weights as measured during the last wake, or (before any wake) what the
    /// engine measured serving (an upper bound: it counts the KV cache too), or the
    /// reservation.
    fn host_need(&self) -> u64 {
        if let Some(b) = self.cfg.host_memory_bytes {
            return b;
        }
        let life = self.life.lock().unwrap();
        if let Some(b) = life.weights_bytes {
            return b;
        }
        life.serving_bytes
            .iter()
            .map(|(_, b)| *b)
            .max()
            .filter(|b| *b > 0)
            .unwrap_or(life.reserve_bytes)
    }

    /// The level this sleep goes to: the configured one, unless the weights would wait
    /// in host memory that is full, where the engine can drop them instead — then level
    /// 2 (counted and told), and the next wake reloads them from disk. The host memory
    /// is held in the ledger before the engine sleeps, so no two sleepers count on the
    /// same bytes.
    async fn sleep_level(&self) -> u8 {
        let level = self.cfg.sleep_level;
        let engine = self.driver.engine();
        if !engine.keeps_weights_in_host(level) {
            return level;
        }
        let need = self.host_need();
        let can_drop = engine.can_drop_weights();
        match self.ledger.hold_host_all(need, !can_drop).await {
            Ok(()) => {
                self.life.lock().unwrap().host_bytes = need;
                level
            }
            Err(e) if !can_drop => {
                // It keeps them in host memory whatever happens: say so, sleep anyway.
                tracing::warn!(model = %self.cfg.model, error = %e, reason = e.metric_label(), "could not record the host memory the weights take");
                self.life.lock().unwrap().host_bytes = need;
                level
            }
            Err(e) => {
                let full = matches!(
                    e,
                    crate::error::ClaimError::Refused(decide::Refusal::HostFull { .. })
                );
                if full {
                    self.metrics.demotions.inc();
                    self.metrics.notice(crate::metrics::Notice::Demoted {
                        reason: e.to_string(),
                    });
                }
                tracing::info!(model = %self.cfg.model, error = %e, reason = e.metric_label(), "weights not kept in host memory: sleeping at level 2");
                self.life.lock().unwrap().host_bytes = 0;
                2
            }
        }
    }

    /// Puts the engine to sleep at the level [`Sidecar::sleep_level`] chooses.
    async fn sleep_engine(&self, what: &'static str) -> Result<(), crate::error::DriverError> {
        let level = self.sleep_level().await;
        self.driver.sleep(what, level).await
    }

    /// The engine is gone (stopped, crashed, failed): its host memory with it.
    async fn host_gone(&self) {
        self.ledger.drop_host_all(true).await;
        self.life.lock().unwrap().host_bytes = 0;
    }

    /// The engine died (process exit) or stopped answering connections.
    pub fn engine_lost(self: &Arc<Self>, why: &str) {
        if !self.driver.mark_lost() {
            return;
        }
        let mut life = self.life.lock().unwrap();
        tracing::warn!(model = %self.cfg.model, state = %life.state, why, "engine lost");
        if life.state == State::Serving && self.apply(&mut life, Event::EngineLost) {
            life.serving_since = None;
            drop(life);
            let me = self.clone();
            self.spawn(async move {
                // A dead process holds nothing; measure anyway rather than assume.
                let residual = me.driver.measure().await.unwrap_or_default();
                me.release_all(&residual).await;
                me.host_gone().await;
                // Only now may a wake claim again: requests wait behind the barrier.
                let mut life = me.life.lock().unwrap();
                me.apply(&mut life, Event::Slept);
                me.demand_locked(&mut life);
            });
        }
    }

    /// Reports each engine death `exits` receives, for as long as the sidecar runs.
    pub fn watch_exits(self: &Arc<Self>, mut exits: mpsc::UnboundedReceiver<String>) {
        let me = Arc::downgrade(self);
        self.spawn(async move {
            while let Some(why) = exits.recv().await {
                let Some(me) = me.upgrade() else { return };
                me.engine_lost(&why);
            }
        });
    }

    /// The engine answered a request: it is not wedged.
    pub fn engine_answered(&self) {
        self.driver.answered();
    }

    /// A request got no response headers within `after`. Enough of them in a row mean a
    /// wedged engine (it takes connections, never answers): restart it as if lost.
    pub fn engine_timed_out(self: &Arc<Self>, after: Duration) {
        tracing::warn!(model = %self.cfg.model, ?after, "engine response timed out");
        if let Some(n) = self.driver.timed_out() {
            self.engine_lost(&format!(
                "engine wedged: {n} responses in a row timed out after {after:?}"
            ));
        }
    }

    /// Boot: claim memory under the wake lock, start the engine, measure it serving,
    /// put it to sleep, measure what it keeps, release. Then `sleeping` and ready.
    pub async fn boot(self: &Arc<Self>) -> Result<(), BootError> {
        // A boot holds the GPU's wake lock for as long as the engine takes to start
        // (minutes for vLLM): heartbeats keep it from lapsing, so that no other engine
        // starts beside it (concurrent start-ups on one GPU fail).
        self.start_heartbeat();
        let boot_bytes = match self.cfg.memory_bytes {
            Some(b) => b,
            // Unknown until measured: reserve what is free, as vLLM takes its share.
            None => self.ledger.free_bytes().await?,
        };
        let waiting = |why| self.set_waiting(why);
        // The claim may wait long for memory. An engine that runs already (this sidecar
        // restarted beside it) or starts meanwhile (its container restarted) holds memory
        // the claim has not charged yet: it sleeps while the claim waits.
        let period = (self.cfg.wake_lock_ttl / 3).max(Duration::from_millis(100));
        let claim = self.ledger.claim_all(boot_bytes, &[], None, &waiting);
        tokio::pin!(claim);
        let mut next_look = Instant::now();
        loop {
            tokio::select! {
                biased;
                claimed = &mut claim => {
                    claimed?;
                    break;
                }
                () = tokio::time::sleep_until(next_look) => {
                    next_look = Instant::now() + period;
                    self.sleep_uncharged_engine().await;
                }
            }
        }
        // Whatever fails from here on, the claim and the wake lock are given back.
        let booted = async {
            if self.driver.start().await? {
                if let Some(m) = self.driver.measure().await {
                    self.record_serving(&m);
                }
                // Bounded like a wake: a boot holds the GPU's wake lock while it runs.
                self.sleep_engine("sleep at boot").await?;
            }
            Ok::<_, crate::error::DriverError>(())
        };
        if let Err(e) = booted.await {
            self.release_all(&[]).await;
            self.host_gone().await;
            return Err(e.into());
        }
        let residual = self.driver.measure().await.unwrap_or_default();
        self.release_all(&residual).await;
        let mut life = self.life.lock().unwrap();
        if life.reserve_bytes == 0 {
            tracing::warn!(model = %self.cfg.model, "no memory probe and no --memory-bytes: wakes reserve nothing");
        }
        life.boot_ready = true;
        self.admission.touch();
        tracing::info!(model = %self.cfg.model, reserve = life.reserve_bytes, "booted; sleeping until the first request");
        self.demand_locked(&mut life);
        Ok(())
    }

    /// Boots in the background, then runs the loops. The boot's outcome comes back on
    /// the receiver (dropped unsent when the sidecar shuts down first).
    pub fn start(self: &Arc<Self>) -> oneshot::Receiver<Result<(), BootError>> {
        let (tx, rx) = oneshot::channel();
        let me = self.clone();
        self.spawn(async move {
            let booted = me.boot().await;
            match &booted {
                Ok(()) => me.spawn_background(),
                Err(e) => {
                    tracing::error!(model = %me.cfg.model, pod = %me.pod, error = %e, reason = e.metric_label(), "boot failed");
                }
            }
            let _ = tx.send(booted);
        });
        rx
    }

    /// Sleeps the model after `idleTimeout` without inference (and `minRuntime` served).
    /// It wakes only at deadlines and state changes, never per request: a finishing
    /// request moves the last activity, so the deadline is recomputed when it comes.
    async fn run_idle_timer(self: Arc<Self>) {
        let mut states = self.subscribe();
        loop {
            let (state, serving_since) = {
                let life = self.life.lock().unwrap();
                (life.state, life.serving_since)
            };
            if state != State::Serving {
                if states.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let (last_activity, busy) = self.admission.activity();
            let idle_at = later(last_activity, self.cfg.idle_timeout);
            let deadline =
                serving_since.map_or(idle_at, |s| idle_at.max(later(s, self.cfg.min_runtime)));
            let now = Instant::now();
            if now >= deadline && !busy {
                let _ = self.deactivate("idle").await;
                continue;
            }
            // Busy at the deadline: the request's end restarts the clock, look again then.
            let next = if now >= deadline {
                later(now, self.cfg.idle_timeout)
            } else {
                deadline
            };
            tokio::select! {
                // In order: a fleet simulation replays the same run from the same seed.
                biased;
                () = tokio::time::sleep_until(next) => {}
                _ = states.changed() => {}
            }
        }
    }

    /// The loops a booted sidecar runs: idle sleep, heartbeat, preemption watch.
    pub fn spawn_background(self: &Arc<Self>) {
        self.spawn(self.clone().run_idle_timer());
        self.start_heartbeat();
        self.spawn(self.clone().run_preemption_watch());
        self.spawn(self.clone().run_adapters());
    }

    /// Keeps the engine's adapters in step with the wanted ones while it serves: reads
    /// the adapters file again every [`ADAPTERS_FILE_PERIOD`] (a ConfigMap volume is
    /// updated in place), and loads or unloads what changed. A sleeping engine picks the
    /// changes up at its next wake.
    async fn run_adapters(self: Arc<Self>) {
        let adapters = self.adapters().clone();
        let mut states = self.subscribe();
        let polls = adapters.file().is_some();
        loop {
            if let Err(e) = adapters.reread() {
                tracing::warn!(model = %self.cfg.model, error = %e, "adapters file not taken; the adapters stay as they were");
            }
            // For an engine that loads adapters only when it starts: its next start.
            self.engine().adapters_at_start(&adapters.wanted());
            if self.state() == State::Serving && adapters.dirty() {
                let _op = self.engine_op.lock().await;
                if self.state() == State::Serving {
                    self.driver.sync_adapters().await;
                }
            }
            let tick = async {
                if polls {
                    tokio::time::sleep(ADAPTERS_FILE_PERIOD).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                () = tick => {}
                () = adapters.changed.notified() => {}
                changed = states.changed() => if changed.is_err() { return },
            }
        }
    }

    fn start_heartbeat(self: &Arc<Self>) {
        if !self.heartbeat_started.swap(true, Ordering::SeqCst) {
            self.spawn(self.clone().run_heartbeat());
        }
    }

    /// Keeps this pod's ledger records alive, and brings them in line with what the
    /// sidecar knows when it is neither waking nor sleeping: a write that failed for
    /// good (marking serving, a release) is repaired here, so that no lock or
    /// reservation outlives its reason.
    async fn run_heartbeat(self: Arc<Self>) {
        let period = (self.cfg.wake_lock_ttl / 3).max(Duration::from_millis(100));
        // Under a policy that weighs demand a model's traffic starting and stopping is
        // reported at once: whom a waker preempts depends on whether its victims have
        // requests to drain. The documented policy heartbeats on its period alone, as it
        // always did.
        let report_edges = self.cfg.policy.rules().weighs_demand();
        let mut busy = self.admission.busy_changes();
        let mut beat = Instant::now() + period;
        let mut last_report = Instant::now();
        loop {
            let edge = async {
                if report_edges {
                    busy.changed().await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                // In order: a fleet simulation replays the same run from the same seed.
                biased;
                () = tokio::time::sleep_until(beat) => beat = Instant::now() + period,
                changed = edge => {
                    if changed.is_err() {
                        return;
                    }
                    // At most one edge report per EDGE_REPORT_INTERVAL: a model busy and
                    // idle in turn (one request at a time) would otherwise write its
                    // records twice per request. What changed meanwhile goes with it.
                    tokio::time::sleep_until(last_report + EDGE_REPORT_INTERVAL).await;
                }
            }
            last_report = Instant::now();
            self.check_engine_asleep();
            let (last_activity, _) = self.admission.activity();
            let traffic = self.admission.traffic();
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            let load = decide::Load {
                accessed: jiff::SignedDuration::try_from(last_activity.elapsed())
                    .ok()
                    .and_then(|ago| self.ledger.now().checked_sub(ago).ok()),
                in_flight: count(traffic.in_flight),
                recent_requests: count(traffic.recent),
                draining: count(traffic.must_finish),
            };
            self.ledger
                .heartbeat(load, &|index| self.settled(index))
                .await;
        }
    }

    /// An engine awake while its model sleeps started again on its own (its container
    /// restarted, or it came back after a crash): it holds memory nobody has charged,
    /// and on a shared GPU that memory is someone else's. Looked at on each heartbeat;
    /// such an engine is put back to sleep, and what it still holds is recorded (the
    /// heartbeat writes it).
    fn check_engine_asleep(self: &Arc<Self>) {
        // Pending too: until the claim is through, nothing charges the engine either (a
        // wake that gets its claim meanwhile waits for the sleep, then wakes it).
        let asleep =
            |life: &Life| life.boot_ready && matches!(life.state, State::Sleeping | State::Pending);
        if !asleep(&self.life.lock().unwrap()) {
            return;
        }
        let me = self.clone();
        self.spawn(async move {
            let Ok(_op) = me.engine_op.try_lock() else {
                return;
            };
            if !asleep(&me.life.lock().unwrap()) {
                return;
            }
            if let Some(residual) = me.sleep_uncharged_engine().await {
                let mut life = me.life.lock().unwrap();
                if life.state == State::Sleeping {
                    life.residual_bytes = residual;
                }
            }
        });
    }

    /// Puts an engine that is awake though nothing charges its memory to sleep
    /// (measuring it first, as a boot does); what it still holds, or `None` when it was
    /// not awake or would not sleep. The caller holds `engine_op` or is the boot.
    async fn sleep_uncharged_engine(&self) -> Option<Vec<(u32, u64)>> {
        if self.driver.engine().is_sleeping().await.unwrap_or(true) {
            return None;
        }
        tracing::warn!(model = %self.cfg.model, "the engine is awake but its memory is not charged (it started on its own): putting it to sleep");
        self.metrics.engine_restarts.inc();
        if let Some(m) = self.driver.measure().await {
            self.record_serving(&m);
        }
        if let Err(e) = self.sleep_engine("sleep").await {
            tracing::warn!(model = %self.cfg.model, error = %e, reason = e.metric_label(), "could not put the engine to sleep");
            return None;
        }
        Some(self.driver.measure().await.unwrap_or_default())
    }

    /// What this pod's entry on GPU `index` must say, when no wake or sleep is under way.
    fn settled(&self, index: u32) -> Option<decide::Settled> {
        let life = self.life.lock().unwrap();
        if !life.boot_ready || self.stop.is_cancelled() {
            return None;
        }
        match life.state {
            State::Sleeping => Some(decide::Settled::Asleep {
                residual: crate::ledger_client::held(&life.residual_bytes, index),
                host: life.host_bytes,
            }),
            State::Serving => Some(decide::Settled::Serving),
            _ => None,
        }
    }

    /// Sleeps this model when another sidecar names it as its victim.
    async fn run_preemption_watch(self: Arc<Self>) {
        let mut watches = self.ledger.watches();
        if watches.is_empty() {
            return;
        }
        loop {
            let chosen = watches
                .iter_mut()
                .any(|w| self.ledger.is_victim(&w.borrow_and_update().status));
            if chosen && self.state() == State::Serving {
                match self.deactivate("preempted").await {
                    Ok(()) => self.metrics.preemption("preempted"),
                    Err(e) => {
                        tracing::debug!(error = %e, reason = e.metric_label(), "preemption found nothing to sleep");
                    }
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

    /// Ends the sidecar as a kill would (SIGKILL, the OOM killer, a node losing power):
    /// its tasks stop wherever they are and nothing more is written, so the ledger keeps
    /// what it last said (a wake lock included) and the engine runs on as it was. What
    /// still waits in the queue is failed, as its clients' connections would be cut.
    /// Fault injection uses it; the sidecar that replaces it must repair the records.
    pub async fn kill(&self) {
        self.stop.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        self.admission.fail_all(&Failure::ShuttingDown);
    }

    /// Shutdown: ends every background task, stops an owned engine, leaves the ledger and
    /// fails whatever still waits.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        while tasks.join_next().await.is_some() {}
        self.driver.stop_process(Duration::from_secs(10)).await;
        self.ledger.leave().await;
        self.admission.fail_all(&Failure::ShuttingDown);
    }
}
