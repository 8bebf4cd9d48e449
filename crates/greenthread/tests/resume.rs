//! `preemption: resume` end to end through the official `openai` SDK: a streamed answer
//! whose model is preempted midway pauses and goes on after the other model's turn, as
//! one answer; a request that cannot be continued (not streamed) is drained as before.

use std::process::Command;

use greenthread_test_support::{LocalProc, chart::repo_root};
use serde_json::Value;

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
    let out = tokio::task::spawn_blocking({
        let url = local.url.clone();
        move || {
            Command::new("python3")
                .arg(repo_root().join("scripts/openai_resume.py"))
                .args([&url, "slow", "quick"])
                .output()
                .expect("python3 with openai (scripts/test installs it)")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the openai SDK run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    println!("openai SDK report: {report}");
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
    assert!(resumed >= 1.0, "the stream was continued: {resumed}");
    let preempted = m
        .value(
            "gthread_sidecar_preemptions_total",
            &[("pod", "slow-0"), ("role", "preempted")],
        )
        .unwrap();
    assert!(
        preempted >= 2.0,
        "preempted twice (streamed, then plain): {preempted}"
    );
}
