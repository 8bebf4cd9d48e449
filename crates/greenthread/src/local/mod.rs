//! `greenthread local`: the whole platform in one process. An in-memory ledger over
//! simulated GPUs, one simulated engine process and one sidecar per model replica, the
//! simulated GPUs' stats kept in the ledger (the agent's job), and the API server.

pub(crate) mod config;
mod manage;
mod prefetch;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use greenthread_api::{EngineKind, GpuSpec, GpuStats, ValidModel};
use greenthread_apiserver::{ApiServer, Auth, ModelRoute, Replica};
use greenthread_controller::render;
use greenthread_gpu::{GpuMetrics, MemoryProbe, SimGpu, SimGpuProbe};
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{
    Assignment, GpuRef, LedgerAt, Parts, Sidecar, SidecarConfig,
    metrics::{SidecarFamilies, SidecarMetrics},
    process::{EngineProcess, NvmlProbe},
    shell_quote,
};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use config::{GpuBackend, gpu_records, load, place};

#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// YAML configuration (GPUs and models); the embedded default when omitted.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address of the API server.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Serve without API keys on a non-loopback address (refused otherwise).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Where what changes at run time is kept across restarts: API keys issued through
    /// the admin API (`keys.json`, hashes only), models changed through it, adapters
    /// downloaded, the Batch API's files and batches (`batches/`). Default
    /// `$XDG_DATA_HOME/greenthread` (`~/.local/share/greenthread`).
    #[arg(long, env = "GREENTHREAD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Requests of one batch (the Batch API) in flight at once.
    #[arg(long, default_value_t = greenthread_apiserver::batch::DEFAULT_CONCURRENCY)]
    pub batch_concurrency: usize,
    /// Bytes of files one API key may keep in the Batch API's store (inputs it uploaded
    /// and its batches' outputs); uploads past it are refused.
    #[arg(long, default_value = "2Gi", value_parser = greenthread_api::arg::size)]
    pub batch_quota: u64,
    #[command(flatten)]
    pub edge: greenthread_edge::EdgeConfig,
}

const SOURCES: greenthread_apiserver::AuthSources = greenthread_apiserver::AuthSources {
    keys: "apiKeys in the config",
    admin: "adminToken in the config",
    admin_open: "adminOpen: true in the config",
};

fn store_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("models.json")
}

/// SIGHUP reads the config file again and applies its models as the admin API would
/// (the data directory's changes over them): a file that fails its checks changes
/// nothing, and says why (the log, and a `config_rejected` event). GPUs, keys and
/// tokens are read at start only.
async fn reload_on_sighup(
    config: Option<PathBuf>,
    store: PathBuf,
    manager: Arc<manage::Manager>,
    api: Arc<ApiServer>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let source = config
            .as_deref()
            .map_or("<embedded default>".into(), |p| p.display().to_string());
        let desired = load(config.as_deref()).and_then(|mut plan| {
            apply_changes(&mut plan, &store)?;
            Ok(plan.models)
        });
        let outcome = match desired {
            Ok(models) => manager.reload(models).await,
            Err(e) => Err(format!("{e:#}")),
        };
        match outcome {
            Ok(changed) => {
                tracing::info!(target: "greenthread::audit", who = "SIGHUP", action = "config_reloaded", config = %source, changed, "config reloaded");
                api.events.emit(
                    "config_reloaded",
                    serde_json::json!({"config": source, "changed": changed}),
                );
            }
            Err(error) => {
                tracing::error!(config = %source, %error, "config not reloaded; nothing changed");
                api.events.emit(
                    "config_rejected",
                    serde_json::json!({"config": source, "error": error}),
                );
            }
        }
    }
}

/// The changes kept in `store` applied over the config file's models: each a model
/// added or replaced through the admin API (checked as the file's are), or removed.
fn apply_changes(plan: &mut config::Plan, store: &std::path::Path) -> anyhow::Result<()> {
    for (name, spec) in manage::load_changes(store)? {
        plan.models.retain(|(n, _)| *n != name);
        if let Some(spec) = spec {
            let m = config::LocalModel {
                name: name.clone(),
                spec,
            };
            let products: Vec<&str> = plan.gpus.iter().map(|g| g.product.as_str()).collect();
            let valid = config::check_model(
                &format!("{}: {name}: ", store.display()),
                &m,
                &plan.backend,
                &products,
            )
            .map_err(|es| anyhow::anyhow!("{}", es.join("; ")))?;
            plan.models.push((name, valid));
        }
    }
    Ok(())
}

