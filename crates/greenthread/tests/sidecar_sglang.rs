//! `--engine sglang` against the simulator speaking SGLang's memory-saver API: sleep is
//! `/release_memory_occupation`, wake is `/resume_memory_occupation` (weights, then KV
//! cache), memory is measured on the simulated GPU, and vLLM's sleep API is never used.
//! Without a CPU backup of the weights they come back uninitialized: the wake's warm-up
//! catches it and a cold restart serves the request.

use std::time::Duration;

use greenthread_test_support::SidecarProc;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const GI: f64 = (1u64 << 30) as f64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sglang_releases_and_resumes_memory_occupation() {
    let sc = SidecarProc::start(
        BIN,
        "sg",
        &["--engine", "sglang", "--idle-timeout", "1h"],
        &[],
    )
    .await;
    // Booted and released: nothing held on the GPU, measured.
    assert_eq!(sc.state().await, "sleeping");
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_gpu_memory_residual_bytes", &[("gpu", "0")]),
        Some(0.0)
    );
    for round in 1..=2 {
        assert_eq!(sc.chat("sg", 3, false).send().await.unwrap().status(), 200);
        assert_eq!(sc.state().await, "serving");
        let m = sc.metrics().await;
        // Weights (1 GiB) and KV cache (512 MiB) back on the simulated GPU.
        assert_eq!(
            m.value("gthread_sidecar_gpu_memory_serving_bytes", &[("gpu", "0")]),
            Some(1.5 * GI)
        );
        assert_eq!(sc.admin("sleep").await.status(), 200);
        let engine = sc.engine_metrics().await;
        assert_eq!(
            engine.value("greenthread_sim_release_memory_calls_total", &[]),
            Some(1.0 + round as f64)
        );
        // Two resumes per wake: weights, then the KV cache.
        assert_eq!(
            engine.value("greenthread_sim_resume_memory_calls_total", &[]),
            Some(2.0 * round as f64)
        );
        // Every engine-level sleep and wake came through SGLang's endpoints, none
        // through vLLM's /sleep and /wake_up.
        assert_eq!(
            engine.value("greenthread_sim_sleep_calls_total", &[]),
            engine.value("greenthread_sim_release_memory_calls_total", &[])
        );
        assert_eq!(
            engine.value("greenthread_sim_wake_calls_total", &[]),
            engine.value("greenthread_sim_resume_memory_calls_total", &[])
        );
    }
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_wake_failures_total", &[]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_without_a_cpu_backup_are_caught_by_the_warm_up() {
    let sc = SidecarProc::start(
        BIN,
        "nb",
        &["--engine", "sglang", "--wake-attempts", "1"],
        &["--no-weights-cpu-backup"],
    )
    .await;
    let resp = sc.chat("nb", 2, false).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let m = sc.metrics().await;
    assert!(m.value("gthread_sidecar_wake_failures_total", &[]).unwrap() >= 1.0);
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(1.0)
    );
    sc.wait_state("serving", Duration::from_secs(1)).await;
}
