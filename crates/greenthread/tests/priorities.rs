//! Priority classes through the real binary: a sidecar's queue under pressure refuses
//! sheddable requests first and critical ones last, and admits the most important first;
//! a critical model's wake preempts at once where a standard one would wait out
//! `maxWaitTime`; a key's priority is a ceiling its requests can only lower.

use std::time::Duration;

use greenthread_test_support::{LocalProc, SidecarProc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_the_least_important_first() {
    let gate = std::env::temp_dir().join(format!("gt-gate-{}-prio", std::process::id()));
    let _ = std::fs::remove_file(&gate);
    let sc = SidecarProc::start(
        BIN,
        "m",
        &["--max-queue", "2", "--wake-feedback", "0s"],
        &["--wake-gate", &gate.display().to_string()],
    )
    .await;
    let send = |priority: &'static str| {
        let r = sc
            .chat("m", 2, false)
            .header("x-greenthread-priority", priority);
        tokio::spawn(r.send())
    };
    // One standard request waits for the (held) wake.
    let first = send("standard");
    wait_until("one queued", Duration::from_secs(10), || async {
        (sc.queue_depth().await == 1.0).then_some(())
    })
    .await;
    // Half full: a sheddable one is refused at once.
    let r = send("sheddable").await.unwrap().unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sheddable"),
        "{e}"
    );
    // A second standard one fills it; a critical one then takes its place.
    let second = send("standard");
    wait_until("two queued", Duration::from_secs(10), || async {
        (sc.queue_depth().await == 2.0).then_some(())
    })
    .await;
    let critical = send("critical");
    let r = second.await.unwrap().unwrap();
    assert_eq!(r.status(), 429, "the latest standard request made room");
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more important"),
        "{e}"
    );
    // A standard newcomer finds the queue full of requests at least as important.
    let r = send("standard").await.unwrap().unwrap();
    assert_eq!(r.status(), 429);

    std::fs::write(&gate, b"").unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(critical.await.unwrap().unwrap().status(), 200);
    let m = sc.metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_rejections_total",
            &[("reason", "queue_full")]
        ),
        Some(3.0)
    );
    let _ = std::fs::remove_file(&gate);
}

/// Two models that do not fit together on one GPU, under `policy: lru`, whose
/// `maxWaitTime` is an hour: a standard wake would wait that hour before preempting.
const CONFIG: &str = r#"
policy: lru
gpus:
  simulated:
    - {memory: 10Gi}
apiKeys:
  - name: ops
    key: sk-ops
    priority: critical
  - name: batch
    key: sk-batch
    priority: sheddable
adminToken: admin-token
models:
  - name: steady
    spec:
      modelName: org/steady
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 1h}
      extraArgs: [--boot-time, 0s, --ttft, 1ms]
  - name: urgent
    spec:
      modelName: org/urgent
      engine: sim
      priority: critical
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 1h}
      extraArgs: [--boot-time, 0s, --ttft, 1ms]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_model_preempts_without_waiting_out_max_wait_time() {
    let local = LocalProc::start(BIN, CONFIG).await;
    let chat = |key: &str, model: &str| {
        local
            .client
            .post(format!("{}/v1/chat/completions", local.url))
            .bearer_auth(key)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
            .timeout(Duration::from_secs(60))
    };
    assert_eq!(chat("sk-ops", "steady").send().await.unwrap().status(), 200);
    // urgent needs steady's memory: it preempts at once, far inside its hour.
    assert_eq!(chat("sk-ops", "urgent").send().await.unwrap().status(), 200);
    let states = local
        .client
        .get(format!("{}/api/v1/models", local.url))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let state = |name: &str| {
        states["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(
        (state("urgent"), state("steady")),
        ("serving".into(), "sleeping".into())
    );
    // And steady, standard, cannot take the GPU back before its hour: its intent is
    // declared, with no victim named.
    let waiting = tokio::spawn(chat("sk-ops", "steady").send());
    let intent = wait_until("steady's intent", Duration::from_secs(30), || async {
        let gpus: serde_json::Value = local
            .client
            .get(format!("{}/api/v1/gpus", local.url))
            .bearer_auth("admin-token")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        gpus["items"][0]["status"]["preemptionIntents"]
            .as_array()?
            .iter()
            .find(|i| i["modelName"] == "org/steady")
            .cloned()
    })
    .await;
    assert!(intent["victimPodName"].is_null(), "{intent}");
    waiting.abort();
    let m = local.metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_preemptions_total",
            &[("model", "urgent"), ("role", "preemptor")]
        ),
        Some(1.0)
    );
}
