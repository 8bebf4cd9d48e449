//! `greenthread sidecar`: sits in front of one engine, puts it to sleep when idle and
//! wakes it on demand, queueing requests meanwhile, with GPU memory claimed in the ledger.

mod adapters;
mod admission;
mod config;
mod driver;
pub mod engine;
pub mod error;
mod ledger_client;
pub mod metrics;
pub mod ondemand;
pub mod ports;
pub mod process;
mod proxy;
mod resume;
mod server;
mod sidecar;
pub mod state;

use std::sync::Arc;

use anyhow::Context;
use greenthread_api::GpuSpec;
use greenthread_gpu::{MemoryProbe, SimGpu, SimGpuProbe};
use greenthread_ledger::{KubeLedger, Ledger, MemoryLedger};
use tokio::{net::TcpListener, sync::mpsc};

pub use adapters::{Adapters, AdaptersFileError};
pub use admission::InFlight;
pub use config::{Assignment, EngineKind, LedgerAt, LedgerKind, Preemption, SidecarConfig};
pub use error::{BootError, Rejection, SleepError, WaitReason};
pub use greenthread_ledger::Clock;
pub use ledger_client::GpuRef;
pub use proxy::Forwarder;
pub use server::{
    AppState, api_error, private_router, public_path, public_router, reexport_engine_metrics, relay,
};
pub use sidecar::{Parts, Sidecar};

use crate::{
    engine::{EngineAdapter, Flavor, ProcessAdapter, SglangAdapter, VllmAdapter},
    process::{EngineProcess, NvmlProbe, RssProbe},
};

