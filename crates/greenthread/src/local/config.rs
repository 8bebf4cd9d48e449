//! `greenthread local`'s configuration: GPUs (simulated, or `auto` for NVML) and models
//! with exactly the fields of the `Model` resource's spec.

use std::{path::Path, sync::Arc};

use greenthread_api::{ByteSize, EngineKind, Gpu, GpuSpec, ModelSpec, ValidModel};
use greenthread_controller::placement;
use greenthread_gpu::{DeviceInfo, DiscoveryError, GpuSource, NvmlSource};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    pub gpus: GpusConfig,
    pub models: Vec<LocalModel>,
    /// Keys for `/v1` (open when empty): strings, or objects with a name, the models
    /// they may use and rate limits (see `docs/multi-tenant.md`).
    #[serde(default)]
    pub api_keys: Vec<greenthread_api::keys::ApiKeySpec>,
    /// Bearer token for `/api`. With `apiKeys` and no admin token, `local` refuses to
    /// start unless `adminOpen: true`.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// More admin tokens, each with a name (`[{name, token}]`): the audit log and the
    /// events say which one made a change (`adminToken` is named `admin`).
    #[serde(default)]
    pub admin_tokens: Vec<NamedToken>,
    /// Serve the admin API to anyone although `apiKeys` are set.
    #[serde(default)]
    pub admin_open: bool,
    /// Bearer token for `/metrics` (open when absent).
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// Scheduling policy: `cost-aware` (the default) or `lru`.
    #[serde(default)]
    pub policy: Option<String>,
    /// What a preempted model's running generations do: `drain` (the default) or
    /// `resume` (stopped at once, continued after its next wake).
    #[serde(default)]
    pub preemption: Option<String>,
    /// Host memory kept for sleeping models' weights (level-1 sleep): a size (`64Gi`),
    /// a share of this machine's memory (`50%`) or `off`. Default: `50%` with real
    /// GPUs, `off` with simulated ones (their weights are not really anywhere).
    #[serde(default)]
    pub host_memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum GpusConfig {
    /// `auto`: every GPU NVML finds.
    Keyword(String),
    Simulated {
        simulated: Vec<SimulatedGpu>,
    },
    /// Some of the GPUs NVML finds, by index or UUID, in this order.
    Devices {
        devices: Vec<DeviceRef>,
    },
}

