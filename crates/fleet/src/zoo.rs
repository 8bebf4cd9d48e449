//! The models a simulation serves: a generated zoo, fixed for a given size so that
//! results compare across versions, and each model's simulated engine.
//!
//! The zoo's figures follow published vLLM measurements (see `docs/simulate.md`): a
//! level-1 wake copies the weights back from host memory at about 25 GB/s plus a fixed
//! ~0.1 s (0.26 s for a 0.6B model, ~0.6 s for 8B on H100; 2.85 s for 30B on A100); going
//! to sleep copies them out at about 20 GB/s plus the same fixed cost; prefill runs at
//! 8,000 tokens/s per engine, decode at 40 tokens/s per sequence, at most 64 sequences.

use greenthread_api::{ModelSpec, ValidModel};
use greenthread_simulator::SimConfig;

use crate::rng::Rng;

/// A size class of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub name: &'static str,
    /// Bytes of weights (decimal gigabytes, as model cards give them).
    pub weights: u64,
    /// Bytes the engine reserves on its GPU when awake (weights, KV cache, activations).
    pub reserved: u64,
}

const GB: u64 = 1_000_000_000;
const GIB: u64 = 1 << 30;

pub const CLASS_3B: Class = Class {
    name: "3b",
    weights: 6 * GB,
    reserved: 12 * GIB,
};
pub const CLASS_8B: Class = Class {
    name: "8b",
    weights: 16 * GB,
    reserved: 24 * GIB,
};
pub const CLASS_14B: Class = Class {
    name: "14b",
    weights: 28 * GB,
    reserved: 40 * GIB,
};

/// The engine timings of the zoo, as `sim-engine` flags.
pub const ZOO_ENGINE: &[&str] = &[
    "--h2d-bandwidth",
    "25000000000",
    "--d2h-bandwidth",
    "20000000000",
    "--wake-fixed",
    "100ms",
    "--sleep-fixed",
    "100ms",
    "--prefill-tokens-per-second",
    "8000",
    "--tokens-per-second",
    "40",
    "--max-num-seqs",
    "64",
    "--ttft",
    "0s",
    "--boot-time",
    "0s",
];

/// The seed of the zoo's order: a constant, so that `--models N` is the same zoo in every
/// run and every version (the workload's seed is `--seed`).
const ZOO_SEED: u64 = 0x6772_6565_6e74_6872;

/// `n` models: half 8B-class, a quarter 3B-class, a quarter 14B-class (in the pattern
/// 8B, 3B, 8B, 14B, so that any `n` keeps the proportions as near as it can), in a
/// seeded order, named `m000-8b`, `m001-14b`, …
///
/// With `tensor` > 1 each model runs tensor-parallel over that many GPUs: each GPU holds
/// its share of the weights and of the KV cache (the class's figures ÷ `tensor`), and
/// copies its share over its own link when the model sleeps or wakes, so wakes and
/// sleeps take that fraction of the time (plus the same fixed cost). Prefill and decode
/// keep their rates: the speed-up of parallel compute and the cost of its all-reduces
/// are not modelled.
pub fn zoo(n: usize, gpu_memory: u64, tensor: u32) -> Result<Vec<(String, ValidModel)>, String> {
    if ![1, 2, 4, 8].contains(&tensor) {
        return Err(format!(
            "tensor parallelism must be 1, 2, 4 or 8, not {tensor}"
        ));
    }
    let pattern = [CLASS_8B, CLASS_3B, CLASS_8B, CLASS_14B];
    let mut classes: Vec<Class> = (0..n).map(|i| pattern[i % 4]).collect();
    Rng::new(ZOO_SEED).shuffle(&mut classes);
    classes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = format!("m{i:03}-{}", c.name);
            Ok((name.clone(), model(&name, c, gpu_memory, tensor)?))
        })
        .collect()
}

fn model(name: &str, class: &Class, gpu_memory: u64, tensor: u32) -> Result<ValidModel, String> {
    // What one GPU holds.
    let (weights, reserved) = (
        class.weights / tensor as u64,
        class.reserved / tensor as u64,
    );
    if reserved > gpu_memory {
        return Err(format!(
            "a {}-class model reserves {} GiB per GPU, more than a {} GiB GPU",
            class.name,
            reserved / GIB,
            gpu_memory / GIB
        ));
    }
    let mut engine: Vec<String> = vec![
        "--weights-bytes".into(),
        weights.to_string(),
        "--kv-cache-bytes".into(),
        (reserved - weights).to_string(),
    ];
    engine.extend(ZOO_ENGINE.iter().map(|s| s.to_string()));
    // The share rounds up so that it is never below the reservation.
    let utilization = (reserved as f64 / gpu_memory as f64 * 1e6).ceil() / 1e6;
    let mut spec = serde_json::json!({
        "modelName": name,
        "engine": "sim",
        "gpuMemoryUtilization": format!("{utilization:.6}"),
        "extraArgs": engine,
    });
    if tensor > 1 {
        spec["parallelism"] = serde_json::json!({"tensor": tensor});
    }
    let spec: ModelSpec = serde_json::from_value(spec).map_err(|e| e.to_string())?;
    spec.validate("model")
        .map_err(|errors| format!("{errors:?}"))
}

