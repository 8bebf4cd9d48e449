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
use greenthread_edge::{Connector, EdgeConfig, Shutdown, transport::memory};
use greenthread_gpu::{MemoryProbe, ProbeError};
use greenthread_ledger::{Clock, Ledger, MemoryLedger};
use greenthread_sidecar::{
    Assignment, GpuRef, LedgerAt, Parts, Sidecar, SidecarConfig, adapter_over, engine_forwarder,
    metrics::{SidecarFamilies, SidecarMetrics},
    state::State,
};
use greenthread_simulator::SimEngine;
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::zoo::engine_config;

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
    /// GPU-seconds it held memory (waking, serving, draining), per GPU it spans.
    pub awake_gpu_seconds: f64,
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

/// What an engine holds, read from the engine itself (a simulated GPU without files).
struct EngineMemory {
    engine: Arc<SimEngine>,
    gpus: Vec<u32>,
}

#[async_trait::async_trait]
impl MemoryProbe for EngineMemory {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        let held = self.engine.held_bytes();
        Ok(self.gpus.iter().map(|g| (*g, held)).collect())
    }
}

struct Fleet {
    api: Arc<ApiServer>,
    sidecars: Vec<(usize, Arc<Sidecar>, Vec<u32>)>,
    _stop: Shutdown,
}

fn gpu_records(setup: &Setup) -> Vec<Gpu> {
    setup
        .gpus
        .iter()
        .enumerate()
        .map(|(i, memory)| Gpu {
            name: format!("gpu-{i}"),
            spec: GpuSpec {
                // Eight GPUs a node, as in most GPU servers.
                node: format!("node-{}", i / 8),
                index: (i % 8) as u32,
                uuid: format!("GPU-sim-{i}"),
                product: "simulated".into(),
                memory_bytes: *memory,
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
    let ledger = Arc::new(MemoryLedger::new());
    for g in &records {
        ledger.add_gpu(&g.name, g.spec.clone());
    }
    let mut registry = Registry::default();
    let families = SidecarFamilies::register(&mut registry);
    // Ledger time follows the virtual clock from a fixed origin: the same on every run.
    let clock = Clock::Tokio {
        anchor: jiff::Timestamp::from_second(1_700_000_000).expect("a valid instant"),
        at: Instant::now(),
    };
    let stop = Shutdown::new();
    let mut routes = Vec::new();
    let mut sidecars = Vec::new();
    let mut engines = Vec::new();
    for (m, ((name, model), replicas)) in setup.models.iter().zip(&placement).enumerate() {
        let mut route = ModelRoute {
            namespace: "sim".into(),
            name: name.clone(),
            model_name: model.spec.model_name.clone(),
            replicas: vec![],
        };
        for (r, positions) in replicas.iter().enumerate() {
            let pod = format!("{name}-{r}");
            let placed: Vec<&Gpu> = positions.iter().map(|p| &records[*p as usize]).collect();
            let share = model.share_of(placed[0].spec.memory_bytes);
            let engine = SimEngine::new(engine_config(model, share).map_err(anyhow::Error::msg)?);
            engines.push((pod.clone(), engine.clone()));
            let (addr, listener) = memory(&pod);
            tokio::spawn(greenthread_edge::serve(
                listener,
                greenthread_simulator::router(engine.clone()),
                EdgeConfig::default(),
                stop.clone(),
            ));
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
            let indices: Vec<u32> = positions.clone();
            let pipe = Connector::Memory(addr);
            let probe = Arc::new(EngineMemory {
                engine: engine.clone(),
                gpus: indices.clone(),
            }) as Arc<dyn MemoryProbe>;
            let (adapter, probe) =
                adapter_over(&cfg, &url, Some(pipe.clone()), None, &indices, Some(probe))?;
            let sidecar = Sidecar::with_metrics(
                cfg.clone(),
                Parts {
                    engine: adapter,
                    process: None,
                    ledger: ledger.clone() as Arc<dyn Ledger>,
                    gpus: placed
                        .iter()
                        .zip(&indices)
                        .map(|(g, i)| GpuRef {
                            name: g.name.clone(),
                            index: *i,
                        })
                        .collect(),
                    probe,
                    clock,
                },
                SidecarMetrics::with_labels(
                    families.clone(),
                    vec![("model", name.clone()), ("pod", pod.clone())],
                ),
            );
            let forwarder = engine_forwarder(&cfg, &url)?.with_connector(pipe);
            route
                .replicas
                .push(Replica::local(pod, sidecar.clone(), Arc::new(forwarder)));
            sidecars.push((m, sidecar, indices));
        }
        routes.push(route);
    }
    // Every engine loads its weights at once, as the engines of a fleet start together;
    // their sidecars then boot them (measure, put to sleep) one GPU lock at a time.
    let booted = futures_util::future::join_all(engines.iter().map(|(_, e)| e.boot())).await;
    for ((pod, _), b) in engines.iter().zip(booted) {
        b.map_err(|e| anyhow::anyhow!("{pod}: {e}"))?;
    }
    let auth = Auth::new(vec![], None, None, false, AUTH)?;
    let api = ApiServer::new(
        routes,
        ledger as Arc<dyn Ledger>,
        auth,
        registry,
        families,
        Box::new(|| {}),
    );
    Ok(Fleet {
        api,
        sidecars,
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
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if ttft.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    ttft = Some(sent.elapsed());
                }
            }
            Some(Err(_)) => {
                return Outcome::Broken {
                    ttft: ttft.unwrap_or_default(),
                };
            }
        }
    }
    Outcome::Answered {
        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
        total: sent.elapsed(),
    }
}

/// Follows a replica's transitions: wakes, and time holding GPU memory.
async fn follow(sidecar: Arc<Sidecar>, stats: Arc<Mutex<ReplicaStats>>, end: Arc<Shutdown>) {
    let holds = |s: State| matches!(s, State::Waking | State::Serving | State::Deactivating);
    let gpus = stats.lock().unwrap().gpus.len().max(1) as f64;
    let mut transitions = sidecar.transitions();
    let mut since: Option<Instant> = holds(sidecar.state()).then(Instant::now);
    let ended = end.wait();
    tokio::pin!(ended);
    loop {
        let next = tokio::select! {
            biased;
            t = transitions.recv() => t,
            () = &mut ended => break,
        };
        let (from, to) = match next {
            Ok(t) => t,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "fleet: transitions missed");
                continue;
            }
            Err(_) => break,
        };
        let mut s = stats.lock().unwrap();
        if from == State::Waking && to == State::Serving {
            s.wakes += 1;
        }
        match (holds(from), holds(to), since) {
            (false, true, _) => since = Some(Instant::now()),
            (true, false, Some(t)) => {
                s.awake_gpu_seconds += t.elapsed().as_secs_f64() * gpus;
                since = None;
            }
            _ => {}
        }
    }
    if let Some(t) = since {
        stats.lock().unwrap().awake_gpu_seconds += t.elapsed().as_secs_f64() * gpus;
    }
}

