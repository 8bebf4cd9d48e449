//! LoRA adapters on demand (issue 18, part 5), through the real binary: `greenthread
//! local` in front of a simulated vLLM, a request naming its adapter in
//! `lora_adapter_metadata`, and a fake file server on loopback that counts what it
//! serves. A miss answers 404 until the files come; then the adapter is downloaded
//! (through a redirect, as the hub's resolve URLs do), loaded and served under its
//! name; the same hash downloads nothing, a new hash downloads again and serves the new
//! weights; a bad URL is a 502 that leaves the cache as it was; past `maxLoras` the least
//! recently used adapter is unloaded; after a sleep the first request loads the adapter
//! again from the cache, without a download.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use greenthread_test_support::{LocalProc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const ADAPTER_HEADER: &str = "x-sim-lora-adapter";
const WEIGHTS_HEADER: &str = "x-sim-lora-weights";

/// Files by name, and how often each was fetched.
#[derive(Default)]
struct Files {
    content: BTreeMap<String, Vec<u8>>,
    fetched: BTreeMap<String, u32>,
}

type Shared = Arc<Mutex<Files>>;

async fn file(State(files): State<Shared>, Path(name): Path<String>) -> Response {
    let mut f = files.lock().unwrap();
    *f.fetched.entry(name.clone()).or_default() += 1;
    match f.content.get(&name) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// As the hub's `resolve` URLs: a redirect to where the bytes are.
async fn resolve(Path(name): Path<String>) -> Response {
    (
        StatusCode::FOUND,
        [(header::LOCATION, format!("/files/{name}?signature=s3cr3t"))],
    )
        .into_response()
}

async fn file_server(files: Shared) -> String {
    let app = axum::Router::new()
        .route("/files/{name}", get(file))
        .route("/resolve/{name}", get(resolve))
        .with_state(files);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// An answer: status, the adapter the engine says served it, the weights' digest, the
/// answer's `model`, and its error type when it is an error.
#[derive(Debug)]
struct Answer {
    status: u16,
    adapter: Option<String>,
    weights: Option<String>,
    model: String,
    error: Option<String>,
    message: String,
}

async fn ask(local: &LocalProc, metadata: serde_json::Value) -> Answer {
    let resp = local
        .client
        .post(format!("{}/v1/chat/completions", local.url))
        .json(&serde_json::json!({
            "model": "org/base",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 3,
            "lora_adapter_metadata": metadata,
        }))
        .send()
        .await
        .unwrap();
    let header = |h: &str| {
        resp.headers()
            .get(h)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (adapter, weights) = (header(ADAPTER_HEADER), header(WEIGHTS_HEADER));
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    Answer {
        status,
        adapter,
        weights,
        model: body["model"].as_str().unwrap_or_default().to_string(),
        error: body["error"]["type"].as_str().map(String::from),
        message: body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    }
}

fn lora(id: &str, name: &str, hash: &str, files: Option<serde_json::Value>) -> serde_json::Value {
    let mut m = serde_json::json!({"lora_model": {"id": id, "name": name, "hash": hash}});
    if let Some(f) = files {
        m["lora_model"]["files"] = f;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_named_per_request_are_downloaded_once_loaded_and_served() {
    let files: Shared = Arc::default();
    {
        let mut f = files.lock().unwrap();
        for a in ["sql", "poet", "chef"] {
            f.content.insert(
                format!("{a}-config.json"),
                br#"{"peft_type": "LORA", "r": 8}"#.to_vec(),
            );
            f.content.insert(
                format!("{a}-v1.safetensors"),
                format!("{a} weights v1").into(),
            );
        }
        f.content
            .insert("sql-v2.safetensors".into(), b"sql weights v2".to_vec());
    }
    let hub = file_server(files.clone()).await;
    let fetched = |name: &str| {
        files
            .lock()
            .unwrap()
            .fetched
            .get(name)
            .copied()
            .unwrap_or(0)
    };
    let files_of = |a: &str, v: &str| {
        serde_json::json!({
            "adapter_config.json": format!("{hub}/resolve/{a}-config.json"),
            "adapter_model.safetensors": format!("{hub}/resolve/{a}-{v}.safetensors"),
        })
    };

    let data = tempfile::tempdir().unwrap();
    let config = r#"
gpus:
  simulated:
    - memory: 80Gi
models:
  - name: base
    spec:
      modelName: org/base
      engine: sim
      gpuMemoryUtilization: "0.5"
      maxLoras: 2
      lora: {enabled: true, downloadTimeout: 20s}
      sleep: {idleTimeout: 1h}
"#;
    let data_env = data.path().display().to_string();
    let local =
        LocalProc::start_env(BIN, config, &[], &[("GREENTHREAD_DATA_DIR", &data_env)]).await;
    // `local`'s default cache: the data directory's.
    let cache = data.path().join("adapters");

    // Every on-demand metric docs/adapters.md documents is exported, at 0 before any use.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/adapters.md"),
    )
    .unwrap();
    let text =
        greenthread_test_support::scrape_text(&local.client, &format!("{}/metrics", local.url))
            .await;
    let documented: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `gthread_") && l.contains("on-demand"))
        .map(|l| l[3..].split(['{', '`']).next().unwrap())
        .collect();
    assert_eq!(documented.len(), 5, "{documented:?}");
    for name in documented {
        assert!(
            text.contains(&format!("\n{name}{{")),
            "{name} is not exported"
        );
    }

    // Not cached, no files: 404, the engine never asked.
    let a = ask(&local, lora("7", "sql", "h1", None)).await;
    assert_eq!(
        (a.status, a.error.as_deref()),
        (404, Some("not_found")),
        "{a:?}"
    );
    assert!(a.message.contains("files"), "{a:?}");

    // With its files: downloaded (through the redirect), loaded, served as `sql`.
    let a = ask(&local, lora("7", "sql", "h1", Some(files_of("sql", "v1")))).await;
    assert_eq!(
        (a.status, a.adapter.as_deref(), a.model.as_str()),
        (200, Some("sql"), "sql"),
        "{a:?}"
    );
    let v1 = a.weights.clone().expect("the engine read the weights file");
    assert_eq!(fetched("sql-v1.safetensors"), 1);
    assert!(cache.join("7/adapter_model.safetensors").is_file());
    assert!(cache.join("7/adapter_config.json").is_file());

    // The same hash: served from the cache (and the engine), no download, even with
    // the files sent again.
    let a = ask(&local, lora("7", "sql", "h1", Some(files_of("sql", "v1")))).await;
    assert_eq!(
        (a.status, a.weights.as_deref()),
        (200, Some(v1.as_str())),
        "{a:?}"
    );
    let a = ask(&local, lora("7", "sql", "h1", None)).await;
    assert_eq!(
        (a.status, a.weights.as_deref()),
        (200, Some(v1.as_str())),
        "{a:?}"
    );
    assert_eq!(fetched("sql-v1.safetensors"), 1);

    // A new hash is a new version: a miss until its files come, then downloaded and
    // served with the new weights.
    let a = ask(&local, lora("7", "sql", "h2", None)).await;
    assert_eq!(a.status, 404, "{a:?}");
    let a = ask(&local, lora("7", "sql", "h2", Some(files_of("sql", "v2")))).await;
    assert_eq!(
        (a.status, a.adapter.as_deref()),
        (200, Some("sql")),
        "{a:?}"
    );
    let v2 = a.weights.clone().unwrap();
    assert_ne!(v1, v2, "the new version's weights serve");
    assert_eq!(fetched("sql-v2.safetensors"), 1);

    // A URL that fails: 502 naming the adapter, without the URL's signature, and the
    // cached copy untouched.
    let bad = serde_json::json!({
        "adapter_config.json": format!("{hub}/files/sql-config.json"),
        "adapter_model.safetensors": format!("{hub}/files/missing.safetensors?signature=s3cr3t"),
    });
    let a = ask(&local, lora("7", "sql", "h3", Some(bad))).await;
    assert_eq!(
        (a.status, a.error.as_deref()),
        (502, Some("adapter_download_failed")),
        "{a:?}"
    );
    assert!(
        a.message.contains("404") && !a.message.contains("s3cr3t"),
        "{a:?}"
    );
    let a = ask(&local, lora("7", "sql", "h2", None)).await;
    assert_eq!(
        (a.status, a.weights.as_deref()),
        (200, Some(v2.as_str())),
        "{a:?}"
    );
    let unreachable = serde_json::json!({
        "adapter_config.json": "http://127.0.0.1:1/c.json",
        "adapter_model.safetensors": "http://127.0.0.1:1/m.safetensors",
    });
    let a = ask(&local, lora("8", "poet", "h1", Some(unreachable))).await;
    assert_eq!(a.status, 502, "{a:?}");

    // Missing id or name: 400 naming the field.
    let a = ask(&local, serde_json::json!({"lora_model": {"name": "sql"}})).await;
    assert_eq!(
        (a.status, a.error.as_deref()),
        (400, Some("invalid_request_error"))
    );
    assert!(a.message.contains("lora_model.id"), "{a:?}");
    let a = ask(&local, serde_json::json!({"lora_model": {"id": "7"}})).await;
    assert_eq!(a.status, 400);
    assert!(a.message.contains("lora_model.name"), "{a:?}");

    // maxLoras 2: a third adapter unloads the least recently used (sql was used before
    // poet, so sql goes).
    for (id, name) in [("8", "poet"), ("9", "chef")] {
        let a = ask(&local, lora(id, name, "h1", Some(files_of(name, "v1")))).await;
        assert_eq!((a.status, a.adapter.as_deref()), (200, Some(name)), "{a:?}");
    }
    let held = on_demand_held(&local).await;
    assert_eq!(held, ["chef", "poet"], "sql was the least recently used");
    let m = local.metrics().await;
    let value = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(-1.0);
    assert_eq!(
        value("gthread_sidecar_adapter_on_demand_evictions_total", &[]),
        1.0
    );
    assert_eq!(value("gthread_sidecar_adapters_on_demand_held", &[]), 2.0);
    assert_eq!(
        value(
            "gthread_sidecar_adapter_downloads_total",
            &[("result", "ok")]
        ),
        4.0
    );
    assert_eq!(
        value(
            "gthread_sidecar_adapter_downloads_total",
            &[("result", "failed")]
        ),
        2.0
    );

    // A sleep: the engine forgets its adapters; the cache does not. The next request
    // wakes the model and loads the adapter from the cache, downloading nothing.
    let r = local
        .client
        .post(format!("{}/api/v1/models/base/sleep", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until("the model to sleep", Duration::from_secs(10), || async {
        (local.states().await["base"] == "sleeping").then_some(())
    })
    .await;
    assert!(on_demand_held(&local).await.is_empty());
    let before = fetched("sql-v2.safetensors");
    let a = ask(&local, lora("7", "sql", "h2", None)).await;
    assert_eq!(
        (a.status, a.adapter.as_deref(), a.weights.as_deref()),
        (200, Some("sql"), Some(v2.as_str())),
        "{a:?}"
    );
    assert_eq!(
        fetched("sql-v2.safetensors"),
        before,
        "no download after a wake"
    );
    // The base still answers as itself.
    let r = local.chat("org/base", 3).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get(ADAPTER_HEADER).is_none());
}

/// The on-demand adapters the sidecar says its engine holds, by name.
async fn on_demand_held(local: &LocalProc) -> Vec<String> {
    let v = local.get_json("/api/v1/models").await;
    let pod = &v["items"][0]["pods"][0];
    let mut names: Vec<String> = pod["adaptersOnDemand"]
        .as_array()
        .unwrap_or_else(|| panic!("no adaptersOnDemand in {pod}"))
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}