/// The simulated engine of a model given `share` bytes of its GPU, as `local` starts it
/// ([`SimConfig::share_args`]), streams coalesced (same times, fewer frames). Engines
/// other than `sim` are simulated with the defaults for their share.
pub fn engine_config(model: &ValidModel, share: u64) -> Result<SimConfig, String> {
    let extra: &[String] = if model.spec.engine == greenthread_api::EngineKind::Sim {
        &model.spec.extra_args
    } else {
        &[]
    };
    let mut args = SimConfig::share_args(&model.spec.model_name, share, extra);
    args.push("--coalesce-stream".into());
    SimConfig::parse(&args).map_err(|e| format!("extraArgs of {}: {e}", model.spec.model_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zoo_is_the_same_for_a_size_and_keeps_the_class_proportions() {
        let a = zoo(28, 80 * GIB, 1).unwrap();
        let b = zoo(28, 80 * GIB, 1).unwrap();
        let names = |z: &[(String, ValidModel)]| z.iter().map(|m| m.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b));
        let count = |c: &str| a.iter().filter(|m| m.0.ends_with(&format!("-{c}"))).count();
        assert_eq!((count("8b"), count("3b"), count("14b")), (14, 7, 7));
        // Seeded, not in pattern order.
        assert_ne!(
            names(&a)[..4],
            ["m000-8b", "m001-3b", "m002-8b", "m003-14b"]
        );
    }

    #[test]
    fn a_zoo_model_reserves_its_class_and_its_engine_has_the_class_timings() {
        let z = zoo(4, 80 * GIB, 1).unwrap();
        let (name, m) = z.iter().find(|m| m.0.ends_with("-14b")).unwrap();
        let share = m.share_of(80 * GIB);
        assert!(
            (40 * GIB..40 * GIB + 100_000).contains(&share),
            "{name}: {share}"
        );
        let e = engine_config(m, share).unwrap();
        assert_eq!(e.weights_bytes, 28 * GB);
        assert_eq!(e.weights_bytes + e.kv_cache_bytes, 40 * GIB);
        assert_eq!(e.h2d_bandwidth, 25 * GB);
        assert_eq!(e.max_num_seqs, 64);
        assert!(e.coalesce_stream);
        // 28 GB at 25 GB/s plus 0.1 s.
        let wake = SimConfig::transfer_time(e.weights_bytes, e.h2d_bandwidth) + e.wake_fixed;
        assert_eq!(wake.as_millis(), 1220);
        assert!(
            zoo(1, 20 * GIB, 1).is_err(),
            "an 8B model does not fit 20 GiB"
        );
    }

    #[test]
    fn a_tensor_parallel_zoo_model_holds_its_share_on_each_gpu_and_moves_it_in_that_time() {
        let z = zoo(4, 80 * GIB, 2).unwrap();
        let (name, m) = z.iter().find(|m| m.0.ends_with("-14b")).unwrap();
        assert_eq!(m.spec.gpus_per_replica(), 2, "{name}");
        let share = m.share_of(80 * GIB);
        assert!(
            (20 * GIB..20 * GIB + 100_000).contains(&share),
            "{name}: {share}"
        );
        let e = engine_config(m, share).unwrap();
        assert_eq!(e.weights_bytes, 14 * GB);
        assert_eq!(e.weights_bytes + e.kv_cache_bytes, 20 * GIB);
        // 14 GB at 25 GB/s plus 0.1 s: each GPU copies its half at once.
        let wake = SimConfig::transfer_time(e.weights_bytes, e.h2d_bandwidth) + e.wake_fixed;
        assert_eq!(wake.as_millis(), 660);
        // Half of a 14B-class model fits a 20 GiB GPU; the whole one does not.
        assert!(zoo(4, 20 * GIB, 2).is_ok());
        assert!(zoo(4, 20 * GIB, 1).is_err());
        assert!(zoo(4, 80 * GIB, 3).unwrap_err().contains("1, 2, 4 or 8"));
    }
}