/// A real GPU as a config names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DeviceRef {
    Index(u32),
    Uuid(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimulatedGpu {
    pub memory: String,
    #[serde(default = "default_product")]
    pub product: String,
}

fn default_product() -> String {
    "Simulated GPU".into()
}

/// An admin token with its name.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToken {
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for NamedToken {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("NamedToken")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModel {
    pub name: String,
    pub spec: ModelSpec,
}

/// One model of the configuration checked — its name a DNS label, its spec valid, its
/// engine one these GPUs run, its parallelism within their number — each problem named
/// by its field under `at` (`models[2].` in a file, nothing for the admin API's body).
/// The same for the file and for a model added at run time.
pub fn check_model(
    at: &str,
    m: &LocalModel,
    backend: &GpuBackend,
    products: &[&str],
) -> Result<ValidModel, Vec<String>> {
    let gpus = products.len();
    let mut errors = Vec::new();
    let valid_name = !m.name.is_empty()
        && m.name.len() <= 63
        && m.name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !m.name.starts_with('-')
        && !m.name.ends_with('-');
    if !valid_name {
        errors.push(format!(
            "{at}name: {:?} must be lowercase letters, digits and '-' (a DNS label)",
            m.name
        ));
    }
    let v = match m.spec.validate(&format!("{at}spec")) {
        Ok(v) => v,
        Err(es) => {
            errors.extend(es.iter().map(ToString::to_string));
            return Err(errors);
        }
    };
    let real = matches!(backend, GpuBackend::Nvml(_));
    match v.spec.engine {
        EngineKind::Vllm | EngineKind::Sglang if !real => errors.push(format!(
            "{at}spec.engine: `{}` runs on real GPUs; use `engine: sim` to simulate it on these simulated GPUs, or `gpus: auto` to run it",
            engine_name(v.spec.engine)
        )),
        EngineKind::Sim if real => errors.push(format!(
            "{at}spec.engine: `sim` engines run on simulated GPUs (gpus: {{simulated: [...]}}), and these GPUs are real ones found through NVML; on them use `vllm`, `sglang`, `llamacpp` or `process`"
        )),
        _ => {}
    }
    let wanted = v.spec.gpus_per_replica() as usize;
    if gpus > 0 && wanted > gpus {
        // Named as the user wrote it.
        let said = if m.spec.parallelism.is_some() {
            format!(
                "parallelism: tensor {} × pipeline {} is {wanted} GPUs,",
                v.spec.tensor(),
                v.spec.pipeline()
            )
        } else {
            format!("tensorParallelSize: {wanted} is")
        };
        errors.push(format!(
            "{at}spec.{said} more than the {gpus} GPUs configured"
        ));
    }
    if let Some(product) = v.spec.gpu_product()
        && gpus > 0
        && !products
            .iter()
            .any(|p| greenthread_api::product_label(p) == product)
    {
        // Each product once, however many GPUs of it there are and in whatever order.
        let have: std::collections::BTreeSet<String> = products
            .iter()
            .map(|p| greenthread_api::product_label(p))
            .collect();
        errors.push(format!(
            "{at}spec.{}: no GPU configured is a {product} (these are: {})",
            if m.spec.product.is_some() {
                "product"
            } else {
                "nodeSelector"
            },
            have.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    if errors.is_empty() {
        Ok(v)
    } else {
        Err(errors)
    }
}

/// A GPU as configured: capacity and product; for a real GPU, its NVML index and UUID.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuPlan {
    pub memory_bytes: u64,
    pub product: String,
    pub device: Option<(u32, String)>,
}

/// Where the GPUs are: simulated in this process, or real, seen through NVML.
#[derive(Clone)]
pub enum GpuBackend {
    Simulated,
    Nvml(Arc<dyn GpuSource>),
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GpuBackend::Simulated => "Simulated",
            GpuBackend::Nvml(_) => "Nvml",
        })
    }
}

/// The checked configuration.
#[derive(Debug)]
pub struct Plan {
    pub gpus: Vec<GpuPlan>,
    pub backend: GpuBackend,
    pub models: Vec<(String, ValidModel)>,
    pub api_keys: Vec<greenthread_api::keys::ApiKey>,
    /// Every admin token with its name (`adminToken` as `admin`).
    pub admin_tokens: Vec<(String, String)>,
    pub admin_open: bool,
    pub metrics_token: Option<String>,
    pub policy: greenthread_ledger::Policy,
    pub preemption: greenthread_sidecar::Preemption,
    /// This machine's memory, and the part of it kept for sleepers (`None`: not
    /// accounted).
    pub host_memory: (u64, Option<u64>),
}

/// Reads and checks `path`, or the embedded default when `None`. Every message names the
/// file and the field.
pub fn load(path: Option<&Path>) -> anyhow::Result<Plan> {
    let (source, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?,
        ),
        None => ("<embedded default>".to_string(), DEFAULT_CONFIG.to_string()),
    };
    parse(&source, &text)
}

pub fn parse(source: &str, text: &str) -> anyhow::Result<Plan> {
    parse_with(source, text, &|| match fake_gpus() {
        Some(fake) => fake,
        None => NvmlSource::new().map(|n| Arc::new(n) as Arc<dyn GpuSource>),
    })
}

/// `GREENTHREAD_LOCAL_FAKE_GPUS=2x80Gi`: GPUs that look real to `local` without a driver,
/// as the agent's `--fake-gpus` (for tests of real engines' command lines through
/// stand-ins, and demos). They report no process memory, so nothing is measured held.
fn fake_gpus() -> Option<Result<Arc<dyn GpuSource>, DiscoveryError>> {
    let v = std::env::var("GREENTHREAD_LOCAL_FAKE_GPUS").ok()?;
    let parsed = v.split_once('x').and_then(|(n, size)| {
        Some((
            n.parse::<u32>().ok()?,
            size.parse::<ByteSize>().ok()?.bytes(),
        ))
    });
    Some(match parsed {
        Some((n, bytes)) => Ok(Arc::new(greenthread_gpu::FakeSource::new(n, bytes))),
        None => Err(DiscoveryError::Nvml(format!(
            "GREENTHREAD_LOCAL_FAKE_GPUS={v:?} is not COUNTxSIZE (e.g. 2x80Gi)"
        ))),
    })
}

