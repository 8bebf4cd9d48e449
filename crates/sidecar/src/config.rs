use std::{net::SocketAddr, path::PathBuf, time::Duration};

use greenthread_api::{ValidModel, arg, format_duration};
use greenthread_ledger::Policy;

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

#[derive(Debug, Clone, PartialEq, clap::Args)]
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
    /// A LoRA adapter to serve, `NAME=SOURCE` (repeatable; SOURCE is a path in the
    /// engine's filesystem or a hub id): loaded once the engine serves and again after
    /// every wake, each load checked with one token through the adapter.
    #[arg(long = "adapter", value_parser = parse_adapter)]
    pub adapters: Vec<greenthread_api::AdapterSpec>,
    /// A JSON file listing the adapters to serve instead (`[{"name": …, "source": …}]`),
    /// read again whenever it changes: adapters added there are loaded into a serving
    /// engine at once and removed ones unloaded; a sleeping one picks them up at its
    /// next wake.
    #[arg(long, conflicts_with = "adapters")]
    pub adapters_file: Option<PathBuf>,
    /// Serve adapters that requests name in `lora_adapter_metadata`: downloaded into
    /// `--lora-cache-dir` on first use, loaded into the engine, the least recently used
    /// unloaded past `--max-loras` (docs/adapters.md).
    #[arg(long)]
    pub lora_on_demand: bool,
    /// Where on-demand adapters are kept; the engine must see it at the same path.
    #[arg(long, default_value = greenthread_api::model::DEFAULT_LORA_CACHE_DIR)]
    pub lora_cache_dir: PathBuf,
    /// How long one on-demand adapter's download may take.
    #[arg(long, default_value = "5m", value_parser = arg::duration)]
    pub lora_download_timeout: Duration,
    /// On-demand adapters the engine holds at once (its `--max-loras`).
    #[arg(long, default_value_t = 4)]
    pub max_loras: u32,
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
    /// `staging.pinned`: the host memory the weights take asleep, once held, is kept
    /// across wakes, so that the model always sleeps at level 1.
    #[arg(long)]
    pub pinned: bool,
    /// Host memory per GPU that the weights take asleep at level 1 (`staging.hostMemory`
    /// split among the replica's GPUs); what the engine measured serving when omitted.
    #[arg(long, value_parser = arg::size)]
    pub host_memory_bytes: Option<u64>,
    /// Serve at least this long after waking before sleeping voluntarily.
    #[arg(long, default_value = "10s", value_parser = arg::duration)]
    pub min_runtime: Duration,
    /// How long a wake waits for memory to free by itself before preempting.
    #[arg(long, default_value = "5s", value_parser = arg::duration)]
    pub max_wait_time: Duration,
    /// Popular models are never chosen as preemption victims.
    #[arg(long)]
    pub popular: bool,
    /// The Model's priority class: `critical` wakes preempt without waiting out
    /// `--max-wait-time` and are preempted last; `sheddable` wakes never preempt and are
    /// preempted first.
    #[arg(long, default_value = "standard", value_parser = |s: &str| s.parse::<greenthread_api::Priority>())]
    pub priority: greenthread_api::Priority,
    /// The installation's scheduling policy: whom a wake short of memory preempts, and
    /// when (`cost-aware`, the default, or `lru`, the documented original).
    #[arg(long, default_value = "cost-aware", value_parser = |s: &str| s.parse::<Policy>())]
    pub policy: Policy,
    /// What happens to a preempted model's running generations: `drain` waits for them
    /// (at most `--drain-timeout`) before the engine sleeps; `resume` stops the ones it
    /// can resume at once and continues each where it stopped once the model serves again
    /// (the client sees one answer with a pause). Requests it cannot resume faithfully
    /// (tools, `n` > 1, log-probabilities, structured output, not streamed) are drained.
    #[arg(long, value_enum, default_value = "drain")]
    pub preemption: Preemption,
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
    /// A wake that takes at least this long is logged with its phases (lock wait,
    /// fairness wait, victim drain and sleep, engine wake, warm-up).
    #[arg(long, default_value = "10s", value_parser = arg::duration)]
    pub log_slow_wakes: Duration,
    /// A streamed request that waits this long for a wake gets its answer started as an
    /// event stream of SSE comments (`: waking <model>, 3.0 s`), one every this long,
    /// until the engine answers; 0s turns it off.
    #[arg(long, default_value = "3s", value_parser = arg::duration)]
    pub wake_feedback: Duration,
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

