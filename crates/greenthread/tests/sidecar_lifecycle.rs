//! Wake on demand, deduplication, and idle sleep, against a real sim-engine process.

use std::time::{Duration, Instant};

use greenthread_test_support::{SidecarProc, get_json, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_wake_then_the_model_sleeps_when_idle() {
    let idle = Duration::from_millis(1500);
    // A 1 GiB weight copy at 1 GiB/s: every request arrives while the wake is under way.
    let sc = SidecarProc::start(
        BIN,
        "m",
        &["--idle-timeout", "1500ms"],
        &["--h2d-bandwidth", "1Gi"],
    )
    .await;
    assert_eq!(sc.state().await, "sleeping");
    assert!(sc.engine_sleeping().await, "boot leaves the engine asleep");

    let responses =
        futures_util::future::join_all((0..200).map(|_| sc.chat("m", 4, false).send())).await;
    let mut ok = 0;
    for r in responses {
        let r = r.expect("request answered");
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        ok += 1;
    }
    assert_eq!(ok, 200);
    let last_request = Instant::now();
    assert_eq!(sc.state().await, "serving");

    let engine = sc.engine_metrics().await;
    assert_eq!(
        engine.value("greenthread_sim_wake_calls_total", &[]),
        Some(2.0),
        "exactly one engine wake: the weights, then the KV cache (measured between)"
    );
    // The 200 requests, and the one-token warm-up that verified the wake.
    assert_eq!(
        engine.value("greenthread_sim_inference_requests_total", &[]),
        Some(201.0)
    );
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_wake_deduplications_total", &[]),
        Some(199.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_requests_total", &[("status", "success")]),
        Some(200.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_wake_duration_seconds_count", &[]),
        Some(1.0)
    );

    // Probes that are not inference keep coming; the model still goes to sleep on time.
    let probe = || async {
        for url in [
            format!("{}/health", sc.public),
            format!("{}/ready", sc.public),
            format!("{}/v1/models", sc.public),
            format!("{}/status", sc.public),
            format!("{}/metrics", sc.private),
            format!("{}/metrics/engine", sc.private),
        ] {
            let r = sc.client.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
        }
    };
    wait_until(
        "idle sleep while probes continue",
        idle + Duration::from_secs(5),
        || async {
            probe().await;
            (sc.state().await == "sleeping").then_some(())
        },
    )
    .await;
    let slept_after = last_request.elapsed();
    assert!(
        slept_after >= idle,
        "slept after {slept_after:?}, before the idle timeout"
    );
    assert!(sc.engine_sleeping().await);

    // Asleep, the same probes wake nothing.
    for _ in 0..20 {
        probe().await;
    }
    let models = get_json(&sc.client, &format!("{}/v1/models", sc.public)).await;
    assert_eq!(
        models["data"][0]["id"], "m",
        "model list answered from the cached copy"
    );
    assert_eq!(sc.state().await, "sleeping");
    assert!(sc.engine_sleeping().await);
    let engine = sc.engine_metrics().await;
    assert_eq!(
        engine.value("greenthread_sim_wake_calls_total", &[]),
        Some(2.0),
        "one wake, in two calls"
    );
    assert_eq!(
        engine.value("greenthread_sim_sleep_calls_total", &[]),
        Some(2.0),
        "boot sleep + idle sleep"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_two_sleep_wakes_through_reload_weights() {
    let sc = SidecarProc::start(BIN, "l2", &["--sleep-level", "2"], &[]).await;
    let r = sc.chat("l2", 3, false).send().await.unwrap();
    // The simulator refuses inference with weights not reloaded, so 200 proves the sequence.
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let engine = sc.engine_metrics().await;
    assert_eq!(
        engine.value("greenthread_sim_wake_calls_total", &[]),
        Some(2.0),
        "weights, then kv_cache"
    );
    // The prefix cache was computed with the old weights: it is reset once per wake.
    assert_eq!(
        engine.value("greenthread_sim_prefix_cache_resets_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        engine.value("vllm:engine_sleep_state", &[("sleep_state", "awake")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_wake_and_sleep() {
    let sc = SidecarProc::start(BIN, "adm", &[], &[]).await;
    let r = sc.admin("wake").await;
    assert_eq!(r.status(), 200);
    assert_eq!(sc.state().await, "serving");
    assert!(!sc.engine_sleeping().await);
    let r = sc.admin("sleep").await;
    assert_eq!(r.status(), 200);
    assert_eq!(sc.state().await, "sleeping");
    assert!(sc.engine_sleeping().await);
    // Sleeping a sleeping model is a conflict with a JSON reason, not a crash.
    let r = sc.admin("sleep").await;
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not serving")
    );
}
