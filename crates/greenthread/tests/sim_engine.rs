//! The simulated engine on its own: memory on the simulated GPU, sleep levels, and what
//! it does with inference while asleep.

use std::time::{Duration, Instant};

use greenthread_test_support::{Proc, free_port, http, scrape, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

struct Sim {
    url: String,
    gpu: tempfile::TempDir,
    client: reqwest::Client,
    _proc: Proc,
}

async fn start(flags: &[&str]) -> Sim {
    let port = free_port();
    let gpu = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = [
        "sim-engine",
        "--model",
        "sim",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--boot-time",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--sim-gpu-dir".to_string(),
        gpu.path().display().to_string(),
    ]);
    args.extend(flags.iter().map(|s| s.to_string()));
    let proc = Proc::spawn(BIN, &args);
    let url = format!("http://127.0.0.1:{port}");
    let client = http();
    wait_until("sim-engine up", Duration::from_secs(20), || async {
        client
            .get(format!("{url}/health"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
            .map(drop)
    })
    .await;
    Sim {
        url,
        gpu,
        client,
        _proc: proc,
    }
}

impl Sim {
    fn used(&self) -> u64 {
        greenthread_gpu::SimGpu::new(self.gpu.path())
            .used_bytes(0)
            .unwrap()
    }

    async fn post(&self, path: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    async fn chat(&self) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&serde_json::json!({"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_follows_sleep_and_wake_on_the_simulated_gpu() {
    let sim = start(&[
        "--weights-bytes",
        "1Gi",
        "--kv-cache-bytes",
        "512Mi",
        "--leak-on-sleep",
        "64Mi",
        "--h2d-bandwidth",
        "4Gi",
    ])
    .await;
    assert_eq!(
        sim.used(),
        (1 << 30) + (512 << 20),
        "awake: weights + KV cache"
    );
    assert_eq!(sim.post("/sleep?level=1").await.status(), 200);
    assert_eq!(sim.used(), 64 << 20, "asleep: only what leaked");
    let t = Instant::now();
    assert_eq!(sim.post("/wake_up").await.status(), 200);
    // Copying 1 GiB back at 4 GiB/s cannot take less than 250 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(sim.used(), (1 << 30) + (512 << 20));
    let m = scrape(&sim.client, &format!("{}/metrics", sim.url)).await;
    assert_eq!(
        m.value("vllm:engine_sleep_state", &[("sleep_state", "awake")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn level_two_needs_reload_weights_before_it_serves() {
    let sim = start(&[]).await;
    assert_eq!(sim.post("/sleep?level=2").await.status(), 200);
    let m = scrape(&sim.client, &format!("{}/metrics", sim.url)).await;
    assert_eq!(
        m.value("vllm:engine_sleep_state", &[("sleep_state", "discard_all")]),
        Some(1.0)
    );
    assert_eq!(sim.post("/wake_up?tags=weights").await.status(), 200);
    assert_eq!(sim.post("/wake_up?tags=kv_cache").await.status(), 200);
    let r = sim.chat().await;
    assert_eq!(r.status(), 500, "garbage weights are refused");
    let r = sim
        .client
        .post(format!("{}/collective_rpc", sim.url))
        .json(&serde_json::json!({"method": "reload_weights"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sim.chat().await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_while_asleep_errors_or_hangs_as_configured() {
    let erroring = start(&["--asleep-behavior", "error"]).await;
    erroring.post("/sleep?level=1").await;
    assert_eq!(erroring.chat().await.status(), 500);

    let hanging = start(&["--asleep-behavior", "hang"]).await;
    hanging.post("/sleep?level=1").await;
    let r = tokio::time::timeout(Duration::from_millis(500), hanging.chat()).await;
    assert!(r.is_err(), "a hanging engine does not answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_engine_frees_its_memory() {
    let sim = start(&["--crash-after-requests", "1"]).await;
    assert!(sim.used() > 0);
    assert_eq!(sim.chat().await.status(), 200);
    wait_until(
        "the crash to free memory",
        Duration::from_secs(5),
        || async { (sim.used() == 0).then_some(()) },
    )
    .await;
}
