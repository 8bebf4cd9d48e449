//! OpenAI's Batch API through `greenthread local`: the official openai SDK uploads a file,
//! makes batches, cancels one, and reads the output, with a restart of the server in the
//! middle; the engine's own request log shows each request reached it exactly once. And
//! batches take only idle capacity: a batch for a sleeping model whose GPU an interactive
//! model holds waits (deferred, no preemption), then runs once that GPU is free.

use std::time::Duration;

use greenthread_test_support::{LocalProc, python_script, wait_until};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

fn config(request_log: &std::path::Path) -> String {
    format!(
        r#"
apiKeys: [k1]
adminToken: t1
gpus:
  simulated:
    - {{memory: 10Gi}}
models:
  - name: alpha
    spec:
      modelName: org/alpha
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {{idleTimeout: 1h}}
      fairness: {{minRuntime: 0s, maxWaitTime: 200ms}}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 100ms, --request-log, "{}"]
  - name: beta
    spec:
      modelName: org/beta
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {{idleTimeout: 1h}}
      fairness: {{minRuntime: 0s, maxWaitTime: 200ms}}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]
"#,
        request_log.display()
    )
}

async fn batch(local: &LocalProc, id: &str) -> Value {
    let r = local
        .client
        .get(format!("{}/v1/batches/{id}", local.url))
        .bearer_auth("k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `scripts/sdk_batch.py`'s `phase` (start, finish) for 24 requests to alpha.
async fn sdk(phase: &str, local: &LocalProc, state: &std::path::Path) -> Value {
    let state = state.display().to_string();
    python_script(
        "sdk_batch.py",
        &[phase, &local.url, "k1", "alpha", "24", &state],
        "the openai SDK (scripts/test installs it)",
    )
    .await
}

/// What reached alpha's engine: each prompt, and how many times.
fn engine_saw(log: &std::path::Path) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(p) = v["messages"][0]["content"].as_str() {
            *seen.entry(p.to_string()).or_default() += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_a_batch_across_a_restart_and_no_request_runs_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (log, state, data) = (
        dir.path().join("requests.log"),
        dir.path().join("state.json"),
        dir.path().join("data"),
    );
    let data_env = data.display().to_string();
    let envs = [("GREENTHREAD_DATA_DIR", data_env.as_str())];
    let flags = ["--batch-concurrency", "2"];
    let local = LocalProc::start_env(BIN, &config(&log), &flags, &envs).await;
    let started = sdk("start", &local, &state).await;
    println!("start: {started}");
    let id = started["batch"].as_str().unwrap().to_string();
    // Stopped in the middle: some answered, some not.
    wait_until(
        "a few requests answered",
        Duration::from_secs(30),
        || async {
            (batch(&local, &id).await["request_counts"]["completed"].as_u64() >= Some(3))
                .then_some(())
        },
    )
    .await;
    let mut local = local;
    assert!(
        local.proc.terminate(Duration::from_secs(30)),
        "local stops on SIGTERM"
    );
    let saw = engine_saw(&log);
    let before: usize = (0..24)
        .filter(|i| saw.contains_key(&format!("batch request {i}")))
        .count();
    assert!(
        before < 24,
        "the batch was not stopped in the middle ({before} of 24 sent)"
    );
    drop(local);

    let local = LocalProc::start_env(BIN, &config(&log), &flags, &envs).await;
    let finished = sdk("finish", &local, &state).await;
    println!("finish: {finished}");
    // Every request reached the engine once: none lost, none sent again after the restart.
    let saw = engine_saw(&log);
    for i in 0..24 {
        assert_eq!(
            saw.get(&format!("batch request {i}")),
            Some(&1),
            "request {i}: {saw:?}"
        );
    }
    let m = local.metrics().await;
    let after = m
        .value(
            "gthread_apiserver_batch_requests_total",
            &[("model", "alpha"), ("result", "completed")],
        )
        .unwrap_or_default();
    assert_eq!(
        after as usize,
        24 - before,
        "sent after the restart: only what was not answered before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_idle_capacity_and_preempts_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalProc::start(BIN, &config(&dir.path().join("requests.log"))).await;
    let http = &local.client;
    let url = &local.url;
    // alpha serves interactive traffic and holds the GPU beta needs.
    let r = local
        .chat("alpha", 2)
        .bearer_auth("k1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let lines: Vec<String> = (0..4)
        .map(|i| {
            json!({"custom_id": format!("b-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "beta", "messages": [{"role": "user", "content": format!("idle {i}")}]}})
            .to_string()
        })
        .collect();
    let (code, file) = upload(&local, "k1", &lines.join("\n")).await;
    assert_eq!(code, 200, "{file}");
    let created: Value = http
        .post(format!("{url}/v1/batches"))
        .bearer_auth("k1")
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    // Its requests are refused while alpha holds the GPU: deferred, again and again.
    wait_until(
        "the batch deferred three times",
        Duration::from_secs(30),
        || async {
            let m = local.metrics().await;
            (m.value(
                "gthread_apiserver_batch_requests_total",
                &[("model", "beta"), ("result", "deferred")],
            )? >= 3.0)
                .then_some(())
        },
    )
    .await;
    let states: std::collections::BTreeMap<String, Value> = local
        .models_as("k1")
        .await
        .into_iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["state"].clone()))
        .collect();
    assert_eq!(states["alpha"], "serving", "{states:?}");
    assert_eq!(states["beta"], "sleeping", "{states:?}");
    assert_eq!(batch(&local, &id).await["request_counts"]["completed"], 0);
    // Once alpha sleeps (idle, or put to sleep), the batch has the GPU.
    let r = http
        .post(format!("{url}/api/v1/models/alpha/sleep"))
        .bearer_auth("t1")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    wait_until("the batch completes", Duration::from_secs(30), || async {
        (batch(&local, &id).await["status"] == "completed").then_some(())
    })
    .await;
    let b = batch(&local, &id).await;
    assert_eq!(b["request_counts"]["completed"], 4, "{b}");
    // Their tokens count for the key that made the batch, as its other requests' do.
    let tokens = local.metrics().await.value(
        "gthread_apiserver_tokens_total",
        &[("key", "key-1"), ("model", "beta"), ("kind", "completion")],
    );
    assert!(tokens.is_some_and(|t| t > 0.0), "{tokens:?}");
    // Nobody was preempted: alpha slept because it was told to, and beta woke into free memory.
    let m = local.metrics().await;
    for model in ["alpha", "beta"] {
        let preempted = m
            .value(
                "gthread_sidecar_preemptions_total",
                &[("model", model), ("role", "preempted")],
            )
            .unwrap_or_default();
        assert_eq!(preempted, 0.0, "{model} was preempted");
    }
}

/// `DELETE /v1/files/{id}` of `file` as `key`: its status.
async fn delete(local: &LocalProc, key: &str, file: &Value) -> u16 {
    let id = file["id"].as_str().unwrap();
    let r = local
        .client
        .delete(format!("{}/v1/files/{id}", local.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

/// A multipart upload of `content` as the SDK sends it: the form the SDK sends, purpose
/// and the file with its name.
async fn upload(local: &LocalProc, key: &str, content: &str) -> (u16, Value) {
    let boundary = "gt-batch-test";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let r = local
        .client
        .post(format!("{}/v1/files", local.url))
        .bearer_auth(key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The Batch API is as safe to share as the rest: each key keeps at most its quota of
/// files (403 `quota_exceeded` past it, room again once it deletes some), and its
/// writes count against its rate limit as its inference requests do (429 past it;
/// reads, which SDKs poll with, do not count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_keeps_its_quota_of_files_and_its_rate_limit() {
    let config = r#"
apiKeys:
  - k1
  - {name: small, key: k2, rateLimit: {requestsPerMinute: 2}}
adminToken: t1
gpus:
  simulated:
    - {memory: 10Gi}
models:
  - name: alpha
    spec:
      modelName: org/alpha
      engine: sim
      gpuMemoryUtilization: "0.6"
      extraArgs: [--boot-time, 0s, --ttft, 5ms]
"#;
    let local = LocalProc::start_with(BIN, config, &["--batch-quota", "1Ki"]).await;
    let line = json!({"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "alpha", "messages": [{"role": "user", "content": "x".repeat(500)}]}})
    .to_string();
    let (code, first) = upload(&local, "k1", &line).await;
    assert_eq!(code, 200, "{first}");
    let (code, refused) = upload(&local, "k1", &line).await;
    assert_eq!(code, 403, "{refused}");
    assert_eq!(refused["error"]["type"], "quota_exceeded", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota of 1024"),
        "{refused}"
    );
    // Another key's files are its own: k2 has room.
    let (code, other) = upload(&local, "k2", &line).await;
    assert_eq!(code, 200, "{other}");
    // Deleting makes room again.
    assert_eq!(delete(&local, "k1", &first).await, 200);
    assert_eq!(upload(&local, "k1", &line).await.0, 200);

    // k2 may make two requests a minute: the upload above was one, a read is none,
    // a deletion is the second, and the next write waits.
    let listed = local
        .client
        .get(format!("{}/v1/files", local.url))
        .bearer_auth("k2")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);
    assert_eq!(delete(&local, "k2", &other).await, 200);
    let (code, limited) = upload(&local, "k2", &line).await;
    assert_eq!(code, 429, "{limited}");
    assert_eq!(limited["error"]["type"], "rate_limit_exceeded", "{limited}");
}
