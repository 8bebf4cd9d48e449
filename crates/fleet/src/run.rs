//! One simulation: the real control plane — sidecars, the in-memory ledger, preemption,
//! the API server's routing and queueing — over simulated engines reached through
//! in-memory pipes, driven by in-process clients, on tokio's paused clock. Nothing in the
//! decision path is re-implemented here: this module only assembles the parts and
//! watches them.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::body::Body;
use greenthread_api::{Gpu, GpuSpec, ValidModel};
use greenthread_apiserver::{ApiServer, Auth, AuthSources, ModelRoute, Replica};
use greenthread_edge::{
    Connector, EdgeConfig, Shutdown,
    transport::{self, MemoryAddr, MemoryListener},
};
use greenthread_gpu::{MemoryProbe, ProbeError};
use greenthread_ledger::{Clock, Ledger, MemoryLedger};
use greenthread_sidecar::{
    Assignment, Forwarder, GpuRef, LedgerAt, Parts, Sidecar, SidecarConfig, adapter_over,
    engine_forwarder,
    metrics::{SidecarFamilies, SidecarMetrics},
    state::State,
};
use greenthread_simulator::{SimConfig, SimEngine};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::{
    faults::{
        CRASH_PATIENCE, CrashWhen, ENGINE_RESTART_DELAY, Fault, FaultPlan, FaultyLedger, Violation,
    },
    zoo::engine_config,
};

/// A request of the simulation: when, to which model, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub at: Duration,
    /// Index into [`Setup::models`].
    pub model: usize,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// What a simulation runs.
pub struct Setup {
    pub models: Vec<(String, ValidModel)>,
    /// Each GPU's memory in bytes; eight GPUs a node.
    pub gpus: Vec<u64>,
    pub requests: Vec<Request>,
    /// Seeds what the control plane draws at random (backoff jitter).
    pub seed: u64,
    pub policy: greenthread_ledger::Policy,
    /// Faults to inject, with the invariants checked throughout.
    pub faults: Option<FaultPlan>,
    /// What a preempted model's running generations do.
    pub preemption: greenthread_sidecar::Preemption,
    /// Host memory for level-1 sleepers per node (shared evenly by its GPUs, as the
    /// agent shares it); `None`: not accounted.
    pub host_memory: Option<u64>,
    /// The host link of every GPU, when it is not the one the engines declare.
    pub link: HostLink,
}

/// How fast a GPU's link to host memory copies weights, in bytes a second: a level-1
/// wake copies them in, a level-1 sleep out. `None`: each engine's own figure (the
/// zoo's: 25 GB/s in and 20 GB/s out, what vLLM's published wake times on H100 imply).
/// A faster link (a Grace Hopper's NVLink-C2C) makes every switch between models
/// cheaper; what that buys a fleet is a question for `simulate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLink {
    pub wake: Option<u64>,
    pub sleep: Option<u64>,
}

impl HostLink {
    /// `engine` on this link.
    pub fn apply(self, engine: &mut SimConfig) {
        if let Some(b) = self.wake {
            engine.h2d_bandwidth = b;
        }
        if let Some(b) = self.sleep {
            engine.d2h_bandwidth = b;
        }
    }
}

/// How one request ended, as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The answer came: its first token after `ttft`, its last after `total`.
    Answered { ttft: Duration, total: Duration },
    /// Refused with an OpenAI-style error.
    Rejected { status: u16, code: String },
    /// Accepted, then cut off mid-answer.
    Broken { ttft: Duration },
    /// Neither answered nor refused within [`HANG_LIMIT`]: a bug.
    Hung,
}

/// A request neither answered nor refused by then counts as hung. Queued requests are
/// refused at the queue's deadline (5 minutes by default), well before.
pub const HANG_LIMIT: Duration = Duration::from_secs(3600);

/// A fault as it struck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// From the first arrival.
    pub at: Duration,
    /// [`Fault::kind`].
    pub kind: &'static str,
    /// What and where.
    pub what: String,
}

/// What a model replica did over the simulation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaStats {
    pub model: usize,
    pub pod: String,
    pub gpus: Vec<u32>,
    /// Wakes completed (waking → serving).
    pub wakes: u64,
    /// Times it was put to sleep for another model.
    pub preempted: u64,
    /// Sleeps at level 2 for lack of host memory (a level-1 model's).
    pub demotions: u64,
    /// Bytes it holds on each of its GPUs while awake.
    pub reserved_bytes: u64,
    /// Seconds it spent waking (memory held, nothing served yet).
    pub waking_seconds: f64,
    /// Seconds it spent serving.
    pub serving_seconds: f64,
    /// Seconds it spent deactivating: draining its answers, then going to sleep.
    pub deactivating_seconds: f64,
}

impl ReplicaStats {
    /// Adds `secs` spent in `state` (one that holds memory).
    fn held(&mut self, state: State, secs: f64) {
        match state {
            State::Waking => self.waking_seconds += secs,
            State::Serving => self.serving_seconds += secs,
            State::Deactivating => self.deactivating_seconds += secs,
            State::Sleeping | State::Pending => {}
        }
    }

    /// GPU-seconds it held memory (waking, serving, draining), per GPU it spans.
    pub fn awake_gpu_seconds(&self) -> f64 {
        (self.waking_seconds + self.serving_seconds + self.deactivating_seconds)
            * self.gpus.len().max(1) as f64
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// One per [`Setup::requests`], in order.
    pub outcomes: Vec<Outcome>,
    pub replicas: Vec<ReplicaStats>,
    /// From the first arrival to the last answer.
    pub simulated: Duration,
    /// Virtual time the replicas took to boot before the workload started.
    pub boot: Duration,
    /// The state of each request's model (its first replica) when it arrived.
    pub arrived_to: Vec<State>,
    /// Each GPU's memory in bytes, by position.
    pub gpu_memory: Vec<u64>,
    /// Per GPU, by position: the seconds × fraction of its memory that was free while
    /// models waited for memory there, every one of them needing more than was free.
    pub stranded_seconds: Vec<f64>,
    /// Per GPU, by position: the seconds during which the models there with a request
    /// in progress, each served the moment it arrived, needed more than its memory
    /// ([`crate::demand`]).
    pub oversubscribed_seconds: Vec<f64>,
    /// Each model (its first replica) as the workload's demand and the reference plan
    /// see it ([`crate::demand`], [`crate::plan`]).
    pub demand: Vec<crate::demand::Demand>,
    /// Per request: the seconds its output takes to decode at its engine's rate, what an
    /// answer never stopped takes from its first token to its last.
    pub decode_seconds: Vec<f64>,
    /// The faults injected, each when it struck (from the first arrival).
    pub injected: Vec<Injected>,
    /// Invariants broken (only checked when faults are injected).
    pub violations: Vec<Violation>,
    /// The seed of the faults injected, if any were.
    pub faults_seed: Option<u64>,
}

/// Progress while it runs.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub simulated: Duration,
    pub total: Duration,
    pub sent: usize,
    pub done: usize,
}

