//! The `Model` resource's spec: what a user declares, in Kubernetes and in `local` mode
//! alike, and its validation into typed values with messages that name the field.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{ResourceRequirements, SecurityContext, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Vllm,
    Sglang,
    Llamacpp,
    Process,
    Sim,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SleepSpec {
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: String,
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: String,
    #[serde(default = "defaults::level")]
    pub level: u8,
    /// A streamed request waiting this long for a wake starts receiving SSE comments
    /// (`: waking <model>, 3.0 s`), one every this long; `0s` turns them off.
    #[serde(default = "defaults::wake_feedback")]
    pub wake_feedback: String,
}

impl Default for SleepSpec {
    fn default() -> Self {
        Self {
            idle_timeout: defaults::idle_timeout(),
            drain_timeout: defaults::drain_timeout(),
            level: 1,
            wake_feedback: defaults::wake_feedback(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FairnessSpec {
    #[serde(default = "defaults::min_runtime")]
    pub min_runtime: String,
    #[serde(default = "defaults::max_wait_time")]
    pub max_wait_time: String,
    #[serde(default)]
    pub popular: bool,
}

impl Default for FairnessSpec {
    fn default() -> Self {
        Self {
            min_runtime: defaults::min_runtime(),
            max_wait_time: defaults::max_wait_time(),
            popular: false,
        }
    }
}

/// A LoRA adapter served on top of the Model's base weights, under its own name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterSpec {
    /// What clients send as `model` to use it: unique among the namespace's Model names,
    /// engine ids and adapters.
    pub name: String,
    /// Where the engine finds it: a path in the engine's filesystem or a hub id, passed
    /// through as it is.
    pub source: String,
}

/// Adapters loaded per request (`lora_adapter_metadata` in the body), downloaded into
/// the replica's adapter cache on first use (docs/adapters.md, "On demand").
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraSpec {
    /// Serve adapters that requests name in `lora_adapter_metadata`.
    #[serde(default)]
    pub enabled: bool,
    /// The largest adapter rank the engine can load (the same as `maxLoraRank`; set one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rank: Option<u32>,
    /// Where downloaded adapters are kept, an absolute path seen alike by the sidecar
    /// and the engine (default `/var/cache/greenthread/adapters` in a pod, the data
    /// directory's `adapters` under `greenthread local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<String>,
    /// How long one adapter's download may take (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_timeout: Option<String>,
}

/// Where a sleeping model's weights wait (docs/host-memory.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagingSpec {
    /// Keep the weights' host memory across wakes once held: the model always sleeps at
    /// level 1 and is never the one sent to level 2 when host memory runs short.
    #[serde(default)]
    pub pinned: bool,
    /// Host memory one replica's weights take asleep at level 1 (e.g. `16Gi`), split
    /// evenly among its GPUs. Default: what the engine measured serving, an upper bound
    /// (it counts the KV cache too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_memory: Option<String>,
}

/// Where a pod keeps downloaded adapters unless `lora.cacheDir` says otherwise.
pub const DEFAULT_LORA_CACHE_DIR: &str = "/var/cache/greenthread/adapters";

/// On-demand adapters, as checked (`lora.enabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnDemandLora {
    /// `lora.cacheDir`; `None`: the shape's default.
    pub cache_dir: Option<String>,
    pub download_timeout: Duration,
}

/// The LoRA settings an engine starts with: they bound what adapters it can load later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraSettings {
    /// Adapters served in one batch at once (vLLM `--max-loras`, SGLang
    /// `--max-loras-per-batch`).
    pub max_loras: u32,
    /// The largest adapter rank the engine can load (`--max-lora-rank`).
    pub max_lora_rank: u32,
}

/// The ranks vLLM accepts for `--max-lora-rank`.
pub const LORA_RANKS: [u32; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// What a Model is for, in the original's newest shape: it decides the routes the API
/// server sends to the Model unless `endpoints` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Chat,
    Tts,
    Asr,
    Embedding,
    Reranker,
}

impl ModelType {
    pub const ALL: [ModelType; 5] = [
        ModelType::Chat,
        ModelType::Tts,
        ModelType::Asr,
        ModelType::Embedding,
        ModelType::Reranker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Chat => "chat",
            ModelType::Tts => "tts",
            ModelType::Asr => "asr",
            ModelType::Embedding => "embedding",
            ModelType::Reranker => "reranker",
        }
    }

    /// The routes a Model of this type serves when its `endpoints` does not say.
    pub fn endpoints(self) -> &'static [&'static str] {
        match self {
            ModelType::Chat => &[
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/responses",
                "/v1/messages",
            ],
            ModelType::Tts => &["/v1/audio/speech"],
            ModelType::Asr => &["/v1/audio/transcriptions", "/v1/audio/translations"],
            ModelType::Embedding => &["/v1/embeddings"],
            ModelType::Reranker => &["/v1/rerank", "/v1/score"],
        }
    }

    /// Routes that belong to other types and not to this one: a Model of this type
    /// listing one in `endpoints` contradicts itself.
    pub fn foreign_endpoints(self) -> Vec<&'static str> {
        let own = self.endpoints();
        Self::ALL
            .iter()
            .filter(|t| **t != self)
            .flat_map(|t| t.endpoints().iter().copied())
            .filter(|e| !own.contains(e))
            .collect()
    }
}

