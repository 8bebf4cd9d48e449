//! The rest of the API by `model` (embeddings, responses, audio transcriptions, rerank,
//! Anthropic's messages) through `greenthread local`, with the official `openai` and
//! `anthropic` SDKs as clients; and the SSE comments a streamed request receives while its
//! model wakes: skipped by the SDK, absent when the wake is quick, an error event when the
//! answer fails after they began, and a client that leaves takes its request with it.

use std::{path::PathBuf, time::Duration};

use futures_util::StreamExt;
use greenthread_test_support::{LocalProc, SidecarProc, python_script, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// A file that does not exist yet: the engine's wake waits for it (`--wake-gate`).
fn gate(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("gt-gate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_goes_by_model_and_the_sdks_skip_wake_comments() {
    let gate = gate("sdk");
    let sim = "[--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]";
    let config = format!(
        r#"
apiKeys: [k1]
adminToken: t1
gpus:
  simulated:
    - {{memory: 10Gi}}
    - {{memory: 10Gi}}
models:
  - name: gated
    spec:
      modelName: org/gated
      engine: sim
      gpuMemoryUtilization: "0.5"
      sleep: {{idleTimeout: 1h, wakeFeedback: 100ms}}
      extraArgs: [--boot-time, 0s, --wake-gate, "{}"]
  - name: alpha
    spec:
      modelName: org/alpha
      engine: sim
      gpuMemoryUtilization: "0.3"
      sleep: {{idleTimeout: 1h}}
      extraArgs: {sim}
  - name: beta
    spec:
      modelName: org/beta
      engine: sim
      gpuMemoryUtilization: "0.3"
      sleep: {{idleTimeout: 1h}}
      extraArgs: {sim}
"#,
        gate.display()
    );
    let local = LocalProc::start(BIN, &config).await;
    let report = python_script(
        "sdk_routes.py",
        &[
            &local.url,
            "k1",
            "org/gated",
            &gate.display().to_string(),
            "alpha:org/alpha",
            "beta:org/beta",
        ],
        "the openai and anthropic SDKs (scripts/test installs them)",
    )
    .await;
    println!("SDK report: {report}");
    let _ = std::fs::remove_file(&gate);

    // Each route was counted for the model it named, by the API server.
    let m = local.metrics().await;
    for model in ["alpha", "beta"] {
        let ok = m
            .value(
                "gthread_apiserver_requests_total",
                &[("model", model), ("code", "200")],
            )
            .unwrap_or_default();
        // embeddings ×2, responses, transcription, rerank, messages.
        assert!(ok >= 6.0, "{model}: {ok} answered requests counted");
    }
}

/// Reads `resp`'s body until `until` holds for what has arrived, or it ends.
async fn read_until(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin),
    seen: &mut String,
    until: impl Fn(&str) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !until(seen) {
            match body.next().await {
                Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk.unwrap())),
                None => return,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("nothing more arrived: {seen:?}"));
}

fn stream_request(sc: &SidecarProc, model: &str) -> reqwest::RequestBuilder {
    sc.client
        .post(format!("{}/v1/chat/completions", sc.public))
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 3,
            "stream": true,
        }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_wake_keeps_the_engines_own_status() {
    // A wake far shorter than the feedback interval: no stream is started early, so an
    // engine's refusal keeps its status.
    let sc = SidecarProc::start(BIN, "m", &["--wake-feedback", "1m"], &[]).await;
    assert_eq!(sc.state().await, "sleeping");
    let r = stream_request(&sc, "not-served-here").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(sc.admin("sleep").await.status(), 200);
    let r = stream_request(&sc, "m").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(!body.contains("\n:") && !body.starts_with(':'), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_while_waking_then_the_answer_or_its_error_as_an_event() {
    let gate = gate("events");
    let sc = SidecarProc::start(
        BIN,
        "m",
        &["--wake-feedback", "100ms"],
        &["--wake-gate", &gate.display().to_string()],
    )
    .await;

    // A client that leaves while the model wakes takes its place in the queue with it.
    let r = stream_request(&sc, "m").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    read_until(&mut body, &mut seen, |s| s.contains(": waking m, ")).await;
    drop(body);
    wait_until("the queue to empty", Duration::from_secs(10), || async {
        (sc.queue_depth().await == 0.0).then_some(())
    })
    .await;
    assert_ne!(sc.state().await, "serving", "the wake is still held");

    // A request the engine refuses once awake: the refusal ends the started stream as
    // an OpenAI-style error event.
    let r = stream_request(&sc, "not-served-here").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    read_until(&mut body, &mut seen, |s| {
        s.matches(": waking m, ").count() >= 2
    })
    .await;
    std::fs::write(&gate, b"").unwrap();
    read_until(&mut body, &mut seen, |_| false).await;
    let events: Vec<&str> = seen
        .split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .collect();
    assert_eq!(events.len(), 2, "{seen:?}");
    let error: serde_json::Value =
        serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not-served-here"),
        "{error}"
    );
    assert_eq!(events[1], "data: [DONE]");
    // Every comment says how long the wait has been, rising.
    let waited: Vec<f64> = seen
        .lines()
        .filter_map(|l| {
            l.strip_prefix(": waking m, ")?
                .strip_suffix(" s")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        waited.len() >= 2 && waited.windows(2).all(|w| w[0] <= w[1]),
        "{seen:?}"
    );
    let _ = std::fs::remove_file(&gate);
}
