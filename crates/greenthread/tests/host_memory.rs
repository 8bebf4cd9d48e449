//! Host memory for sleeping models, through `greenthread local`: three models share one
//! GPU and a host memory budget that holds two level-1 sleepers' weights. The third to
//! go to sleep goes to level 2 (counted, its weights dropped and reloaded from disk at
//! its next wake), every answer is right, and neither the ledger nor the simulated
//! engines' measured host memory ever exceeds the budget.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use greenthread_gpu::SimGpu;
use greenthread_test_support::{LocalProc, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const GI: u64 = 1 << 30;
const BUDGET: u64 = 25 * GI;
const WEIGHTS: u64 = 10 * GI;
const MODELS: [&str; 3] = ["alpha", "beta", "gamma"];

fn config() -> String {
    let mut c =
        String::from("gpus:\n  simulated:\n    - {memory: 80Gi}\nhostMemory: 25Gi\nmodels:\n");
    for m in MODELS {
        // Weights 10 GiB: 40 ms back from host memory, 625 ms from disk.
        c.push_str(&format!(
            r#"  - name: {m}
    spec:
      modelName: org/{m}
      engine: sim
      gpuMemoryUtilization: "0.3"
      staging: {{hostMemory: 10Gi}}
      sleep: {{idleTimeout: 1h}}
      fairness: {{minRuntime: 0s, maxWaitTime: 200ms}}
      extraArgs: [--boot-time, 0s, --weights-bytes, 10Gi, --disk-bandwidth, 16Gi, --h2d-bandwidth, 256Gi, --d2h-bandwidth, 256Gi, --ttft, 5ms]
"#
        ));
    }
    c
}

/// Each model's pod as the admin API shows it.
async fn pods(local: &LocalProc) -> BTreeMap<String, Value> {
    let v = local.get_json("/api/v1/models").await;
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["pods"][0].clone(),
            )
        })
        .collect()
}

/// Host bytes the ledger's records say the occupants hold, per model.
async fn ledger_host(local: &LocalProc) -> BTreeMap<String, u64> {
    let v = local.get_json("/api/v1/gpus").await;
    let mut out = BTreeMap::new();
    for g in v["items"].as_array().unwrap() {
        for o in g["status"]["occupants"].as_array().unwrap() {
            *out.entry(o["modelName"].as_str().unwrap().to_string())
                .or_default() += o["hostMemoryBytes"].as_u64().unwrap_or(0);
        }
    }
    out
}

/// The models asleep at each level, once all three sleep.
async fn levels(local: &LocalProc) -> BTreeMap<u64, Vec<String>> {
    wait_until("every model asleep", Duration::from_secs(30), || async {
        let pods = pods(local).await;
        let mut by_level: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (m, p) in &pods {
            if p["state"] != "sleeping" {
                return None;
            }
            by_level
                .entry(p["sleepLevel"].as_u64()?)
                .or_default()
                .push(m.clone());
        }
        Some(by_level)
    })
    .await
}