pub type OnProgress = Arc<dyn Fn(Progress) + Send + Sync>;

/// Runs `setup` on its own single-threaded runtime with a paused clock: virtual time
/// jumps to the next timer whenever every task waits, and the same setup gives the same
/// run, event for event.
pub fn run(setup: Setup, progress: Option<OnProgress>) -> anyhow::Result<Run> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let out = rt.block_on(simulate(setup, progress));
    // Background loops (heartbeats, idle timers) end with the runtime.
    rt.shutdown_background();
    out
}

const AUTH: AuthSources = AuthSources {
    keys: "none (simulation)",
    admin: "none (simulation)",
    admin_open: "none (simulation)",
};

/// One replica's engine process: started, crashed, started again at the same address.
struct EngineSlot {
    cfg: SimConfig,
    addr: MemoryAddr,
    /// The running engine; none while it is down.
    current: Mutex<Option<Arc<SimEngine>>>,
    /// Its server: aborting it cuts every connection, as a dead process's sockets close.
    serving: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop: Shutdown,
}

impl EngineSlot {
    fn engine(&self) -> Option<Arc<SimEngine>> {
        self.current.lock().unwrap().clone()
    }

    fn run(&self, engine: Arc<SimEngine>, listener: MemoryListener) {
        let serve = greenthread_edge::serve(
            listener,
            greenthread_simulator::router(engine.clone()),
            EdgeConfig::default(),
            self.stop.clone(),
        );
        let task = tokio::spawn(async move {
            let _ = serve.await;
        });
        *self.current.lock().unwrap() = Some(engine);
        *self.serving.lock().unwrap() = Some(task);
    }

    /// The process dies: its memory is freed, its connections cut, its port closed.
    /// Whether it was running.
    fn crash(&self) -> bool {
        let Some(_dead) = self.current.lock().unwrap().take() else {
            return false;
        };
        if let Some(task) = self.serving.lock().unwrap().take() {
            task.abort();
        }
        drop(self.addr.rebind());
        true
    }
}

/// Bytes the engines on `gpu` hold now, but for `except`'s.
fn held_on(fleet: &Fleet, gpu: &str, except: &str) -> u64 {
    fleet
        .slots
        .iter()
        .filter(|s| s.pod != except && s.on(gpu))
        .filter_map(|s| s.engine.engine())
        .map(|e| e.held_bytes())
        .sum()
}

/// A crashed engine is started again as a kubelet restarts a container: after a pause,
/// it loads its weights and comes back awake — unless the memory it needs is not free
/// on one of its GPUs, where it fails as vLLM's start-up memory check does, and is
/// tried again after a back-off that doubles to five minutes (CrashLoopBackOff).
async fn restart_engine(fleet: Arc<Fleet>, slot: Arc<ReplicaSlot>) {
    let need = slot.engine.cfg.weights_bytes + slot.engine.cfg.kv_cache_bytes;
    let fits = || {
        slot.gpus.iter().all(|g| {
            let memory = fleet.capacity.get(&g.name).copied().unwrap_or(0);
            held_on(&fleet, &g.name, &slot.pod) + need <= memory
        })
    };
    let mut pause = ENGINE_RESTART_DELAY;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).clamp(Duration::from_secs(10), Duration::from_secs(300));
        let engine = SimEngine::new(slot.engine.cfg.clone());
        if engine.boot().await.is_ok() && fits() {
            slot.engine.run(engine, slot.engine.addr.rebind());
            return;
        }
        tracing::info!(pod = %slot.pod, retry_in = ?pause, "restarted engine found too little free memory and exited");
    }
}

/// What an engine holds, read from the engine itself (a simulated GPU without files):
/// nothing while its process is down.
struct EngineMemory {
    slot: Arc<EngineSlot>,
    gpus: Vec<u32>,
}

#[async_trait::async_trait]
impl MemoryProbe for EngineMemory {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        let held = self.slot.engine().map_or(0, |e| e.held_bytes());
        Ok(self.gpus.iter().map(|g| (*g, held)).collect())
    }
}

/// One replica: its engine, and the sidecar in front of it (replaced when restarted).
struct ReplicaSlot {
    model: usize,
    pod: String,
    cfg: SidecarConfig,
    url: String,
    gpus: Vec<GpuRef>,
    indices: Vec<u32>,
    engine: Arc<EngineSlot>,
    forwarder: Arc<Forwarder>,
    /// Set once built, and replaced when restarted.
    sidecar: Mutex<Option<Arc<Sidecar>>>,
    /// Bumped at each restart of the sidecar.
    incarnation: tokio::sync::watch::Sender<u64>,
}

impl ReplicaSlot {
    /// Whether it holds memory on GPU `gpu`.
    fn on(&self, gpu: &str) -> bool {
        self.gpus.iter().any(|g| g.name == gpu)
    }

    fn sidecar(&self) -> Arc<Sidecar> {
        self.sidecar
            .lock()
            .unwrap()
            .clone()
            .expect("built with the slot")
    }
}

/// What a sidecar is built from, kept to build it again after a restart.
struct Parts0 {
    ledger: Arc<dyn Ledger>,
    families: Arc<SidecarFamilies>,
    clock: Clock,
}

struct Fleet {
    api: Arc<ApiServer>,
    slots: Vec<Arc<ReplicaSlot>>,
    parts: Parts0,
    memory: Arc<MemoryLedger>,
    faulty: Option<Arc<FaultyLedger>>,
    /// Each GPU's memory, by name.
    capacity: std::collections::BTreeMap<String, u64>,
    /// The models, for the API server's routes when a sidecar is replaced.
    models: Vec<(String, ValidModel)>,
    _stop: Shutdown,
}

