//! Model → pods (engine + sidecar) and Service. Pure: no client, no clock.

use std::{collections::BTreeMap, net::SocketAddr};

use greenthread_api::{EngineKind, FieldError, GpuSpec, Model, ModelSpec, ModelType, ValidModel};
use greenthread_sidecar::{Assignment, EngineKind as SidecarEngine, LedgerAt, SidecarConfig};
use k8s_openapi::{
    ByteString,
    api::core::v1::{
        Capabilities, ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container,
        ContainerPort, DownwardAPIProjection, DownwardAPIVolumeFile, EnvVar, EnvVarSource,
        HTTPGetAction, KeyToPath, LocalObjectReference, ObjectFieldSelector, Pod,
        PodSecurityContext, PodSpec, Probe, ProjectedVolumeSource, SeccompProfile, Secret,
        SecretKeySelector, SecurityContext, Service, ServiceAccountTokenProjection, ServicePort,
        ServiceSpec, Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::Resource;

/// Where the engine listens: loopback only, so nothing bypasses the sidecar.
pub const ENGINE_PORT: u16 = 8001;
pub const HTTP_PORT: i32 = 8080;
pub const METRICS_PORT: i32 = 9090;
pub const MODEL_LABEL: &str = "greenthread.ai/model";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// On a Model's pods: the GPU objects placement chose (comma-separated).
pub const GPUS_ANNOTATION: &str = "greenthread.ai/gpus";
/// On a Model's pods: the bytes per GPU placement counted for it before any was measured.
pub const MEMORY_ANNOTATION: &str = "greenthread.ai/memory-per-gpu";

/// Images and cluster settings the chart passes to the controller.
#[derive(Debug, Clone)]
pub struct Settings {
    pub vllm_image: String,
    pub sidecar_image: String,
    /// e.g. `nvidia`, where the NVIDIA container runtime is not the default.
    pub runtime_class: Option<String>,
    /// Namespace of the GPU objects (the agent's), which the sidecars update.
    pub gpu_namespace: String,
    /// Service account of Model pods: the one allowed to update GPU status.
    pub service_account: Option<String>,
    /// The sidecar's public port, its private (metrics, admin) port, the engine's port.
    pub ports: Ports,
    /// Engine images a Model may run (globs, `*` any characters); empty: any.
    pub allowed_images: Vec<String>,
    /// Secrets in each Model's namespace that its pod pulls images with.
    pub image_pull_secrets: Vec<String>,
    /// The scheduling policy every sidecar applies.
    pub policy: greenthread_ledger::Policy,
    /// What every sidecar does with a preempted model's running answers.
    pub preemption: greenthread_sidecar::Preemption,
    /// The nodes' weights cache, if any.
    pub weights: crate::WeightsArgs,
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: i32,
    pub metrics: i32,
    pub engine: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            http: HTTP_PORT,
            metrics: METRICS_PORT,
            engine: ENGINE_PORT,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            vllm_image: "vllm/vllm-openai:v0.11.0".into(),
            sidecar_image: "ghcr.io/greenthread/greenthread:0.1.0".into(),
            runtime_class: None,
            gpu_namespace: "greenthread-system".into(),
            service_account: None,
            ports: Ports::default(),
            allowed_images: Vec::new(),
            image_pull_secrets: Vec::new(),
            policy: greenthread_ledger::Policy::default(),
            preemption: greenthread_sidecar::Preemption::Drain,
            weights: crate::WeightsArgs::default(),
        }
    }
}

/// The init container that downloads a Model's weights before its engine starts.
pub const DOWNLOAD_CONTAINER: &str = "download";

/// Where engine containers find the nodes' weights cache.
pub const WEIGHTS_DIR: &str = "/var/cache/huggingface/hub";

/// The hub repository whose weights the Model's engine loads, when they come from a hub:
/// a vLLM or SGLang Model whose `modelName` is a hub id. The controller downloads them
/// in an init container, `local` before the engine starts.
pub fn hub_weights(s: &ModelSpec) -> Option<&str> {
    (matches!(s.engine, EngineKind::Vllm | EngineKind::Sglang)
        && greenthread_weights::Repo::parse(&s.model_name).is_ok())
    .then_some(s.model_name.as_str())
}

