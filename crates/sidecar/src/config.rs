use std::{net::SocketAddr, path::PathBuf, time::Duration};

use greenthread_api::arg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// vLLM's sleep-mode API at `--engine-url`.
    Vllm,
    /// The built-in simulator, started and owned by the sidecar (speaks vLLM's API).
    Sim,
    /// SGLang with `--enable-memory-saver` (release / resume memory occupation).
    Sglang,
    /// llama.cpp's `llama-server` started by `--engine-command`: asleep = stopped.
    Llamacpp,
    /// Any OpenAI-compatible server started by `--engine-command`: asleep = stopped.
    Process,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SidecarConfig {
    /// Timeouts, caps and limits of both ports.
    #[command(flatten)]
    pub edge: greenthread_edge::EdgeConfig,
    /// More paths the public port forwards (and everything below them), for engines
    /// with serving endpoints outside the OpenAI, Anthropic and vLLM ones (repeatable).
    #[arg(long = "extra-public-path")]
    pub extra_public_paths: Vec<String>,
    /// Request headers never sent to the engine, besides `Authorization`, `Cookie` and
    /// `Proxy-Authorization` (repeatable).
    #[arg(long = "strip-header")]
    pub strip_headers: Vec<String>,
    /// Longest wait for a connection to the engine.
    #[arg(long, default_value = "5s", value_parser = arg::duration)]
    pub engine_connect_timeout: Duration,
    /// Longest wait for the engine's response headers (a non-streamed completion sends
    /// them when it is done); past it the client gets 504 and the slot is freed.
    #[arg(long, default_value = "10m", value_parser = arg::duration)]
    pub engine_response_timeout: Duration,
    /// Consecutive engine timeouts after which the engine counts as wedged and is
    /// restarted.
    #[arg(long, default_value_t = 3)]
    pub engine_timeouts_before_restart: u32,
    /// A file holding the engine's own API key (vLLM/SGLang `--api-key`), sent by the
    /// sidecar on every engine call; also `GREENTHREAD_ENGINE_API_KEY`. Never a flag value.
    #[arg(long)]
    pub engine_api_key_file: Option<PathBuf>,
    /// A file holding the token `/admin/*` on the private port demands; also
    /// `GREENTHREAD_SIDECAR_ADMIN_TOKEN`. Without one, the private port relies on the
    /// network policy that keeps it private.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// The engine's API key (read from `--engine-api-key-file` or the environment).
    #[arg(skip)]
    pub engine_api_key: Option<String>,
    /// The private port's admin token (read from `--admin-token-file` or the environment).
    #[arg(skip)]
    pub admin_token: Option<String>,
    /// Public address: inference, /health, /ready, /status.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Private address: /metrics, /metrics/engine, /admin/*.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// The engine's base URL (loopback). Required unless `--engine sim` picks one.
    #[arg(long)]
    pub engine_url: Option<String>,
    /// Engine API spoken at `--engine-url`.
    #[arg(long, value_enum, default_value = "vllm")]
    pub engine: EngineKind,
    /// Start and own the engine with this shell command (restarted on faults).
    #[arg(long)]
    pub engine_command: Option<String>,
    /// Extra arguments for the built-in simulator with `--engine sim` (repeatable).
    #[arg(long = "engine-arg", allow_hyphen_values = true)]
    pub engine_args: Vec<String>,
    /// Served model id.
    #[arg(long)]
    pub model: String,
    /// This sidecar's pod name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This sidecar's pod namespace: with it, the ledger knows the pod as
    /// `namespace/name`, so that tenants' pods of the same name never collide.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Sleep after this long without inference traffic.
    #[arg(long, default_value = "5m", value_parser = arg::duration)]
    pub idle_timeout: Duration,
    /// Longest wait for in-flight requests before sleeping anyway.
    #[arg(long, default_value = "30s", value_parser = arg::duration)]
    pub drain_timeout: Duration,
    /// vLLM sleep level: 1 offloads weights to CPU, 2 discards them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub sleep_level: u8,
    /// Serve at least this long after waking before sleeping voluntarily.
    #[arg(long, default_value = "10s", value_parser = arg::duration)]
    pub min_runtime: Duration,
    /// How long a wake waits for memory to free by itself before preempting.
    #[arg(long, default_value = "5s", value_parser = arg::duration)]
    pub max_wait_time: Duration,
    /// Popular models are never chosen as preemption victims.
    #[arg(long)]
    pub popular: bool,
    /// Requests held at once while the model is not serving; more get 429.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// Longest a request waits for the model to serve before a 503.
    #[arg(long, default_value = "5m", value_parser = arg::duration)]
    pub queue_timeout: Duration,
    /// Longest one engine wake call may take before it counts as failed.
    #[arg(long, default_value = "2m", value_parser = arg::duration)]
    pub wake_timeout: Duration,
    /// Longest a (re)started engine may take to answer.
    #[arg(long, default_value = "10m", value_parser = arg::duration)]
    pub boot_timeout: Duration,
    /// Wake attempts before a cold restart of an owned engine.
    #[arg(long, default_value_t = 2)]
    pub wake_attempts: u32,
    /// Cold restarts per wake before the queued requests fail.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Memory to reserve per GPU when waking; measured serving memory when omitted.
    #[arg(long, value_parser = arg::size)]
    pub memory_bytes: Option<u64>,
    /// Simulated GPU directory that engines allocate on (see `sim-engine --sim-gpu-dir`).
    #[arg(long, env = "GREENTHREAD_SIM_GPU_DIR")]
    pub sim_gpu_dir: Option<PathBuf>,
    /// Index of this sidecar's GPU.
    #[arg(long, default_value_t = 0)]
    pub gpu_index: u32,
    /// Size of the in-memory ledger's simulated GPU.
    #[arg(long, default_value = "80Gi", value_parser = arg::size)]
    pub sim_gpu_memory: u64,
    /// Deadline of the one-token completion that verifies every wake; an engine that
    /// misses it is wedged (healthy to probes, deaf to requests) and is restarted.
    #[arg(long, default_value = "60s", value_parser = arg::duration)]
    pub warmup_timeout: Duration,
    /// How long a wake lock survives its holder's silence.
    #[arg(long, default_value = "30s", value_parser = arg::duration)]
    pub wake_lock_ttl: Duration,
    /// Where the GPU ledger lives: in this process, or the GPU objects' status on Kubernetes.
    #[arg(long, value_enum, default_value = "memory")]
    pub ledger: LedgerKind,
    /// With `--ledger kube`: the GPU objects this pod's engine uses (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub gpus: Vec<String>,
    /// With `--ledger kube`: the namespace of the GPU objects.
    /// (Not the pod's namespace: Models run in their users' namespaces, GPUs in the agent's.)
    #[arg(
        long,
        env = "GREENTHREAD_GPU_NAMESPACE",
        default_value = "greenthread-system"
    )]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LedgerKind {
    /// An in-memory ledger with one simulated GPU (`--sim-gpu-memory`).
    Memory,
    /// `GPU` objects through the Kubernetes API (in-cluster or `KUBECONFIG`).
    Kube,
}