/// How a replica's engine is split over the GPUs of one node (the original's newest
/// shape; `tensorParallelSize` is the older spelling of `tensor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Parallelism {
    /// GPUs each layer is split across (vLLM `--tensor-parallel-size`, SGLang `--tp`):
    /// 1, 2, 4 or 8 (default 1). The same as `tensorParallelSize`: set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<u32>,
    /// Stages the layers are cut into, each on its own GPUs of the same node (vLLM
    /// `--pipeline-parallel-size`, SGLang `--pp-size`), 1 to 8 (default 1). A replica
    /// takes `tensor × pipeline` GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<u32>,
}

/// The node label that names a node's GPU product (NVIDIA GPU feature discovery's),
/// which `spec.product` selects.
pub const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

/// A GPU product name as GPU feature discovery writes it in [`GPU_PRODUCT_LABEL`]: NVML's
/// name with its spaces as `-` (`NVIDIA H100 80GB HBM3` is `NVIDIA-H100-80GB-HBM3`).
pub fn product_label(product: &str) -> String {
    product.trim().replace(' ', "-")
}

/// The most GPUs one replica may take: all on one node.
pub const MAX_GPUS_PER_REPLICA: u32 = 8;

/// The CEL rule refusing a `modelType` with `endpoints` of another type, from the same
/// table as [`ModelSpec::validate`]'s check.
fn endpoints_rule() -> String {
    let quoted = |list: &[&str]| {
        list.iter()
            .map(|e| format!("'{e}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let map = ModelType::ALL
        .iter()
        .map(|t| format!("'{}': [{}]", t.as_str(), quoted(&t.foreign_endpoints())))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "!has(self.modelType) || !has(self.endpoints) || self.endpoints.all(e, !(e in {{{map}}}[self.modelType]))"
    )
}

/// A route the API server can send to a Model: `/v1/` and path segments of letters,
/// digits, `_`, `-` and `.` (none starting with `.`: no `..`).
const ENDPOINT_PATTERN: &str = "^/v1(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)+$";
/// A label value (GPU feature discovery's product names are).
const PRODUCT_PATTERN: &str = "^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$";
/// An engine's `--load-format` value.
const LOAD_FORMAT_PATTERN: &str = "^[a-z0-9_]{1,32}$";

/// `Model.spec`: what a user declares. Defaults are those of the resource; the CEL rules
/// are checked at admission with the messages below.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "greenthread.ai",
    version = "v1alpha1",
    kind = "Model",
    plural = "models",
    shortname = "gtm",
    namespaced,
    status = "ModelStatus",
    // `kubectl scale`, HPA and KEDA set `spec.replicas` through `/scale`.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"REPLICAS","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"SERVING","type":"integer","jsonPath":".status.servingReplicas"}"#,
    printcolumn = r#"{"name":"SLEEPING","type":"integer","jsonPath":".status.sleepingReplicas"}"#,
    printcolumn = r#"{"name":"NODE","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"GPUS","type":"string","jsonPath":".status.gpus"}"#,
    printcolumn = r#"{"name":"VRAM/GPU","type":"string","jsonPath":".status.servingMemoryPerGPU"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.tensorParallelSize) || self.tensorParallelSize in [1, 2, 4, 8]").message("tensorParallelSize must be 1, 2, 4 or 8 (a power of two)"))]
#[x_kube(validation = Rule::new("!has(self.parallelism) || !has(self.parallelism.tensor) || self.parallelism.tensor in [1, 2, 4, 8]").message("parallelism.tensor must be 1, 2, 4 or 8 (a power of two)"))]
#[x_kube(validation = Rule::new("!has(self.parallelism) || !has(self.parallelism.pipeline) || (self.parallelism.pipeline >= 1 && self.parallelism.pipeline <= 8)").message("parallelism.pipeline must be 1 to 8"))]
#[x_kube(validation = Rule::new("!has(self.parallelism) || !has(self.parallelism.tensor) || !has(self.tensorParallelSize) || self.parallelism.tensor == self.tensorParallelSize").message("parallelism.tensor contradicts tensorParallelSize: set one of them"))]
#[x_kube(validation = Rule::new("(has(self.parallelism) && has(self.parallelism.tensor) ? self.parallelism.tensor : (has(self.tensorParallelSize) ? self.tensorParallelSize : 1)) * (has(self.parallelism) && has(self.parallelism.pipeline) ? self.parallelism.pipeline : 1) <= 8").message("a replica runs on one node: tensor × pipeline parallelism must be at most 8 GPUs"))]
#[x_kube(validation = Rule::new(endpoints_rule()).message("endpoints contradict modelType: a route of another model type is listed"))]
#[x_kube(validation = Rule::new(format!("!has(self.endpoints) || (size(self.endpoints) > 0 && self.endpoints.all(e, e.matches('{ENDPOINT_PATTERN}')))")).message("endpoints must list routes such as /v1/chat/completions"))]
#[x_kube(validation = Rule::new("!has(self.modelType) || !(self.modelType in ['tts', 'asr']) || self.engine != 'llamacpp'").message("modelType tts and asr need an engine that serves audio (vllm, sglang, process or sim), not llamacpp"))]
#[x_kube(validation = Rule::new(format!("!has(self.product) || self.product.matches('{PRODUCT_PATTERN}')")).message("product must be a GPU product as its node label writes it, e.g. NVIDIA-H100-80GB-HBM3"))]
#[x_kube(validation = Rule::new("!has(self.product) || !has(self.nodeSelector) || !('nvidia.com/gpu.product' in self.nodeSelector) || self.nodeSelector['nvidia.com/gpu.product'] == self.product").message("product contradicts nodeSelector's nvidia.com/gpu.product: set one of them"))]
#[x_kube(validation = Rule::new(format!("!has(self.loadFormat) || self.loadFormat.matches('{LOAD_FORMAT_PATTERN}')")).message("loadFormat must be an engine's load format, e.g. safetensors or runai_streamer"))]
#[x_kube(validation = Rule::new("!has(self.loadFormat) || !(self.engine in ['llamacpp', 'process'])").message("loadFormat needs an engine that takes --load-format (vllm, sglang or sim)"))]
#[x_kube(validation = Rule::new("self.gpuMemoryUtilization.matches('^[0-9]*[.]?[0-9]+$') && double(self.gpuMemoryUtilization) > 0.0 && double(self.gpuMemoryUtilization) <= 1.0").message("gpuMemoryUtilization must be a number in (0, 1], e.g. \"0.90\""))]
#[x_kube(validation = Rule::new("!has(self.staging) || !has(self.staging.hostMemory) || self.staging.hostMemory.matches('^[0-9]+(Ki|Mi|Gi|Ti)?$')").message("staging.hostMemory must be a size such as 16Gi"))]
#[x_kube(validation = Rule::new("!has(self.staging) || !has(self.staging.pinned) || !self.staging.pinned || (self.sleep.level == 1 && !(self.engine in ['llamacpp', 'process']))").message("staging.pinned keeps weights in host memory: it needs sleep.level 1 and an engine that sleeps (vllm, sglang or sim)"))]
#[x_kube(validation = Rule::new("self.sleep.level in [1, 2]").message("sleep.level must be 1 (offload weights to CPU) or 2 (discard weights)"))]
#[x_kube(validation = Rule::new("self.sleep.idleTimeout.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && self.sleep.drainTimeout.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$')").message("sleep.idleTimeout and sleep.drainTimeout must be durations such as 500ms, 30s or 5m"))]
#[x_kube(validation = Rule::new("self.sleep.wakeFeedback.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$')").message("sleep.wakeFeedback must be a duration such as 3s (0s turns it off)"))]
#[x_kube(validation = Rule::new("self.fairness.minRuntime.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$') && self.fairness.maxWaitTime.matches('^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$')").message("fairness.minRuntime and fairness.maxWaitTime must be durations such as 500ms, 30s or 5m"))]
#[x_kube(validation = Rule::new("self.engine != 'process' || (has(self.command) && size(self.command) > 0)").message("engine process needs a command to run"))]
#[x_kube(validation = Rule::new("self.replicas >= 1").message("replicas must be at least 1"))]
#[x_kube(validation = Rule::new("!has(self.lora) || !has(self.lora.maxRank) || !has(self.maxLoraRank) || self.lora.maxRank == self.maxLoraRank").message("lora.maxRank contradicts maxLoraRank: set one of them"))]
#[x_kube(validation = Rule::new("!has(self.lora) || !has(self.lora.enabled) || !self.lora.enabled || !(self.engine in ['llamacpp', 'process'])").message("lora.enabled needs an engine that loads adapters at run time (vllm, sglang or sim)"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// The engine's model id (e.g. `Qwen/Qwen2.5-7B-Instruct`).
    pub model_name: String,
    #[serde(default)]
    pub engine: EngineKind,
    /// For `process` engines: the command to run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default = "defaults::dtype")]
    pub dtype: String,
    #[serde(default = "defaults::utilization")]
    pub gpu_memory_utilization: String,
    /// GPUs each layer is split across: 1, 2, 4 or 8 (default 1). The older spelling of
    /// `parallelism.tensor`: set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_size: Option<u32>,
    /// Tensor and pipeline parallelism, the newer shape (a replica takes `tensor ×
    /// pipeline` GPUs of one node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<Parallelism>,
    /// What the Model is for (chat, tts, asr, embedding, reranker): the routes it serves
    /// unless `endpoints` lists them. Neither set: every route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<ModelType>,
    /// The routes the API server sends to this Model (e.g. `/v1/embeddings`); others
    /// are answered 404 naming these. Default: those of `modelType`, or every route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(max = 128)))]
    pub endpoints: Option<Vec<String>>,
    /// The GPU product a replica must land on, as the node label
    /// `nvidia.com/gpu.product` writes it (e.g. `NVIDIA-H100-80GB-HBM3`); the same as
    /// that key in `nodeSelector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// How the engine loads the weights (vLLM and SGLang `--load-format`, e.g.
    /// `safetensors`, `runai_streamer`); default: the engine's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_format: Option<String>,
    #[serde(default = "defaults::one")]
    pub replicas: u32,
    /// Requests the API server has outstanding on every serving replica at which it
    /// wakes a sleeping one (0: never); requests go to the least loaded serving replica.
    #[serde(default = "defaults::scale_out")]
    pub scale_out: u32,
    /// `critical` models wait less for memory and are preempted last; `sheddable` ones
    /// never preempt anyone and are preempted first (docs/multi-tenant.md).
    #[serde(default)]
    pub priority: crate::Priority,
    #[serde(default)]
    pub quantization: String,
    /// LoRA adapters served on this Model's replicas; adding or removing one loads or
    /// unloads it without a restart (docs/adapters.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterSpec>,
    /// Adapters served in one batch at once (default 4). Set it on a Model that starts
    /// without adapters to add some later: the engine enables LoRA only when it starts
    /// with adapters or with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_loras: Option<u32>,
    /// The largest adapter rank the engine can load (default 16); one of 1, 8, 16, 32,
    /// 64, 128, 256, 320, 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lora_rank: Option<u32>,
    /// Adapters loaded on demand, per request (docs/adapters.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    #[serde(default)]
    pub extra_args: Vec<String>,
    #[serde(default)]
    pub sleep: SleepSpec,
    /// Where the weights wait while the model sleeps: `pinned`, `hostMemory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<StagingSpec>,
    #[serde(default)]
    pub fairness: FairnessSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The engine container's security context, replacing the restricted default (no
    /// privilege escalation, no capabilities) for engines that need more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

/// `Model.status`, written by the controller.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// Pending | Downloading | Ready | Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub serving_replicas: i32,
    #[serde(default)]
    pub sleeping_replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// Measured serving memory per GPU, e.g. `21Gi`.
    #[serde(
        default,
        rename = "servingMemoryPerGPU",
        skip_serializing_if = "Option::is_none"
    )]
    pub serving_memory_per_gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The label selector of the Model's pods, for the `/scale` subresource (an HPA
    /// reads the pods' metrics through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// While the phase is `Downloading`: the weights' bytes in the nodes' caches so far
    /// and in all, over the replicas still downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// A download of a Model's weights under way (`status.download`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadStatus {
    pub downloaded_bytes: u64,
    pub total_bytes: u64,
}