/// [`parse`], discovering real GPUs (`gpus: auto` or `devices`) through `discover`.
pub fn parse_with(
    source: &str,
    text: &str,
    discover: &dyn Fn() -> Result<Arc<dyn GpuSource>, DiscoveryError>,
) -> anyhow::Result<Plan> {
    let cfg: LocalConfig =
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("config {source}: {e}"))?;
    let mut errors: Vec<String> = Vec::new();
    let mut backend = GpuBackend::Simulated;
    let gpus = match &cfg.gpus {
        GpusConfig::Keyword(k) if k == "auto" => {
            real_gpus(discover, None, &mut backend, &mut errors)
        }
        GpusConfig::Devices { devices } => {
            real_gpus(discover, Some(devices), &mut backend, &mut errors)
        }
        GpusConfig::Keyword(k) => {
            errors.push(format!(
                "gpus: {k:?} is none of `auto`, `{{devices: [...]}}` or `{{simulated: [...]}}`"
            ));
            vec![]
        }
        GpusConfig::Simulated { simulated } => simulated
            .iter()
            .enumerate()
            .filter_map(|(i, g)| match g.memory.parse::<ByteSize>() {
                Ok(b) if b.bytes() > 0 => Some(GpuPlan {
                    memory_bytes: b.bytes(),
                    product: g.product.clone(),
                    device: None,
                }),
                Ok(_) => {
                    errors.push(format!("gpus.simulated[{i}].memory: must be more than 0"));
                    None
                }
                Err(e) => {
                    errors.push(format!("gpus.simulated[{i}].memory: {e}"));
                    None
                }
            })
            .collect(),
    };
    if matches!(&cfg.gpus, GpusConfig::Simulated { simulated } if simulated.is_empty()) {
        errors.push("gpus.simulated: at least one GPU is needed".into());
    }
    if cfg.models.is_empty() {
        errors.push("models: at least one model is needed".into());
    }
    let mut models = Vec::new();
    for (i, m) in cfg.models.iter().enumerate() {
        let at = format!("models[{i}].");
        if cfg.models[..i].iter().any(|o| o.name == m.name) {
            errors.push(format!("{at}name: {:?} is used twice", m.name));
        }
        let products: Vec<&str> = gpus.iter().map(|g| g.product.as_str()).collect();
        match check_model(&at, m, &backend, &products) {
            Ok(v) => models.push((m.name.clone(), v)),
            Err(es) => errors.extend(es),
        }
    }
    let specs: Vec<(&str, &greenthread_api::ModelSpec)> = cfg
        .models
        .iter()
        .map(|m| (m.name.as_str(), &m.spec))
        .collect();
    for (i, j, clash) in greenthread_api::adapter_clashes(&specs) {
        errors.push(format!(
            "models[{i}].spec.adapters[{j}].name: {clash}: requests could not tell them apart"
        ));
    }
    let policy = match cfg
        .policy
        .as_deref()
        .map(str::parse::<greenthread_ledger::Policy>)
    {
        None => greenthread_ledger::Policy::default(),
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            errors.push(format!("policy: {e}"));
            greenthread_ledger::Policy::default()
        }
    };
    let preemption = match cfg.preemption.as_deref() {
        None => greenthread_sidecar::Preemption::Drain,
        Some(s) => clap::ValueEnum::from_str(s, false).unwrap_or_else(|_| {
            errors.push(format!("preemption: {s:?} is not drain or resume"));
            greenthread_sidecar::Preemption::Drain
        }),
    };
    if preemption.check(policy).is_err() {
        errors.push("preemption: resume needs policy: cost-aware (lru always drains)".into());
    }
    let machine = greenthread_gpu::host_memory_bytes().unwrap_or(0);
    let host_budget = match cfg.host_memory.as_deref() {
        Some(s) => s
            .parse::<greenthread_api::HostBudget>()
            .unwrap_or_else(|e| {
                errors.push(format!("hostMemory: {e}"));
                greenthread_api::HostBudget::Off
            }),
        None if matches!(backend, GpuBackend::Simulated) => greenthread_api::HostBudget::Off,
        None => greenthread_api::HostBudget::Percent(50.0),
    };
    let api_keys = greenthread_api::keys::resolve_keys(&cfg.api_keys, "apiKeys", |p| {
        std::fs::read_to_string(p)
    })
    .unwrap_or_else(|e| {
        errors.extend(e.iter().map(ToString::to_string));
        vec![]
    });
    let mut admin_tokens: Vec<(String, String)> = cfg
        .admin_token
        .clone()
        .map(|t| ("admin".to_string(), t))
        .into_iter()
        .collect();
    for (i, t) in cfg.admin_tokens.iter().enumerate() {
        let valid = !t.name.is_empty()
            && t.name.len() <= 64
            && t.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !valid {
            errors.push(format!(
                "adminTokens[{i}].name: {:?} must be 1 to 64 letters, digits, '.', '_' or '-'",
                t.name
            ));
        } else if admin_tokens.iter().any(|(n, _)| *n == t.name) {
            errors.push(format!(
                "adminTokens[{i}].name: {:?} is used twice (adminToken is `admin`)",
                t.name
            ));
        }
        if t.token.trim().is_empty() {
            errors.push(format!("adminTokens[{i}].token: is required"));
        }
        admin_tokens.push((t.name.clone(), t.token.clone()));
    }
    if !errors.is_empty() {
        anyhow::bail!("config {source} is invalid:\n  {}", errors.join("\n  "));
    }
    Ok(Plan {
        policy,
        preemption,
        gpus,
        backend,
        models,
        api_keys,
        admin_tokens,
        admin_open: cfg.admin_open,
        metrics_token: cfg.metrics_token,
        host_memory: (machine, host_budget.bytes(machine)),
    })
}

