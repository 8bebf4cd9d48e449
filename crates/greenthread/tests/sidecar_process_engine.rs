//! `--engine process`: an engine with no sleep API is put to sleep by stopping its
//! process and woken by starting it; the wake counts once a real one-token completion
//! has answered, and the reservation is the resident memory the sidecar measured. The
//! engine here is `greenthread sim-engine` run as a plain OpenAI-compatible server.

use std::time::Duration;

use greenthread_test_support::{SidecarProc, wait_until};

const WAIT: Duration = Duration::from_secs(20);

async fn engine_listening(sc: &SidecarProc) -> bool {
    let addr = sc.engine.trim_start_matches("http://").to_string();
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_engine_sleeps_stopped_and_wakes_started_with_its_memory_measured() {
    let sc = SidecarProc::start(
        env!("CARGO_BIN_EXE_greenthread"),
        "proc-model",
        &["--engine", "process", "--idle-timeout", "1h"],
        &[],
    )
    .await;
    // Booted: started, measured, stopped. Asleep means no process at all.
    assert_eq!(sc.state().await, "sleeping");
    assert!(
        !engine_listening(&sc).await,
        "a sleeping process engine is stopped"
    );
    let m = sc.metrics().await;
    let measured = m
        .value("gthread_sidecar_gpu_memory_serving_bytes", &[("gpu", "0")])
        .unwrap();
    assert!(
        measured > 1_000_000.0,
        "resident memory measured at boot: {measured}"
    );
    // The engine's metrics of a stopped engine: empty, not an error.
    let engine_metrics = sc
        .client
        .get(format!("{}/metrics/engine", sc.private))
        .send()
        .await
        .unwrap();
    assert_eq!(engine_metrics.status(), 200);

    // A request starts it; the answer comes from the engine.
    let resp = sc.chat("proc-model", 4, false).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(sc.state().await, "serving");
    assert!(engine_listening(&sc).await);
    let m = sc.metrics().await;
    assert!(
        m.value("gthread_sidecar_gpu_memory_reserved_bytes", &[("gpu", "0")])
            .unwrap()
            > 1_000_000.0,
        "the wake reserved the measured footprint"
    );
    // The warm-up completion reached the engine before the request did.
    let engine = sc.engine_metrics().await;
    let served: f64 = engine
        .find(
            "vllm:request_success_total",
            &[("model_name", "proc-model")],
        )
        .map(|s| s.value)
        .sum();
    assert!(served >= 2.0, "warm-up and request: {served}");

    // Sleep stops it; what it holds afterwards is measured: nothing.
    assert_eq!(sc.admin("sleep").await.status(), 200);
    assert_eq!(sc.state().await, "sleeping");
    wait_until("the engine process gone", WAIT, || async {
        (!engine_listening(&sc).await).then_some(())
    })
    .await;
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_gpu_memory_residual_bytes", &[("gpu", "0")]),
        Some(0.0)
    );
    // Stopping it on purpose is not a crash.
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(0.0)
    );
    // And it wakes again.
    assert_eq!(
        sc.chat("proc-model", 2, true)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(sc.state().await, "serving");
}