/// `--adapter NAME=SOURCE`.
fn parse_adapter(s: &str) -> Result<greenthread_api::AdapterSpec, String> {
    let (name, source) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=SOURCE"))?;
    greenthread_api::model::adapter_name(name).map_err(|e| format!("adapter name {e}"))?;
    if source.is_empty() {
        return Err(format!("adapter {name:?} has no source"));
    }
    Ok(greenthread_api::AdapterSpec {
        name: name.into(),
        source: source.into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preemption {
    Drain,
    Resume,
}

impl Preemption {
    pub fn flag(self) -> &'static str {
        match self {
            Preemption::Drain => "drain",
            Preemption::Resume => "resume",
        }
    }

    /// Whether this preemption goes with `policy`: the documented `lru` always drains
    /// (it is kept as it was), so `resume` needs the cost-aware policy.
    pub fn check(self, policy: Policy) -> Result<(), String> {
        if self == Preemption::Resume && !policy.rules().may_resume() {
            return Err(format!(
                "preemption resume needs the cost-aware policy: {policy} always drains"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LedgerKind {
    /// An in-memory ledger with one simulated GPU (`--sim-gpu-memory`).
    Memory,
    /// `GPU` objects through the Kubernetes API (in-cluster or `KUBECONFIG`).
    Kube,
}

impl EngineKind {
    /// The API the sidecar speaks for a Model's engine. `owned_sim`: the simulator runs
    /// under the sidecar (`local`) rather than beside it in its own container, where it
    /// is just another vLLM.
    pub fn of(engine: greenthread_api::EngineKind, owned_sim: bool) -> Self {
        use greenthread_api::EngineKind as Spec;
        match engine {
            Spec::Sim if owned_sim => EngineKind::Sim,
            Spec::Sim | Spec::Vllm => EngineKind::Vllm,
            Spec::Sglang => EngineKind::Sglang,
            Spec::Llamacpp => EngineKind::Llamacpp,
            Spec::Process => EngineKind::Process,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sim => "sim",
            EngineKind::Sglang => "sglang",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Process => "process",
        }
    }
}

/// Where the sidecar keeps its GPU ledger, and which records it accounts on.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerAt {
    /// In this process (`local`, tests): the caller hands the sidecar its ledger.
    Memory,
    /// The GPU objects `gpus` in `namespace`, through the Kubernetes API.
    Kube {
        gpus: Vec<String>,
        namespace: String,
    },
}

/// What a replica's sidecar needs besides its Model's spec: where it listens, how it
/// reaches and runs its engine, which GPUs it accounts on and how much it reserves there.
/// Placement and the shape (a pod, `local`) decide these.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// Public and private addresses; the command line's defaults when `None`.
    pub listen: Option<(SocketAddr, SocketAddr)>,
    pub engine_url: String,
    pub engine: EngineKind,
    /// The engine's shell command, for a sidecar that starts and owns it.
    pub engine_command: Option<String>,
    /// The pod's name; in a pod it comes from `POD_NAME` instead.
    pub pod_name: Option<String>,
    pub ledger: LedgerAt,
    /// Bytes to reserve per GPU when waking; measured when `None`.
    pub memory_bytes: Option<u64>,
    /// The installation's scheduling policy.
    pub policy: Policy,
}

impl SidecarConfig {
    /// The one way to assemble a sidecar's configuration: the command line's defaults,
    /// then the Model's values (sleep, fairness, model id), then the replica's
    /// assignment. `greenthread local` runs it as it is; the controller writes it into
    /// the pod with [`SidecarConfig::to_args`].
    pub fn for_model(model: &ValidModel, at: Assignment) -> Self {
        let mut cfg = Self::from_args(&model.spec.model_name, &[])
            .expect("the command line's defaults parse");
        // The environment of the process that assembles (the controller, `local`) is
        // not the sidecar's: what parsing took from it is put back to the defaults.
        cfg.pod_namespace = None;
        cfg.sim_gpu_dir = None;
        if let Some((public, private)) = at.listen {
            cfg.listen = public;
            cfg.metrics_listen = private;
        }
        cfg.engine_url = Some(at.engine_url);
        cfg.engine = at.engine;
        cfg.engine_command = at.engine_command;
        cfg.pod_name = at.pod_name;
        cfg.idle_timeout = model.idle_timeout;
        cfg.drain_timeout = model.drain_timeout;
        cfg.wake_feedback = model.wake_feedback;
        cfg.sleep_level = model.spec.sleep.level;
        cfg.pinned = model.spec.staging.as_ref().is_some_and(|s| s.pinned);
        cfg.host_memory_bytes = model
            .host_memory
            .map(|b| b / u64::from(model.spec.gpus_per_replica().max(1)));
        cfg.min_runtime = model.min_runtime;
        cfg.max_wait_time = model.max_wait_time;
        cfg.popular = model.spec.fairness.popular;
        cfg.priority = model.spec.priority;
        cfg.policy = at.policy;
        match at.ledger {
            LedgerAt::Memory => cfg.ledger = LedgerKind::Memory,
            LedgerAt::Kube { gpus, namespace } => {
                cfg.ledger = LedgerKind::Kube;
                cfg.gpus = gpus;
                cfg.namespace = namespace;
            }
        }
        cfg.memory_bytes = at.memory_bytes;
        cfg.adapters = model.spec.adapters.clone();
        if let Some(od) = &model.on_demand {
            cfg.lora_on_demand = true;
            if let Some(dir) = &od.cache_dir {
                cfg.lora_cache_dir = dir.into();
            }
            cfg.lora_download_timeout = od.download_timeout;
            cfg.max_loras = model.lora.map_or(4, |l| l.max_loras);
        }
        cfg
    }

    /// The command line that [`SidecarConfig::from_args`] parses back into this
    /// configuration, for what [`SidecarConfig::for_model`] sets (the rest stays at the
    /// defaults). Fixed order, so that rendered pods are stable.
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            self.listen.to_string(),
            "--metrics-listen".into(),
            self.metrics_listen.to_string(),
        ];
        if let Some(url) = &self.engine_url {
            args.extend(["--engine-url".into(), url.clone()]);
        }
        args.extend(["--model".into(), self.model.clone()]);
        if let Some(pod) = &self.pod_name {
            args.extend(["--pod-name".into(), pod.clone()]);
        }
        args.extend([
            "--idle-timeout".into(),
            format_duration(self.idle_timeout),
            "--drain-timeout".into(),
            format_duration(self.drain_timeout),
            "--wake-feedback".into(),
            format_duration(self.wake_feedback),
            "--sleep-level".into(),
            self.sleep_level.to_string(),
            "--min-runtime".into(),
            format_duration(self.min_runtime),
            "--max-wait-time".into(),
            format_duration(self.max_wait_time),
            "--policy".into(),
            self.policy.to_string(),
            "--preemption".into(),
            self.preemption.flag().into(),
        ]);
        if self.ledger == LedgerKind::Kube {
            args.extend([
                "--ledger".into(),
                "kube".into(),
                "--gpus".into(),
                self.gpus.join(","),
                "--namespace".into(),
                self.namespace.clone(),
            ]);
        }
        if let Some(bytes) = self.memory_bytes {
            args.extend(["--memory-bytes".into(), bytes.to_string()]);
        }
        if self.popular {
            args.push("--popular".into());
        }
        if self.pinned {
            args.push("--pinned".into());
        }
        if let Some(bytes) = self.host_memory_bytes {
            args.extend(["--host-memory-bytes".into(), bytes.to_string()]);
        }
        if !self.priority.is_standard() {
            args.extend(["--priority".into(), self.priority.to_string()]);
        }
        args.extend(["--engine".into(), self.engine.flag().into()]);
        if let Some(command) = &self.engine_command {
            args.extend(["--engine-command".into(), command.clone()]);
        }
        for a in &self.adapters {
            args.extend(["--adapter".into(), format!("{}={}", a.name, a.source)]);
        }
        if let Some(file) = &self.adapters_file {
            args.extend(["--adapters-file".into(), file.display().to_string()]);
        }
        if self.lora_on_demand {
            args.extend([
                "--lora-on-demand".into(),
                "--lora-cache-dir".into(),
                self.lora_cache_dir.display().to_string(),
                "--lora-download-timeout".into(),
                format_duration(self.lora_download_timeout),
                "--max-loras".into(),
                self.max_loras.to_string(),
            ]);
        }
        args
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_always_drains() {
        for (policy, preemption, ok) in [
            (Policy::Lru, Preemption::Drain, true),
            (Policy::Lru, Preemption::Resume, false),
            (Policy::CostAware, Preemption::Drain, true),
            (Policy::CostAware, Preemption::Resume, true),
        ] {
            assert_eq!(
                preemption.check(policy).is_ok(),
                ok,
                "{policy} {preemption:?}"
            );
        }
        let e = Preemption::Resume.check(Policy::Lru).unwrap_err();
        assert!(e.contains("lru always drains"), "{e}");
    }

    /// `local`'s shape (an owned simulator, the in-process ledger, a pod name) survives
    /// the same round trip as a pod's.
    #[test]
    fn a_local_assembly_parses_back_from_its_args() {
        let spec: greenthread_api::ModelSpec = serde_json::from_value(serde_json::json!({
            "modelName": "org/m", "engine": "sim",
            "sleep": {"idleTimeout": "2m", "drainTimeout": "250ms", "level": 2},
            "adapters": [{"name": "sql", "source": "/lora/sql=v2"}],
            "maxLoras": 2,
            "lora": {"enabled": true, "cacheDir": "/cache/lora", "downloadTimeout": "90s"},
            "fairness": {"minRuntime": "1m5s", "maxWaitTime": "0s", "popular": true},
        }))
        .unwrap();
        let valid = spec.validate("spec").unwrap();
        let cfg = SidecarConfig::for_model(
            &valid,
            Assignment {
                listen: None,
                engine_url: "http://127.0.0.1:4321".into(),
                engine: EngineKind::of(valid.spec.engine, true),
                engine_command: None,
                pod_name: Some("m-3".into()),
                ledger: LedgerAt::Memory,
                memory_bytes: Some(7 << 30),
                policy: Policy::Lru,
            },
        );
        assert_eq!(cfg.engine, EngineKind::Sim);
        assert_eq!(cfg.sleep_level, 2);
        assert_eq!(cfg.drain_timeout, Duration::from_millis(250));
        assert_eq!(cfg.pod_name(), "m-3");
        assert_eq!(cfg.adapters, valid.spec.adapters);
        assert!(cfg.lora_on_demand);
        assert_eq!(
            (
                cfg.lora_cache_dir.to_str(),
                cfg.lora_download_timeout,
                cfg.max_loras
            ),
            (Some("/cache/lora"), Duration::from_secs(90), 2)
        );
        let args = cfg.to_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(SidecarConfig::from_args("ignored", &args).unwrap(), cfg);
        // In a pod the simulator runs beside the sidecar: it is just another vLLM there.
        assert_eq!(
            EngineKind::of(greenthread_api::EngineKind::Sim, false),
            EngineKind::Vllm
        );
    }

    /// `staging`: pinned, and a replica's host memory split among its GPUs, through the
    /// command line and back.
    #[test]
    fn staging_reaches_the_sidecar_per_gpu() {
        let spec: greenthread_api::ModelSpec = serde_json::from_value(serde_json::json!({
            "modelName": "org/m", "engine": "vllm", "tensorParallelSize": 2,
            "staging": {"pinned": true, "hostMemory": "32Gi"},
        }))
        .unwrap();
        let valid = spec.validate("spec").unwrap();
        let cfg = SidecarConfig::for_model(
            &valid,
            Assignment {
                listen: None,
                engine_url: "http://127.0.0.1:8000".into(),
                engine: EngineKind::Vllm,
                engine_command: None,
                pod_name: None,
                ledger: LedgerAt::Memory,
                memory_bytes: None,
                policy: Policy::default(),
            },
        );
        assert!(cfg.pinned);
        assert_eq!(cfg.host_memory_bytes, Some(16 << 30));
        let args = cfg.to_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(SidecarConfig::from_args("ignored", &args).unwrap(), cfg);
    }
}