/// An engine kind as users write it in a config.
fn engine_name(kind: EngineKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The real GPUs NVML finds, all (`wanted` is `None`) or those named, in that order.
fn real_gpus(
    discover: &dyn Fn() -> Result<Arc<dyn GpuSource>, DiscoveryError>,
    wanted: Option<&[DeviceRef]>,
    backend: &mut GpuBackend,
    errors: &mut Vec<String>,
) -> Vec<GpuPlan> {
    let field = if wanted.is_some() {
        "gpus.devices"
    } else {
        "gpus"
    };
    let found = match discover().and_then(|s| Ok((s.devices()?, s))) {
        Ok(found) => found,
        Err(e) => {
            errors.push(format!(
                "{field}: real GPUs are discovered through NVML: {e}; without a driver, list simulated GPUs instead (gpus: {{simulated: [{{memory: 80Gi}}]}})"
            ));
            return vec![];
        }
    };
    let (devices, source) = found;
    if devices.is_empty() {
        errors.push(format!("{field}: NVML found no GPU on this machine"));
        return vec![];
    }
    let plan = |d: &DeviceInfo| GpuPlan {
        memory_bytes: d.memory_bytes,
        product: d.product.clone(),
        device: Some((d.index, d.uuid.clone())),
    };
    let chosen: Vec<GpuPlan> = match wanted {
        None => devices.iter().map(plan).collect(),
        Some(wanted) => {
            let mut chosen: Vec<GpuPlan> = Vec::new();
            for (i, w) in wanted.iter().enumerate() {
                let hit = devices.iter().find(|d| match w {
                    DeviceRef::Index(n) => d.index == *n,
                    DeviceRef::Uuid(u) => d.uuid == *u,
                });
                match hit {
                    None => errors.push(format!(
                        "gpus.devices[{i}]: no GPU {} here; NVML found {}",
                        match w {
                            DeviceRef::Index(n) => format!("with index {n}"),
                            DeviceRef::Uuid(u) => format!("{u:?}"),
                        },
                        devices
                            .iter()
                            .map(|d| format!("{} ({})", d.index, d.uuid))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    Some(d)
                        if chosen
                            .iter()
                            .any(|c| c.device.as_ref().is_some_and(|(n, _)| *n == d.index)) =>
                    {
                        errors.push(format!(
                            "gpus.devices[{i}]: GPU {} is listed twice",
                            d.index
                        ))
                    }
                    Some(d) => chosen.push(plan(d)),
                }
            }
            if wanted.is_empty() {
                errors.push("gpus.devices: at least one GPU is needed".into());
            }
            chosen
        }
    };
    *backend = GpuBackend::Nvml(source);
    chosen
}

/// The name of GPU `index` in `local`'s ledger.
pub fn gpu_name(index: u32) -> String {
    format!("local-{index}")
}

/// The configured GPUs as ledger records on one node, `local`: a real GPU keeps its
/// NVML index and UUID; simulated ones are numbered in order.
/// The GPUs' ledger records: each with an even share of the sleepers' host memory.
pub fn gpu_records(plan: &Plan) -> Vec<Gpu> {
    let host_share = GpuSpec::host_share(plan.host_memory.1, plan.gpus.len());
    plan.gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let (index, uuid) = g
                .device
                .clone()
                .unwrap_or_else(|| (i as u32, format!("GPU-sim-{i:04}")));
            Gpu {
                name: gpu_name(index),
                spec: GpuSpec {
                    node: "local".into(),
                    index,
                    uuid,
                    product: g.product.clone(),
                    memory_bytes: g.memory_bytes,
                    host_memory_bytes: host_share,
                },
                status: Default::default(),
                resource_version: String::new(),
            }
        })
        .collect()
}

/// Positions in `gpus` for every replica of every model (in the plan's order): the
/// controller's placement, so that `local` and Kubernetes place alike.
pub fn place(plan: &Plan, gpus: &[Gpu]) -> anyhow::Result<Vec<Vec<Vec<u32>>>> {
    placement::place_models(&plan.models, gpus)
        .map_err(|(name, e)| anyhow::anyhow!("model {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use greenthread_gpu::FakeSource;

    use super::*;

    const GI: u64 = 1 << 30;

    /// Two 80 GiB GPUs, as a fake NVML reports them.
    fn fake() -> Result<Arc<dyn GpuSource>, DiscoveryError> {
        Ok(Arc::new(FakeSource::new(2, 80 * GI)))
    }

    fn with_gpus(gpus: &str, engine: &str) -> String {
        format!(
            "gpus: {gpus}\nmodels:\n  - name: a\n    spec: {{modelName: m, engine: {engine}, command: [srv]}}\n"
        )
    }

    #[test]
    fn gpus_auto_takes_every_gpu_nvml_finds_with_its_uuid() {
        let plan = parse_with("cfg", &with_gpus("auto", "llamacpp"), &fake).unwrap();
        assert!(matches!(plan.backend, GpuBackend::Nvml(_)));
        let records = gpu_records(&plan);
        let seen: Vec<(&str, u32, &str, u64)> = records
            .iter()
            .map(|g| {
                (
                    g.name.as_str(),
                    g.spec.index,
                    g.spec.uuid.as_str(),
                    g.spec.memory_bytes,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("local-0", 0, "GPU-fake-0000", 80 * GI),
                ("local-1", 1, "GPU-fake-0001", 80 * GI)
            ]
        );
        assert_eq!(records[0].spec.product, "Fake GPU");
    }

    #[test]
    fn a_subset_of_gpus_is_chosen_by_index_or_uuid_in_order() {
        let text = with_gpus("{devices: [1, GPU-fake-0000]}", "process");
        let plan = parse_with("cfg", &text, &fake).unwrap();
        let records = gpu_records(&plan);
        let names: Vec<&str> = records.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["local-1", "local-0"]);
        // Placement speaks positions in the records, whatever the devices' indices.
        let one = parse_with("cfg", &with_gpus("{devices: [1]}", "process"), &fake).unwrap();
        let records = gpu_records(&one);
        assert_eq!(place(&one, &records).unwrap(), vec![vec![vec![0]]]);
        assert_eq!(records[0].spec.index, 1);
    }

    #[test]
    fn wrong_devices_and_missing_drivers_are_named() {
        let e = parse_with("cfg", &with_gpus("{devices: [7, 0, 0]}", "process"), &fake)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpus.devices[0]: no GPU with index 7 here; NVML found 0 (GPU-fake-0000), 1 (GPU-fake-0001)"),
            "{e}"
        );
        assert!(e.contains("gpus.devices[2]: GPU 0 is listed twice"), "{e}");
        let e = parse_with("cfg", &with_gpus("{devices: [GPU-nope]}", "process"), &fake)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpus.devices[0]: no GPU \"GPU-nope\" here"),
            "{e}"
        );
        let e = parse_with("cfg", &with_gpus("{devices: []}", "process"), &fake)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpus.devices: at least one GPU is needed"),
            "{e}"
        );
        let no_driver = || -> Result<Arc<dyn GpuSource>, DiscoveryError> {
            Err(DiscoveryError::NoDriver(
                "libnvidia-ml.so.1: cannot open".into(),
            ))
        };
        let e = parse_with("cfg", &with_gpus("auto", "process"), &no_driver)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config cfg is invalid"), "{e}");
        assert!(
            e.contains("gpus: real GPUs are discovered through NVML"),
            "{e}"
        );
        assert!(e.contains("NVIDIA driver installed"), "{e}");
        assert!(e.contains("list simulated GPUs instead"), "{e}");
        let none = || -> Result<Arc<dyn GpuSource>, DiscoveryError> {
            Ok(Arc::new(FakeSource::new(0, 0)))
        };
        let e = parse_with("cfg", &with_gpus("auto", "process"), &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpus: NVML found no GPU on this machine"), "{e}");
    }

    #[test]
    fn engines_must_match_the_gpus() {
        let e = parse_with("cfg", &with_gpus("auto", "sim"), &fake)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models[0].spec.engine: `sim` engines run on simulated GPUs"),
            "{e}"
        );
        let e = parse_with(
            "cfg",
            &with_gpus("{simulated: [{memory: 8Gi}]}", "vllm"),
            &fake,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("models[0].spec.engine: `vllm` runs on real GPUs; use `engine: sim` to simulate it on these simulated GPUs, or `gpus: auto` to run it"),
            "{e}"
        );
        let tp = "gpus: {devices: [0]}\nmodels:\n  - name: a\n    spec: {modelName: m, engine: process, command: [srv], tensorParallelSize: 2}\n";
        let e = parse_with("cfg", tp, &fake).unwrap_err().to_string();
        assert!(
            e.contains("models[0].spec.tensorParallelSize: 2 is more than the 1 GPUs configured"),
            "{e}"
        );
    }

    #[test]
    fn the_embedded_default_is_valid_and_cannot_serve_everything_at_once() {
        let plan = parse("default", DEFAULT_CONFIG).unwrap();
        assert_eq!(plan.gpus.len(), 2);
        assert_eq!(plan.models.len(), 4);
        assert_eq!(
            plan.models
                .iter()
                .filter(|(_, m)| m.spec.fairness.popular)
                .count(),
            1
        );
        let placement = place(&plan, &gpu_records(&plan)).unwrap();
        let mut per_gpu = [0.0; 2];
        for (m, replicas) in plan.models.iter().zip(&placement) {
            for gpus in replicas {
                for g in gpus {
                    per_gpu[*g as usize] += m.1.gpu_memory_utilization;
                }
            }
        }
        assert!(
            per_gpu.iter().any(|u| *u > 1.0),
            "some GPU is oversubscribed: {per_gpu:?}"
        );
    }

    #[test]
    fn admin_tokens_have_names_and_never_show_their_tokens() {
        let base = "gpus:\n  simulated: [{memory: 10Gi}]\nmodels:\n  - name: a\n    spec: {modelName: m, engine: sim}\n";
        let plan = parse(
            "cfg",
            &format!("adminToken: t0\nadminTokens: [{{name: alice, token: t1}}]\n{base}"),
        )
        .unwrap();
        let names: Vec<&str> = plan.admin_tokens.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["admin", "alice"]);
        let e = parse(
            "cfg",
            &format!("adminToken: secret-t0\nadminTokens: [{{name: admin, token: secret-t1}}, {{name: 'b c', token: ''}}]\n{base}"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("adminTokens[0].name: \"admin\" is used twice"),
            "{e}"
        );
        assert!(
            e.contains("adminTokens[1].name") && e.contains("adminTokens[1].token: is required"),
            "{e}"
        );
        assert!(!e.contains("secret-"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let bad = r#"
gpus:
  simulated:
    - memory: 80Gb
models:
  - name: Bad_Name
    spec:
      modelName: m
      engine: sim
      gpuMemoryUtilization: "2"
"#;
        let e = parse("cfg.yaml", bad).unwrap_err().to_string();
        assert!(e.starts_with("config cfg.yaml is invalid"), "{e}");
        assert!(
            e.contains("gpus.simulated[0].memory: invalid size \"80Gb\""),
            "{e}"
        );
        assert!(e.contains("models[0].name: \"Bad_Name\""), "{e}");
        assert!(
            e.contains("models[0].spec.gpuMemoryUtilization: 2 is outside (0, 1]"),
            "{e}"
        );

        let unknown = "gpus: {simulated: [{memory: 1Gi}]}\nmodels:\n  - name: a\n    spec: {modelName: m, engine: sim, idleTimeout: 5m}\n";
        let e = parse("cfg.yaml", unknown).unwrap_err().to_string();
        assert!(e.contains("cfg.yaml") && e.contains("idleTimeout"), "{e}");

        let auto = "gpus: auto\nmodels:\n  - name: a\n    spec: {modelName: m, engine: sim}\n";
        let e = parse("cfg.yaml", auto).unwrap_err().to_string();
        assert!(e.contains("NVML") || e.contains("NVIDIA driver"), "{e}");
    }

    #[test]
    fn preemption_is_drain_unless_resume_is_asked_and_anything_else_is_named() {
        let base = "gpus: {simulated: [{memory: 10Gi}]}\nmodels:\n  - {name: a, spec: {modelName: a, engine: sim}}\n";
        assert_eq!(
            parse("t", base).unwrap().preemption,
            greenthread_sidecar::Preemption::Drain
        );
        let resume = format!("preemption: resume\n{base}");
        assert_eq!(
            parse("t", &resume).unwrap().preemption,
            greenthread_sidecar::Preemption::Resume
        );
        let lru = format!("policy: lru\npreemption: resume\n{base}");
        let e = parse("cfg.yaml", &lru).unwrap_err().to_string();
        assert!(
            e.contains("cfg.yaml") && e.contains("preemption: resume needs policy: cost-aware"),
            "{e}"
        );
        let bad = format!("preemption: pause\n{base}");
        let e = parse("cfg.yaml", &bad).unwrap_err().to_string();
        assert!(
            e.contains("cfg.yaml") && e.contains("preemption: \"pause\""),
            "{e}"
        );
    }

    /// `hostMemory`: off by default on simulated GPUs, a size split evenly among the
    /// GPU records, and a bad value named.
    #[test]
    fn host_memory_is_shared_by_the_gpus_and_a_bad_value_is_named() {
        let base = "gpus: {simulated: [{memory: 10Gi}, {memory: 10Gi}]}\nmodels:\n  - {name: a, spec: {modelName: a, engine: sim}}\n";
        let shares = |text: &str| {
            gpu_records(&parse("t", text).unwrap())
                .iter()
                .map(|g| g.spec.host_memory_bytes)
                .collect::<Vec<_>>()
        };
        assert_eq!(shares(base), [None, None]);
        let sized = format!("hostMemory: 64Gi\n{base}");
        assert_eq!(shares(&sized), [Some(32 << 30), Some(32 << 30)]);
        let bad = format!("hostMemory: lots\n{base}");
        let e = parse("cfg.yaml", &bad).unwrap_err().to_string();
        assert!(
            e.contains("cfg.yaml") && e.contains("hostMemory: invalid host memory budget \"lots\""),
            "{e}"
        );
    }

    #[test]
    fn placement_is_the_controllers_best_fit_with_replicas_apart() {
        let text = "gpus: {simulated: [{memory: 10Gi}, {memory: 10Gi}]}\nmodels:\n  - {name: a, spec: {modelName: a, engine: sim, gpuMemoryUtilization: \"0.6\"}}\n  - {name: b, spec: {modelName: b, engine: sim, gpuMemoryUtilization: \"0.5\"}}\n  - {name: c, spec: {modelName: c, engine: sim, gpuMemoryUtilization: \"0.4\", replicas: 2}}\n";
        let plan = parse("t", text).unwrap();
        // a (6Gi) takes gpu 0; b (5Gi) fits only beside nothing, on gpu 1; c's first
        // replica (4Gi) fits gpu 0 exactly (the tightest), its second goes apart, to gpu 1.
        assert_eq!(
            place(&plan, &gpu_records(&plan)).unwrap(),
            vec![vec![vec![0]], vec![vec![1]], vec![vec![0], vec![1]]]
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// A scalar as YAML would spell it: good values, near misses, garbage, quoting traps.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "80Gi",
                "0",
                "-1Gi",
                "1.5Ti",
                "10Zi",
                "sim",
                "auto",
                "true",
                "~",
                "[]",
                "{}",
                "\"0.6\"",
                "0.6",
                "5m",
                "1e400",
                "99999999999999999999999",
                "'",
                "\"",
                ": :",
                "&a",
                "*a",
                "!!binary x",
                "llama-8b",
                "Bad_Name",
                "-x",
                "",
            ])
            .prop_map(String::from),
            "[ -~]{0,16}".prop_map(|s| format!("{s:?}")),
        ]
    }

    /// A config shaped like the real one, with scalars anywhere and keys that may be wrong.
    fn config() -> impl Strategy<Value = String> {
        let model = (
            scalar(),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "modelName",
                        "engine",
                        "gpuMemoryUtilization",
                        "tensorParallelSize",
                        "replicas",
                        "extraArgs",
                        "command",
                        "sleep",
                        "fairness",
                        "image",
                        "bogus",
                    ]),
                    scalar(),
                ),
                0..6,
            ),
        )
            .prop_map(|(name, fields)| {
                let spec: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| format!("      {k}: {v}"))
                    .collect();
                format!("  - name: {name}\n    spec:\n{}\n", spec.join("\n"))
            });
        (
            prop::collection::vec(scalar(), 0..3),
            prop::collection::vec(model, 0..4),
            prop::option::of(scalar()),
            prop::option::of(scalar()),
        )
            .prop_map(|(gpus, models, keys, admin)| {
                let mut out = String::from("gpus:\n  simulated:\n");
                for g in gpus {
                    out.push_str(&format!("    - {{memory: {g}}}\n"));
                }
                out.push_str("models:\n");
                for m in models {
                    out.push_str(&m);
                }
                if let Some(k) = keys {
                    out.push_str(&format!("apiKeys: [{k}]\n"));
                }
                if let Some(a) = admin {
                    out.push_str(&format!("adminToken: {a}\n"));
                }
                out
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        /// Never a panic; a refusal names the file, and the field where the checks find it.
        #[test]
        fn configs_load_or_are_refused_naming_the_file(text in config()) {
            match parse("fuzz.yaml", &text) {
                Ok(plan) => {
                    prop_assert!(!plan.gpus.is_empty() && !plan.models.is_empty());
                    prop_assert!(plan.gpus.iter().all(|g| g.memory_bytes > 0));
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    prop_assert!(msg.starts_with("config fuzz.yaml"), "{msg}\n{text}");
                    prop_assert!(msg.len() > "config fuzz.yaml: ".len(), "{msg}");
                }
            }
        }
    }
}
