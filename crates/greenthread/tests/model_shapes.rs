//! Models in both shapes through `greenthread local`: the original's newer one
//! (`modelType`, `product`, `parallelism`) and the older one (`tensorParallelSize`, the
//! node selector's GPU product, every route). `product` picks the GPUs, the pipeline
//! stages take theirs, `modelType` limits the routes the API server sends (others 404
//! naming the Model's), and a contradiction stops `local` naming the field.

use greenthread_test_support::LocalProc;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

const SIM: &str = "[--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]";

fn config() -> String {
    format!(
        r#"
gpus:
  simulated:
    - {{memory: 10Gi, product: NVIDIA H100 80GB HBM3}}
    - {{memory: 10Gi, product: NVIDIA H100 80GB HBM3}}
    - {{memory: 10Gi, product: NVIDIA L40S}}
    - {{memory: 10Gi, product: NVIDIA L40S}}
models:
  # The newer shape.
  - name: embed
    spec:
      modelName: org/embed
      engine: sim
      modelType: embedding
      product: NVIDIA-L40S
      parallelism: {{tensor: 1, pipeline: 2}}
      gpuMemoryUtilization: "0.3"
      sleep: {{idleTimeout: 1h}}
      extraArgs: {SIM}
  # The older shape: every route.
  - name: chat
    spec:
      modelName: org/chat
      engine: sim
      tensorParallelSize: 1
      nodeSelector: {{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}}
      gpuMemoryUtilization: "0.3"
      sleep: {{idleTimeout: 1h}}
      extraArgs: {SIM}
"#
    )
}

/// The GPUs (by index) where `pod` is an occupant.
fn gpus_of(gpus: &Value, pod: &str) -> Vec<u64> {
    gpus["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| {
            g["status"]["occupants"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["podName"].as_str().unwrap().ends_with(pod))
        })
        .map(|g| g["spec"]["index"].as_u64().unwrap())
        .collect()
}

async fn post(local: &LocalProc, path: &str, body: Value) -> (u16, Value) {
    let r = local
        .client
        .post(format!("{}{path}", local.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_shapes_place_and_route_as_they_say() {
    let local = LocalProc::start(BIN, &config()).await;

    // Placement: the product's GPUs, both pipeline stages on them.
    let gpus = local.get_json("/api/v1/gpus").await;
    assert_eq!(gpus_of(&gpus, "embed-0"), [2, 3], "{gpus}");
    let chat = gpus_of(&gpus, "chat-0");
    assert!(chat == [0] || chat == [1], "chat on an H100: {chat:?}");

    // The newer shape's type decides its routes...
    let embedding = json!({"model": "embed", "input": "hello"});
    let (status, v) = post(&local, "/v1/embeddings", embedding).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["data"][0]["embedding"].as_array().is_some(), "{v}");
    let chat_body = json!({"model": "embed", "messages": [{"role": "user", "content": "hi"}]});
    for path in ["/v1/chat/completions", "/embed/v1/chat/completions"] {
        let (status, v) = post(&local, path, chat_body.clone()).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["error"]["type"], "endpoint_not_served", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("\"embed\" does not serve \"/v1/chat/completions\"")
                && message.ends_with("it serves /v1/embeddings"),
            "{message}"
        );
    }
    // ... while the older shape serves every route.
    let (status, v) = post(
        &local,
        "/v1/embeddings",
        json!({"model": "chat", "input": "x"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(local.chat("chat", 2).send().await.unwrap().status(), 200);

    // The admin API says what each serves; refusals are counted for the Model.
    let embed = local.get_json("/api/v1/models/embed").await;
    assert_eq!(embed["endpoints"], json!(["/v1/embeddings"]), "{embed}");
    let chat = local.get_json("/api/v1/models/chat").await;
    assert_eq!(chat["endpoints"], Value::Null, "{chat}");
    let m = local.metrics().await;
    let refused = m
        .value(
            "gthread_apiserver_requests_total",
            &[("model", "embed"), ("code", "404")],
        )
        .unwrap_or_default();
    assert_eq!(refused, 2.0);
}

/// `local` refuses what the CRD's rules refuse, naming the field; and a product no GPU
/// has, naming the products there are.
#[test]
fn contradictions_and_missing_products_stop_local_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to, says) in [
        (
            "parallelism: {tensor: 1, pipeline: 2}",
            "parallelism: {tensor: 2, pipeline: 2}\n      tensorParallelSize: 1",
            "models[0].spec.parallelism.tensor: 2 contradicts tensorParallelSize 1",
        ),
        (
            "modelType: embedding",
            "modelType: embedding\n      endpoints: [/v1/audio/speech]",
            "models[0].spec.endpoints: \"/v1/audio/speech\" contradicts modelType embedding",
        ),
        (
            "product: NVIDIA-L40S",
            "product: NVIDIA-A100-SXM4-80GB",
            "models[0].spec.product: no GPU configured is a NVIDIA-A100-SXM4-80GB (these are: NVIDIA-H100-80GB-HBM3, NVIDIA-L40S)",
        ),
        (
            "parallelism: {tensor: 1, pipeline: 2}",
            "parallelism: {tensor: 2, pipeline: 4}",
            "models[0].spec.parallelism: tensor 2 × pipeline 4 is 8 GPUs, more than the 4 GPUs configured",
        ),
    ] {
        let text = config();
        assert!(text.contains(from));
        let path = dir.path().join("local.yaml");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["local", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("GREENTHREAD_DATA_DIR", dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{to}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{to}: {err}");
    }
}
