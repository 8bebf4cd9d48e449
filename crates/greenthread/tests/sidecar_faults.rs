//! Engine faults: failed wakes, crashes, memory kept after sleep.

use std::time::Duration;

use greenthread_test_support::SidecarProc;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_that_fails_twice_is_served_after_a_cold_restart() {
    let sc = SidecarProc::start(BIN, "f", &["--wake-attempts", "2"], &["--fail-wakes", "2"]).await;
    let r = sc.chat("f", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_wake_failures_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(1.0)
    );
    assert_eq!(sc.state().await, "serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_crashes_while_serving_is_restarted_for_the_next_request() {
    // Two: the one-token warm-up that verifies the wake, then the client's request.
    let sc = SidecarProc::start(BIN, "c", &[], &["--crash-after-requests", "2"]).await;
    assert_eq!(sc.chat("c", 2, false).send().await.unwrap().status(), 200);
    // The engine exits after its first answer; the reservation goes with it.
    sc.wait_state("sleeping", Duration::from_secs(5)).await;
    let status = sc.status().await;
    assert_eq!(status["memory"]["reservedBytes"], 0);
    let r = sc.chat("c", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_an_engine_keeps_after_sleep_is_measured_and_reported() {
    let leak: u64 = 256 << 20;
    let sc = SidecarProc::start(BIN, "k", &[], &["--leak-on-sleep", "256Mi"]).await;
    let check = |status: serde_json::Value| {
        assert_eq!(
            status["memory"]["residualBytes"][0]["bytes"], leak,
            "{status}"
        );
    };
    check(sc.status().await);
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_gpu_memory_residual_bytes", &[("gpu", "0")]),
        Some(leak as f64)
    );
    // Serving memory is measured too: weights + KV cache of the simulator.
    assert_eq!(
        m.value("gthread_sidecar_gpu_memory_serving_bytes", &[("gpu", "0")]),
        Some(((1u64 << 30) + (512 << 20)) as f64)
    );
    // Again after a full wake/sleep cycle.
    assert_eq!(sc.chat("k", 2, false).send().await.unwrap().status(), 200);
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_gpu_memory_residual_bytes", &[("gpu", "0")]),
        Some(0.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_gpu_memory_reserved_bytes", &[("gpu", "0")]),
        Some(((1u64 << 30) + (512 << 20)) as f64)
    );
    assert_eq!(sc.admin("sleep").await.status(), 200);
    check(sc.status().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_that_hangs_times_out_and_is_cold_restarted() {
    let sc = SidecarProc::start(
        BIN,
        "h",
        &["--wake-timeout", "300ms", "--wake-attempts", "1"],
        &["--wake-hang"],
    )
    .await;
    let r = sc.chat("h", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_wake_failures_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_never_wakes_fails_the_queue_with_a_reason_and_holds_nothing() {
    // Every wake fails and every restart is woken again: the restart budget runs out.
    let sc = SidecarProc::start(
        BIN,
        "n",
        &["--wake-attempts", "1", "--max-restarts", "0"],
        &["--fail-wakes", "100"],
    )
    .await;
    let r = sc.chat("n", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("failed to wake"), "{msg}");
    assert_eq!(sc.state().await, "sleeping");
    assert_eq!(sc.status().await["memory"]["reservedBytes"], 0);
    // `GreenThreadModelFailing` reads this series.
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_rejections_total", &[("reason", "failed")]),
        Some(1.0)
    );
}