impl Fleet {
    fn new_sidecar(parts: &Parts0, slot: &ReplicaSlot) -> anyhow::Result<Arc<Sidecar>> {
        let pipe = Connector::Memory(slot.engine.addr.clone());
        let probe = Arc::new(EngineMemory {
            slot: slot.engine.clone(),
            gpus: slot.indices.clone(),
        }) as Arc<dyn MemoryProbe>;
        let (adapter, probe) = adapter_over(
            &slot.cfg,
            &slot.url,
            Some(pipe),
            None,
            &slot.indices,
            Some(probe),
        )?;
        Ok(Sidecar::with_metrics(
            slot.cfg.clone(),
            Parts {
                engine: adapter,
                process: None,
                ledger: parts.ledger.clone(),
                gpus: slot.gpus.clone(),
                probe,
                clock: parts.clock,
            },
            SidecarMetrics::with_labels(
                parts.families.clone(),
                vec![("model", slot.cfg.model.clone()), ("pod", slot.pod.clone())],
            ),
        ))
    }

    /// The API server's routes to the sidecars there are now.
    fn routes(models: &[(String, ValidModel)], slots: &[Arc<ReplicaSlot>]) -> Vec<ModelRoute> {
        models
            .iter()
            .enumerate()
            .map(|(m, (name, model))| {
                let replicas = slots
                    .iter()
                    .filter(|s| s.model == m)
                    .map(|s| Replica::local(s.pod.clone(), s.sidecar(), s.forwarder.clone()))
                    .collect();
                ModelRoute::new("sim", name, &model.spec.model_name, replicas)
                    .with_scale_out(model.spec.scale_out as usize)
            })
            .collect()
    }
}

fn gpu_records(setup: &Setup) -> Vec<Gpu> {
    let n = setup.gpus.len();
    setup
        .gpus
        .iter()
        .enumerate()
        .map(|(i, memory)| Gpu {
            name: gpu_name(i),
            spec: GpuSpec {
                // Eight GPUs a node, as in most GPU servers.
                node: format!("node-{}", i / 8),
                index: (i % 8) as u32,
                uuid: format!("GPU-sim-{i}"),
                product: "simulated".into(),
                memory_bytes: *memory,
                // The node's budget over its GPUs (eight, or what the last node has).
                host_memory_bytes: GpuSpec::host_share(setup.host_memory, (n - i / 8 * 8).min(8)),
            },
            status: Default::default(),
            resource_version: String::new(),
        })
        .collect()
}

/// Every replica placed as `local` and the controller place them, each a real sidecar in
/// front of its simulated engine, and the API server routing to them.
async fn assemble(setup: &Setup) -> anyhow::Result<Fleet> {
    let records = gpu_records(setup);
    let placement = greenthread_controller::placement::place_models(&setup.models, &records)
        .map_err(|(name, e)| anyhow::anyhow!("model {name}: {e}"))?;
    let memory = Arc::new(MemoryLedger::new());
    for g in &records {
        memory.add_gpu(&g.name, g.spec.clone());
    }
    let faulty = setup
        .faults
        .as_ref()
        .map(|plan| Arc::new(FaultyLedger::new(memory.clone(), plan.seed)));
    let ledger: Arc<dyn Ledger> = match &faulty {
        Some(f) => f.clone(),
        None => memory.clone(),
    };
    let mut registry = Registry::default();
    let families = SidecarFamilies::register(&mut registry);
    // Ledger time follows the virtual clock from a fixed origin: the same on every run.
    let clock = Clock::Tokio {
        anchor: jiff::Timestamp::from_second(1_700_000_000).expect("a valid instant"),
        at: Instant::now(),
    };
    let parts = Parts0 {
        ledger: ledger.clone(),
        families: families.clone(),
        clock,
    };
    let stop = Shutdown::new();
    let mut slots = Vec::new();
    for (m, ((name, model), replicas)) in setup.models.iter().zip(&placement).enumerate() {
        for (r, positions) in replicas.iter().enumerate() {
            let pod = format!("{name}-{r}");
            let placed: Vec<&Gpu> = positions.iter().map(|p| &records[*p as usize]).collect();
            let share = model.share_of(placed[0].spec.memory_bytes);
            let mut engine_cfg = engine_config(model, share).map_err(anyhow::Error::msg)?;
            setup.link.apply(&mut engine_cfg);
            let (addr, listener) = transport::memory(&pod);
            let engine = Arc::new(EngineSlot {
                cfg: engine_cfg.clone(),
                addr: addr.clone(),
                current: Mutex::new(None),
                serving: Mutex::new(None),
                stop: stop.clone(),
            });
            engine.run(SimEngine::new(engine_cfg), listener);
            let url = format!("http://{pod}.engine:8001");
            let cfg = SidecarConfig::for_model(
                model,
                Assignment {
                    listen: None,
                    engine_url: url.clone(),
                    engine: greenthread_sidecar::EngineKind::Sim,
                    engine_command: None,
                    pod_name: Some(pod.clone()),
                    ledger: LedgerAt::Memory,
                    memory_bytes: Some(share),
                    policy: setup.policy,
                },
            );
            let cfg = SidecarConfig {
                preemption: setup.preemption,
                // The simulated clients read answers, not comments: a comment would
                // count as a first token, and a refusal after it as a cut-off answer.
                wake_feedback: std::time::Duration::ZERO,
                ..cfg
            };
            let forwarder = engine_forwarder(&cfg, &url)?.with_connector(Connector::Memory(addr));
            let gpus = placed
                .iter()
                .zip(positions)
                .map(|(g, i)| GpuRef {
                    name: g.name.clone(),
                    index: *i,
                })
                .collect();
            let slot = ReplicaSlot {
                model: m,
                pod,
                cfg,
                url,
                gpus,
                indices: positions.clone(),
                engine,
                forwarder: Arc::new(forwarder),
                sidecar: Mutex::new(None),
                incarnation: tokio::sync::watch::Sender::new(0),
            };
            *slot.sidecar.lock().unwrap() = Some(Fleet::new_sidecar(&parts, &slot)?);
            slots.push(Arc::new(slot));
        }
    }
    // Every engine loads its weights at once, as the engines of a fleet start together;
    // their sidecars then boot them (measure, put to sleep) one GPU lock at a time.
    let engines: Vec<_> = slots
        .iter()
        .map(|s| (s.pod.clone(), s.engine.engine()))
        .collect();
    let booted = futures_util::future::join_all(
        engines
            .iter()
            .map(|(_, e)| async move { e.as_ref().expect("just started").boot().await }),
    )
    .await;
    for ((pod, _), b) in engines.iter().zip(booted) {
        b.map_err(|e| anyhow::anyhow!("{pod}: {e}"))?;
    }
    let auth = Auth::new(vec![], None, None, false, AUTH)?;
    let api = ApiServer::new(
        Fleet::routes(&setup.models, &slots),
        ledger,
        auth,
        registry,
        families,
        Box::new(|| {}),
    );
    Ok(Fleet {
        api,
        slots,
        parts,
        memory,
        faulty,
        capacity: records
            .iter()
            .map(|g| (g.name.clone(), g.spec.memory_bytes))
            .collect(),
        models: setup.models.clone(),
        _stop: stop,
    })
}

