//! LoRA adapters through the real binary (issue 12, item 1): a sidecar loads its
//! adapters once the engine serves and again after every wake (the simulator forgets
//! them across a sleep, the worst vLLM does), each checked with one token; adapters
//! added to or removed from its adapters file are loaded or unloaded while the engine
//! serves, without a restart; SGLang is asked for `<base>:<adapter>`; the API server
//! routes an adapter's name to its base Model, lists it with `parent`, applies keys to
//! it as to its base, and `local` refuses a name that would mean two things.

use std::time::Duration;

use greenthread_test_support::{LocalProc, SidecarProc, get_json, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const ADAPTER_HEADER: &str = "x-sim-lora-adapter";
const WAIT: Duration = Duration::from_secs(30);

/// A chat answer's status, the adapter the simulator says answered (its header) and
/// the answer's `model`.
async fn ask(req: reqwest::RequestBuilder) -> (u16, Option<String>, String) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let adapter = resp
        .headers()
        .get(ADAPTER_HEADER)
        .map(|v| v.to_str().unwrap().to_string());
    let body: serde_json::Value = resp.json().await.unwrap();
    (
        status,
        adapter,
        body["model"].as_str().unwrap_or_default().to_string(),
    )
}

/// Each adapter in the sidecar's `/status`: (name, loaded, error).
async fn adapters(sc: &SidecarProc) -> Vec<(String, bool, Option<String>)> {
    sc.status().await["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["loaded"].as_bool().unwrap(),
                a["error"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The names the engine itself lists (what it holds now).
async fn engine_lists(sc: &SidecarProc) -> Vec<String> {
    let v = get_json(&sc.client, &format!("{}/v1/models", sc.engine)).await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_after_every_wake_and_follow_their_file_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adapters.json");
    std::fs::write(
        &file,
        r#"[{"name": "sql", "source": "org/sql-lora"}, {"name": "broken", "source": "/nonexistent/lora"}]"#,
    )
    .unwrap();
    let sc = SidecarProc::start(
        BIN,
        "org/base",
        &[
            "--adapters-file",
            file.to_str().unwrap(),
            "--idle-timeout",
            "1h",
        ],
        &["--enable-lora"],
    )
    .await;

    // Listed before any wake, with their base as parent (listing never wakes).
    let listed = get_json(&sc.client, &format!("{}/v1/models", sc.public)).await;
    let sql = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sql")
        .cloned()
        .unwrap();
    assert_eq!(sql["parent"], "org/base");
    assert_eq!(sc.state().await, "sleeping");

    // The first request for the adapter wakes the base and reaches the adapter.
    let (status, adapter, model) = ask(sc.chat("sql", 3, false)).await;
    assert_eq!(
        (status, adapter.as_deref(), model.as_str()),
        (200, Some("sql"), "sql")
    );
    // The base answers as itself.
    let (status, adapter, _) = ask(sc.chat("org/base", 3, false)).await;
    assert_eq!((status, adapter), (200, None));
    let m = sc.metrics().await;
    let loads = |m: &greenthread_test_support::Exposition, name: &str, adapter: &str| {
        m.value(name, &[("adapter", adapter)])
    };
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_loads_total", "sql"),
        Some(1.0)
    );
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_load_failures_total", "sql"),
        Some(0.0)
    );
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_loaded", "sql"),
        Some(1.0)
    );
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_load_failures_total", "broken"),
        Some(1.0)
    );
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_loaded", "broken"),
        Some(0.0)
    );
    // Every metric docs/adapters.md documents is exported under its documented name
    // (the on-demand ones by a sidecar serving them: tests/lora_on_demand.rs).
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/adapters.md"),
    )
    .unwrap();
    let text =
        greenthread_test_support::scrape_text(&sc.client, &format!("{}/metrics", sc.private)).await;
    for line in doc
        .lines()
        .filter(|l| l.starts_with("| `gthread_") && !l.contains("on-demand"))
    {
        let name = line[3..].split(['{', '`']).next().unwrap();
        assert!(
            text.contains(&format!("\n{name}{{")),
            "{name} is not exported"
        );
    }
    let status = adapters(&sc).await;
    assert_eq!((status[0].0.as_str(), status[0].1), ("sql", true));
    assert!(
        status[1]
            .2
            .as_deref()
            .is_some_and(|e| e.contains("No adapter found")),
        "{status:?}"
    );

    // Asleep, the engine forgets its adapters; the next request's wake loads them again.
    assert!(sc.admin("sleep").await.status().is_success());
    sc.wait_state("sleeping", WAIT).await;
    assert!(!engine_lists(&sc).await.contains(&"sql".to_string()));
    assert_eq!(
        sc.metrics()
            .await
            .value("gthread_sidecar_adapter_loaded", &[("adapter", "sql")]),
        Some(0.0)
    );
    let (status, adapter, _) = ask(sc.chat("sql", 3, false)).await;
    assert_eq!((status, adapter.as_deref()), (200, Some("sql")));
    let m = sc.metrics().await;
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_loads_total", "sql"),
        Some(2.0)
    );
    assert_eq!(
        loads(&m, "gthread_sidecar_adapter_load_failures_total", "broken"),
        Some(2.0)
    );
    let wakes = sc
        .engine_metrics()
        .await
        .value("greenthread_sim_wake_calls_total", &[]);

    // While it serves: one adapter added, one removed, the broken one gone. The engine is
    // neither woken again nor restarted for it.
    std::fs::write(&file, r#"[{"name": "code", "source": "org/code-lora"}]"#).unwrap();
    wait_until("code loaded and checked", WAIT, || async {
        (adapters(&sc).await == vec![("code".to_string(), true, None)]).then_some(())
    })
    .await;
    let listed = engine_lists(&sc).await;
    assert!(
        listed.contains(&"code".to_string()) && !listed.contains(&"sql".to_string()),
        "{listed:?}"
    );
    let (status, adapter, _) = ask(sc.chat("code", 3, false)).await;
    assert_eq!((status, adapter.as_deref()), (200, Some("code")));
    let (status, _, _) = ask(sc.chat("sql", 3, false)).await;
    assert_eq!(status, 404, "an unloaded adapter is no more");
    assert_eq!(sc.state().await, "serving");
    assert_eq!(
        sc.engine_metrics()
            .await
            .value("greenthread_sim_wake_calls_total", &[]),
        wakes
    );
    assert_eq!(
        sc.metrics()
            .await
            .value("gthread_sidecar_engine_restarts_total", &[]),
        Some(0.0)
    );

    // A broken file changes nothing.
    std::fs::write(&file, r#"[{"name": "bad/name", "source": "x"}]"#).unwrap();
    let error = wait_until("the broken file reported", WAIT, || async {
        sc.status().await["adaptersFileError"]
            .as_str()
            .map(str::to_string)
    })
    .await;
    assert!(error.contains("adapters[0].name"), "{error}");
    assert_eq!(adapters(&sc).await, vec![("code".to_string(), true, None)]);
}

/// SGLang names an adapter `<base>:<adapter>` in its OpenAI API: the sidecar asks for it
/// so, and loads through SGLang's own endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_is_asked_for_base_colon_adapter() {
    let sc = SidecarProc::start(
        BIN,
        "org/base",
        &[
            "--engine",
            "sglang",
            "--adapter",
            "sql=org/sql-lora",
            "--idle-timeout",
            "1h",
        ],
        &["--enable-lora"],
    )
    .await;
    let (status, adapter, model) = ask(sc.chat("sql", 3, false)).await;
    assert_eq!((status, adapter.as_deref()), (200, Some("sql")));
    // The engine was asked for it by SGLang's name (its answer echoes the request's).
    assert_eq!(model, "org/base:sql");
    // Streamed too.
    let resp = sc.chat("sql", 3, true).send().await.unwrap();
    assert_eq!(resp.headers()[ADAPTER_HEADER], "sql");
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"model\":\"org/base:sql\""), "{text}");
    assert_eq!(
        sc.metrics()
            .await
            .value("gthread_sidecar_adapter_loads_total", &[("adapter", "sql")]),
        Some(1.0)
    );
}

