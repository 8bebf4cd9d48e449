//! The vLLM adapter against what real vLLM versions do, each with the simulator's fault
//! that reproduces it: requests still running when the drain times out finish
//! (`mode=wait`), engines sharing a GPU start one at a time even when start-up outlasts
//! the wake lock's TTL, a wedged engine (healthy to probes, deaf to requests) is caught by
//! the wake's one-token warm-up and restarted, and the sleep state comes from
//! `/is_sleeping` or `vllm:engine_sleep_state`, never from `/health`.

use std::{sync::Arc, time::Duration};

use greenthread_api::GpuSpec;
use greenthread_gpu::{MemoryProbe, SimGpu, SimGpuProbe};
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{
    GpuRef, Parts, Sidecar, SidecarConfig, engine::VllmAdapter, process::EngineProcess,
};
use greenthread_test_support::{SidecarProc, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const GI: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_running_when_the_drain_times_out_finishes() {
    // 40 tokens at 20/s: 2 s of generation; the drain gives up after 200 ms.
    let sc = SidecarProc::start(
        BIN,
        "w",
        &["--drain-timeout", "200ms", "--idle-timeout", "1h"],
        &["--tokens-per-second", "20"],
    )
    .await;
    assert_eq!(sc.chat("w", 1, false).send().await.unwrap().status(), 200);
    let long = tokio::spawn(sc.chat("w", 40, false).send());
    wait_until("the request in flight", Duration::from_secs(5), || async {
        (sc.status().await["queue"]["inFlight"] == 1).then_some(())
    })
    .await;
    assert_eq!(sc.admin("sleep").await.status(), 200);
    // Slept with mode=wait: the engine finished the request instead of aborting it.
    let resp = long.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 40, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_preemption_barrier_timeouts_total", &[]),
        Some(1.0)
    );
    assert!(sc.engine_sleeping().await);
}

fn sim_engine_args(dir: &std::path::Path, model: &str, port: u16) -> Vec<String> {
    let listen = format!("127.0.0.1:{port}");
    let dir = dir.display().to_string();
    [
        "sim-engine",
        "--listen",
        &listen,
        "--model",
        model,
        "--boot-time",
        "1200ms",
        "--weights-bytes",
        "1Gi",
        "--kv-cache-bytes",
        "1Gi",
        "--sim-gpu-dir",
        &dir,
        "--fail-concurrent-boot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The engine's command line for a sidecar to start (a shell command).
fn sim_engine(dir: &std::path::Path, model: &str, port: u16) -> String {
    std::iter::once(BIN.to_string())
        .chain(sim_engine_args(dir, model, port))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_sharing_a_gpu_start_one_at_a_time_even_past_the_lock_ttl() {
    let dir = tempfile::tempdir().unwrap();
    // The fault is real: two engines started together on one GPU, one fails.
    let (p1, p2) = (free_port(), free_port());
    let start = |model: &str, port: u16| {
        std::process::Command::new(BIN)
            .args(sim_engine_args(dir.path(), model, port))
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (start("a", p1), start("b", p2));
    // A healthy engine never exits by itself: wait (bounded) for one to fail on its own,
    // then stop the other by its PID. Only the engines' own exits count.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let own_failures = loop {
        let (ea, eb) = (a.try_wait().unwrap(), b.try_wait().unwrap());
        if ea.is_some() || eb.is_some() {
            break [ea, eb]
                .into_iter()
                .flatten()
                .filter(|s| !s.success())
                .count();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "neither engine failed its concurrent start-up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(own_failures >= 1, "concurrent start-ups must fail");

    // Through sidecars: the wake lock serializes the boots, kept alive by heartbeats
    // although each start-up (1.2 s) outlasts the lock's TTL (300 ms).
    let ledger = Arc::new(MemoryLedger::new());
    ledger.add_gpu(
        "g0",
        GpuSpec {
            node: "n".into(),
            index: 0,
            memory_bytes: 80 * GI,
            ..Default::default()
        },
    );
    let sim = SimGpu::new(dir.path());
    let mut sidecars = Vec::new();
    for model in ["a", "b"] {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let cfg = SidecarConfig::from_args(
            model,
            &[
                "--memory-bytes",
                "20Gi",
                "--wake-lock-ttl",
                "300ms",
                "--pod-name",
                &format!("{model}-0"),
            ],
        )
        .unwrap();
        let (tx, _exits) = tokio::sync::mpsc::unbounded_channel();
        let probe: Arc<dyn MemoryProbe> = Arc::new(SimGpuProbe {
            gpu: sim.clone(),
            indices: vec![0],
            engine_listen: format!("127.0.0.1:{port}"),
        });
        sidecars.push(Sidecar::new(
            cfg,
            Parts {
                engine: Arc::new(VllmAdapter::new(&url)),
                process: Some(Arc::new(EngineProcess::new(
                    sim_engine(dir.path(), model, port),
                    vec![],
                    tx,
                ))),
                ledger: ledger.clone() as Arc<dyn Ledger>,
                gpus: vec![GpuRef {
                    name: "g0".into(),
                    index: 0,
                }],
                probe: Some(probe),
                clock: greenthread_sidecar::Clock::Wall,
            },
        ));
    }
    let (ra, rb) = tokio::join!(sidecars[0].boot(), sidecars[1].boot());
    ra.expect("a booted");
    rb.expect("b booted");
    for sc in &sidecars {
        sc.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_engine_is_caught_by_the_warm_up_and_restarted() {
    let sc = SidecarProc::start(
        BIN,
        "wedge",
        &["--warmup-timeout", "500ms", "--wake-attempts", "1"],
        &["--wedge-after-wakes", "1"],
    )
    .await;
    // Its first wake wedges it: health 200, is_sleeping false, requests hang.
    let resp = sc.chat("wedge", 2, false).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(1.0)
    );
    assert!(m.value("gthread_sidecar_wake_failures_total", &[]).unwrap() >= 1.0);
    assert_eq!(sc.state().await, "serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sleep_state_comes_from_the_metric_when_is_sleeping_is_missing() {
    let sc = SidecarProc::start(BIN, "ns", &["--idle-timeout", "1h"], &["--no-is-sleeping"]).await;
    let is_sleeping = sc
        .client
        .get(format!("{}/is_sleeping", sc.engine))
        .send()
        .await
        .unwrap();
    assert_eq!(is_sleeping.status(), 404);
    assert_eq!(sc.state().await, "sleeping");
    for _ in 0..2 {
        assert_eq!(sc.chat("ns", 2, false).send().await.unwrap().status(), 200);
        assert_eq!(sc.state().await, "serving");
        assert_eq!(sc.admin("sleep").await.status(), 200);
        assert_eq!(sc.state().await, "sleeping");
    }
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_wake_failures_total", &[]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_unhealthy_while_asleep_is_neither_lost_nor_taken_for_awake() {
    let sc = SidecarProc::start(
        BIN,
        "uh",
        &["--idle-timeout", "1h"],
        &["--unhealthy-while-asleep"],
    )
    .await;
    let health = sc
        .client
        .get(format!("{}/health", sc.engine))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        503,
        "the engine sleeps and says it is unhealthy"
    );
    // The sidecar stays ready (a sleeping model keeps receiving the traffic that wakes it).
    let ready = sc
        .client
        .get(format!("{}/ready", sc.public))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(sc.chat("uh", 2, false).send().await.unwrap().status(), 200);
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_engine_restarts_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_wake_failures_total", &[]),
        Some(0.0)
    );
}
