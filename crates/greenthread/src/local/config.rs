//! `greenthread local`'s configuration: GPUs (simulated, or `auto` for NVML) and models
//! with exactly the fields of the `Model` resource's spec.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use greenthread_api::{ByteSize, EngineKind, Gpu, GpuSpec, ModelSpec, ValidModel};
use greenthread_controller::placement;
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    pub gpus: GpusConfig,
    pub models: Vec<LocalModel>,
    /// Bearer keys for `/v1` (open when empty).
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Bearer token for `/api`. With `apiKeys` and no admin token, `local` refuses to
    /// start unless `adminOpen: true`.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Serve the admin API to anyone although `apiKeys` are set.
    #[serde(default)]
    pub admin_open: bool,
    /// Bearer token for `/metrics` (open when absent).
    #[serde(default)]
    pub metrics_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum GpusConfig {
    Keyword(String),
    Simulated { simulated: Vec<SimulatedGpu> },
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModel {
    pub name: String,
    pub spec: ModelSpec,
}

/// A GPU as configured: capacity and product.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuPlan {
    pub memory_bytes: u64,
    pub product: String,
}

/// The checked configuration.
#[derive(Debug)]
pub struct Plan {
    pub gpus: Vec<GpuPlan>,
    pub models: Vec<(String, ValidModel)>,
    pub api_keys: Vec<String>,
    pub admin_token: Option<String>,
    pub admin_open: bool,
    pub metrics_token: Option<String>,
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
    let cfg: LocalConfig =
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("config {source}: {e}"))?;
    let mut errors: Vec<String> = Vec::new();
    let gpus = match &cfg.gpus {
        GpusConfig::Keyword(k) if k == "auto" => {
            errors.push(if nvml_present() {
                "gpus: `auto` found an NVIDIA driver, but `local` runs only simulated engines so far, and they need simulated GPUs; list them instead (gpus: {simulated: [{memory: 80Gi}]})".into()
            } else {
                "gpus: `auto` discovers GPUs through NVML, and no NVIDIA driver (libnvidia-ml.so.1) was found on this machine; list simulated GPUs instead (gpus: {simulated: [{memory: 80Gi}]})".into()
            });
            vec![]
        }
        GpusConfig::Keyword(k) => {
            errors.push(format!(
                "gpus: {k:?} is neither `auto` nor `{{simulated: [...]}}`"
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
        let valid_name = !m.name.is_empty()
            && m.name.len() <= 63
            && m.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !m.name.starts_with('-')
            && !m.name.ends_with('-');
        if !valid_name {
            errors.push(format!(
                "models[{i}].name: {:?} must be lowercase letters, digits and '-' (a DNS label)",
                m.name
            ));
        }
        if cfg.models[..i].iter().any(|o| o.name == m.name) {
            errors.push(format!("models[{i}].name: {:?} is used twice", m.name));
        }
        match m.spec.validate(&format!("models[{i}].spec")) {
            Ok(v) => {
                if !matches!(
                    v.spec.engine,
                    EngineKind::Sim | EngineKind::Llamacpp | EngineKind::Process
                ) {
                    errors.push(format!(
                        "models[{i}].spec.engine: {:?} engines are not supported by `local` yet; use `sim`, `llamacpp` or `process`",
                        v.spec.engine
                    ));
                }
                if !gpus.is_empty() && v.spec.tensor_parallel_size as usize > gpus.len() {
                    errors.push(format!(
                        "models[{i}].spec.tensorParallelSize: {} is more than the {} GPUs configured",
                        v.spec.tensor_parallel_size,
                        gpus.len()
                    ));
                }
                models.push((m.name.clone(), v));
            }
            Err(es) => errors.extend(es.iter().map(ToString::to_string)),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("config {source} is invalid:\n  {}", errors.join("\n  "));
    }
    Ok(Plan {
        gpus,
        models,
        api_keys: cfg.api_keys,
        admin_token: cfg.admin_token,
        admin_open: cfg.admin_open,
        metrics_token: cfg.metrics_token,
    })
}

/// Whether NVML (the NVIDIA driver's management library) can be loaded here.
fn nvml_present() -> bool {
    let name = c"libnvidia-ml.so.1";
    // SAFETY: dlopen with a valid C string; the handle is closed at once.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// The name of GPU `index` in `local`'s ledger.
pub fn gpu_name(index: u32) -> String {
    format!("local-{index}")
}

/// The configured GPUs as ledger records: one node, `local`, simulated UUIDs.
pub fn gpu_records(plan: &Plan) -> Vec<Gpu> {
    plan.gpus
        .iter()
        .enumerate()
        .map(|(i, g)| Gpu {
            name: gpu_name(i as u32),
            spec: GpuSpec {
                node: "local".into(),
                index: i as u32,
                uuid: format!("GPU-sim-{i:04}"),
                product: g.product.clone(),
                memory_bytes: g.memory_bytes,
            },
            status: Default::default(),
            resource_version: String::new(),
        })
        .collect()
}

/// GPU indices for every replica of every model (in the plan's order), chosen by the
/// controller's [`placement::place`], so that `local` and Kubernetes place alike: best
/// fit where the model fits with everything else awake, else the least over-committed
/// GPUs, replicas of one model apart. The biggest models are placed first (declaration
/// order among equals), as they have the fewest good places.
pub fn place(plan: &Plan, gpus: &[Gpu]) -> anyhow::Result<Vec<Vec<Vec<u32>>>> {
    let mut order: Vec<usize> = (0..plan.models.len()).collect();
    order.sort_by(|a, b| {
        plan.models[*b]
            .1
            .gpu_memory_utilization
            .total_cmp(&plan.models[*a].1.gpu_memory_utilization)
            .then(a.cmp(b))
    });
    let index: BTreeMap<&str, u32> = gpus
        .iter()
        .map(|g| (g.name.as_str(), g.spec.index))
        .collect();
    let mut placed: BTreeMap<String, u64> = BTreeMap::new();
    let mut out: Vec<Vec<Vec<u32>>> = plan.models.iter().map(|_| Vec::new()).collect();
    for i in order {
        let (name, m) = &plan.models[i];
        let need = |g: &Gpu| m.share_of(g.spec.memory_bytes);
        let mut same_model = BTreeSet::new();
        for _ in 0..m.spec.replicas {
            let chosen = placement::place(
                gpus,
                &placement::Request {
                    tensor_parallel_size: m.spec.tensor_parallel_size,
                    need: &need,
                    placed: &placed,
                    same_model: &same_model,
                    nodes: None,
                },
            )
            .map_err(|e| anyhow::anyhow!("model {name}: {e}"))?;
            for g in &chosen {
                let gpu = &gpus[index[g.as_str()] as usize];
                *placed.entry(g.clone()).or_default() += need(gpu);
                same_model.insert(g.clone());
            }
            out[i].push(chosen.iter().map(|g| index[g.as_str()]).collect());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
