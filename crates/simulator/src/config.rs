use std::{net::SocketAddr, path::PathBuf, time::Duration};

use greenthread_api::arg;

/// What a sleeping engine does when sent inference anyway (real vLLM versions differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AsleepBehavior {
    /// Answer 500 at once.
    #[default]
    Error,
    /// Never answer.
    Hang,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    pub listen: SocketAddr,
    /// Timeouts, caps and limits of the server.
    #[command(flatten)]
    pub edge: greenthread_edge::EdgeConfig,
    /// Model id served (`/v1/models`, the `model` field of requests).
    #[arg(long)]
    pub model: String,
    /// Like vLLM's `--served-model-name`: the names requests may use instead of
    /// `--model` (repeatable). Without it, `--model` is the one name.
    #[arg(long = "served-model-name")]
    pub served_model_names: Vec<String>,
    /// Like vLLM without `--enable-sleep-mode` or without `VLLM_SERVER_DEV_MODE=1`: the
    /// sleep API (`/sleep`, `/wake_up`, `/is_sleeping`, `/collective_rpc`) is not there.
    #[arg(long, hide = true)]
    pub no_sleep_api: bool,
    /// Like vLLM's `--enable-lora` (with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`): serve LoRA
    /// adapters loaded at run time through `/v1/load_lora_adapter` (vLLM) or
    /// `/load_lora_adapter` (SGLang). Adapters are forgotten when the engine sleeps, the
    /// worst that vLLM does (vLLM #53888, #39934), so a sidecar must load them again.
    #[arg(long)]
    pub enable_lora: bool,
    /// Like llama-server's `--lora FILE` (repeatable): adapters loaded at start (the
    /// files must exist), applied to a request that lists them by position in its `lora`
    /// (`[{"id": N, "scale": S}]`); its answer is marked with the file.
    #[arg(long = "lora")]
    pub start_loras: Vec<String>,
    /// Bytes of weights held on the GPU while awake.
    #[arg(long, default_value = "2Gi", value_parser = arg::size)]
    pub weights_bytes: u64,
    /// Bytes of KV cache held on the GPU while awake.
    #[arg(long, default_value = "1Gi", value_parser = arg::size)]
    pub kv_cache_bytes: u64,
    /// Host-to-device bandwidth in bytes per second (level 1 wake copies weights back).
    #[arg(long, default_value = "24Gi", value_parser = arg::size)]
    pub h2d_bandwidth: u64,
    /// Device-to-host bandwidth in bytes per second (level 1 sleep offloads weights).
    #[arg(long, default_value = "24Gi", value_parser = arg::size)]
    pub d2h_bandwidth: u64,
    /// Disk bandwidth in bytes per second (boot and level 2 wake load weights from disk).
    #[arg(long, default_value = "2Gi", value_parser = arg::size)]
    pub disk_bandwidth: u64,
    /// Fixed cost of a wake besides copying the weights (allocator, CUDA graphs).
    #[arg(long, default_value = "0s", value_parser = arg::duration)]
    pub wake_fixed: Duration,
    /// Fixed cost of going to sleep besides offloading the weights.
    #[arg(long, default_value = "0s", value_parser = arg::duration)]
    pub sleep_fixed: Duration,
    /// Fixed start-up cost before weights load (process start, compilation, graphs).
    #[arg(long, default_value = "500ms", value_parser = arg::duration)]
    pub boot_time: Duration,
    /// Time to first token, besides the prefill (`--prefill-tokens-per-second`).
    #[arg(long, default_value = "20ms", value_parser = arg::duration)]
    pub ttft: Duration,
    /// Prompt tokens prefilled per second, one request at a time (the engine's prefill
    /// throughput is shared by its requests); 0: no prefill cost.
    #[arg(long, default_value_t = 0.0)]
    pub prefill_tokens_per_second: f64,
    /// Output tokens per second per request.
    #[arg(long, default_value_t = 1000.0)]
    pub tokens_per_second: f64,
    /// Streams send the first token, then the rest in one piece when the last is due:
    /// the same times for a client, far fewer frames (the fleet simulator's engines).
    #[arg(long, hide = true)]
    pub coalesce_stream: bool,
    /// Output tokens when a request sets no `max_tokens`.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: u32,
    /// Requests run at once; the rest wait (`vllm:num_requests_waiting`).
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Directory of the simulated GPU this engine allocates on.
    #[arg(long, env = "GREENTHREAD_SIM_GPU_DIR")]
    pub sim_gpu_dir: Option<PathBuf>,
    /// Index of the simulated GPU.
    #[arg(long, env = "GREENTHREAD_SIM_GPU_INDEX", default_value_t = 0)]
    pub sim_gpu_index: u32,

    /// Fault: the first N wake-up calls fail with 500.
    #[arg(long, default_value_t = 0)]
    pub fail_wakes: u32,
    /// Fault: wake-up calls never return.
    #[arg(long)]
    pub wake_hang: bool,
    /// Fault: a wake-up call waits until this file exists, so that a test holds a wake
    /// open for as long as it needs, however loaded the machine.
    #[arg(long)]
    pub wake_gate: Option<PathBuf>,
    /// Fault: the process exits right after answering its Nth inference request.
    #[arg(long)]
    pub crash_after_requests: Option<u64>,
    /// Fault: bytes still held on the GPU after sleep.
    #[arg(long, default_value = "0", value_parser = arg::size)]
    pub leak_on_sleep: u64,
    /// What inference sent to a sleeping engine gets.
    #[arg(long, value_enum, default_value_t)]
    pub asleep_behavior: AsleepBehavior,
    /// Fault: start-up fails when another engine boots on the same simulated GPU at the
    /// same time (concurrent vLLM start-ups on one GPU fail on memory profiling).
    #[arg(long)]
    pub fail_concurrent_boot: bool,
    /// Fault: after the Nth wake the engine is wedged: `/health` and `/is_sleeping` say
    /// all is well, inference never answers.
    #[arg(long)]
    pub wedge_after_wakes: Option<u32>,
    /// Fault: no `/is_sleeping` endpoint (404), as without vLLM's development mode; the
    /// state is only in `vllm:engine_sleep_state`.
    #[arg(long)]
    pub no_is_sleeping: bool,
    /// Fault: `/health` answers 503 while asleep (it says nothing about sleep either way).
    #[arg(long)]
    pub unhealthy_while_asleep: bool,
    /// Like vLLM's `--api-key` (and its `VLLM_API_KEY`): `/v1` paths need this bearer
    /// token.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Fault: inference requests after the Nth (the warm-up counts) are taken and never
    /// answered, while health and sleep state look fine.
    #[arg(long)]
    pub hang_after_requests: Option<u64>,
    /// Prints a line to stdout per inference request, as chatty engines log; a process
    /// whose stdout is gone then fails every request (Rust's `println!`, Python's logging
    /// both do), as an engine with a dropped output pipe would.
    #[arg(long)]
    pub print_requests: bool,
    /// Appends each inference request's body to this file, a line each: how a test
    /// counts what reached the engine (the Batch API's "never twice" across restarts).
    #[arg(long)]
    pub request_log: Option<PathBuf>,
    /// Fault: prints a line that is not UTF-8 to stdout at start-up.
    #[arg(long)]
    pub print_invalid_utf8: bool,
    /// SGLang without `--enable-weights-cpu-backup`: released weights are gone, and
    /// resuming gives back uninitialized buffers.
    #[arg(long)]
    pub no_weights_cpu_backup: bool,
}