const LOCAL: &str = r#"
gpus:
  simulated:
    - {memory: 20Gi}
models:
  - name: base
    spec:
      modelName: org/base
      engine: sim
      gpuMemoryUtilization: "0.4"
      sleep: {idleTimeout: 1h}
      adapters:
        - {name: sql, source: org/sql-lora}
      extraArgs: [--boot-time, 0s]
  - name: other
    spec:
      modelName: org/other
      engine: sim
      gpuMemoryUtilization: "0.4"
      extraArgs: [--boot-time, 0s]
adminOpen: true
apiKeys:
  - name: everyone
    key: sk-all
  - name: others-only
    key: sk-other
    models: [other]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_routes_an_adapter_to_its_base_model() {
    let local = LocalProc::start(BIN, LOCAL).await;
    let chat = |key: &str, model: &str| local.chat(model, 2).bearer_auth(key);
    let all = local.models_as("sk-all").await;
    let sql = all.iter().find(|m| m["id"] == "sql").unwrap();
    assert_eq!(sql["parent"], "base");
    assert_eq!(sql["state"], "sleeping");
    // The adapter's name wakes its base and reaches the adapter.
    let (status, adapter, model) = ask(chat("sk-all", "sql")).await;
    assert_eq!(
        (status, adapter.as_deref(), model.as_str()),
        (200, Some("sql"), "sql")
    );
    let base = local.get_json("/api/v1/models/base").await;
    assert_eq!(base["pods"][0]["state"], "serving", "{base}");
    // A key that may not use the base may not use its adapters either, nor see them.
    let (status, _, _) = ask(chat("sk-other", "sql")).await;
    assert_eq!(status, 403);
    let theirs = local.models_as("sk-other").await;
    assert!(theirs.iter().all(|m| m["id"] != "sql"), "{theirs:?}");
    // The admin API says which adapters a Model serves.
    let v = local.get_json("/api/v1/models/base").await;
    assert_eq!(v["adapters"], serde_json::json!(["sql"]));
    // The official openai SDK lists the adapter with its parent and is answered by it,
    // plain and streamed.
    let report = greenthread_test_support::openai_script(
        "sdk_adapters.py",
        &[&local.url, "sk-all", "sql", "base"],
    )
    .await;
    assert_eq!(report["stream_models"], serde_json::json!(["sql"]));
}