mod defaults {
    pub fn idle_timeout() -> String {
        "5m".into()
    }
    pub fn drain_timeout() -> String {
        "30s".into()
    }
    pub fn wake_feedback() -> String {
        "3s".into()
    }
    pub fn level() -> u8 {
        1
    }
    pub fn min_runtime() -> String {
        "10s".into()
    }
    pub fn max_wait_time() -> String {
        "5s".into()
    }
    pub fn dtype() -> String {
        "bfloat16".into()
    }
    pub fn utilization() -> String {
        "0.90".into()
    }
    pub fn one() -> u32 {
        1
    }
    pub fn scale_out() -> u32 {
        8
    }
}

/// A spec field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// The spec's values, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidModel {
    /// The spec [normalized](ModelSpec::normalized): one shape, whichever was written.
    pub spec: ModelSpec,
    pub gpu_memory_utilization: f64,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub wake_feedback: Duration,
    pub min_runtime: Duration,
    pub max_wait_time: Duration,
    /// LoRA enabled in the engine, and how: `None` when the Model has no adapters, no
    /// `maxLoras` and no `lora.enabled`.
    pub lora: Option<LoraSettings>,
    /// Adapters loaded per request, when `lora.enabled`.
    pub on_demand: Option<OnDemandLora>,
    /// `staging.hostMemory`: host memory one replica's weights take asleep at level 1.
    pub host_memory: Option<u64>,
}