impl SimConfig {
    /// The names requests may use.
    pub fn names(&self) -> Vec<&str> {
        if self.served_model_names.is_empty() {
            vec![self.model.as_str()]
        } else {
            self.served_model_names.iter().map(String::as_str).collect()
        }
    }

    /// A fast engine for tests, with everything else at its defaults.
    pub fn for_model(model: &str) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            cfg: SimConfig,
        }
        Wrapper::parse_from(["sim", "--model", model]).cfg
    }

    /// The `sim-engine` flags for an engine given `share` bytes of its GPU, as vLLM takes
    /// its share up front: weights three fifths of it, KV cache the rest, unless `extra`
    /// (the Model's `extraArgs`, appended) sets them itself.
    pub fn share_args(model: &str, share: u64, extra: &[String]) -> Vec<String> {
        let sets = |flag: &str| {
            extra
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let weights = share / 5 * 3;
        let mut args = vec!["--model".to_string(), model.to_string()];
        if !sets("--weights-bytes") {
            args.extend(["--weights-bytes".to_string(), weights.to_string()]);
        }
        if !sets("--kv-cache-bytes") {
            args.extend([
                "--kv-cache-bytes".to_string(),
                (share - weights).to_string(),
            ]);
        }
        args.extend(extra.iter().cloned());
        args
    }

    /// Parses `sim-engine` flags (without the program name).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            cfg: SimConfig,
        }
        Wrapper::try_parse_from(
            std::iter::once("sim-engine".to_string()).chain(args.iter().cloned()),
        )
        .map(|w| w.cfg)
        .map_err(|e| e.to_string())
    }

    pub fn transfer_time(bytes: u64, bandwidth: u64) -> Duration {
        if bandwidth == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 / bandwidth as f64)
    }
}