#[test]
fn local_refuses_an_adapter_named_like_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.yaml");
    std::fs::write(
        &config,
        LOCAL.replace(
            "{name: sql, source: org/sql-lora}",
            "{name: other, source: org/x}",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["local", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("models[0].spec.adapters[0].name: \"other\" is also the Model \"other\""),
        "{err}"
    );
}

/// llama.cpp loads adapters only when it starts (`--lora`, none applied unless a request
/// asks): the sidecar starts it with them and asks for one through the request's `lora`
/// list; an adapter added while it serves comes with its next start, which is its next
/// wake (llama.cpp sleeps by being stopped). Through the llama-server stand-in (the
/// simulator behind llama-server's command line, refusing a `--lora` file that does not
/// exist, as llama-server does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_starts_with_its_adapters_and_takes_new_ones_at_its_next_wake() {
    use greenthread_test_support::{Proc, free_port, http, wait_http};
    let dir = tempfile::tempdir().unwrap();
    let (sql, code) = (dir.path().join("sql.gguf"), dir.path().join("code.gguf"));
    std::fs::write(&sql, b"GGUF").unwrap();
    std::fs::write(&code, b"GGUF").unwrap();
    let file = dir.path().join("adapters.json");
    let entry = |name: &str, path: &std::path::Path| serde_json::json!({"name": name, "source": path.display().to_string()});
    std::fs::write(&file, serde_json::json!([entry("sql", &sql)]).to_string()).unwrap();
    let (public, private, engine) = (free_port(), free_port(), free_port());
    let _proc = Proc::spawn(
        BIN,
        &[
            "sidecar".to_string(),
            "--model".into(),
            "org/base".into(),
            "--engine".into(),
            "llamacpp".into(),
            "--engine-command".into(),
            format!(
                "{BIN} llama-stand-in -m /models/base.gguf --host 127.0.0.1 --port {engine} --alias org/base"
            ),
            "--engine-url".into(),
            format!("http://127.0.0.1:{engine}"),
            "--listen".into(),
            format!("127.0.0.1:{public}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{private}"),
            "--adapters-file".into(),
            file.display().to_string(),
            "--min-runtime".into(),
            "0s".into(),
            "--idle-timeout".into(),
            "1h".into(),
        ],
    );
    wait_http(&format!("http://127.0.0.1:{public}/health")).await;
    let client = http();
    let chat = |model: &str| {
        client
            .post(format!("http://127.0.0.1:{public}/v1/chat/completions"))
            .json(&serde_json::json!({
                "model": model, "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            }))
    };
    let sql_path = sql.display().to_string();
    let (status, adapter, model) = ask(chat("sql")).await;
    assert_eq!((status, adapter.as_deref()), (200, Some(sql_path.as_str())));
    // The engine was asked for its base model, the adapter applied by position.
    assert_eq!(model, "org/base");
    let (status, adapter, _) = ask(chat("org/base")).await;
    assert_eq!(
        (status, adapter),
        (200, None),
        "the base applies no adapter"
    );
    let status_of =
        || async { get_json(&client, &format!("http://127.0.0.1:{private}/status")).await };

    // Added while serving: not loaded now (nor counted a failure), loaded at the next
    // wake.
    std::fs::write(
        &file,
        serde_json::json!([entry("sql", &sql), entry("code", &code)]).to_string(),
    )
    .unwrap();
    wait_until("code wanted", WAIT, || async {
        let s = status_of().await;
        (s["adapters"].as_array().unwrap().len() == 2).then_some(s)
    })
    .await;
    let (_, adapter, _) = ask(chat("code")).await;
    assert_eq!(adapter, None, "not before the engine's next start");
    let metrics = || async {
        greenthread_test_support::scrape(&client, &format!("http://127.0.0.1:{private}/metrics"))
            .await
    };
    assert_eq!(
        metrics().await.value(
            "gthread_sidecar_adapter_load_failures_total",
            &[("adapter", "code")]
        ),
        None
    );
    let slept = client
        .post(format!("http://127.0.0.1:{private}/admin/sleep"))
        .send()
        .await
        .unwrap();
    assert!(slept.status().is_success());
    wait_until("asleep", WAIT, || async {
        (status_of().await["state"] == "sleeping").then_some(())
    })
    .await;
    let code_path = code.display().to_string();
    let (status, adapter, _) = ask(chat("code")).await;
    assert_eq!(
        (status, adapter.as_deref()),
        (200, Some(code_path.as_str()))
    );
    let m = metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_adapter_loads_total",
            &[("adapter", "code")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_adapter_loads_total", &[("adapter", "sql")]),
        Some(2.0)
    );
}

/// docs/adapters.md's Model is a valid one, with the LoRA settings it says.
#[test]
fn the_documented_model_is_valid() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/adapters.md"),
    )
    .unwrap();
    let start = doc.find("```yaml\n").unwrap() + 8;
    let end = start + doc[start..].find("```").unwrap();
    let model: greenthread_api::Model = serde_saphyr::from_str(&doc[start..end]).unwrap();
    let valid = model.spec.validate("spec").unwrap();
    assert_eq!(
        valid.lora,
        Some(greenthread_api::LoraSettings {
            max_loras: 2,
            max_lora_rank: 64
        })
    );
    let names: Vec<&str> = model
        .spec
        .adapters
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["sql", "support"]);
}