fn chat_body(model: &str, r: &Request) -> String {
    // One whitespace-separated word per prompt token, as the simulator counts them.
    let prompt = "w ".repeat(r.prompt_tokens as usize);
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": r.output_tokens,
        "stream": true,
    })
    .to_string()
}

/// One client request through the API server's router, timed from its send.
async fn send(router: axum::Router, body: String) -> Outcome {
    let sent = Instant::now();
    let req = http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("a valid request");
    let resp = match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status != 200 {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = v["error"]["code"]
            .as_str()
            .or(v["error"]["type"].as_str())
            .unwrap_or("unknown")
            .to_string();
        return Outcome::Rejected { status, code };
    }
    let mut ttft = None;
    // An answer that ends with an error event (a continuation that could not be had)
    // was cut off, however it ended.
    let mut failed = false;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if ttft.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    ttft = Some(sent.elapsed());
                }
                failed |= frame
                    .data_ref()
                    .is_some_and(|d| d.windows(10).any(|w| w == b"{\"error\":{"));
            }
            Some(Err(_)) => {
                return Outcome::Broken {
                    ttft: ttft.unwrap_or_default(),
                };
            }
        }
    }
    if failed {
        return Outcome::Broken {
            ttft: ttft.unwrap_or_default(),
        };
    }
    Outcome::Answered {
        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
        total: sent.elapsed(),
    }
}

/// Follows a replica's transitions, through its sidecar's restarts: wakes, and time
/// holding GPU memory in each state.
async fn follow(slot: Arc<ReplicaSlot>, stats: Arc<Mutex<ReplicaStats>>, end: Arc<Shutdown>) {
    let holds = |s: State| matches!(s, State::Waking | State::Serving | State::Deactivating);
    let mut incarnations = slot.incarnation.subscribe();
    let ended = end.wait();
    tokio::pin!(ended);
    // The state holding memory now, and since when.
    let mut since: Option<(Instant, State)> = None;
    let close = |since: &mut Option<(Instant, State)>| {
        if let Some((t, state)) = since.take() {
            stats.lock().unwrap().held(state, t.elapsed().as_secs_f64());
        }
    };
    'incarnations: loop {
        let sidecar = slot.sidecar();
        incarnations.mark_unchanged();
        let mut transitions = sidecar.transitions();
        let now = sidecar.state();
        if since.is_none() && holds(now) {
            since = Some((Instant::now(), now));
        }
        loop {
            let next = tokio::select! {
                biased;
                t = transitions.recv() => t,
                _ = incarnations.changed() => {
                    // A new sidecar starts asleep; the killed one's state is gone with it.
                    close(&mut since);
                    continue 'incarnations;
                }
                () = &mut ended => break 'incarnations,
            };
            let (from, to) = match next {
                Ok(t) => t,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "fleet: transitions missed");
                    continue;
                }
                Err(_) => break 'incarnations,
            };
            {
                let mut s = stats.lock().unwrap();
                if from == State::Waking && to == State::Serving {
                    s.wakes += 1;
                }
                if from == State::Deactivating
                    && to == State::Sleeping
                    && sidecar.cfg.sleep_level == 1
                    && sidecar.asleep_at() == 2
                {
                    s.demotions += 1;
                }
            }
            close(&mut since);
            if holds(to) {
                since = Some((Instant::now(), to));
            }
        }
    }
    close(&mut since);
}

/// Each model's demand, from its first replica: where it is placed, what it holds
/// there, how fast its engine serves (a model without a replica demands nothing).
fn demand_of(fleet: &Fleet, models: usize) -> Vec<crate::demand::Demand> {
    (0..models)
        .map(|m| {
            let slot = fleet.slots.iter().find(|s| s.model == m);
            slot.map_or_else(Default::default, |s| {
                let e = &s.engine.cfg;
                crate::demand::Demand {
                    gpus: s.indices.clone(),
                    bytes: s.cfg.memory_bytes.unwrap_or(0),
                    ttft_seconds: e.ttft.as_secs_f64(),
                    prefill_tokens_per_second: e.prefill_tokens_per_second,
                    tokens_per_second: e.tokens_per_second,
                    wake_seconds: (SimConfig::transfer_time(e.weights_bytes, e.h2d_bandwidth)
                        + e.wake_fixed)
                        .as_secs_f64(),
                    sleep_seconds: (SimConfig::transfer_time(e.weights_bytes, e.d2h_bandwidth)
                        + e.sleep_fixed)
                        .as_secs_f64(),
                    max_sequences: e.max_num_seqs,
                }
            })
        })
        .collect()
}

/// The name of the GPU record at position `i`.
fn gpu_name(i: usize) -> String {
    format!("gpu-{i}")
}

/// The fraction of `gpu`'s memory free while models wait for memory there, none of
/// them fitting in it; 0 when none waits or one fits.
fn stranded_fraction(gpu: &Gpu) -> f64 {
    let free = greenthread_ledger::decide::available_bytes(&gpu.spec, &gpu.status, None);
    let waiting = &gpu.status.preemption_intents;
    if waiting.is_empty()
        || waiting.iter().any(|i| i.needed_bytes <= free)
        || gpu.spec.memory_bytes == 0
    {
        return 0.0;
    }
    free as f64 / gpu.spec.memory_bytes as f64
}

