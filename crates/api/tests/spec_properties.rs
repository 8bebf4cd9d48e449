//! Hostile Model specs: thousands of generated specs, every field drawn from valid values,
//! near misses and garbage. Validation never panics, and every refusal names the field.

use greenthread_api::ModelSpec;
use proptest::prelude::*;
use serde_json::{Value, json};

const FIELDS: [&str; 11] = [
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
            )| {
                json!({
                    "modelName": name, "engine": engine, "gpuMemoryUtilization": util,
                    "tensorParallelSize": tp, "replicas": replicas, "command": command,
                    "sleep": {"idleTimeout": idle, "drainTimeout": drain, "level": level},
                    "fairness": {"minRuntime": min_rt, "maxWaitTime": max_wait},
                })
            },
        )
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
                prop_assert!([1, 2, 4, 8].contains(&valid.spec.tensor_parallel_size));
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
