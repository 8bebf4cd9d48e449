//! The Model CRD's CEL rules, evaluated as the API server would (kube-cel) on valid and
//! invalid objects, and its printer columns; both shapes of a Model, from
//! `data/model_shapes.yaml`, through the CEL rules and validation alike.

use greenthread_api::{Model, ModelSpec};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = Model::crd();
    let v = &crd.spec.versions[0];
    serde_json::to_value(
        v.schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// A Model as `kubectl apply` would send it, after the API server's defaulting.
fn model(spec_patch: Value) -> Value {
    let mut spec = json!({
        "modelName": "Qwen/Qwen2.5-7B-Instruct",
        "engine": "vllm",
        "dtype": "bfloat16",
        "gpuMemoryUtilization": "0.90",
        "replicas": 1,
        "quantization": "",
        "extraArgs": [],
        "sleep": {"idleTimeout": "5m", "drainTimeout": "30s", "level": 1},
        "fairness": {"minRuntime": "10s", "maxWaitTime": "5s", "popular": false},
    });
    merge(&mut spec, spec_patch);
    json!({"apiVersion": "greenthread.ai/v1alpha1", "kind": "Model", "metadata": {"name": "m"}, "spec": spec})
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn errors(obj: &Value) -> Vec<String> {
    match kube_cel::Validator::new().validate(&schema(), obj, None) {
        Ok(()) => vec![],
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| format!("{}: {}", e.field_path, e.message))
            .collect(),
    }
}

#[test]
fn a_valid_model_passes() {
    assert_eq!(errors(&model(json!({}))), Vec::<String>::new());
    let good = model(
        json!({"tensorParallelSize": 8, "gpuMemoryUtilization": "1", "sleep": {"level": 2, "idleTimeout": "500ms"}}),
    );
    assert_eq!(errors(&good), Vec::<String>::new());
    let process = model(json!({"engine": "process", "command": ["llama-server", "-m", "m.gguf"]}));
    assert_eq!(errors(&process), Vec::<String>::new());
    let on_demand = model(json!({"maxLoraRank": 64, "lora": {"enabled": true, "maxRank": 64}}));
    assert_eq!(errors(&on_demand), Vec::<String>::new());
    // Off, llama.cpp may carry the block.
    let off = model(json!({"engine": "llamacpp", "lora": {"enabled": false}}));
    assert_eq!(errors(&off), Vec::<String>::new());
}

#[test]
fn invalid_models_are_refused_with_a_message_a_user_understands() {
    let cases = [
        (
            json!({"tensorParallelSize": 3}),
            "tensorParallelSize must be 1, 2, 4 or 8",
        ),
        (
            json!({"gpuMemoryUtilization": "1.5"}),
            "gpuMemoryUtilization must be a number in (0, 1]",
        ),
        (
            json!({"gpuMemoryUtilization": "0"}),
            "gpuMemoryUtilization must be a number in (0, 1]",
        ),
        (
            json!({"gpuMemoryUtilization": "most"}),
            "gpuMemoryUtilization must be a number in (0, 1]",
        ),
        (json!({"sleep": {"level": 3}}), "sleep.level must be 1"),
        (
            json!({"sleep": {"idleTimeout": "soon"}}),
            "sleep.idleTimeout and sleep.drainTimeout must be durations",
        ),
        (
            json!({"fairness": {"maxWaitTime": "5 parsecs"}}),
            "fairness.minRuntime and fairness.maxWaitTime must be durations",
        ),
        (
            json!({"engine": "process"}),
            "engine process needs a command",
        ),
        (json!({"replicas": 0}), "replicas must be at least 1"),
        (
            json!({"maxLoraRank": 16, "lora": {"enabled": true, "maxRank": 64}}),
            "lora.maxRank contradicts maxLoraRank",
        ),
        (
            json!({"engine": "llamacpp", "lora": {"enabled": true}}),
            "lora.enabled needs an engine that loads adapters at run time",
        ),
    ];
    for (patch, want) in cases {
        let got = errors(&model(patch.clone()));
        assert!(
            got.iter().any(|m| m.contains(want)),
            "{patch}: expected {want:?}, got {got:?}"
        );
    }
}

fn columns(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Vec<String> {
    crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

#[test]
fn printer_columns_are_those_of_the_spec() {
    let crd = Model::crd();
    let names = columns(&crd);
    assert_eq!(
        names,
        [
            "PHASE", "REPLICAS", "SERVING", "SLEEPING", "NODE", "GPUS", "VRAM/GPU", "AGE"
        ]
    );
    assert!(
        crd.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some()
    );
    let gpu = greenthread_api::GpuResource::crd();
    let names = columns(&gpu);
    assert_eq!(
        names,
        ["NODE", "INDEX", "PRODUCT", "AVAILABLE", "OCCUPANTS", "AGE"]
    );
    assert_eq!(gpu.spec.names.kind, "GPU");
    assert_eq!(gpu.spec.names.plural, "gpus");
}

/// `data/model_shapes.yaml`, with `modelName` added where a spec leaves it out.
fn shapes() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/model_shapes.yaml"
    ))
    .unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn with_name(spec: &Value) -> Value {
    let mut spec = spec.clone();
    if spec.get("modelName").is_none() {
        spec["modelName"] = json!("org/m");
    }
    spec
}

/// The spec as `local` and the controller read it.
fn typed(spec: &Value) -> ModelSpec {
    serde_json::from_value(with_name(spec)).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

/// Accepted by both checks: the CRD's rules and validation.
fn accepted(spec: &Value) -> greenthread_api::ValidModel {
    assert_eq!(
        errors(&model(with_name(spec))),
        Vec::<String>::new(),
        "{spec}"
    );
    typed(spec)
        .validate("spec")
        .unwrap_or_else(|e| panic!("{spec}: {e:?}"))
}

#[test]
fn both_shapes_of_a_model_normalize_to_one_spec() {
    let shapes = shapes();
    for case in shapes["same"].as_array().unwrap() {
        let what = case["what"].as_str().unwrap();
        let (older, newer) = (accepted(&case["older"]), accepted(&case["newer"]));
        assert_eq!(older.spec, newer.spec, "{what}");
        // The normalized spec is a fixed point that validates again.
        assert_eq!(older.spec.normalized(), older.spec, "{what}");
        assert_eq!(
            older.spec.validate("spec").unwrap().spec,
            older.spec,
            "{what}"
        );
        // One spelling of each: parallelism, the product in both places.
        assert_eq!(older.spec.tensor_parallel_size, None, "{what}");
        if let Some(p) = &older.spec.product {
            assert_eq!(
                older
                    .spec
                    .node_selector
                    .get(greenthread_api::GPU_PRODUCT_LABEL),
                Some(p),
                "{what}"
            );
        }
    }
}

#[test]
fn what_a_model_serves_and_the_gpus_it_takes() {
    let shapes = shapes();
    for case in shapes["served"].as_array().unwrap() {
        let spec = &case["spec"];
        let valid = accepted(spec);
        let want: Option<Vec<String>> = serde_json::from_value(case["endpoints"].clone()).unwrap();
        assert_eq!(valid.spec.served_endpoints(), want, "{spec}");
        assert_eq!(valid.spec.endpoints, want, "{spec}: normalized");
        assert_eq!(
            u64::from(valid.spec.gpus_per_replica()),
            case["gpus"].as_u64().unwrap(),
            "{spec}"
        );
    }
}

#[test]
fn contradictions_are_refused_by_the_crd_and_by_validation_alike() {
    let shapes = shapes();
    for case in shapes["refused"].as_array().unwrap() {
        let spec = &case["spec"];
        let (field, says, cel) = (
            case["field"].as_str().unwrap(),
            case["says"].as_str().unwrap(),
            case["cel"].as_str().unwrap(),
        );
        let got = errors(&model(with_name(spec)));
        assert!(
            got.iter().any(|m| m.contains(cel)),
            "{spec}: CEL: expected {cel:?}, got {got:?}"
        );
        let errors = typed(spec).validate("spec").unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.field == format!("spec.{field}") && e.message.contains(says)),
            "{spec}: expected spec.{field}: …{says}…, got {errors:?}"
        );
    }
}