impl ValidModel {
    /// The bytes the engine takes on a GPU of `gpu_memory_bytes`: vLLM (and SGLang) take
    /// `gpuMemoryUtilization` of it up front, weights and KV cache alike.
    pub fn share_of(&self, gpu_memory_bytes: u64) -> u64 {
        (gpu_memory_bytes as f64 * self.gpu_memory_utilization) as u64
    }
}

impl ModelSpec {
    /// Whether adapters are loaded per request (`lora.enabled`).
    pub fn lora_on_demand(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.enabled)
    }

    /// The LoRA settings the engine starts with: enabled when the Model has adapters,
    /// sets `maxLoras` or loads adapters on demand.
    pub fn lora_settings(&self) -> Option<LoraSettings> {
        (!self.adapters.is_empty() || self.max_loras.is_some() || self.lora_on_demand()).then(
            || LoraSettings {
                max_loras: self
                    .max_loras
                    // Not the number of adapters: adding one must not change the engine's
                    // flags (its pods would roll).
                    .unwrap_or(4),
                max_lora_rank: self
                    .max_lora_rank
                    .or(self.lora.as_ref().and_then(|l| l.max_rank))
                    .unwrap_or(16),
            },
        )
    }

    /// GPUs each layer is split across: `parallelism.tensor` or `tensorParallelSize`.
    pub fn tensor(&self) -> u32 {
        self.parallelism
            .and_then(|p| p.tensor)
            .or(self.tensor_parallel_size)
            .unwrap_or(1)
    }

    /// Pipeline stages: `parallelism.pipeline`.
    pub fn pipeline(&self) -> u32 {
        self.parallelism.and_then(|p| p.pipeline).unwrap_or(1)
    }

    /// The GPUs one replica takes, all on one node.
    pub fn gpus_per_replica(&self) -> u32 {
        self.tensor().max(1) * self.pipeline().max(1)
    }

    /// The routes the API server sends to this Model: `endpoints`, else those of
    /// `modelType`; `None`: every route.
    pub fn served_endpoints(&self) -> Option<Vec<String>> {
        match (&self.endpoints, self.model_type) {
            (Some(list), _) => Some(list.clone()),
            (None, Some(t)) => Some(t.endpoints().iter().map(|e| e.to_string()).collect()),
            (None, None) => None,
        }
    }

    /// The GPU product a replica must land on: `product`, or the node selector's
    /// [`GPU_PRODUCT_LABEL`].
    pub fn gpu_product(&self) -> Option<&str> {
        self.product.as_deref().or(self
            .node_selector
            .get(GPU_PRODUCT_LABEL)
            .map(String::as_str))
    }

    /// The one internal form both shapes of a spec come to, which the controller renders
    /// and `local` runs: parallelism as `parallelism: {tensor, pipeline}`, the routes
    /// served in `endpoints` (from `modelType` when it decides them), the GPU product
    /// both in `product` and in the node selector. Two specs that mean the same are the
    /// same once normalized, and normalizing twice changes nothing.
    pub fn normalized(&self) -> ModelSpec {
        let mut s = self.clone();
        s.tensor_parallel_size = None;
        s.parallelism = Some(Parallelism {
            tensor: Some(self.tensor()),
            pipeline: Some(self.pipeline()),
        });
        s.endpoints = self.served_endpoints();
        if let Some(product) = self.gpu_product().map(str::to_string) {
            s.node_selector
                .insert(GPU_PRODUCT_LABEL.to_string(), product.clone());
            s.product = Some(product);
        }
        s
    }

    /// Checks every field; all problems are reported, each naming its field under `path`.
    pub fn validate(&self, path: &str) -> Result<ValidModel, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            errors.push(FieldError {
                field: format!("{path}.{field}"),
                message,
            })
        };
        if self.model_name.trim().is_empty() {
            err("modelName", "is required".into());
        }
        let utilization = match self.gpu_memory_utilization.trim().parse::<f64>() {
            Ok(u) if u > 0.0 && u <= 1.0 => u,
            Ok(u) => {
                err("gpuMemoryUtilization", format!("{u} is outside (0, 1]"));
                0.0
            }
            Err(_) => {
                err(
                    "gpuMemoryUtilization",
                    format!(
                        "{:?} is not a number in (0, 1]",
                        self.gpu_memory_utilization
                    ),
                );
                0.0
            }
        };
        for (field, tp) in [
            ("tensorParallelSize", self.tensor_parallel_size),
            (
                "parallelism.tensor",
                self.parallelism.and_then(|p| p.tensor),
            ),
        ] {
            if let Some(tp) = tp
                && ![1, 2, 4, 8].contains(&tp)
            {
                err(field, format!("{tp} is not one of 1, 2, 4, 8"));
            }
        }
        if let (Some(a), Some(b)) = (
            self.parallelism.and_then(|p| p.tensor),
            self.tensor_parallel_size,
        ) && a != b
        {
            err(
                "parallelism.tensor",
                format!("{a} contradicts tensorParallelSize {b}: set one of them"),
            );
        }
        if let Some(pp) = self.parallelism.and_then(|p| p.pipeline)
            && !(1..=MAX_GPUS_PER_REPLICA).contains(&pp)
        {
            err(
                "parallelism.pipeline",
                format!("{pp} is not from 1 to {MAX_GPUS_PER_REPLICA}"),
            );
        } else if self.gpus_per_replica() > MAX_GPUS_PER_REPLICA {
            err(
                "parallelism",
                format!(
                    "tensor {} × pipeline {} is {} GPUs; a replica runs on one node, at most {MAX_GPUS_PER_REPLICA}",
                    self.tensor(),
                    self.pipeline(),
                    self.gpus_per_replica()
                ),
            );
        }
        if self.replicas == 0 {
            err("replicas", "must be at least 1".into());
        }
        if !(1..=2).contains(&self.sleep.level) {
            err("sleep.level", format!("{} is not 1 or 2", self.sleep.level));
        }
        if self.engine == EngineKind::Process && self.command.is_empty() {
            err("command", "is required for engine process".into());
        }
        let mut dur = |field: &str, value: &str| match parse_duration(value) {
            Ok(d) => d,
            Err(e) => {
                err(field, e.to_string());
                Duration::ZERO
            }
        };
        let idle_timeout = dur("sleep.idleTimeout", &self.sleep.idle_timeout);
        let drain_timeout = dur("sleep.drainTimeout", &self.sleep.drain_timeout);
        let wake_feedback = dur("sleep.wakeFeedback", &self.sleep.wake_feedback);
        let min_runtime = dur("fairness.minRuntime", &self.fairness.min_runtime);
        let max_wait_time = dur("fairness.maxWaitTime", &self.fairness.max_wait_time);
        for (field, message) in adapter_errors(&self.adapters, Some(&self.model_name)) {
            err(&field, message);
        }
        if self.max_loras == Some(0) {
            err("maxLoras", "must be at least 1".into());
        }
        if let Some(rank) = self.max_lora_rank
            && !LORA_RANKS.contains(&rank)
        {
            err(
                "maxLoraRank",
                format!("{rank} is not one of 1, 8, 16, 32, 64, 128, 256, 320, 512"),
            );
        }
        for (field, message) in self.shape_errors() {
            err(field, message);
        }
        let mut on_demand = None;
        if let Some(l) = &self.lora {
            if let Some(rank) = l.max_rank
                && !LORA_RANKS.contains(&rank)
            {
                err(
                    "lora.maxRank",
                    format!("{rank} is not one of 1, 8, 16, 32, 64, 128, 256, 320, 512"),
                );
            }
            if let (Some(a), Some(b)) = (l.max_rank, self.max_lora_rank)
                && a != b
            {
                err(
                    "lora.maxRank",
                    format!("{a} contradicts maxLoraRank {b}: set one of them"),
                );
            }
            if let Some(dir) = &l.cache_dir
                && !dir.starts_with('/')
            {
                err("lora.cacheDir", format!("{dir:?} is not an absolute path"));
            }
            let timeout = match &l.download_timeout {
                Some(t) => match parse_duration(t) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        err("lora.downloadTimeout", "must be more than 0s".into());
                        Duration::ZERO
                    }
                    Err(e) => {
                        err("lora.downloadTimeout", e.to_string());
                        Duration::ZERO
                    }
                },
                None => Duration::from_secs(300),
            };
            if l.enabled && matches!(self.engine, EngineKind::Llamacpp | EngineKind::Process) {
                err(
                    "lora.enabled",
                    format!(
                        "engine {} cannot load adapters at run time (vllm, sglang and sim can)",
                        serde_json::to_value(self.engine)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    ),
                );
            }
            on_demand = l.enabled.then(|| OnDemandLora {
                cache_dir: l.cache_dir.clone(),
                download_timeout: timeout,
            });
        }
        if self.staging.as_ref().is_some_and(|s| s.pinned)
            && (self.sleep.level != 1
                || matches!(self.engine, EngineKind::Llamacpp | EngineKind::Process))
        {
            err(
                "staging.pinned",
                "keeps weights in host memory: it needs sleep.level 1 and an engine that sleeps (vllm, sglang or sim)".into(),
            );
        }
        let host_memory = match self.staging.as_ref().and_then(|s| s.host_memory.as_ref()) {
            Some(size) => match size.parse::<crate::ByteSize>() {
                Ok(b) => Some(b.bytes()),
                Err(e) => {
                    err("staging.hostMemory", e.to_string());
                    None
                }
            },
            None => None,
        };
        let lora = self.lora_settings();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ValidModel {
            host_memory,
            spec: self.normalized(),
            gpu_memory_utilization: utilization,
            idle_timeout,
            drain_timeout,
            wake_feedback,
            min_runtime,
            max_wait_time,
            lora,
            on_demand,
        })
    }
}