/// The weights cache's volume, the mount of it, and the init container that downloads
/// the Model's weights into it before the engine starts — for a vLLM or SGLang Model
/// whose `modelName` is a hub id, when the installation has a cache.
fn weights_download(
    s: &ModelSpec,
    settings: &Settings,
) -> Option<(Volume, VolumeMount, Container)> {
    let w = &settings.weights;
    hub_weights(s)?;
    let volume = match (&w.host_path, &w.claim) {
        (Some(path), _) => Volume {
            name: "weights".into(),
            host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                path: path.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
        (None, Some(claim)) => Volume {
            name: "weights".into(),
            persistent_volume_claim: Some(
                k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: None,
                },
            ),
            ..Default::default()
        },
        (None, None) => return None,
    };
    let mount = VolumeMount {
        name: "weights".into(),
        mount_path: WEIGHTS_DIR.into(),
        ..Default::default()
    };
    let mut args: Vec<String> = vec![
        "download".into(),
        s.model_name.clone(),
        "--cache-dir".into(),
        WEIGHTS_DIR.into(),
    ];
    if let Some(b) = &w.budget {
        args.extend(["--cache-budget".into(), b.clone()]);
    }
    let mut env = Vec::new();
    if let Some(e) = &w.endpoint {
        env.push(self::env("HF_ENDPOINT", e));
    }
    if let Some(secret) = &w.token_secret {
        // From the Model's namespace; absent, public models still download.
        env.push(EnvVar {
            name: "HF_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                    name: secret.clone(),
                    key: "token".into(),
                    optional: Some(true),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let download = Container {
        name: DOWNLOAD_CONTAINER.into(),
        image: Some(settings.sidecar_image.clone()),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        volume_mounts: Some(vec![mount.clone()]),
        security_context: Some(restricted(true)),
        ..Default::default()
    };
    Some((volume, mount, download))
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn labels(model: &Model) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            MODEL_LABEL.to_string(),
            model.metadata.name.clone().unwrap_or_default(),
        ),
        (COMPONENT_LABEL.to_string(), "model".to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "greenthread".to_string(),
        ),
    ])
}

/// An engine's flag names for what every engine server takes.
struct Flags {
    share: &'static str,
    tensor: &'static str,
    pipeline: &'static str,
}

/// An engine server's command line: `head`, its loopback address, `switches`, then the
/// spec's memory share, parallelism, dtype, quantization, load format under each
/// engine's flag names, the names it answers to, and the user's extra arguments last (so
/// that they win). Pipeline parallelism appears only past 1 stage.
fn serve_args(
    spec: &ModelSpec,
    port: u16,
    head: &[&str],
    switches: &[&str],
    flags: Flags,
    served: &[&str],
) -> Vec<String> {
    let s = spec;
    let mut args: Vec<String> = head.iter().map(|a| a.to_string()).collect();
    args.push(s.model_name.clone());
    args.extend([
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
    ]);
    args.extend(switches.iter().map(|a| a.to_string()));
    args.extend([
        flags.share.to_string(),
        s.gpu_memory_utilization.clone(),
        flags.tensor.to_string(),
        s.tensor().to_string(),
    ]);
    if s.pipeline() > 1 {
        args.extend([flags.pipeline.to_string(), s.pipeline().to_string()]);
    }
    args.extend(["--dtype".into(), s.dtype.clone()]);
    if !s.quantization.is_empty() {
        args.extend(["--quantization".to_string(), s.quantization.clone()]);
    }
    if let Some(f) = &s.load_format {
        args.extend(["--load-format".to_string(), f.clone()]);
    }
    if !served.is_empty() {
        args.push("--served-model-name".into());
        args.extend(served.iter().map(|n| n.to_string()));
    }
    args.extend(s.extra_args.iter().cloned());
    args
}