/// Assembles a sidecar from flags alone: an in-memory ledger with one simulated GPU, and
/// with `--engine sim` a simulator it starts itself on a free loopback port.
pub async fn run(mut cfg: SidecarConfig) -> anyhow::Result<()> {
    cfg.preemption
        .check(cfg.policy)
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    cfg.load_secrets()?;
    // Keeps the simulated GPU directory for as long as the sidecar runs.
    let mut _tempdir = None;
    // And the simulator's port.
    let mut _port = None;
    if cfg.engine == EngineKind::Sim && cfg.engine_command.is_none() {
        let lease = ports::engine_port()?;
        let port = lease.port();
        _port = Some(lease);
        let exe = std::env::current_exe().context("locating the greenthread binary")?;
        let extra: Vec<String> = cfg.engine_args.iter().map(|a| shell_quote(a)).collect();
        cfg.engine_url
            .get_or_insert_with(|| format!("http://127.0.0.1:{port}"));
        let listen = cfg
            .engine_url
            .as_deref()
            .unwrap()
            .trim_start_matches("http://")
            .to_string();
        // Adapters need LoRA enabled in the engine, as vLLM's `--enable-lora`.
        let lora = if cfg.adapters.is_empty() && cfg.adapters_file.is_none() {
            ""
        } else {
            " --enable-lora"
        };
        cfg.engine_command = Some(format!(
            "{} sim-engine --listen {listen} --model {}{lora} {}",
            shell_quote(&exe.to_string_lossy()),
            shell_quote(&cfg.model),
            extra.join(" ")
        ));
    }
    let engine_url = cfg
        .engine_url
        .clone()
        .context("--engine-url is required (or --engine sim to run the built-in simulator)")?;
    // An engine the sidecar starts is measured by the driver (NVML, per process) where
    // there is one. Without one, engines speaking vLLM's or SGLang's API are simulators
    // that allocate on a simulated GPU, which measures them; process engines are measured
    // by their resident memory.
    let nvml = (cfg.engine_command.is_some() && cfg.engine != EngineKind::Sim)
        .then(|| greenthread_gpu::NvmlSource::new().ok())
        .flatten()
        .filter(|n| {
            use greenthread_gpu::GpuSource;
            n.devices().is_ok_and(|d| !d.is_empty())
        })
        .map(|n| Arc::new(n) as Arc<dyn greenthread_gpu::GpuSource>);
    if cfg.engine_command.is_some()
        && cfg.sim_gpu_dir.is_none()
        && nvml.is_none()
        && matches!(
            cfg.engine,
            EngineKind::Vllm | EngineKind::Sim | EngineKind::Sglang
        )
    {
        let dir = tempfile::Builder::new()
            .prefix("greenthread-simgpu-")
            .tempdir()?;
        cfg.sim_gpu_dir = Some(dir.path().to_path_buf());
        _tempdir = Some(dir);
    }

    let (ledger, gpus): (Arc<dyn Ledger>, Vec<GpuRef>) = match cfg.ledger {
        LedgerKind::Memory => {
            let ledger = Arc::new(MemoryLedger::new());
            let gpu = GpuRef {
                name: format!("local-{}", cfg.gpu_index),
                index: cfg.gpu_index,
            };
            ledger.add_gpu(
                &gpu.name,
                GpuSpec {
                    node: "local".into(),
                    index: cfg.gpu_index,
                    uuid: format!("GPU-sim-{}", cfg.gpu_index),
                    product: "Simulated GPU".into(),
                    memory_bytes: cfg.sim_gpu_memory,
                    host_memory_bytes: None,
                },
            );
            (ledger, vec![gpu])
        }
        LedgerKind::Kube => {
            anyhow::ensure!(
                !cfg.gpus.is_empty(),
                "--ledger kube needs --gpus (the GPU objects this engine uses)"
            );
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API for --ledger kube")?;
            let ledger = KubeLedger::new(client, &cfg.namespace).await?;
            let mut gpus = Vec::new();
            for name in &cfg.gpus {
                let g = ledger.get(name).await.with_context(|| {
                    format!(
                        "--gpus: GPU object {name:?} in namespace {:?}",
                        cfg.namespace
                    )
                })?;
                gpus.push(GpuRef {
                    name: name.clone(),
                    index: g.spec.index,
                });
            }
            (Arc::new(ledger), gpus)
        }
    };
    let indices: Vec<u32> = gpus.iter().map(|g| g.index).collect();
    let engine_listen = engine_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let probe = cfg.sim_gpu_dir.as_ref().map(|dir| {
        Arc::new(SimGpuProbe {
            gpu: SimGpu::new(dir),
            indices: indices.clone(),
            engine_listen,
        }) as Arc<dyn MemoryProbe>
    });
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let process = cfg.engine_command.clone().map(|command| {
        let mut env = vec![(
            "GREENTHREAD_SIM_GPU_INDEX".to_string(),
            cfg.gpu_index.to_string(),
        )];
        if let Some(dir) = &cfg.sim_gpu_dir {
            env.push((
                "GREENTHREAD_SIM_GPU_DIR".into(),
                dir.to_string_lossy().into_owned(),
            ));
        }
        Arc::new(EngineProcess::new(command, env, exits_tx))
    });
    let probe = probe.or_else(|| {
        let (nvml, process) = (nvml.clone()?, process.clone()?);
        Some(Arc::new(NvmlProbe {
            nvml,
            process,
            indices: indices.clone(),
        }) as Arc<dyn MemoryProbe>)
    });
    let (engine, probe) = adapter(&cfg, &engine_url, process.as_ref(), &indices, probe)?;
    let sidecar = Sidecar::new(
        cfg.clone(),
        Parts {
            engine,
            process,
            ledger,
            gpus,
            probe,
            clock: Clock::Wall,
        },
    );
    sidecar.watch_exits(exits);
    serve(sidecar, &engine_url, greenthread_edge::signal()).await
}

/// The adapter for `--engine`, and the probe that measures it: process engines (stopped
/// to sleep) are measured by their resident memory unless a simulated GPU measures them.
#[allow(clippy::type_complexity)]
pub fn adapter(
    cfg: &SidecarConfig,
    engine_url: &str,
    process: Option<&Arc<EngineProcess>>,
    indices: &[u32],
    probe: Option<Arc<dyn MemoryProbe>>,
) -> anyhow::Result<(Arc<dyn EngineAdapter>, Option<Arc<dyn MemoryProbe>>)> {
    adapter_over(cfg, engine_url, None, process, indices, probe)
}