impl ModelSpec {
    /// The newer shape's fields that are malformed or contradict another: endpoints
    /// that are no routes or belong to another `modelType`, a type the engine cannot
    /// serve, a product that is no label value or differs from the node selector's, a
    /// load format for an engine without one.
    fn shape_errors(&self) -> Vec<(&'static str, String)> {
        let mut errors = Vec::new();
        if let Some(list) = &self.endpoints {
            if list.is_empty() {
                errors.push((
                    "endpoints",
                    "must list at least one route (or be left out)".into(),
                ));
            }
            if list.len() > 16 {
                errors.push((
                    "endpoints",
                    format!("lists {} routes; at most 16", list.len()),
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for e in list {
                if !endpoint_route(e) {
                    errors.push((
                        "endpoints",
                        format!("{e:?} is not a route such as /v1/chat/completions"),
                    ));
                } else if !seen.insert(e.as_str()) {
                    errors.push(("endpoints", format!("{e:?} is listed twice")));
                }
            }
            if let Some(t) = self.model_type {
                let foreign = t.foreign_endpoints();
                for e in list.iter().filter(|e| foreign.contains(&e.as_str())) {
                    errors.push((
                        "endpoints",
                        format!(
                            "{e:?} contradicts modelType {}: it is a route of another model type (a {} Model serves {})",
                            t.as_str(),
                            t.as_str(),
                            t.endpoints().join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(t @ (ModelType::Tts | ModelType::Asr)) = self.model_type
            && self.engine == EngineKind::Llamacpp
        {
            errors.push((
                "modelType",
                format!(
                    "{}: llama.cpp's server does not serve audio (vllm, sglang, process or sim do)",
                    t.as_str()
                ),
            ));
        }
        if let Some(p) = &self.product {
            if !label_value(p) {
                errors.push((
                    "product",
                    format!(
                        "{p:?} is not a GPU product as its node label writes it (e.g. NVIDIA-H100-80GB-HBM3)"
                    ),
                ));
            }
            if let Some(selected) = self.node_selector.get(GPU_PRODUCT_LABEL)
                && selected != p
            {
                errors.push((
                    "product",
                    format!(
                        "{p:?} contradicts nodeSelector {GPU_PRODUCT_LABEL}={selected:?}: set one of them"
                    ),
                ));
            }
        }
        if let Some(f) = &self.load_format {
            if f.is_empty()
                || f.len() > 32
                || !f
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                errors.push((
                    "loadFormat",
                    format!("{f:?} is not a load format such as safetensors or runai_streamer"),
                ));
            }
            if matches!(self.engine, EngineKind::Llamacpp | EngineKind::Process) {
                errors.push((
                    "loadFormat",
                    "needs an engine that takes --load-format (vllm, sglang or sim)".into(),
                ));
            }
        }
        errors
    }
}

/// Whether `e` is a route the API server can send to a Model ([`ENDPOINT_PATTERN`]).
fn endpoint_route(e: &str) -> bool {
    let Some(rest) = e.strip_prefix("/v1/") else {
        return false;
    };
    e.len() <= 128
        && rest.split('/').all(|seg| {
            seg.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        })
}

/// Whether `v` is a Kubernetes label value that is not empty ([`PRODUCT_PATTERN`]).
fn label_value(v: &str) -> bool {
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    v.len() <= 63
        && ends(v.chars().next())
        && ends(v.chars().last())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Adapter names that collide among the Models of one namespace, given as `(Model name,
/// spec)`: an adapter named like a Model, like another Model's engine id, or like another
/// Model's adapter would make a request's `model` mean two things. Each clash as
/// `(Model index, adapter index, what it collides with)`, for every adapter involved.
pub fn adapter_clashes(models: &[(&str, &ModelSpec)]) -> Vec<(usize, usize, String)> {
    let mut clashes = Vec::new();
    for (i, (_, spec)) in models.iter().enumerate() {
        for (j, a) in spec.adapters.iter().enumerate() {
            let mut with = Vec::new();
            for (k, (other, other_spec)) in models.iter().enumerate() {
                if *other == a.name {
                    with.push(format!("the Model {other:?}"));
                }
                if k != i && other_spec.model_name == a.name {
                    with.push(format!("the engine id of Model {other:?}"));
                }
                if k != i && other_spec.adapters.iter().any(|o| o.name == a.name) {
                    with.push(format!("an adapter of Model {other:?}"));
                }
            }
            if !with.is_empty() {
                clashes.push((i, j, format!("{:?} is also {}", a.name, with.join(" and "))));
            }
        }
    }
    clashes
}

/// What is wrong with an adapter list, each problem as (field, message): a name that
/// cannot name an adapter, repeats another, or is the Model's own `model_name`; a source
/// missing. The Model spec's check and the sidecar's adapters file share it.
pub fn adapter_errors(list: &[AdapterSpec], model_name: Option<&str>) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, a) in list.iter().enumerate() {
        let name = format!("adapters[{i}].name");
        if let Err(why) = adapter_name(&a.name) {
            errors.push((name, why));
        } else if model_name == Some(a.name.as_str()) {
            errors.push((name, format!("{:?} is the Model's own modelName", a.name)));
        } else if !seen.insert(a.name.as_str()) {
            errors.push((name, format!("{:?} is named twice", a.name)));
        }
        if a.source.trim().is_empty() {
            errors.push((
                format!("adapters[{i}].source"),
                "is required (a path in the engine's filesystem or a hub id)".into(),
            ));
        }
    }
    errors
}

/// Whether `name` can name an adapter: what clients send as `model`, so letters, digits,
/// `.`, `_` and `-` (no `/`, which names a namespace, and no `:`, which SGLang reads as
/// `base:adapter`), at most 128 characters.
pub fn adapter_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name.len() > 128 {
        return Err(format!("{name:?} is longer than 128 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!(
            "{name:?} may hold only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<ModelSpec, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn defaults_are_those_of_the_resource() {
        let s = spec(serde_json::json!({"modelName": "m"})).unwrap();
        let v = s.validate("spec").unwrap();
        assert_eq!(s.engine, EngineKind::Vllm);
        assert_eq!(
            (s.dtype.as_str(), s.tensor(), s.replicas),
            ("bfloat16", 1, 1)
        );
        assert_eq!(v.gpu_memory_utilization, 0.9);
        assert_eq!(
            (v.idle_timeout, v.drain_timeout),
            (Duration::from_secs(300), Duration::from_secs(30))
        );
        assert_eq!(
            (v.min_runtime, v.max_wait_time),
            (Duration::from_secs(10), Duration::from_secs(5))
        );
        assert_eq!(s.sleep.level, 1);
        assert_eq!(v.wake_feedback, Duration::from_secs(3));
        assert!(!s.fairness.popular);
    }

    #[test]
    fn every_bad_field_is_named() {
        let s = spec(serde_json::json!({
            "modelName": "",
            "gpuMemoryUtilization": "1.5",
            "tensorParallelSize": 3,
            "replicas": 0,
            "sleep": {"idleTimeout": "soon", "level": 3, "wakeFeedback": "often"},
            "fairness": {"maxWaitTime": "5 parsecs"},
        }))
        .unwrap();
        let errors = s.validate("models[2].spec").unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "models[2].spec.modelName",
                "models[2].spec.gpuMemoryUtilization",
                "models[2].spec.tensorParallelSize",
                "models[2].spec.replicas",
                "models[2].spec.sleep.level",
                "models[2].spec.sleep.idleTimeout",
                "models[2].spec.sleep.wakeFeedback",
                "models[2].spec.fairness.maxWaitTime",
            ]
        );
        assert!(errors[1].to_string().contains("outside (0, 1]"));
    }

    #[test]
    fn adapters_are_checked_and_enable_lora() {
        let s = spec(serde_json::json!({"modelName": "base"})).unwrap();
        assert_eq!(s.validate("spec").unwrap().lora, None);
        let s = spec(serde_json::json!({"modelName": "base", "adapters": [
            {"name": "sql", "source": "/adapters/sql"},
            {"name": "chat", "source": "org/chat-lora"},
        ]}))
        .unwrap();
        assert_eq!(
            s.validate("spec").unwrap().lora,
            Some(LoraSettings {
                max_loras: 4,
                max_lora_rank: 16
            })
        );
        // No adapters yet, but room for them later.
        let s = spec(serde_json::json!({"modelName": "base", "maxLoras": 3, "maxLoraRank": 64}))
            .unwrap();
        assert_eq!(
            s.validate("spec").unwrap().lora,
            Some(LoraSettings {
                max_loras: 3,
                max_lora_rank: 64
            })
        );
        let s = spec(
            serde_json::json!({"modelName": "base", "maxLoras": 0, "maxLoraRank": 12,
                "adapters": [
                    {"name": "a/b", "source": "x"},
                    {"name": "ok", "source": " "},
                    {"name": "ok", "source": "y"},
                    {"name": "base", "source": "z"},
                    {"name": "", "source": "z"},
            ]}),
        )
        .unwrap();
        let errors = s.validate("spec").unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.adapters[0].name",
                "spec.adapters[1].source",
                "spec.adapters[2].name",
                "spec.adapters[3].name",
                "spec.adapters[4].name",
                "spec.maxLoras",
                "spec.maxLoraRank",
            ]
        );
        assert!(errors[2].message.contains("named twice"), "{}", errors[2]);
        assert!(errors[3].message.contains("own modelName"), "{}", errors[3]);
        let e =
            spec(serde_json::json!({"modelName": "m", "adapters": [{"name": "a"}]})).unwrap_err();
        assert!(e.to_string().contains("source"), "{e}");
    }

    #[test]
    fn on_demand_adapters_are_checked_and_enable_lora() {
        let s = spec(serde_json::json!({"modelName": "base", "lora": {"enabled": true}})).unwrap();
        let v = s.validate("spec").unwrap();
        assert_eq!(
            (v.lora, v.on_demand),
            (
                Some(LoraSettings {
                    max_loras: 4,
                    max_lora_rank: 16
                }),
                Some(OnDemandLora {
                    cache_dir: None,
                    download_timeout: Duration::from_secs(300)
                })
            )
        );
        let s = spec(serde_json::json!({"modelName": "base", "lora": {
            "enabled": true, "maxRank": 64, "cacheDir": "/c", "downloadTimeout": "90s"}}))
        .unwrap();
        let v = s.validate("spec").unwrap();
        assert_eq!(v.lora.unwrap().max_lora_rank, 64);
        assert_eq!(
            v.on_demand.unwrap(),
            OnDemandLora {
                cache_dir: Some("/c".into()),
                download_timeout: Duration::from_secs(90)
            }
        );
        // Declared but off: no LoRA, no on-demand.
        let s = spec(serde_json::json!({"modelName": "base", "lora": {"enabled": false}})).unwrap();
        let v = s.validate("spec").unwrap();
        assert_eq!((v.lora, v.on_demand), (None, None));
        let s = spec(
            serde_json::json!({"modelName": "base", "engine": "llamacpp",
            "maxLoraRank": 16, "lora": {
            "enabled": true, "maxRank": 12, "cacheDir": "cache", "downloadTimeout": "soon"}}),
        )
        .unwrap();
        let errors = s.validate("spec").unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.lora.maxRank",
                "spec.lora.maxRank",
                "spec.lora.cacheDir",
                "spec.lora.downloadTimeout",
                "spec.lora.enabled",
            ]
        );
        assert!(
            errors[1].message.contains("contradicts maxLoraRank 16"),
            "{}",
            errors[1]
        );
        assert!(
            errors[4].message.contains("engine llamacpp"),
            "{}",
            errors[4]
        );
    }

    #[test]
    fn adapter_names_that_mean_two_things_are_clashes() {
        let m = |name: &str, adapters: &[&str]| {
            spec(serde_json::json!({"modelName": format!("org/{name}"), "adapters":
                adapters.iter().map(|a| serde_json::json!({"name": a, "source": "s"})).collect::<Vec<_>>()}))
            .unwrap()
        };
        let (a, b, c) = (
            m("a", &["sql", "b"]),
            m("b", &["sql", "own"]),
            m("c", &["org/a"]),
        );
        let clashes = adapter_clashes(&[("a", &a), ("b", &b), ("c", &c)]);
        let at: Vec<(usize, usize)> = clashes.iter().map(|(i, j, _)| (*i, *j)).collect();
        // `org/a` is not a valid adapter name, but a clash all the same.
        assert_eq!(at, [(0, 0), (0, 1), (1, 0), (2, 0)]);
        assert_eq!(clashes[0].2, "\"sql\" is also an adapter of Model \"b\"");
        assert_eq!(clashes[1].2, "\"b\" is also the Model \"b\"");
        assert!(
            clashes[3].2.contains("engine id of Model \"a\""),
            "{}",
            clashes[3].2
        );
        assert!(adapter_clashes(&[("a", &m("a", &["x"])), ("b", &m("b", &["y"]))]).is_empty());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e =
            spec(serde_json::json!({"modelName": "m", "gpuMemoryUtilisation": "0.5"})).unwrap_err();
        assert!(e.to_string().contains("gpuMemoryUtilisation"), "{e}");
    }
}