/// vLLM's whole command line for `spec`, served as `name` and as its engine id, on
/// `port`: `vllm serve <modelName>` (or the spec's `command`, with `--model`), sleep
/// mode on, the spec's memory share, parallelism, dtype, quantization, then the user's
/// extra arguments. The controller and `local` both run it.
pub fn vllm_command(spec: &ModelSpec, name: &str, port: u16) -> Vec<String> {
    let mut served = vec![name];
    if spec.model_name != name {
        served.push(&spec.model_name);
    }
    let custom: Vec<&str> = spec.command.iter().map(String::as_str).collect();
    let head: Vec<&str> = if custom.is_empty() {
        vec!["vllm", "serve"]
    } else {
        custom.into_iter().chain(["--model"]).collect()
    };
    let mut switches = vec!["--enable-sleep-mode".to_string()];
    if let Some(l) = spec.lora_settings() {
        // Adapters are loaded by the sidecar at run time (with
        // VLLM_ALLOW_RUNTIME_LORA_UPDATING); these bound what it can load.
        switches.extend([
            "--enable-lora".into(),
            "--max-loras".into(),
            l.max_loras.to_string(),
            "--max-lora-rank".into(),
            l.max_lora_rank.to_string(),
        ]);
    }
    let switches: Vec<&str> = switches.iter().map(String::as_str).collect();
    serve_args(
        spec,
        port,
        &head,
        &switches,
        Flags {
            share: "--gpu-memory-utilization",
            tensor: "--tensor-parallel-size",
            pipeline: "--pipeline-parallel-size",
        },
        &served,
    )
}

/// The engine container's arguments for vLLM (its command is `vllm`).
pub fn vllm_args(model: &Model, port: u16) -> Vec<String> {
    let name = model.metadata.name.clone().unwrap_or_default();
    vllm_command(&model.spec.normalized(), &name, port)
        .into_iter()
        .skip(1)
        .collect()
}

/// SGLang's whole command line: `python3 -m sglang.launch_server` (or the spec's
/// `command`), its memory saver on, weights backed up on the CPU so that they come back
/// intact, metrics, then the spec's values as for vLLM. The controller and `local` both
/// run it.
pub fn sglang_command(spec: &ModelSpec, port: u16) -> Vec<String> {
    let custom: Vec<&str> = spec.command.iter().map(String::as_str).collect();
    let head: Vec<&str> = if custom.is_empty() {
        vec!["python3", "-m", "sglang.launch_server", "--model-path"]
    } else {
        custom.into_iter().chain(["--model-path"]).collect()
    };
    let mut switches: Vec<String> = [
        "--enable-memory-saver",
        "--enable-weights-cpu-backup",
        "--enable-metrics",
    ]
    .map(String::from)
    .into();
    if matches!(
        spec.model_type,
        Some(ModelType::Embedding | ModelType::Reranker)
    ) {
        // SGLang serves embeddings and scores only when told the model is one.
        switches.push("--is-embedding".into());
    }
    if let Some(l) = spec.lora_settings() {
        // Started without adapters (the sidecar loads them), SGLang must be told which
        // layers they may touch.
        switches.extend([
            "--enable-lora".into(),
            "--max-loras-per-batch".into(),
            l.max_loras.to_string(),
            "--max-lora-rank".into(),
            l.max_lora_rank.to_string(),
            "--lora-target-modules".into(),
            "all".into(),
        ]);
    }
    let switches: Vec<&str> = switches.iter().map(String::as_str).collect();
    serve_args(
        spec,
        port,
        &head,
        &switches,
        Flags {
            share: "--mem-fraction-static",
            tensor: "--tp",
            pipeline: "--pp-size",
        },
        &[],
    )
}

/// The engine container's arguments for SGLang (its command is `python3`).
pub fn sglang_args(model: &Model, port: u16) -> Vec<String> {
    sglang_command(&model.spec.normalized(), port)
        .into_iter()
        .skip(1)
        .collect()
}

/// A spec that [`ModelSpec::validate`](greenthread_api::ModelSpec::validate) refuses:
/// nothing is rendered from it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid spec: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidSpec(pub Vec<FieldError>);