/// `--data-dir`, else `$XDG_DATA_HOME/greenthread`, else `~/.local/share/greenthread`.
fn data_dir(args: &LocalArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.data_dir {
        return Ok(d.clone());
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("no --data-dir, and neither XDG_DATA_HOME nor HOME is set")?;
    Ok(base.join("greenthread"))
}

fn config_name(args: &LocalArgs) -> String {
    format!(
        "config {}",
        args.config
            .as_deref()
            .map_or("<embedded default>".into(), |p| p.display().to_string())
    )
}

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let mut plan = load(args.config.as_deref())?;
    let data_dir = data_dir(&args)?;
    // Models added, replaced or removed through the admin API in earlier runs.
    let store = store_path(&data_dir);
    apply_changes(&mut plan, &store)?;
    let auth = Auth::with_admins(
        plan.api_keys.clone(),
        plan.admin_tokens.clone(),
        plan.metrics_token.clone(),
        plan.admin_open,
        SOURCES,
    )
    .with_context(|| config_name(&args))?;
    let issued = greenthread_apiserver::issued::Issued::load(data_dir.join("keys.json")).await?;
    let auth = auth
        .with_issued(issued, SOURCES)
        .with_context(|| format!("keys kept in {}", data_dir.display()))?;
    auth.check_exposure(args.listen, args.allow_unauthenticated, SOURCES)?;
    let records = gpu_records(&plan);
    let placement = place(&plan, &records).with_context(|| config_name(&args))?;
    let sim_dir = tempfile::Builder::new()
        .prefix("greenthread-local-gpus-")
        .tempdir()?;
    let sim = SimGpu::new(sim_dir.path());
    let exe = std::env::current_exe().context("locating the greenthread binary")?;

    let ledger = Arc::new(MemoryLedger::new());
    let ledger_for_stats = ledger.clone();
    let specs: Vec<GpuSpec> = records.iter().map(|g| g.spec.clone()).collect();
    for g in &records {
        ledger.add_gpu(&g.name, g.spec.clone());
    }

    let mut registry = Registry::default();
    let families = SidecarFamilies::register(&mut registry);
    let gpu_metrics = Arc::new(GpuMetrics::register(&mut registry));
    let prefetch = Arc::new(prefetch::Prefetch::from_env(&mut registry));

    let starter = Arc::new(Starter {
        exe,
        backend: plan.backend.clone(),
        records: records.clone(),
        sim: sim.clone(),
        sim_dir: sim_dir.path().to_path_buf(),
        ledger: ledger.clone(),
        families: families.clone(),
        policy: plan.policy,
        preemption: plan.preemption,
        adapter_cache: data_dir.join("adapters"),
        prefetch,
    });
    let mut routes = Vec::new();
    let mut sidecars = Vec::new();
    let mut boots = Vec::new();
    let mut running = std::collections::BTreeMap::new();
    for ((name, model), positions) in plan.models.iter().zip(&placement) {
        let (route, started) = starter.start_model(name, model, positions)?;
        routes.push(route);
        sidecars.extend(started.iter().cloned());
        boots.push((name.clone(), model.clone(), started.clone()));
        running.insert(
            name.clone(),
            manage::Running {
                model: model.clone(),
                positions: positions.clone(),
                sidecars: started,
            },
        );
    }

    // The agent's job: keep each GPU's measured stats in its record, from NVML for real
    // GPUs, from the simulated devices' processes otherwise.
    let sample: Sampler = match &plan.backend {
        GpuBackend::Nvml(source) => {
            let source = source.clone();
            Arc::new(move |s: &GpuSpec| source.stats(s.index).ok())
        }
        GpuBackend::Simulated => {
            let sim = sim.clone();
            Arc::new(move |s: &GpuSpec| sim.stats(s).ok())
        }
    };
    let refresh = {
        let (sample, specs, metrics) = (sample.clone(), specs.clone(), gpu_metrics.clone());
        let (ledger, names, host) = (
            ledger.clone(),
            records.iter().map(|g| g.name.clone()).collect::<Vec<_>>(),
            plan.host_memory,
        );
        move || {
            for s in &specs {
                if let Some(stats) = sample(s) {
                    metrics.set(s, &stats);
                }
            }
            let held = names
                .iter()
                .filter_map(|n| ledger.gpu(n))
                .map(|g| greenthread_ledger::decide::host_held_bytes(&g.status))
                .sum();
            metrics.set_host("local", host.0, host.1, held);
        }
    };
    refresh();
    let names: Vec<(String, GpuSpec)> = records
        .iter()
        .map(|g| (g.name.clone(), g.spec.clone()))
        .collect();
    tokio::spawn(async move {
        loop {
            report_gpu_stats(&*ledger_for_stats, &sample, &names).await;
            // Device statistics are sampled, as an agent samples NVML.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });

    let api = ApiServer::new(
        routes,
        ledger.clone(),
        auth,
        registry,
        families,
        Box::new(refresh),
    );
    let batches = greenthread_apiserver::batch::Batches::start(
        &data_dir.join("batches"),
        &api,
        args.batch_concurrency,
        greenthread_apiserver::batch::Quota {
            bytes: args.batch_quota,
            ..Default::default()
        },
    )
    .with_context(|| format!("the Batch API's store in {}", data_dir.display()))?;
    let _ = api.batches.set(batches.clone());
    let prefetch = starter.prefetch.clone();
    let manager = Arc::new(manage::Manager::new(starter, &api, running, store));
    let _ = api
        .manager
        .set(manager.clone() as Arc<dyn greenthread_apiserver::ModelManager>);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    *api.advertise.write().unwrap() = listener.local_addr()?.to_string();

    // Each boots in the background once its weights are in the cache (a failure is
    // logged); the loops follow.
    for (name, model, started) in boots {
        prefetch.boot(&name, &model, started);
    }

    let base = format!("http://{}", args.listen);
    println!(
        "GreenThread local: {} models on {} GPUs ({})",
        plan.models.len(),
        specs.len(),
        args.config
            .as_deref()
            .map_or("embedded default".into(), |p| p.display().to_string())
    );
    println!(
        "  OpenAI API   {base}/v1        (models: {})",
        api.known_models()
    );
    println!("  Admin API    {base}/api/v1/models  {base}/api/v1/gpus  {base}/api/v1/events");
    println!(
        "  Engines      boot in the background (`booting` in /v1/models until up); their output and boot progress are logged below"
    );
    println!("  Metrics      {base}/metrics");
    println!(
        "  Try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'",
        plan.models[0].0
    );

    api.shutdown.on_signals();
    tokio::spawn(reload_on_sighup(
        args.config.clone(),
        store_path(&data_dir),
        manager.clone(),
        api.clone(),
    ));
    greenthread_edge::serve(
        listener,
        greenthread_apiserver::router(api.clone()),
        args.edge.clone(),
        api.shutdown.clone(),
    )
    .await?;
    // Requests in progress have finished or met the shutdown deadline; batch requests in
    // flight are answered and recorded (a restart sends them no more); stop every engine.
    batches.shutdown(args.edge.shutdown_timeout).await;
    tracing::info!("stopping engines");
    let manager = manager.running_sidecars().await;
    futures_util::future::join_all(manager.iter().map(|s| s.shutdown())).await;
    drop(sim_dir);
    Ok(())
}

/// What starting a model's replicas takes: kept, so that models added at run time start
/// exactly as those of the configuration.
pub(crate) struct Starter {
    exe: PathBuf,
    pub(crate) backend: GpuBackend,
    pub(crate) records: Vec<greenthread_api::Gpu>,
    sim: SimGpu,
    sim_dir: PathBuf,
    ledger: Arc<MemoryLedger>,
    families: Arc<SidecarFamilies>,
    policy: greenthread_ledger::Policy,
    preemption: greenthread_sidecar::Preemption,
    /// On-demand adapters' cache unless a Model sets `lora.cacheDir`: the data
    /// directory's, kept across runs as the Hugging Face cache is.
    adapter_cache: PathBuf,
    /// Weights into the Hugging Face cache before an engine first boots.
    pub(crate) prefetch: Arc<prefetch::Prefetch>,
}

impl Starter {
    /// The route and sidecars of `model`'s replicas at `positions` (in the GPU records),
    /// each with its engine (not started yet: [`Sidecar::start`] boots it).
    pub(crate) fn start_model(
        &self,
        name: &str,
        model: &ValidModel,
        positions: &[Vec<u32>],
    ) -> anyhow::Result<(ModelRoute, Vec<Arc<Sidecar>>)> {
        let mut sidecars = Vec::new();
        let mut route = ModelRoute::new("local", name, &model.spec.model_name, vec![])
            .with_scale_out(model.spec.scale_out as usize)
            .with_adapters(model.spec.adapters.iter().map(|a| a.name.clone()).collect())
            .with_endpoints(model.spec.served_endpoints());
        for (r, positions) in positions.iter().enumerate() {
            let pod = format!("{name}-{r}");
            let lease = greenthread_sidecar::ports::engine_port()?;
            let port = lease.port();
            let url = format!("http://127.0.0.1:{port}");
            let placed: Vec<&greenthread_api::Gpu> = positions
                .iter()
                .map(|p| &self.records[*p as usize])
                .collect();
            // Device indices: NVML's for real GPUs, positions for simulated ones.
            let gpus: Vec<u32> = placed.iter().map(|g| g.spec.index).collect();
            let gpus = &gpus;
            let first_gpu = gpus[0];
            let memory = model.share_of(placed[0].spec.memory_bytes);
            let (command, kind) = engine_command(&self.exe, name, model, port, memory);
            let cfg = SidecarConfig::for_model(
                model,
                Assignment {
                    listen: None,
                    engine_url: url.clone(),
                    engine: kind,
                    // `local` starts the engine itself (below), with the GPUs' environment.
                    engine_command: None,
                    pod_name: Some(pod.clone()),
                    ledger: LedgerAt::Memory,
                    // A simulated vLLM takes its share up front; a process engine is measured.
                    memory_bytes: (kind == greenthread_sidecar::EngineKind::Sim).then_some(memory),
                    policy: self.policy,
                },
            );
            let on_demand_cache = model.on_demand.as_ref().map(|od| {
                od.cache_dir
                    .as_ref()
                    .map_or(self.adapter_cache.clone(), PathBuf::from)
            });
            let cfg = SidecarConfig {
                preemption: self.preemption,
                lora_cache_dir: on_demand_cache.unwrap_or(cfg.lora_cache_dir),
                ..cfg
            };
            let (exits_tx, exits) = mpsc::unbounded_channel();
            let (env, probe) = match &self.backend {
                GpuBackend::Simulated => {
                    let env = vec![
                        (
                            "GREENTHREAD_SIM_GPU_DIR".to_string(),
                            self.sim_dir.to_string_lossy().into_owned(),
                        ),
                        (
                            "GREENTHREAD_SIM_GPU_INDEX".to_string(),
                            first_gpu.to_string(),
                        ),
                    ];
                    let probe = (kind == greenthread_sidecar::EngineKind::Sim).then(|| {
                        Arc::new(SimGpuProbe {
                            gpu: self.sim.clone(),
                            indices: gpus.clone(),
                            engine_listen: format!("127.0.0.1:{port}"),
                        }) as Arc<dyn MemoryProbe>
                    });
                    (env, probe)
                }
                // A real engine sees only its placed GPUs, by UUID, and is measured per
                // process by the driver.
                GpuBackend::Nvml(_) => {
                    let uuids: Vec<&str> = placed.iter().map(|g| g.spec.uuid.as_str()).collect();
                    let mut env = vec![("CUDA_VISIBLE_DEVICES".to_string(), uuids.join(","))];
                    env.extend(self.prefetch.engine_env(model));
                    if model.spec.engine == EngineKind::Vllm {
                        // vLLM's sleep API lives behind its development endpoints.
                        env.push(("VLLM_SERVER_DEV_MODE".to_string(), "1".to_string()));
                        if model.lora.is_some() {
                            // Its adapter API, behind this.
                            env.push((
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING".to_string(),
                                "True".to_string(),
                            ));
                        }
                    }
                    (env, None)
                }
            };
            let process = Arc::new(EngineProcess::new(command, env, exits_tx).holding(lease));
            let probe = match &self.backend {
                GpuBackend::Nvml(source) => Some(Arc::new(NvmlProbe {
                    nvml: source.clone(),
                    process: process.clone(),
                    indices: gpus.clone(),
                }) as Arc<dyn MemoryProbe>),
                GpuBackend::Simulated => probe,
            };
            let (engine, probe) =
                greenthread_sidecar::adapter(&cfg, &url, Some(&process), gpus, probe)
                    .with_context(|| format!("model {name}"))?;
            let sidecar = Sidecar::with_metrics(
                cfg,
                Parts {
                    engine,
                    process: Some(process),
                    ledger: self.ledger.clone() as Arc<dyn Ledger>,
                    gpus: placed
                        .iter()
                        .map(|g| GpuRef {
                            name: g.name.clone(),
                            index: g.spec.index,
                        })
                        .collect(),
                    probe,
                    clock: greenthread_sidecar::Clock::Wall,
                },
                SidecarMetrics::with_labels(
                    self.families.clone(),
                    vec![("model", name.to_string()), ("pod", pod.clone())],
                ),
            );
            sidecar.watch_exits(exits);
            // Client credentials stop here: the engine never sees them.
            let forwarder = greenthread_sidecar::engine_forwarder(&sidecar.cfg, &url)?;
            route
                .replicas
                .push(Replica::local(pod, sidecar.clone(), Arc::new(forwarder)));
            sidecars.push(sidecar);
        }
        Ok((route, sidecars))
    }
}

/// Measured statistics of a GPU, if it can be sampled now.
type Sampler = Arc<dyn Fn(&GpuSpec) -> Option<GpuStats> + Send + Sync>;

/// One round of the agent's job: each GPU's sampled statistics into its ledger record.
async fn report_gpu_stats(ledger: &dyn Ledger, sample: &Sampler, gpus: &[(String, GpuSpec)]) {
    for (name, spec) in gpus {
        let Some(stats) = sample(spec) else { continue };
        let r = greenthread_ledger::update(ledger, name, &|| {}, |g| {
            let mut next = g.status.clone();
            next.stats = Some(stats.clone());
            Ok::<_, greenthread_ledger::LedgerError>((Some(next), ()))
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(gpu = spec.index, error = %e, "could not report gpu stats");
        }
    }
}

/// The engine's command line on `port`, and the API the sidecar speaks to it. `sim`:
/// the built-in simulator taking `memory` up front; `vllm` and `sglang`: the command
/// lines the controller renders for their containers (one function for both);
/// `llamacpp`: `llama-server` (the spec's `command`, or `llama-server` on the PATH) with
/// the spec's `extraArgs`; `process`: the spec's `command` and `extraArgs`, where
/// `{port}` stands for the port (also in `$PORT`).
fn engine_command(
    exe: &std::path::Path,
    name: &str,
    model: &ValidModel,
    port: u16,
    memory: u64,
) -> (String, greenthread_sidecar::EngineKind) {
    let spec = &model.spec;
    let kind = greenthread_sidecar::EngineKind::of(spec.engine, true);
    let join = |argv: Vec<String>| {
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let command = match spec.engine {
        EngineKind::Llamacpp | EngineKind::Process => {
            spec.owned_engine_command(port, "llama-server")
        }
        EngineKind::Vllm => join(render::vllm_command(spec, name, port)),
        EngineKind::Sglang => join(render::sglang_command(spec, port)),
        EngineKind::Sim => {
            let mut argv = vec![exe.to_string_lossy().into_owned(), "sim-engine".to_string()];
            argv.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
            argv.extend(greenthread_simulator::SimConfig::share_args(
                &spec.model_name,
                memory,
                &spec.extra_args,
            ));
            if model.lora.is_some() {
                argv.push("--enable-lora".to_string());
            }
            join(argv)
        }
    };
    (command, kind)
}

#[cfg(test)]
mod tests {
    use greenthread_gpu::{FakeSource, GpuSource};
    use greenthread_ledger::MemoryLedger;

    use super::*;

    #[tokio::test]
    async fn real_gpus_stats_are_sampled_into_their_records() {
        let source = Arc::new(FakeSource::new(2, 80 << 30));
        let stats = GpuStats {
            used_memory_bytes: 7 << 30,
            free_memory_bytes: 73 << 30,
            utilization_percent: 42.0,
            temperature_celsius: 55.0,
            power_watts: 300.0,
        };
        source.set_stats(1, stats.clone());
        let ledger = MemoryLedger::new();
        let gpus: Vec<(String, GpuSpec)> = source
            .devices()
            .unwrap()
            .into_iter()
            .map(|d| {
                let spec = GpuSpec {
                    node: "local".into(),
                    index: d.index,
                    uuid: d.uuid,
                    product: d.product,
                    memory_bytes: d.memory_bytes,
                    host_memory_bytes: None,
                };
                ledger.add_gpu(&format!("local-{}", d.index), spec.clone());
                (format!("local-{}", d.index), spec)
            })
            .collect();
        let sample: Sampler = {
            let source = source.clone();
            Arc::new(move |s: &GpuSpec| source.stats(s.index).ok())
        };
        report_gpu_stats(&ledger, &sample, &gpus).await;
        let record = ledger.get("local-1").await.unwrap();
        assert_eq!(record.status.stats, Some(stats));
        let other = ledger.get("local-0").await.unwrap();
        assert_eq!(other.status.stats.unwrap().used_memory_bytes, 0);
    }
}
