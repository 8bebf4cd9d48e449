//! The queue in front of a waking model: bounded, with deadlines, and disconnect-safe.

use std::time::Duration;

use greenthread_test_support::{SidecarProc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    // 1 GiB at 512 MiB/s: a 2 s wake.
    let sc = SidecarProc::start(
        BIN,
        "q",
        &["--max-queue", "2"],
        &["--h2d-bandwidth", "512Mi"],
    )
    .await;
    let a = tokio::spawn(sc.chat("q", 2, false).send());
    let b = tokio::spawn(sc.chat("q", 2, false).send());
    wait_until("two queued", Duration::from_secs(5), || async {
        (sc.queue_depth().await == 2.0).then_some(())
    })
    .await;
    let r = sc.chat("q", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(a.await.unwrap().unwrap().status(), 200);
    assert_eq!(b.await.unwrap().unwrap().status(), 200);
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_requests_total", &[("status", "error")]),
        Some(1.0)
    );
    // The series the shipped alerts read, by reason: this one refusal, queue_full.
    assert_eq!(
        m.value(
            "gthread_sidecar_rejections_total",
            &[("reason", "queue_full")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "gthread_sidecar_rejections_total",
            &[("reason", "deadline")]
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_503_with_a_json_reason() {
    let sc = SidecarProc::start(
        BIN,
        "d",
        &["--queue-timeout", "400ms"],
        &["--h2d-bandwidth", "256Mi"],
    )
    .await;
    let r = sc.chat("d", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "timeout");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("model d is waking"), "{msg}");
    assert_eq!(sc.queue_depth().await, 0.0);
    // `GreenThreadQueueTimeouts` reads this series.
    let m = sc.metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_rejections_total",
            &[("reason", "deadline")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_queued_never_reaches_the_engine() {
    // The engine's wake waits for this file: the model stays waking until the test says,
    // however slow the machine.
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("wake");
    let sc = SidecarProc::start(BIN, "x", &[], &["--wake-gate", gate.to_str().unwrap()]).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .post(format!("{}/v1/chat/completions", sc.public))
        .json(&serde_json::json!({"model": "x", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout());
    wait_until("the queue to empty", Duration::from_secs(10), || async {
        (sc.queue_depth().await == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        sc.state().await,
        "waking",
        "removed from the queue, not released by the wake"
    );
    std::fs::write(&gate, b"").unwrap();
    sc.wait_state("serving", Duration::from_secs(10)).await;
    // Only the wake's one-token warm-up reached the engine, not the client's request.
    let engine = sc.engine_metrics().await;
    assert_eq!(
        engine.value("greenthread_sim_inference_requests_total", &[]),
        Some(1.0)
    );
}