async fn simulate(setup: Setup, progress: Option<OnProgress>) -> anyhow::Result<Run> {
    greenthread_ledger::seed_jitter(setup.seed);
    let booting = Instant::now();
    let fleet = assemble(&setup).await?;
    let boots: Vec<_> = fleet.sidecars.iter().map(|(_, s, _)| s.start()).collect();
    for (rx, (_, s, _)) in boots.into_iter().zip(&fleet.sidecars) {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("{} did not boot: {e}", s.pod),
            Err(_) => anyhow::bail!("{} stopped while booting", s.pod),
        }
    }
    let boot = booting.elapsed();

    let end = Arc::new(Shutdown::new());
    let mut followers = tokio::task::JoinSet::new();
    let stats: Vec<Arc<Mutex<ReplicaStats>>> = fleet
        .sidecars
        .iter()
        .map(|(m, s, gpus)| {
            let stats = Arc::new(Mutex::new(ReplicaStats {
                model: *m,
                pod: s.pod.clone(),
                gpus: gpus.clone(),
                ..Default::default()
            }));
            followers.spawn(follow(s.clone(), stats.clone(), end.clone()));
            stats
        })
        .collect();
    let preempted_before: Vec<u64> = fleet
        .sidecars
        .iter()
        .map(|(_, s, _)| s.metrics.preemptions("preempted"))
        .collect();

    let router = greenthread_apiserver::router(fleet.api.clone());
    let start = Instant::now();
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
    let mut first_replica: Vec<Option<&Arc<Sidecar>>> = vec![None; setup.models.len()];
    for (m, sidecar, _) in fleet.sidecars.iter().rev() {
        first_replica[*m] = Some(sidecar);
    }
    let mut arrived_to = Vec::with_capacity(setup.requests.len());
    for (i, r) in setup.requests.iter().enumerate() {
        tokio::time::sleep_until(start + r.at).await;
        arrived_to.push(first_replica[r.model].map_or(State::Sleeping, |s| s.state()));
        let body = chat_body(&setup.models[r.model].0, r);
        let (router, done) = (router.clone(), done.clone());
        clients.spawn(async move {
            let outcome = tokio::time::timeout(HANG_LIMIT, send(router, body))
                .await
                .unwrap_or(Outcome::Hung);
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
    end.trigger();
    while followers.join_next().await.is_some() {}
    let replicas = stats
        .iter()
        .zip(&fleet.sidecars)
        .zip(preempted_before)
        .map(|((s, (_, sidecar, _)), before)| {
            let mut s = s.lock().unwrap().clone();
            s.preempted = sidecar.metrics.preemptions("preempted") - before;
            s
        })
        .collect();
    Ok(Run {
        outcomes,
        replicas,
        simulated,
        boot,
        arrived_to,
    })
}
