//! Hostile Model specs: thousands of generated specs, every field drawn from valid values,
//! near misses and garbage, in both shapes (`tensorParallelSize` and `parallelism`,
//! `modelType` and `endpoints`, `product` and the node selector). Validation never
//! panics, every refusal names the field, and what is accepted normalizes to a fixed
//! point that validates again.

use greenthread_api::ModelSpec;
use proptest::prelude::*;
use serde_json::{Value, json};

const FIELDS: [&str; 18] = [
    "modelName",
    "engine",
    "gpuMemoryUtilization",
    "tensorParallelSize",
    "replicas",
    "command",
    "sleep.idleTimeout",
    "sleep.drainTimeout",
    "sleep.level",
    "fairness.minRuntime",
    "fairness.maxWaitTime",
    "parallelism",
    "parallelism.tensor",
    "parallelism.pipeline",
    "modelType",
    "endpoints",
    "product",
    "loadFormat",
];

fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        prop::collection::vec(any::<String>(), 0..3).prop_map(Value::from),
    ]
}

fn duration() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            "0s",
            "500ms",
            "30s",
            "5m",
            "1h",
            "-1s",
            "5 m",
            "",
            "10",
            "1e9s",
            "99999999999999999999s",
            "1d"
        ])
        .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        any_json(),
    ]
}

fn spec() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!("org/m")),
            Just(json!("")),
            Just(json!("  ")),
            any_json()
        ],
        prop_oneof![
            prop::sample::select(vec!["vllm", "sglang", "llamacpp", "process", "sim", "tgi"])
                .prop_map(Value::from),
            any_json()
        ],
        prop_oneof![
            prop::sample::select(vec![
                "0.9", "1", "0", "1.5", "-0.1", "NaN", "inf", "0.45 ", "x"
            ])
            .prop_map(Value::from),
            any_json()
        ],
        prop_oneof![(0u32..20).prop_map(Value::from), any_json()],
        prop_oneof![(0u32..5).prop_map(Value::from), any_json()],
        prop_oneof![
            Just(json!([])),
            Just(json!(["serve", "--port", "{port}"])),
            any_json()
        ],
        (
            duration(),
            duration(),
            prop_oneof![(0u8..4).prop_map(Value::from), any_json()],
        ),
        (duration(), duration()),
        newer_shape(),
    )
        .prop_map(
            |(
                name,
                engine,
                util,
                tp,
                replicas,
                command,
                (idle, drain, level),
                (min_rt, max_wait),
                newer,
            )| {
                let mut spec = json!({
                    "modelName": name, "engine": engine, "gpuMemoryUtilization": util,
                    "replicas": replicas, "command": command,
                    "sleep": {"idleTimeout": idle, "drainTimeout": drain, "level": level},
                    "fairness": {"minRuntime": min_rt, "maxWaitTime": max_wait},
                });
                if !tp.is_null() {
                    spec["tensorParallelSize"] = tp;
                }
                for (k, v) in newer {
                    spec[k] = v;
                }
                spec
            },
        )
}

/// The newer shape's fields, each present or not: valid values, contradictions with the
/// older spelling, and garbage.
fn newer_shape() -> impl Strategy<Value = Vec<(&'static str, Value)>> {
    let small = || prop_oneof![(0u32..10).prop_map(Value::from), any_json()];
    let routes = prop::sample::select(vec![
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/audio/speech",
        "/v1/rerank",
        "/v1/custom/route",
        "/v1/../admin",
        "/v1/",
        "v1/chat",
        "/v2/rerank",
    ]);
    (
        prop::option::of(prop_oneof![
            (prop::option::of(small()), prop::option::of(small())).prop_map(|(t, p)| {
                let mut o = serde_json::Map::new();
                if let Some(t) = t {
                    o.insert("tensor".into(), t);
                }
                if let Some(p) = p {
                    o.insert("pipeline".into(), p);
                }
                Value::Object(o)
            }),
            any_json(),
        ]),
        prop::option::of(prop_oneof![
            prop::sample::select(vec![
                "chat",
                "tts",
                "asr",
                "embedding",
                "reranker",
                "vision"
            ])
            .prop_map(Value::from),
            any_json()
        ]),
        prop::option::of(prop_oneof![
            prop::collection::vec(routes, 0..4).prop_map(Value::from),
            any_json()
        ]),
        prop::option::of(prop_oneof![
            prop::sample::select(vec![
                "NVIDIA-H100-80GB-HBM3",
                "H100",
                "NVIDIA H100",
                "-x",
                ""
            ])
            .prop_map(Value::from),
            any_json()
        ]),
        prop::option::of(prop::sample::select(vec!["H100", "A100"]).prop_map(Value::from)),
        prop::option::of(prop_oneof![
            prop::sample::select(vec!["safetensors", "runai_streamer", "Bad Format", ""])
                .prop_map(Value::from),
            any_json()
        ]),
    )
        .prop_map(|(par, ty, ep, product, selected, load)| {
            let mut out = Vec::new();
            out.extend(par.map(|v| ("parallelism", v)));
            out.extend(ty.map(|v| ("modelType", v)));
            out.extend(ep.map(|v| ("endpoints", v)));
            out.extend(product.map(|v| ("product", v)));
            out.extend(selected.map(|v| ("nodeSelector", json!({"nvidia.com/gpu.product": v}))));
            out.extend(load.map(|v| ("loadFormat", v)));
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn every_spec_is_accepted_or_refused_naming_its_field(v in spec()) {
        let Ok(s) = serde_json::from_value::<ModelSpec>(v.clone()) else {
            // Wrong JSON types: the CRD's schema refuses those at admission.
            return Ok(());
        };
        match s.validate("spec") {
            Ok(valid) => {
                prop_assert!(valid.gpu_memory_utilization > 0.0 && valid.gpu_memory_utilization <= 1.0);
                let spec = &valid.spec;
                prop_assert!([1, 2, 4, 8].contains(&spec.tensor()));
                prop_assert!(spec.gpus_per_replica() <= greenthread_api::MAX_GPUS_PER_REPLICA);
                // Normalized: the older spellings folded into the newer, a fixed point
                // that validates again to itself and means what the spec said.
                prop_assert_eq!(spec.tensor_parallel_size, None);
                prop_assert_eq!(&spec.normalized(), spec);
                prop_assert_eq!(&spec.validate("spec").unwrap().spec, spec);
                prop_assert_eq!(spec.tensor(), s.tensor());
                prop_assert_eq!(spec.pipeline(), s.pipeline());
                prop_assert_eq!(spec.served_endpoints(), s.served_endpoints());
                prop_assert_eq!(spec.gpu_product(), s.gpu_product());
                prop_assert!(valid.spec.replicas >= 1);
                prop_assert!(!valid.spec.model_name.trim().is_empty());
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for e in errors {
                    let field = e.field.strip_prefix("spec.").unwrap_or_default();
                    prop_assert!(FIELDS.contains(&field), "{e:?}");
                    prop_assert!(!e.message.is_empty(), "{e:?}");
                }
            }
        }
    }
}