/// Follows every ledger commit until `end`: per GPU, the time × fraction of its memory
/// left free while models waited for memory there and none of them fitted in it. A record
/// only changes at a commit, so each one holds until the next.
async fn follow_free_memory(
    fleet: Arc<Fleet>,
    end: Arc<Shutdown>,
) -> std::collections::BTreeMap<String, f64> {
    use std::collections::BTreeMap;
    let mut commits = fleet.memory.commits();
    let ended = end.wait();
    tokio::pin!(ended);
    // Per GPU: since when, and the fraction stranded then (0 when none is).
    let mut current: BTreeMap<String, (Instant, f64)> = fleet
        .capacity
        .keys()
        .filter_map(|name| fleet.memory.gpu(name))
        .map(|g| (g.name.clone(), (Instant::now(), stranded_fraction(&g))))
        .collect();
    let mut stranded: BTreeMap<String, f64> = BTreeMap::new();
    let mut add = |name: &str, since: Instant, fraction: f64| {
        *stranded.entry(name.to_string()).or_default() += fraction * since.elapsed().as_secs_f64();
    };
    loop {
        let gpu = tokio::select! {
            biased;
            c = commits.recv() => match c {
                Ok(g) => g,
                // Capacity 65,536: not reached by a simulation; a gap would only
                // stretch the previous record over it.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            },
            () = &mut ended => break,
        };
        if let Some((since, fraction)) = current.get(&gpu.name) {
            add(&gpu.name, *since, *fraction);
        }
        let fraction = stranded_fraction(&gpu);
        current.insert(gpu.name.clone(), (Instant::now(), fraction));
    }
    for (name, (since, fraction)) in &current {
        add(name, *since, *fraction);
    }
    stranded
}

/// The longest a request may take under faults before it counts as hung: every
/// admission the relay may make waits at most the queue's deadline, then the answer
/// streams at the engine's pace (twice over, for a shared engine), plus a minute.
fn deadline(cfg: &SidecarConfig, engine: &SimConfig, r: &Request) -> Duration {
    let decode = if engine.tokens_per_second > 0.0 {
        Duration::from_secs_f64(f64::from(r.output_tokens) / engine.tokens_per_second)
    } else {
        Duration::ZERO
    };
    cfg.queue_timeout * 3 + decode * 2 + Duration::from_secs(60)
}

/// What the invariant checks share with the run.
struct Watch {
    seed: u64,
    /// The first arrival, from which times are reported.
    origin: Mutex<Instant>,
    steps: std::sync::atomic::AtomicU64,
    violations: Mutex<Vec<Violation>>,
    injected: Mutex<Vec<Injected>>,
}

impl Watch {
    fn at(&self) -> Duration {
        Instant::now().saturating_duration_since(*self.origin.lock().unwrap())
    }

    fn violated(&self, what: String) {
        let v = Violation {
            seed: self.seed,
            at: self.at(),
            step: self.steps.load(std::sync::atomic::Ordering::Relaxed),
            what,
        };
        tracing::warn!(violation = %v, "invariant broken");
        self.violations.lock().unwrap().push(v);
    }

    fn injected(&self, fault: &Fault, at: Option<&str>) {
        let what = match at {
            Some(pod) => format!("{fault} on {pod}"),
            None => fault.to_string(),
        };
        tracing::info!(at = ?self.at(), %what, "fault injected");
        self.injected.lock().unwrap().push(Injected {
            at: self.at(),
            kind: fault.kind(),
            what,
        });
    }
}

/// Whether a sidecar is where it may hold its GPUs' wake lock: booting, or waking.
fn needs_lock(s: &Sidecar) -> bool {
    !s.boot_ready() || matches!(s.state(), State::Pending | State::Waking)
}

/// Checks every committed ledger record: no GPU is charged more than its memory, and no
/// wake lock is honoured after its wake ended (held, unexpired, by a sidecar that no
/// longer wakes, for longer than the lock's lifetime).
async fn check_commits(fleet: Arc<Fleet>, watch: Arc<Watch>, end: Arc<Shutdown>) {
    use std::sync::atomic::Ordering;
    let mut commits = fleet.memory.commits();
    let ttl = fleet
        .slots
        .first()
        .map_or(Duration::from_secs(30), |s| s.cfg.wake_lock_ttl);
    let mut stale: std::collections::BTreeMap<String, (String, Instant)> = Default::default();
    let ended = end.wait();
    tokio::pin!(ended);
    let mut over_since: std::collections::BTreeMap<String, Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let gpu = tokio::select! {
            biased;
            _ = tick.tick() => {
                check_engine_memory(&fleet, &watch, &mut over_since, ttl);
                continue;
            }
            c = commits.recv() => match c {
                Ok(g) => g,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    watch.violated(format!("the checker missed {n} ledger commits"));
                    continue;
                }
                Err(_) => return,
            },
            () = &mut ended => return,
        };
        watch.steps.fetch_add(1, Ordering::Relaxed);
        let charged = greenthread_ledger::decide::committed_bytes(&gpu.status);
        if charged > gpu.spec.memory_bytes {
            watch.violated(format!(
                "{}: {charged} bytes charged, more than its {} bytes",
                gpu.name, gpu.spec.memory_bytes
            ));
        }
        let Some(lock) = &gpu.status.wake_lock else {
            stale.remove(&gpu.name);
            continue;
        };
        let holder = fleet.slots.iter().find(|s| s.pod == lock.pod_name);
        let needed = holder.is_some_and(|s| needs_lock(&s.sidecar()));
        let expired = greenthread_ledger::decide::lock_expired(
            &gpu.status,
            lock,
            ttl,
            fleet.parts.clock.now(),
        );
        if needed || expired {
            stale.remove(&gpu.name);
            continue;
        }
        let now = Instant::now();
        let since = stale
            .entry(gpu.name.clone())
            .or_insert_with(|| (lock.pod_name.clone(), now));
        if since.0 != lock.pod_name {
            *since = (lock.pod_name.clone(), now);
        } else if now - since.1 > ttl {
            watch.violated(format!(
                "{}: the wake lock of {} is still honoured {:.1} s after its wake ended",
                gpu.name,
                lock.pod_name,
                (now - since.1).as_secs_f64()
            ));
            stale.remove(&gpu.name);
        }
    }
}