/// The sidecar's configuration in a pod on `gpus`: the one assembly
/// ([`SidecarConfig::for_model`]) with the pod's addresses, the Kubernetes ledger and the
/// engine's share of the largest GPU.
pub fn sidecar_config(model: &ValidModel, gpus: &[GpuSpec], settings: &Settings) -> SidecarConfig {
    let p = settings.ports;
    let any = |port: u16| SocketAddr::from(([0, 0, 0, 0], port));
    let s = &model.spec;
    let engine = SidecarEngine::of(s.engine, false);
    let engine_command = matches!(engine, SidecarEngine::Llamacpp | SidecarEngine::Process)
        .then(|| s.owned_engine_command(p.engine, "/app/llama-server"));
    let cfg = SidecarConfig::for_model(
        model,
        Assignment {
            listen: Some((any(p.http as u16), any(p.metrics as u16))),
            engine_url: format!("http://127.0.0.1:{}", p.engine),
            engine,
            engine_command,
            pod_name: None,
            ledger: LedgerAt::Kube {
                gpus: gpus
                    .iter()
                    .map(|g| format!("{}-{}", g.node, g.index))
                    .collect(),
                namespace: settings.gpu_namespace.clone(),
            },
            memory_bytes: gpus.iter().map(|g| model.share_of(g.memory_bytes)).max(),
            policy: settings.policy,
        },
    );
    SidecarConfig {
        preemption: settings.preemption,
        // In a pod the adapters come from the Model's ConfigMap, updated in place when
        // the spec changes (the pod is never re-created for it).
        adapters: Vec::new(),
        adapters_file: s
            .lora_settings()
            .map(|_| format!("{ADAPTERS_DIR}/{ADAPTERS_KEY}").into()),
        ..cfg
    }
}

/// Where the Model's adapters ConfigMap is mounted for the sidecar.
pub const ADAPTERS_DIR: &str = "/etc/greenthread/adapters";
/// The ConfigMap's key holding the adapters, as JSON.
pub const ADAPTERS_KEY: &str = "adapters.json";

/// The ConfigMap holding a Model's adapters (`{model}-adapters`).
pub fn adapters_config_map_name(model: &Model) -> String {
    format!(
        "{}-adapters",
        model.metadata.name.clone().unwrap_or_default()
    )
}

/// `spec.adapters` as the sidecar reads them, in a ConfigMap the Model owns; `None` when
/// the Model has LoRA off (no adapters, no `maxLoras`).
pub fn render_adapters_config_map(model: &Model) -> Option<ConfigMap> {
    model.spec.lora_settings()?;
    let owner = model
        .controller_owner_ref(&())
        .expect("a Model from the API server has a name and uid");
    Some(ConfigMap {
        metadata: ObjectMeta {
            name: Some(adapters_config_map_name(model)),
            namespace: model.metadata.namespace.clone(),
            labels: Some(labels(model)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ADAPTERS_KEY.to_string(),
            serde_json::to_string(&model.spec.adapters).expect("adapters serialize"),
        )])),
        ..Default::default()
    })
}

