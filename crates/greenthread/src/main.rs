mod download;
mod local;
mod simulate;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "greenthread",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GREENTHREAD_REVISION"), ")"),
    about = "Many LLMs on few GPUs"
)]
struct Cli {
    /// Runtime worker threads. The sidecar defaults to one: proxying is I/O-bound, and
    /// one thread avoids cross-thread wake-ups (lower latency) and leaves the cores to
    /// the engine. Other roles default to one per core.
    #[arg(long, global = true, env = "GREENTHREAD_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The node agent: GPU discovery, GPU objects and their stats, GPU metrics.
    Agent(greenthread_agent::AgentConfig),
    /// The controller: Model → placed pods, Service and status; ledger hygiene; leader election.
    Controller(Box<greenthread_controller::ControllerConfig>),
    /// The API server: one OpenAI endpoint for every Model, admin API, events, metrics.
    Apiserver(greenthread_apiserver::cluster::ApiServerConfig),
    /// Print the CustomResourceDefinitions (Model, GPU) as YAML.
    Crds,
    /// A model's weights from the hub (`HF_ENDPOINT`, `HF_TOKEN`) into the node's cache:
    /// resumed, checked, never twice.
    Download(download::DownloadArgs),
    /// The GPUs NVML sees, their statistics and the memory of each compute process, as
    /// JSON (what the agent reports; a machine without the driver gets a clear error).
    Gpus,
    /// Copy this binary into DIR (an init container's job, for engines whose image
    /// runs the sidecar itself).
    #[command(hide = true)]
    InstallBinary { dir: std::path::PathBuf },
    /// Everything on one machine: ledger, engines, sidecars and the API server.
    Local(local::LocalArgs),
    /// How many GPUs do my models and my traffic need? Replays a request trace through
    /// the real control plane over simulated engines, in virtual time.
    Simulate(Box<simulate::SimulateArgs>),
    /// Sleep/wake proxy in front of one inference engine.
    Sidecar(Box<greenthread_sidecar::SidecarConfig>),
    /// A vLLM-compatible simulated engine.
    SimEngine(greenthread_simulator::SimConfig),
    /// The simulator behind vLLM's command line (`vllm serve MODEL …`), for tests: a
    /// `vllm` on the PATH that runs `greenthread vllm-stand-in "$@"`.
    #[command(hide = true)]
    VllmStandIn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The simulator behind SGLang's launcher (`python3 -m sglang.launch_server …`).
    #[command(hide = true)]
    SglangStandIn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The simulator behind llama.cpp's `llama-server` command line.
    #[command(hide = true)]
    LlamaStandIn {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Crds => {
            print!("{}", crds()?);
            return Ok(());
        }
        Command::InstallBinary { dir } => return install_binary(dir),
        Command::Gpus => return gpus(),
        _ => {}
    }
    // A simulation runs thousands of sidecars: only errors, unless RUST_LOG says more.
    let quiet = matches!(cli.command, Command::Simulate(_));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if quiet { "error" } else { "info" })
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Simulate(args) = cli.command {
        // Its own runtime: one thread on a paused clock.
        return simulate::main(*args);
    }
    let threads = cli.worker_threads.unwrap_or(match cli.command {
        Command::Sidecar(_) => 1,
        _ => std::thread::available_parallelism().map_or(2, usize::from),
    });
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async {
        match cli.command {
            Command::Agent(cfg) => greenthread_agent::run(cfg).await,
            Command::Apiserver(cfg) => greenthread_apiserver::cluster::run(cfg).await,
            Command::Controller(cfg) => greenthread_controller::run(*cfg).await,
            Command::Local(args) => local::run(args).await,
            Command::Download(args) => download::run(args).await,
            Command::Sidecar(cfg) => greenthread_sidecar::run(*cfg).await,
            Command::SimEngine(cfg) => greenthread_simulator::bind_and_serve(cfg).await,
            Command::VllmStandIn { args } => {
                greenthread_simulator::bind_and_serve(greenthread_simulator::stand_in::vllm(&args)?)
                    .await
            }
            Command::SglangStandIn { args } => {
                greenthread_simulator::bind_and_serve(greenthread_simulator::stand_in::sglang(
                    &args,
                )?)
                .await
            }
            Command::LlamaStandIn { args } => {
                greenthread_simulator::bind_and_serve(greenthread_simulator::stand_in::llama(
                    &args,
                )?)
                .await
            }
            Command::Crds
            | Command::InstallBinary { .. }
            | Command::Gpus
            | Command::Simulate(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

fn gpus() -> anyhow::Result<()> {
    use greenthread_gpu::{GpuSource, NvmlSource};
    let nvml = NvmlSource::new()?;
    let mut out = Vec::new();
    for d in nvml.devices()? {
        let stats = nvml.stats(d.index)?;
        let processes: Vec<serde_json::Value> = nvml
            .process_memory(d.index)?
            .into_iter()
            .map(|(pid, bytes)| serde_json::json!({"pid": pid, "usedMemoryBytes": bytes}))
            .collect();
        out.push(serde_json::json!({
            "index": d.index, "uuid": d.uuid, "product": d.product,
            "memoryBytes": d.memory_bytes, "stats": stats, "processes": processes,
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn install_binary(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().context("locating this binary")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("greenthread");
    std::fs::copy(&exe, &target)
        .with_context(|| format!("copying {} to {}", exe.display(), target.display()))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    println!("{}", target.display());
    Ok(())
}

/// Both CRDs as one YAML stream, as checked in under `charts/greenthread/crds/`.
fn crds() -> anyhow::Result<String> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [
        greenthread_api::Model::crd(),
        greenthread_api::GpuResource::crd(),
    ] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