/// [`adapter`], reaching the engine through `connector` when given (an in-memory pipe to
/// an engine in this process) instead of TCP to `engine_url`.
#[allow(clippy::type_complexity)]
pub fn adapter_over(
    cfg: &SidecarConfig,
    engine_url: &str,
    connector: Option<greenthread_edge::Connector>,
    process: Option<&Arc<EngineProcess>>,
    indices: &[u32],
    probe: Option<Arc<dyn MemoryProbe>>,
) -> anyhow::Result<(Arc<dyn EngineAdapter>, Option<Arc<dyn MemoryProbe>>)> {
    let key = cfg.engine_api_key.as_deref();
    let flavor = match cfg.engine {
        EngineKind::Vllm | EngineKind::Sim => {
            let mut a = VllmAdapter::new(engine_url).with_api_key(key);
            if let Some(c) = connector {
                a = a.with_connector(c);
            }
            return Ok((Arc::new(a), probe));
        }
        EngineKind::Sglang => {
            let mut a = SglangAdapter::new(engine_url).with_api_key(key);
            if let Some(c) = connector {
                a = a.with_connector(c);
            }
            return Ok((Arc::new(a), probe));
        }
        EngineKind::Llamacpp => Flavor::LlamaCpp,
        EngineKind::Process => Flavor::Process,
    };
    let process = process.with_context(|| {
        format!(
            "--engine {:?} sleeps by stopping the engine: it needs --engine-command",
            cfg.engine
        )
    })?;
    let mut adapter = ProcessAdapter::new(engine_url, process.clone(), flavor, cfg.boot_timeout)
        .with_api_key(key);
    if let Some(c) = connector {
        adapter = adapter.with_connector(c);
    }
    let probe = probe.or_else(|| {
        Some(Arc::new(RssProbe {
            process: process.clone(),
            indices: indices.to_vec(),
        }) as Arc<dyn MemoryProbe>)
    });
    Ok((Arc::new(adapter), probe))
}

/// Binds both ports, boots the sidecar and serves until `until` completes.
pub async fn serve(
    sidecar: Arc<Sidecar>,
    engine_url: &str,
    until: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cfg = sidecar.cfg.clone();
    let state = AppState {
        sidecar: sidecar.clone(),
        forwarder: Arc::new(engine_forwarder(&cfg, engine_url)?),
    };
    let public = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding --listen {}", cfg.listen))?;
    let private = TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", cfg.metrics_listen))?;
    tracing::info!(model = %cfg.model, public = %cfg.listen, private = %cfg.metrics_listen, engine = engine_url, "sidecar listening");
    let stop = greenthread_edge::Shutdown::new();
    let public_srv = tokio::spawn(greenthread_edge::serve(
        public,
        public_router(state.clone()),
        cfg.edge.clone(),
        stop.clone(),
    ));
    let private_srv = tokio::spawn(greenthread_edge::serve(
        private,
        private_router(state),
        cfg.edge.clone(),
        stop.clone(),
    ));
    let booted = sidecar.start();
    tokio::pin!(until);
    tokio::select! {
        () = &mut until => {}
        booted = booted => {
            if let Ok(Err(e)) = booted {
                stop.trigger();
                sidecar.shutdown().await;
                return Err(e.into());
            }
            until.await;
        }
    }
    tracing::info!(model = %cfg.model, "shutting down");
    stop.trigger();
    let _ = public_srv.await;
    let _ = private_srv.await;
    sidecar.shutdown().await;
    Ok(())
}

/// The connection pool to `engine_url` with the configured timeouts, the client
/// credentials stripped and the engine's own key sent.
pub fn engine_forwarder(cfg: &SidecarConfig, engine_url: &str) -> anyhow::Result<Forwarder> {
    Forwarder::new(engine_url)?
        .with_timeouts(cfg.engine_connect_timeout, cfg.engine_response_timeout)
        .with_credentials(&cfg.strip_headers, cfg.engine_api_key.as_deref())
}

/// A loopback port free now, from the kernel's ephemeral range (for our own listeners,
/// bound at once; an engine's port comes from [`ports::engine_port`]).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub use greenthread_api::shell_quote;