async fn answer(local: &LocalProc, model: &str) -> String {
    let r = local
        .client
        .post(format!("{}/v1/chat/completions", local.url))
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("a question for {model}")}],
            "max_tokens": 6,
        }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{model}: {body}");
    assert_eq!(body["model"], format!("org/{model}"), "{body}");
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_third_sleeper_goes_to_level_two_and_the_budget_holds() {
    // `local` keeps its simulated GPUs in a temporary directory: under ours, to measure.
    let tmp = tempfile::tempdir().unwrap();
    let tmp_env = tmp.path().display().to_string();
    let local = LocalProc::start_env(BIN, &config(), &[], &[("TMPDIR", &tmp_env)]).await;
    let sim_dir = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("greenthread-local-gpus-")
        })
        .expect("local's simulated GPUs");
    let sim = SimGpu::new(sim_dir);

    // What the engines hold in host memory, measured all along.
    let (most, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let monitor = {
        let (most, stop, sim) = (most.clone(), stop.clone(), sim.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let held = sim.host_bytes([0]).unwrap();
                most.fetch_max(held, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Booted (each engine slept once at boot): two wait at level 1, the last at level 2.
    let at_boot = levels(&local).await;
    assert_eq!(at_boot[&1].len(), 2, "{at_boot:?}");
    assert_eq!(at_boot[&2].len(), 1, "{at_boot:?}");
    let third = at_boot[&2][0].clone();
    let held = ledger_host(&local).await;
    for m in MODELS {
        let want = if m == third { 0 } else { WEIGHTS };
        assert_eq!(held[&format!("org/{m}")], want, "{m}: {held:?}");
    }
    assert_eq!(sim.host_bytes([0]).unwrap(), 2 * WEIGHTS);

    // Three rounds of turns: each model answers, then sleeps. The two that hold host
    // memory give it back when they wake and take it again when they sleep; the third
    // finds the other two there each time, and sleeps at level 2 again.
    let mut first: BTreeMap<&str, String> = BTreeMap::new();
    for round in 0..3 {
        for m in MODELS {
            let text = answer(&local, m).await;
            let want = first.entry(m).or_insert_with(|| text.clone());
            assert_eq!(&text, want, "round {round}: {m} answered otherwise");
            let r = local
                .client
                .post(format!("{}/api/v1/models/{m}/sleep", local.url))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
            let now = levels(&local).await;
            assert_eq!(now, at_boot, "round {round}, after {m}");
            let held: u64 = ledger_host(&local).await.values().sum();
            assert!(held <= BUDGET, "round {round}: the ledger holds {held}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    monitor.await.unwrap();
    let most = most.load(Ordering::Relaxed);
    assert!(
        most <= BUDGET,
        "the engines held {most} bytes of host memory"
    );
    assert_eq!(most, 2 * WEIGHTS, "two sleepers' weights, measured");

    let m = local.metrics().await;
    let node = [("node", "local")];
    assert_eq!(
        m.value("gthread_host_memory_sleepers_budget_bytes", &node),
        Some(BUDGET as f64)
    );
    assert_eq!(
        m.value("gthread_host_memory_sleepers_bytes", &node),
        Some((2 * WEIGHTS) as f64)
    );
    for model in MODELS {
        let l = [("model", model)];
        let demotions = m.value("gthread_sidecar_sleep_demotions_total", &l);
        let host = m.value(
            "gthread_sidecar_host_memory_bytes",
            &[("model", model), ("gpu", "0")],
        );
        if model == third {
            // At boot and after each of its three turns.
            assert_eq!(demotions, Some(4.0), "{model}");
            assert_eq!(host, Some(0.0), "{model}");
            // Each of its wakes reloaded 10 GiB from disk at 16 GiB/s.
            let sum = m
                .value("gthread_sidecar_wake_duration_seconds_sum", &l)
                .unwrap();
            let count = m
                .value("gthread_sidecar_wake_duration_seconds_count", &l)
                .unwrap();
            assert_eq!(count, 3.0, "{model}");
            assert!(sum / count >= 0.6, "{model}: wakes took {sum} s in all");
        } else {
            assert_eq!(demotions, Some(0.0), "{model}");
            assert_eq!(host, Some(WEIGHTS as f64), "{model}");
        }
    }
}

/// Without `staging.hostMemory`, the weights' size is measured at the first wake: at boot
/// only what the engine held serving is known (weights and KV cache, 19.6 GiB here, more
/// than the 15 GiB budget), so it sleeps at level 2; its first wake brings the weights
/// back alone and measures them (10 GiB), and from then on it sleeps at level 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_weights_are_measured_at_the_first_wake() {
    let config = r#"
gpus:
  simulated:
    - {memory: 80Gi}
hostMemory: 15Gi
models:
  - name: solo
    spec:
      modelName: org/solo
      engine: sim
      gpuMemoryUtilization: "0.3"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s}
      extraArgs: [--boot-time, 0s, --weights-bytes, 10Gi, --disk-bandwidth, 64Gi, --h2d-bandwidth, 256Gi, --d2h-bandwidth, 256Gi, --ttft, 5ms]
"#;
    let local = LocalProc::start(BIN, config).await;
    assert_eq!(
        levels(&local).await,
        BTreeMap::from([(2, vec!["solo".to_string()])])
    );
    let first = answer(&local, "solo").await;
    let pod = &pods(&local).await["solo"];
    assert_eq!(pod["memory"]["weightsBytes"], WEIGHTS, "{pod}");
    for round in 0..2 {
        let r = local
            .client
            .post(format!("{}/api/v1/models/solo/sleep", local.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        assert_eq!(
            levels(&local).await,
            BTreeMap::from([(1, vec!["solo".to_string()])]),
            "round {round}"
        );
        assert_eq!(ledger_host(&local).await["org/solo"], WEIGHTS);
        assert_eq!(answer(&local, "solo").await, first, "round {round}");
    }
    let m = local.metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_sleep_demotions_total",
            &[("model", "solo")]
        ),
        Some(1.0),
        "at boot only"
    );
}