/// What the engines really hold on each GPU must fit it: an engine that holds memory
/// its sidecar has not charged (one that came back awake on its own) pushes others out
/// of memory on real hardware. Brief overlaps are tolerated for `grace` (a sidecar
/// notices on its next heartbeat); longer ones break the invariant.
fn check_engine_memory(
    fleet: &Fleet,
    watch: &Watch,
    over_since: &mut std::collections::BTreeMap<String, Instant>,
    grace: Duration,
) {
    let now = Instant::now();
    for (gpu, memory) in &fleet.capacity {
        let held = held_on(fleet, gpu, "");
        if held <= *memory {
            over_since.remove(gpu);
            continue;
        }
        let since = *over_since.entry(gpu.clone()).or_insert(now);
        if now - since > grace {
            let who: Vec<String> = fleet
                .slots
                .iter()
                .filter(|s| s.on(gpu))
                .filter_map(|s| {
                    let e = s.engine.engine()?;
                    (e.held_bytes() > 0).then(|| {
                        format!(
                            "{} {} GiB ({})",
                            s.pod,
                            e.held_bytes() >> 30,
                            s.sidecar().state()
                        )
                    })
                })
                .collect();
            let charged: Vec<String> = fleet
                .memory
                .gpu(gpu)
                .map(|g| {
                    g.status
                        .occupants
                        .iter()
                        .map(|o| {
                            format!(
                                "{} {} {} GiB",
                                o.pod_name,
                                o.state.as_str(),
                                greenthread_ledger::decide::charged_bytes(o) >> 30
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            watch.violated(format!(
                "{gpu}: its engines have held {} GiB, more than its {} GiB, for {:.0} s: {}; the ledger charges {}",
                held >> 30,
                memory >> 30,
                (now - since).as_secs_f64(),
                who.join(", "),
                charged.join(", ")
            ));
            over_since.remove(gpu);
        }
    }
}

/// Kills the sidecar of `slot` and starts a new one in its place, again (as a kubelet
/// would, after a pause) for as long as it fails to boot.
async fn restart_sidecar(fleet: Arc<Fleet>, slot: Arc<ReplicaSlot>) {
    for attempt in 0..10u32 {
        slot.sidecar().kill().await;
        // Its connections to the engine closed with it: the engine aborts what they
        // carried, as vLLM aborts the requests of clients that went away.
        if let Some(e) = slot.engine.engine() {
            e.abort_running();
        }
        let new = match Fleet::new_sidecar(&fleet.parts, &slot) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(pod = %slot.pod, error = %e, "could not build a sidecar");
                return;
            }
        };
        *slot.sidecar.lock().unwrap() = Some(new.clone());
        slot.incarnation.send_modify(|n| *n += 1);
        fleet
            .api
            .set_models(Fleet::routes(&fleet.models, &fleet.slots));
        match new.start().await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => {
                tracing::warn!(pod = %slot.pod, attempt, error = %e, "restarted sidecar did not boot")
            }
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Whether `slot` is where a crash `when` strikes.
fn crash_point(slot: &ReplicaSlot, when: CrashWhen) -> bool {
    let sidecar = slot.sidecar();
    match when {
        CrashWhen::Waking => sidecar.state() == State::Waking,
        CrashWhen::Streaming => {
            sidecar.state() == State::Serving
                && slot.engine.engine().is_some_and(|e| e.running() > 0)
        }
        CrashWhen::Asleep => sidecar.boot_ready() && sidecar.state() == State::Sleeping,
    }
}

async fn inject(fleet: Arc<Fleet>, watch: Arc<Watch>, plan: FaultPlan, start: Instant) {
    for (at, fault) in plan.events {
        tokio::time::sleep_until(start + at).await;
        let slot = |r: usize| fleet.slots[r % fleet.slots.len()].clone();
        match fault {
            Fault::Crash { replica, when } => {
                let (slot, watch, fleet) = (slot(replica), watch.clone(), fleet.clone());
                tokio::spawn(async move {
                    let patience = Instant::now() + CRASH_PATIENCE;
                    while !crash_point(&slot, when) {
                        if Instant::now() >= patience {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if slot.engine.crash() {
                        watch.injected(&fault, Some(&slot.pod));
                        tokio::spawn(restart_engine(fleet, slot.clone()));
                    }
                });
            }
            Fault::WakeFails { replica, times } => {
                let slot = slot(replica);
                if let Some(e) = slot.engine.engine() {
                    e.fail_next_wakes(times);
                    watch.injected(&fault, Some(&slot.pod));
                }
            }
            Fault::WakeHangs { replica } => {
                let slot = slot(replica);
                if let Some(e) = slot.engine.engine() {
                    e.hang_next_wakes(1);
                    watch.injected(&fault, Some(&slot.pod));
                }
            }
            Fault::SlowLedger { lasting, delay } => {
                if let Some(l) = &fleet.faulty {
                    l.slow_for(lasting, delay);
                    watch.injected(&fault, None);
                }
            }
            Fault::ConflictingWrites { lasting } => {
                if let Some(l) = &fleet.faulty {
                    l.conflicts_for(lasting);
                    watch.injected(&fault, None);
                }
            }
            Fault::Corrupt { gpu } => {
                let name = format!("gpu-{gpu}");
                // A copy of a booted sidecar's entry, renamed.
                if let Some(g) = fleet.memory.gpu(&name)
                    && let Some(mut intruder) = g.status.occupants.first().cloned()
                {
                    let mut status = g.status.clone();
                    intruder.pod_name = "planted-bug".into();
                    intruder.state = greenthread_api::OccupantState::Serving;
                    intruder.reserved_memory_bytes = g.spec.memory_bytes + 1;
                    status.occupants.push(intruder);
                    let _ = fleet
                        .memory
                        .replace_status(&name, &g.resource_version, status)
                        .await;
                    watch.injected(&fault, None);
                }
            }
            Fault::SidecarRestart { replica } => {
                let slot = slot(replica);
                watch.injected(&fault, Some(&slot.pod));
                tokio::spawn(restart_sidecar(fleet.clone(), slot));
            }
        }
    }
}

/// After the faults: every sidecar booted and settled, the ledger says what each
/// sidecar is, and each engine is asleep or awake as its sidecar says.
async fn check_converged(fleet: &Fleet, watch: &Watch) {
    let settled =
        |s: &Sidecar| s.boot_ready() && matches!(s.state(), State::Sleeping | State::Serving);
    let patience = Instant::now() + Duration::from_secs(600);
    // Two heartbeats: a record a failed write left wrong is repaired by then.
    let beat = fleet
        .slots
        .first()
        .map_or(Duration::from_secs(10), |s| s.cfg.wake_lock_ttl / 3);
    loop {
        while !fleet.slots.iter().all(|s| settled(&s.sidecar())) && Instant::now() < patience {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(beat * 2).await;
        // Settled still (an idle timeout may have started a sleep meanwhile)?
        if fleet.slots.iter().all(|s| settled(&s.sidecar())) || Instant::now() >= patience {
            break;
        }
    }
    for slot in &fleet.slots {
        let sidecar = slot.sidecar();
        let state = sidecar.state();
        if !settled(&sidecar) {
            let booted = if sidecar.boot_ready() {
                "booted"
            } else {
                "not booted"
            };
            watch.violated(format!("{}: did not settle ({booted}, {state})", slot.pod));
            continue;
        }
        for g in &slot.gpus {
            let Ok(record) = fleet.memory.get(&g.name).await else {
                continue;
            };
            let says = record.status.occupant(&slot.pod).map(|o| o.state);
            let expected = match state {
                State::Serving => greenthread_api::OccupantState::Serving,
                _ => greenthread_api::OccupantState::Sleeping,
            };
            if says != Some(expected) {
                watch.violated(format!(
                    "{} on {}: the ledger says {says:?}, the sidecar {state}",
                    slot.pod, g.name
                ));
            }
            let lock = record.status.wake_lock.as_ref();
            let left = [
                (
                    lock.is_some_and(|l| l.pod_name == slot.pod),
                    "still holds the wake lock",
                ),
                (
                    record
                        .status
                        .preemption_intents
                        .iter()
                        .any(|i| i.pod_name == slot.pod),
                    "an intent outlived its wake",
                ),
            ];
            for (_, what) in left.iter().filter(|(held, _)| *held) {
                watch.violated(format!("{} on {}: {what}", slot.pod, g.name));
            }
        }
        match slot.engine.engine() {
            None => watch.violated(format!("{}: its engine is still down", slot.pod)),
            Some(e) if e.is_sleeping() != (state == State::Sleeping) => {
                let engine = if e.is_sleeping() { "asleep" } else { "awake" };
                watch.violated(format!(
                    "{}: the engine is {engine}, its sidecar {state}",
                    slot.pod
                ));
            }
            Some(_) => {}
        }
    }
}

async fn simulate(setup: Setup, progress: Option<OnProgress>) -> anyhow::Result<Run> {
    greenthread_ledger::seed_jitter(setup.seed);
    let booting = Instant::now();
    let fleet = Arc::new(assemble(&setup).await?);
    let watch = Arc::new(Watch {
        seed: setup.faults.as_ref().map_or(setup.seed, |p| p.seed),
        origin: Mutex::new(booting),
        steps: Default::default(),
        violations: Mutex::default(),
        injected: Mutex::default(),
    });
    let end = Arc::new(Shutdown::new());
    let checker = setup
        .faults
        .as_ref()
        .map(|_| tokio::spawn(check_commits(fleet.clone(), watch.clone(), end.clone())));
    let boots: Vec<_> = fleet.slots.iter().map(|s| s.sidecar().start()).collect();
    for (rx, slot) in boots.into_iter().zip(&fleet.slots) {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("{} did not boot: {e}", slot.pod),
            Err(_) => anyhow::bail!("{} stopped while booting", slot.pod),
        }
    }
    let boot = booting.elapsed();

    let stranding = tokio::spawn(follow_free_memory(fleet.clone(), end.clone()));
    let mut followers = tokio::task::JoinSet::new();
    let stats: Vec<Arc<Mutex<ReplicaStats>>> = fleet
        .slots
        .iter()
        .map(|slot| {
            let stats = Arc::new(Mutex::new(ReplicaStats {
                model: slot.model,
                pod: slot.pod.clone(),
                gpus: slot.indices.clone(),
                reserved_bytes: slot.cfg.memory_bytes.unwrap_or(0),
                ..Default::default()
            }));
            followers.spawn(follow(slot.clone(), stats.clone(), end.clone()));
            stats
        })
        .collect();
    let preempted_before: Vec<u64> = fleet
        .slots
        .iter()
        .map(|s| s.sidecar().metrics.preemptions("preempted"))
        .collect();

    let router = greenthread_apiserver::router(fleet.api.clone());
    let start = Instant::now();
    *watch.origin.lock().unwrap() = start;
    let injector = setup
        .faults
        .clone()
        .map(|plan| tokio::spawn(inject(fleet.clone(), watch.clone(), plan, start)));
    let total = setup.requests.last().map_or(Duration::ZERO, |r| r.at);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reporter = progress.map(|report| {
        let (done, sent) = (done.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                report(Progress {
                    simulated: start.elapsed(),
                    total,
                    sent: sent.load(std::sync::atomic::Ordering::Relaxed),
                    done: done.load(std::sync::atomic::Ordering::Relaxed),
                });
            }
        })
    });
    let mut clients = tokio::task::JoinSet::new();
    // Each model's first replica, whose state a request finds on arrival.
    let mut first_replica: Vec<Option<&Arc<ReplicaSlot>>> = vec![None; setup.models.len()];
    for slot in fleet.slots.iter().rev() {
        first_replica[slot.model] = Some(slot);
    }
    let mut arrived_to = Vec::with_capacity(setup.requests.len());
    for (i, r) in setup.requests.iter().enumerate() {
        tokio::time::sleep_until(start + r.at).await;
        arrived_to.push(first_replica[r.model].map_or(State::Sleeping, |s| s.sidecar().state()));
        let body = chat_body(&setup.models[r.model].0, r);
        let limit = match (setup.faults.is_some(), first_replica[r.model]) {
            (true, Some(slot)) => deadline(&slot.cfg, &slot.engine.cfg, r),
            _ => HANG_LIMIT,
        };
        let (router, done, watch) = (router.clone(), done.clone(), watch.clone());
        let model = setup.models[r.model].0.clone();
        let checked = setup.faults.is_some();
        clients.spawn(async move {
            let outcome = tokio::time::timeout(limit, send(router, body))
                .await
                .unwrap_or(Outcome::Hung);
            if checked && outcome == Outcome::Hung {
                watch.violated(format!(
                    "request {i} to {model} neither answered nor refused within {limit:?}"
                ));
            }
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (i, outcome)
        });
        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let mut outcomes = vec![Outcome::Hung; setup.requests.len()];
    while let Some(joined) = clients.join_next().await {
        let (i, outcome) = joined?;
        outcomes[i] = outcome;
    }
    let simulated = start.elapsed();
    if let Some(r) = reporter {
        r.abort();
    }
    if let Some(plan) = &setup.faults {
        if let Some(i) = injector {
            let _ = i.await;
        }
        tokio::time::sleep_until(start + plan.until).await;
        check_converged(&fleet, &watch).await;
    }
    end.trigger();
    if let Some(c) = checker {
        let _ = c.await;
    }
    while followers.join_next().await.is_some() {}
    let stranded = stranding.await?;
    let stranded_seconds = (0..setup.gpus.len())
        .map(|i| stranded.get(&gpu_name(i)).copied().unwrap_or(0.0))
        .collect();
    let replicas = stats
        .iter()
        .zip(&fleet.slots)
        .zip(preempted_before)
        .map(|((s, slot), before)| {
            let mut s = s.lock().unwrap().clone();
            s.preempted = slot.sidecar().metrics.preemptions("preempted") - before;
            s
        })
        .collect();
    let violations = std::mem::take(&mut *watch.violations.lock().unwrap());
    let injected = std::mem::take(&mut *watch.injected.lock().unwrap());
    let demand = demand_of(&fleet, setup.models.len());
    let decode_seconds = setup
        .requests
        .iter()
        .map(|r| demand[r.model].decode_seconds(r))
        .collect();
    Ok(Run {
        outcomes,
        replicas,
        simulated,
        boot,
        arrived_to,
        gpu_memory: setup.gpus.clone(),
        stranded_seconds,
        oversubscribed_seconds: crate::demand::oversubscribed_seconds(
            &setup.gpus,
            &demand,
            &setup.requests,
        ),
        demand,
        decode_seconds,
        injected,
        violations,
        faults_seed: setup.faults.as_ref().map(|p| p.seed),
    })
}

#[cfg(test)]
mod tests {
    use greenthread_api::{GpuStatus, Occupant, OccupantState, PreemptionIntent};

    use super::*;

    const GIB: u64 = 1 << 30;

    fn gpu(serving_gib: &[u64], waiting_gib: &[u64]) -> Gpu {
        let at = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        let occupants = serving_gib
            .iter()
            .enumerate()
            .map(|(i, gib)| Occupant {
                pod_name: format!("s{i}"),
                model_name: format!("s{i}"),
                state: OccupantState::Serving,
                reserved_memory_bytes: gib * GIB,
                residual_memory_bytes: 0,
                popular: false,
                priority: Default::default(),
                last_accessed: None,
                became_serving_at: Some(at),
                min_runtime: Duration::from_secs(10),
                heartbeat: at,
                in_flight: 0,
                draining: 0,
                recent_requests: 0,
                host_memory_bytes: 0,
                pinned: false,
            })
            .collect();
        let preemption_intents = waiting_gib
            .iter()
            .enumerate()
            .map(|(i, gib)| PreemptionIntent {
                pod_name: format!("w{i}"),
                model_name: format!("w{i}"),
                needed_bytes: gib * GIB,
                since: at,
                victim_pod_name: None,
            })
            .collect();
        Gpu {
            name: gpu_name(0),
            spec: GpuSpec {
                memory_bytes: 80 * GIB,
                ..Default::default()
            },
            status: GpuStatus {
                occupants,
                preemption_intents,
                ..Default::default()
            },
            resource_version: String::new(),
        }
    }

    #[test]
    fn memory_is_stranded_when_models_wait_and_none_fits_in_what_is_free() {
        // (serving GiB, waiting GiB) → the fraction of the GPU stranded
        let cases: &[(&[u64], &[u64], f64)] = &[
            // 40 + 24 + 12 awake: 4 GiB free, a 24 waits for it.
            (&[40, 24, 12], &[24], 0.05),
            // Every waiter needs more: 8 GiB beside three 24s.
            (&[24, 24, 24], &[12, 40], 0.1),
            // Nobody waits: free, not stranded.
            (&[40, 24], &[], 0.0),
            // One waiter fits (it is about to claim, or held for another): not stranded.
            (&[40, 24], &[12, 24], 0.0),
        ];
        for (serving, waiting, want) in cases {
            let got = stranded_fraction(&gpu(serving, waiting));
            assert_eq!(got, *want, "{serving:?} awake, {waiting:?} waiting");
        }
    }

    /// `models` (two that cannot share their 24 GiB GPU) asked in turn every 30 s.
    fn alternating(models: &[(String, ValidModel)], link: HostLink) -> Run {
        let requests = (0..8)
            .map(|i| Request {
                at: Duration::from_secs(30 * i),
                model: (i % 2) as usize,
                prompt_tokens: 100,
                output_tokens: 20,
            })
            .collect();
        run(
            Setup {
                models: models.to_vec(),
                gpus: vec![24 * GIB],
                requests,
                seed: 1,
                policy: Default::default(),
                faults: None,
                preemption: greenthread_sidecar::Preemption::Resume,
                host_memory: None,
                link,
            },
            None,
        )
        .unwrap()
    }

    /// The host link reaches the engines: every level-1 wake and sleep of a run on a link
    /// ten times as fast takes its weights' copy time less by nine tenths, and nothing
    /// else changes.
    #[test]
    fn a_faster_host_link_shortens_every_level_1_wake_and_sleep_by_the_copy_it_saves() {
        let models = crate::zoo::zoo(2, 24 * GIB, 1).unwrap();
        let slow = alternating(&models, HostLink::default());
        let fast = alternating(
            &models,
            HostLink {
                wake: Some(250_000_000_000),
                sleep: Some(200_000_000_000),
            },
        );
        assert!(
            fast.outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Answered { .. })),
            "{:?}",
            fast.outcomes
        );
        for (s, f) in slow.replicas.iter().zip(&fast.replicas) {
            // The same schedule: each model woke for each of its requests.
            assert_eq!((s.wakes, s.preempted), (f.wakes, f.preempted), "{}", s.pod);
            assert!(s.wakes >= 4, "{}: {} wakes", s.pod, s.wakes);
            let weights = engine_config(&models[s.model].1, 24 * GIB)
                .unwrap()
                .weights_bytes as f64;
            // Each level-1 wake saves its copy in, each level-1 sleep its copy out. The
            // first wake may reload from disk instead: an engine that booted before its
            // sidecar recorded it sleeps at level 2.
            let (per_in, per_out) = (
                weights * (1.0 / 25e9 - 1.0 / 250e9),
                weights * (1.0 / 20e9 - 1.0 / 200e9),
            );
            let waking = s.waking_seconds - f.waking_seconds;
            let level_1 = (waking / per_in).round();
            assert!(
                (waking - level_1 * per_in).abs() < 0.01
                    && (s.wakes - 1..=s.wakes).contains(&(level_1 as u64)),
                "{}: waking {waking:.3} s less over {} wakes, {per_in:.3} s a wake",
                s.pod,
                s.wakes
            );
            let sleeping = s.deactivating_seconds - f.deactivating_seconds;
            let saved_out = s.preempted as f64 * per_out;
            assert!(
                (sleeping - saved_out).abs() < 0.01,
                "{}: sleeping {sleeping:.3} s less, expected {saved_out:.3}",
                s.pod
            );
        }
    }
}