/// The adapters ConfigMap as a volume (optional: a pod may start before it exists).
fn adapters_volume(model: &Model) -> Volume {
    Volume {
        name: "adapters".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: adapters_config_map_name(model),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn adapters_mount() -> VolumeMount {
    VolumeMount {
        name: "adapters".into(),
        mount_path: ADAPTERS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// Where the `greenthread` binary is put for engines the sidecar runs in their own image.
pub const BINARY_DIR: &str = "/greenthread";
/// Where in-cluster clients (kube-rs too) look for the service-account token.
pub const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The uid our own containers run as (distroless `nonroot`).
pub const NONROOT_UID: i64 = 65532;

/// The image the engine container of `model` runs.
pub fn engine_image(model: &Model, settings: &Settings) -> String {
    let s = &model.spec;
    s.image.clone().unwrap_or_else(|| match s.engine {
        EngineKind::Sim => settings.sidecar_image.clone(),
        EngineKind::Sglang => SGLANG_IMAGE.to_string(),
        EngineKind::Llamacpp | EngineKind::Process => LLAMACPP_IMAGE.to_string(),
        EngineKind::Vllm => settings.vllm_image.clone(),
    })
}

/// Whether `image` matches one of `patterns` (`*` stands for any characters); every
/// image is allowed when there are none.
pub fn image_allowed(image: &str, patterns: &[String]) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }
    patterns.is_empty()
        || patterns
            .iter()
            .any(|p| glob(p.as_bytes(), image.as_bytes()))
}

/// No privilege escalation, no capabilities: every container we render. Ours (the
/// sidecar, the binary installer) also run as non-root on a read-only root filesystem.
fn restricted(ours: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        run_as_non_root: ours.then_some(true),
        run_as_user: ours.then_some(NONROOT_UID),
        read_only_root_filesystem: ours.then_some(true),
        ..Default::default()
    }
}

/// The service-account token, projected for the sidecar alone (the pod mounts none, so
/// an engine image of the user's choice never holds it).
fn token_volume() -> Volume {
    Volume {
        name: "kube-api-access".into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3607),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                field_path: "metadata.namespace".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

fn token_mount() -> VolumeMount {
    VolumeMount {
        name: "kube-api-access".into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }
}
pub const LLAMACPP_IMAGE: &str = "ghcr.io/ggml-org/llama.cpp:server";
pub const SGLANG_IMAGE: &str = "lmsysorg/sglang:v0.5.4";

/// The pod of replica `replica`, placed on `gpus` (all on one node). Engines with a
/// sleep API (vLLM, SGLang, the simulator) run beside the sidecar; engines without one
/// (llama.cpp, any process) run under it, in their own image, with the `greenthread`
/// binary copied in by an init container, so that sleeping can stop them.
pub fn render_pod(
    model: &Model,
    replica: u32,
    gpus: &[GpuSpec],
    settings: &Settings,
) -> Result<Pod, InvalidSpec> {
    let valid = model.spec.validate("spec").map_err(InvalidSpec)?;
    Ok(render_valid_pod(model, &valid, replica, gpus, settings))
}

/// [`render_pod`] for a spec already validated (the reconcile's plan validates first).
pub fn render_valid_pod(
    model: &Model,
    valid: &ValidModel,
    replica: u32,
    gpus: &[GpuSpec],
    settings: &Settings,
) -> Pod {
    // Rendered from the normalized spec: either shape of a Model renders the same pod.
    let s = &valid.spec;
    let name = format!(
        "{}-{replica}",
        model.metadata.name.clone().unwrap_or_default()
    );
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    let port = settings.ports.engine;
    let mut engine_env = vec![
        // vLLM's sleep API lives behind its development endpoints.
        env("VLLM_SERVER_DEV_MODE", "1"),
        // The GPUs placement chose, by UUID, for the NVIDIA container runtime.
        env("NVIDIA_VISIBLE_DEVICES", &uuids.join(",")),
    ];
    let lora = s.lora_settings().is_some();
    if lora {
        // vLLM's adapter API (the sidecar loads adapters at run time) lives behind this.
        engine_env.push(env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"));
    }
    let mut sidecar_env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
    ];
    let ports = vec![
        ContainerPort {
            name: Some("http".into()),
            container_port: settings.ports.http,
            ..Default::default()
        },
        ContainerPort {
            name: Some("metrics".into()),
            container_port: settings.ports.metrics,
            ..Default::default()
        },
    ];
    let args: Vec<String> = std::iter::once("sidecar".to_string())
        .chain(sidecar_config(valid, gpus, settings).to_args())
        .collect();
    let sidecar_container = |name: &str, image: String, command, args, env, resources| Container {
        name: name.into(),
        image: Some(image),
        command,
        args: Some(args),
        env: Some(env),
        ports: Some(ports.clone()),
        liveness_probe: Some(http_probe("/health", 10)),
        // Ready once booted, whatever the state: a sleeping model keeps receiving traffic.
        readiness_probe: Some(http_probe("/ready", 5)),
        resources,
        ..Default::default()
    };
    if takes_engine_key(model) {
        // The engine answers only its sidecar, which holds the same key: vLLM and the
        // simulator read VLLM_API_KEY; SGLang takes `--api-key`, expanded by the kubelet.
        let secret = engine_key_secret_name(model);
        engine_env.push(env_secret("VLLM_API_KEY", &secret));
        sidecar_env.push(env_secret("GREENTHREAD_ENGINE_API_KEY", &secret));
    }
    let (containers, init_containers, volumes) = match s.engine {
        EngineKind::Vllm | EngineKind::Sim | EngineKind::Sglang => {
            let (image, command, engine_args) = match s.engine {
                EngineKind::Sim => (
                    settings.sidecar_image.clone(),
                    vec!["greenthread".to_string()],
                    vec![
                        "sim-engine".into(),
                        "--listen".into(),
                        format!("127.0.0.1:{port}"),
                        "--model".into(),
                        s.model_name.clone(),
                    ]
                    .into_iter()
                    .chain(lora.then(|| "--enable-lora".to_string()))
                    .collect(),
                ),
                EngineKind::Sglang => {
                    let mut argv = sglang_command(s, port);
                    let args = argv.split_off(1);
                    (
                        SGLANG_IMAGE.to_string(),
                        argv,
                        args.into_iter()
                            .chain(["--api-key".to_string(), "$(VLLM_API_KEY)".to_string()])
                            .collect(),
                    )
                }
                _ => {
                    let name = model.metadata.name.clone().unwrap_or_default();
                    let mut argv = vllm_command(s, &name, port);
                    let args = argv.split_off(1);
                    (settings.vllm_image.clone(), argv, args)
                }
            };
            // On-demand adapters: the sidecar downloads them, the engine reads them, at
            // the same path in both.
            let cache = model.spec.lora_on_demand().then(|| {
                let path = s
                    .lora
                    .as_ref()
                    .and_then(|l| l.cache_dir.clone())
                    .unwrap_or_else(|| greenthread_api::model::DEFAULT_LORA_CACHE_DIR.into());
                (
                    Volume {
                        name: "lora-cache".into(),
                        empty_dir: Some(Default::default()),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "lora-cache".into(),
                        mount_path: path,
                        ..Default::default()
                    },
                )
            });
            let weights = weights_download(s, settings);
            let mut engine_mounts: Vec<VolumeMount> =
                cache.iter().map(|(_, m)| m.clone()).collect();
            if let Some((_, mount, _)) = &weights {
                // The cache the init container filled; nothing to fetch from here on.
                engine_mounts.push(mount.clone());
                engine_env.push(env("HF_HUB_CACHE", WEIGHTS_DIR));
                engine_env.push(env("HF_HUB_OFFLINE", "1"));
            }
            let engine = Container {
                name: "engine".into(),
                image: Some(s.image.clone().unwrap_or(image)),
                volume_mounts: (!engine_mounts.is_empty()).then_some(engine_mounts),
                command: Some(command),
                args: Some(engine_args),
                env: Some(engine_env),
                resources: s.resources.clone(),
                security_context: Some(
                    s.security_context
                        .clone()
                        .unwrap_or_else(|| restricted(s.engine == EngineKind::Sim)),
                ),
                ..Default::default()
            };
            let mut sidecar = sidecar_container(
                "sidecar",
                settings.sidecar_image.clone(),
                None,
                args,
                sidecar_env,
                None,
            );
            sidecar.security_context = Some(restricted(true));
            let mut mounts = vec![token_mount()];
            let mut volumes = vec![token_volume()];
            if lora {
                mounts.push(adapters_mount());
                volumes.push(adapters_volume(model));
            }
            if let Some((volume, mount)) = cache {
                mounts.push(mount);
                volumes.push(volume);
            }
            sidecar.volume_mounts = Some(mounts);
            let init = weights.map(|(volume, _, download)| {
                volumes.push(volume);
                vec![download]
            });
            (vec![engine, sidecar], init, Some(volumes))
        }
        EngineKind::Llamacpp | EngineKind::Process => {
            let image = s
                .image
                .clone()
                .unwrap_or_else(|| LLAMACPP_IMAGE.to_string());
            let mount = VolumeMount {
                name: "greenthread".into(),
                mount_path: BINARY_DIR.into(),
                ..Default::default()
            };
            let mut engine = sidecar_container(
                "engine",
                image,
                Some(vec![format!("{BINARY_DIR}/greenthread")]),
                args,
                engine_env.into_iter().chain(sidecar_env).collect(),
                s.resources.clone(),
            );
            // The sidecar runs inside the engine's image here (it stops and starts the
            // engine), so the token is in this container: its engine is the user's own
            // command, run by the sidecar.
            let mut mounts = vec![mount.clone(), token_mount()];
            if lora {
                mounts.push(adapters_mount());
            }
            engine.volume_mounts = Some(mounts);
            engine.security_context = Some(
                s.security_context
                    .clone()
                    .unwrap_or_else(|| restricted(false)),
            );
            let install = Container {
                name: "greenthread".into(),
                image: Some(settings.sidecar_image.clone()),
                args: Some(vec!["install-binary".into(), BINARY_DIR.into()]),
                volume_mounts: Some(vec![mount]),
                security_context: Some(restricted(true)),
                ..Default::default()
            };
            let volume = Volume {
                name: "greenthread".into(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            };
            let mut volumes = vec![volume, token_volume()];
            if lora {
                volumes.push(adapters_volume(model));
            }
            (vec![engine], Some(vec![install]), Some(volumes))
        }
    };
    let owner = model
        .controller_owner_ref(&())
        .expect("a Model from the API server has a name and uid");
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: model.metadata.namespace.clone(),
            labels: Some(labels(model)),
            annotations: Some(BTreeMap::from([(
                GPUS_ANNOTATION.to_string(),
                gpus.iter()
                    .map(|g| format!("{}-{}", g.node, g.index))
                    .collect::<Vec<_>>()
                    .join(","),
            )])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: gpus.first().map(|g| g.node.clone()),
            node_selector: (!s.node_selector.is_empty()).then(|| s.node_selector.clone()),
            tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
            runtime_class_name: settings.runtime_class.clone(),
            image_pull_secrets: (!settings.image_pull_secrets.is_empty()).then(|| {
                settings
                    .image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            service_account_name: settings.service_account.clone(),
            // Mounted only where it is needed (the sidecar), never by default.
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            init_containers,
            containers,
            volumes,
            ..Default::default()
        }),
        status: None,
    };
    // What the pod runs, summed up: a pod whose sum differs from its Model's now is
    // rolled (see `plan`).
    let hash = spec_hash(&pod);
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(SPEC_HASH_ANNOTATION.to_string(), hash);
    pod
}

/// The annotation holding what a pod was rendered from, summed up ([`spec_hash`]).
pub const SPEC_HASH_ANNOTATION: &str = "greenthread.ai/spec-hash";

/// FNV-1a (64 bits, stable across builds) of the pod's spec as JSON: everything the pod
/// runs — images, command lines, environment, volumes, placement.
pub fn spec_hash(pod: &Pod) -> String {
    let json = serde_json::to_vec(&pod.spec).expect("a pod spec serializes");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in json {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The key of the Secret holding a Model's engine API key.
pub const ENGINE_KEY: &str = "api-key";

/// The Secret holding `model`'s engine API key (`{model}-engine-key`), for engines that
/// take one (vLLM, SGLang, the simulator).
pub fn engine_key_secret_name(model: &Model) -> String {
    format!(
        "{}-engine-key",
        model.metadata.name.clone().unwrap_or_default()
    )
}

/// Whether `model`'s engine takes an API key the sidecar can send (so that the engine
/// answers nobody but its sidecar, and never sees users' keys).
pub fn takes_engine_key(model: &Model) -> bool {
    matches!(
        model.spec.engine,
        EngineKind::Vllm | EngineKind::Sglang | EngineKind::Sim
    )
}

/// The Secret with `model`'s engine API key `key`, owned by the Model.
pub fn render_engine_key_secret(model: &Model, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(engine_key_secret_name(model)),
            namespace: model.metadata.namespace.clone(),
            labels: Some(labels(model)),
            owner_references: Some(vec![
                model
                    .controller_owner_ref(&())
                    .expect("a Model from the API server has a uid"),
            ]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            ENGINE_KEY.to_string(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

fn env_secret(name: &str, secret: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: ENGINE_KEY.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One Service per Model, selecting its pods' sidecars.
pub fn render_service(model: &Model) -> Service {
    let name = model.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: model.metadata.namespace.clone(),
            labels: Some(labels(model)),
            owner_references: Some(vec![
                model
                    .controller_owner_ref(&())
                    .expect("a Model from the API server has a uid"),
            ]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(MODEL_LABEL.to_string(), name)])),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: METRICS_PORT,
                    target_port: Some(IntOrString::String("metrics".into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}
