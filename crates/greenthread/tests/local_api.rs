//! `greenthread local` through its API server: routing, model list, admin REST, GPUs
//! (and the seed's kubectl jsonpath over them), events, keys, metrics, bad configs.

use std::{collections::BTreeSet, process::Command, time::Duration};

use futures_util::StreamExt;
use greenthread_test_support::{
    LocalProc, SEED_GPU_JSONPATH, TEST_CONFIG, kubectl_jsonpath, wait_until,
};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_routed_by_model_and_listing_never_wakes() {
    let local = LocalProc::start(BIN, TEST_CONFIG).await;
    let states = local.states().await;
    assert_eq!(
        states.keys().cloned().collect::<Vec<_>>(),
        ["alpha", "beta", "delta", "gamma"]
    );
    assert!(states.values().all(|s| s == "sleeping"), "{states:?}");
    // Listing again and again wakes nothing.
    for _ in 0..5 {
        assert!(local.states().await.values().all(|s| s == "sleeping"));
    }

    // By the body's `model`: the Model's name or the engine's model id.
    let r = local.chat("alpha", 3).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["model"], "org/alpha");
    assert_eq!(local.states().await["alpha"], "serving");
    assert_eq!(
        local.chat("org/beta", 3).send().await.unwrap().status(),
        200
    );

    // By a path prefix.
    let r = local
        .client
        .post(format!("{}/beta/v1/completions", local.url))
        .json(&serde_json::json!({"model": "org/beta", "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Unknown model: 404 naming the known ones.
    let r = local.chat("omega", 3).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("omega") && msg.contains("alpha, beta, delta, gamma"),
        "{msg}"
    );

    // Malformed JSON and a missing model: 400, OpenAI-style.
    for body in ["{not json", r#"{"messages": []}"#] {
        let r = local
            .client
            .post(format!("{}/v1/chat/completions", local.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: serde_json::Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }

    // gamma shares gpu 1 with beta and does not fit beside it: beta is preempted.
    assert_eq!(local.chat("gamma", 2).send().await.unwrap().status(), 200);
    let states = local.states().await;
    assert_eq!(
        (states["gamma"].as_str(), states["beta"].as_str()),
        ("serving", "sleeping")
    );
    assert_eq!(states["alpha"], "serving", "alpha's gpu is not involved");

    // Admin: sleep and wake.
    let r = local
        .client
        .post(format!("{}/api/v1/models/gamma/sleep", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(local.states().await["gamma"], "sleeping");
    let r = local
        .client
        .post(format!("{}/api/v1/models/delta/wake", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status["state"], "serving");
    assert_eq!(status["servingReplicas"], 1);
    let r = local
        .client
        .post(format!("{}/api/v1/models/nope/wake", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Metrics: every sidecar's series labeled by model and pod, the API server's counts.
    let m = local.metrics().await;
    for model in ["alpha", "beta", "gamma", "delta"] {
        let pod = format!("{model}-0");
        let labels = [("model", model), ("pod", pod.as_str())];
        let on: Vec<_> = m
            .find("gthread_sidecar_state", &labels)
            .filter(|s| s.value == 1.0)
            .collect();
        assert_eq!(on.len(), 1, "{model}");
    }
    assert_eq!(
        m.value(
            "gthread_sidecar_preemptions_total",
            &[("model", "beta"), ("role", "preempted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "gthread_sidecar_preemptions_total",
            &[("model", "gamma"), ("role", "preemptor")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "gthread_apiserver_requests_total",
            &[("model", "alpha"), ("code", "200")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "gthread_apiserver_requests_total",
            &[("model", "unknown"), ("code", "404")]
        ),
        Some(1.0)
    );
    assert!(
        m.value(
            "gthread_apiserver_request_duration_seconds_count",
            &[("model", "beta")]
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        m.find("DCGM_FI_DEV_FB_USED", &[("gpu", "0")])
            .next()
            .is_some()
    );
    assert!(
        m.value("gthread_gpu_memory_used_bytes", &[("gpu", "0")])
            .unwrap()
            > 0.0,
        "alpha and delta serve on gpu 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpus_are_shaped_like_the_resource_and_the_seed_jsonpath_prints_every_occupant() {
    let local = LocalProc::start(BIN, TEST_CONFIG).await;
    assert_eq!(local.chat("beta", 2).send().await.unwrap().status(), 200);
    let list = local.get_json("/api/v1/gpus").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let mut printed = Vec::new();
    for gpu in items {
        assert_eq!(gpu["kind"], "GPU");
        assert_eq!(gpu["apiVersion"], "greenthread.ai/v1alpha1");
        assert!(gpu["spec"]["memoryBytes"].as_u64().unwrap() > 0);
        printed.push(kubectl_jsonpath(gpu, SEED_GPU_JSONPATH));
    }
    let expected: BTreeSet<String> = items
        .iter()
        .flat_map(|g| {
            g["status"]["occupants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    format!(
                        "{}({})",
                        o["modelName"].as_str().unwrap(),
                        o["state"].as_str().unwrap()
                    )
                })
        })
        .collect();
    assert_eq!(expected.len(), 4, "{expected:?}");
    let all = printed.join("\n");
    for occupant in &expected {
        assert!(
            all.contains(occupant.as_str()),
            "{occupant} missing from:\n{all}"
        );
    }
    assert!(all.contains("org/beta(serving)"), "{all}");
    let single = local.get_json("/api/v1/gpus/local-1").await;
    assert_eq!(single["metadata"]["name"], "local-1");
    assert!(
        single["status"]["stats"]["usedMemoryBytes"]
            .as_u64()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_stream_as_server_sent_events() {
    let local = LocalProc::start(BIN, TEST_CONFIG).await;
    let resp = local
        .client
        .get(format!("{}/api/v1/events", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    assert_eq!(local.chat("beta", 2).send().await.unwrap().status(), 200);
    let mut seen = String::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(r#""model":"beta","pod":"beta-0","from":"waking","to":"serving""#)
                || seen.contains(r#""from":"waking","model":"beta""#)
            {
                return;
            }
        }
    })
    .await;
    let events = greenthread_test_support::state_events(&seen);
    let beta: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["model"] == "beta" && !e["from"].is_null())
        .map(|e| {
            (
                e["from"].as_str().unwrap().into(),
                e["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(got.is_ok(), "events so far: {events:?}");
    assert_eq!(
        beta,
        [
            ("sleeping".into(), "pending".into()),
            ("pending".into(), "waking".into()),
            ("waking".into(), "serving".into())
        ]
    );
    // The stream opens with a snapshot of every replica.
    assert_eq!(events.iter().filter(|e| e["from"].is_null()).count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api_and_the_admin_token_guards_admin() {
    let config = format!("apiKeys: [k1]\nadminToken: root-token\n{TEST_CONFIG}");
    let local = LocalProc::start(BIN, &config).await;
    let url = |p: &str| format!("{}{p}", local.url);
    let r = local.chat("alpha", 2).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_api_key");
    // (what, request, bearer token, status). Scrapes stay open, as Prometheus expects.
    let chat = || local.chat("alpha", 2);
    let get = |p: &str| local.client.get(url(p));
    let table = [
        ("chat, wrong key", chat(), Some("wrong"), 401),
        ("chat, key", chat(), Some("k1"), 200),
        ("models, no key", get("/v1/models"), None, 401),
        ("models, key", get("/v1/models"), Some("k1"), 200),
        ("admin, an API key", get("/api/v1/gpus"), Some("k1"), 401),
        (
            "admin, admin token",
            get("/api/v1/gpus"),
            Some("root-token"),
            200,
        ),
        ("metrics, nothing", get("/metrics"), None, 200),
    ];
    for (what, req, token, want) in table {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        assert_eq!(req.send().await.unwrap().status(), want, "{what}");
    }
}

#[test]
fn a_bad_config_is_refused_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "gpus: {simulated: [{memory: 8Gi}]}\nmodels:\n  - name: a\n    spec: {modelName: m, engine: sim, tensorParallelSize: 3}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["local", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("models[0].spec.tensorParallelSize"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_every_engine() {
    // Ctrl-C (SIGINT) from a terminal, SIGTERM from a service manager: the same clean end.
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        stops_every_engine_on(signal, name).await;
    }
}

async fn stops_every_engine_on(signal: libc::c_int, name: &str) {
    let mut local = LocalProc::start(BIN, TEST_CONFIG).await;
    assert_eq!(local.chat("alpha", 2).send().await.unwrap().status(), 200);
    let pid = local.proc.pid();
    let children = || -> Vec<u32> {
        let out = Command::new("pgrep")
            .args(["-P", &pid.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let engines = children();
    assert_eq!(engines.len(), 4, "one engine per model");
    // A stream in flight when the signal comes (1500 tokens at 1000/s) is drained.
    let resp = local
        .client
        .post(format!("{}/v1/chat/completions", local.url))
        .json(&serde_json::json!({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1500, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    // SAFETY: signals our own child process.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
    let mut body = String::from_utf8_lossy(&first).into_owned();
    let rest = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    });
    rest.await.expect("the stream ends");
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "{name}: the in-flight stream completed"
    );
    let exit = local.proc.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "exits cleanly on {name}: {exit:?}"
    );
    wait_until(
        &format!("engines to exit on {name}"),
        Duration::from_secs(5),
        || async {
            engines
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
                .then_some(())
        },
    )
    .await;
}
