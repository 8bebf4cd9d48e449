//! `preemption: resume` end to end through the official `openai` SDK: a streamed answer
//! whose model is preempted midway pauses and goes on after the other model's turn, as
//! one answer, and its continuation is drained, not stopped again; a request that cannot
//! be continued (not streamed) is drained as before.

use greenthread_test_support::{LocalProc, openai_script};

/// One simulated GPU that holds either model, not both; the first streams slowly
/// enough (20 tokens/s) to be preempted midway.
const CONFIG: &str = r#"
gpus:
  simulated:
    - {memory: 10Gi}
preemption: resume
models:
  - name: slow
    spec:
      modelName: org/slow
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 200ms}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms, --tokens-per-second, "20"]
  - name: quick
    spec:
      modelName: org/quick
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 200ms}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_stream_pauses_and_goes_on_as_one_answer_through_the_openai_sdk() {
    let local = LocalProc::start(env!("CARGO_BIN_EXE_greenthread"), CONFIG).await;
    let report = openai_script("openai_resume.py", &[&local.url, "slow", "quick"]).await;
    // The pause is the other model's turn: a wake, its answer, a wake back.
    assert!(
        report["streamed"]["longestPauseSeconds"].as_f64().unwrap() > 0.1,
        "{report}"
    );

    let m = local.metrics().await;
    let resumed = m
        .value(
            "gthread_sidecar_generations_resumed_total",
            &[("pod", "slow-0")],
        )
        .unwrap();
    assert_eq!(
        resumed, 1.0,
        "the stream was continued once (its continuation drained at the second preemption)"
    );
    // Its pause is measured: one, and it lasted (the other model's turn).
    let pauses = m
        .value(
            "gthread_sidecar_generation_pause_seconds_count",
            &[("pod", "slow-0")],
        )
        .unwrap();
    assert_eq!(pauses, 1.0, "one stopped answer, one pause");
    let paused = m
        .value(
            "gthread_sidecar_generation_pause_seconds_sum",
            &[("pod", "slow-0")],
        )
        .unwrap();
    assert!(paused > 0.0, "{paused}");
    let preempted = m
        .value(
            "gthread_sidecar_preemptions_total",
            &[("pod", "slow-0"), ("role", "preempted")],
        )
        .unwrap();
    // The stream is stopped by the first preemption. The continuation and the plain
    // answer must finish before the model sleeps: a waker no longer names a model with
    // such answers (it waits for them, `draining` in the GPU record), so a later turn
    // may come as a preemption of the idle model or without one.
    assert!(
        preempted >= 2.0,
        "preempted for the stream and again after its continuation: {preempted}"
    );
}