impl SidecarConfig {
    /// The defaults of the command line for `model`, then `args` on top (for tests and
    /// embedding, e.g. `["--idle-timeout", "1s"]`).
    pub fn from_args(model: &str, args: &[&str]) -> Result<Self, clap::Error> {
        use clap::Parser;
        #[derive(clap::Parser)]
        #[command(args_override_self = true)]
        struct Wrapper {
            #[command(flatten)]
            cfg: SidecarConfig,
        }
        let argv = ["sidecar", "--model", model]
            .into_iter()
            .chain(args.iter().copied());
        Wrapper::try_parse_from(argv).map(|w| w.cfg)
    }

    /// Reads the secrets named by files or the environment into the configuration.
    pub fn load_secrets(&mut self) -> anyhow::Result<()> {
        self.engine_api_key = greenthread_edge::secret(
            "GREENTHREAD_ENGINE_API_KEY",
            self.engine_api_key_file.as_deref(),
        )?;
        self.admin_token = greenthread_edge::secret(
            "GREENTHREAD_SIDECAR_ADMIN_TOKEN",
            self.admin_token_file.as_deref(),
        )?;
        Ok(())
    }

    /// This sidecar's key in the GPU ledger: `namespace/name` when the namespace is known.
    pub fn pod_name(&self) -> String {
        let name = self
            .pod_name
            .clone()
            .unwrap_or_else(|| format!("{}-0", self.model));
        match &self.pod_namespace {
            Some(ns) if !ns.is_empty() => greenthread_api::ledger_key(ns, &name),
            _ => name,
        }
    }
}
