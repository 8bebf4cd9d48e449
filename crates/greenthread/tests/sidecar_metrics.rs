//! The sidecar's exposition matches the monitoring page: names, types, labels, and a
//! one-hot state at every scrape.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use greenthread_test_support::{SidecarProc, scrape_text};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// (sample name, type, label key, label values) from the seed's tables.
const SEED: [(&str, &str, &str, &[&str]); 12] = [
    (
        "gthread_sidecar_state",
        "gauge",
        "state",
        &["sleeping", "pending", "waking", "serving", "deactivating"],
    ),
    (
        "gthread_sidecar_wake_duration_seconds",
        "histogram",
        "",
        &[],
    ),
    (
        "gthread_sidecar_sleep_duration_seconds",
        "histogram",
        "",
        &[],
    ),
    (
        "gthread_sidecar_requests_total",
        "counter",
        "status",
        &["success", "error"],
    ),
    ("gthread_sidecar_queue_depth", "gauge", "", &[]),
    ("gthread_sidecar_in_flight_requests", "gauge", "", &[]),
    (
        "gthread_sidecar_gpu_memory_reserved_bytes",
        "gauge",
        "gpu",
        &["0"],
    ),
    (
        "gthread_sidecar_gpu_memory_serving_bytes",
        "gauge",
        "gpu",
        &["0"],
    ),
    (
        "gthread_sidecar_preemptions_total",
        "counter",
        "role",
        &["preempted", "preemptor"],
    ),
    (
        "gthread_sidecar_preemption_barrier_timeouts_total",
        "counter",
        "",
        &[],
    ),
    (
        "gthread_sidecar_wake_deduplications_total",
        "counter",
        "",
        &[],
    ),
    (
        "gthread_sidecar_gpu_cas_conflicts_total",
        "counter",
        "",
        &[],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seed_metric_is_exposed_with_its_type_and_labels() {
    let sc = SidecarProc::start(BIN, "met", &[], &[]).await;
    let m = sc.metrics().await;
    for (name, kind, key, values) in SEED {
        assert_eq!(m.type_of(name), Some(kind), "{name}");
        if kind == "histogram" {
            let les: Vec<f64> = m
                .find(&format!("{name}_bucket"), &[])
                .map(|s| s.labels["le"].parse::<f64>().unwrap())
                .collect();
            assert_eq!(les.first(), Some(&0.01), "{name} starts at 10 ms");
            assert!(les.contains(&120.0), "{name} reaches 2 minutes");
            assert!(m.value(&format!("{name}_count"), &[]).is_some());
            continue;
        }
        if key.is_empty() {
            let s: Vec<_> = m.find(name, &[]).collect();
            assert_eq!(s.len(), 1, "{name} has one unlabeled series");
            assert!(s[0].labels.is_empty(), "{name}");
        } else {
            let got: BTreeSet<&str> = m.find(name, &[]).map(|s| s.labels[key].as_str()).collect();
            assert_eq!(got, values.iter().copied().collect(), "{name} by {key}");
        }
    }
    // The engine's own metrics are re-exported under vLLM's names.
    let engine = greenthread_test_support::Exposition::parse(
        &scrape_text(&sc.client, &format!("{}/metrics/engine", sc.private)).await,
    )
    .unwrap();
    for name in [
        "vllm:request_success_total",
        "vllm:request_duration_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:engine_sleep_state",
    ] {
        assert!(
            engine.type_of(name).is_some(),
            "{name} missing from /metrics/engine"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_state_is_set_at_every_scrape_through_a_cycle() {
    let sc = Arc::new(SidecarProc::start(BIN, "hot", &[], &["--h2d-bandwidth", "4Gi"]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (sc, stop) = (sc.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let m = sc.metrics().await;
                let on: Vec<String> = m
                    .find("gthread_sidecar_state", &[])
                    .filter(|s| s.value == 1.0)
                    .map(|s| s.labels["state"].clone())
                    .collect();
                let total: f64 = m.find("gthread_sidecar_state", &[]).map(|s| s.value).sum();
                assert_eq!(on.len(), 1, "states at 1: {on:?}");
                assert_eq!(total, 1.0);
                seen.push(on[0].clone());
            }
            seen
        })
    };
    assert_eq!(sc.chat("hot", 2, false).send().await.unwrap().status(), 200);
    assert_eq!(sc.admin("sleep").await.status(), 200);
    assert_eq!(sc.chat("hot", 2, false).send().await.unwrap().status(), 200);
    assert_eq!(sc.admin("sleep").await.status(), 200);
    stop.store(true, Ordering::SeqCst);
    let seen = scraper.await.unwrap();
    let distinct: BTreeSet<&str> = seen.iter().map(String::as_str).collect();
    assert!(seen.len() > 20, "{} scrapes", seen.len());
    assert!(
        distinct.contains("sleeping") && distinct.contains("serving"),
        "{distinct:?}"
    );
}
