//! A real Prometheus (Debian's `prometheus` package) scrapes `greenthread local` under
//! traffic, and every example query of the monitoring page returns a plausible answer.

use std::time::Duration;

use greenthread_test_support::{LocalProc, Prometheus, TEST_CONFIG, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// The monitoring page's example queries.
pub const SEED_QUERIES: [(&str, &str); 8] = [
    (
        "wake latency p99",
        "histogram_quantile(0.99, rate(gthread_sidecar_wake_duration_seconds_bucket[5m]))",
    ),
    (
        "request rate per model",
        r#"sum by (pod) (rate(gthread_sidecar_requests_total{status="success"}[5m]))"#,
    ),
    (
        "models currently serving",
        r#"count(gthread_sidecar_state{state="serving"} == 1)"#,
    ),
    (
        "queue depth across all models",
        "sum(gthread_sidecar_queue_depth)",
    ),
    (
        "preemption rate",
        "sum(rate(gthread_sidecar_preemptions_total[5m])) by (role)",
    ),
    (
        "gpu memory per model",
        "gthread_sidecar_gpu_memory_serving_bytes",
    ),
    (
        "wakes per minute",
        "sum(rate(gthread_sidecar_wake_duration_seconds_count[5m])) * 60",
    ),
    (
        "sleeps per minute",
        "sum(rate(gthread_sidecar_sleep_duration_seconds_count[5m])) * 60",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seed_query_answers_against_a_real_prometheus() {
    let local = LocalProc::start(BIN, TEST_CONFIG).await;
    let target = local.url.trim_start_matches("http://");
    let prom = Prometheus::start(&format!(
        "  - job_name: greenthread\n    static_configs: [{{targets: ['{target}']}}]\n"
    ))
    .await;
    prom.wait_up(1).await;

    // Traffic: wakes, a preemption on gpu 1 (beta ↔ gamma), sleeps.
    for round in 0..3 {
        for model in ["alpha", "beta", "gamma", "delta"] {
            assert_eq!(
                local.chat(model, 2).send().await.unwrap().status(),
                200,
                "{model} in round {round}"
            );
        }
        let r = local
            .client
            .post(format!("{}/api/v1/models/alpha/sleep", local.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let serving_now = local
        .states()
        .await
        .values()
        .filter(|s| *s == "serving")
        .count() as f64;

    // Wait for a scrape taken after the traffic ended: the serving count alone could
    // match a scrape from the middle of a round, when a request was still queued.
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    wait_until(
        "a scrape of the final state to reach prometheus",
        Duration::from_secs(30),
        || async {
            let r = prom
                .query("min(timestamp(gthread_sidecar_queue_depth))")
                .await;
            (r.len() == 1 && r[0].1 > ended).then_some(())
        },
    )
    .await;

    let mut answers = std::collections::BTreeMap::new();
    for (name, q) in SEED_QUERIES {
        let r = prom.query(q).await;
        assert!(!r.is_empty(), "{name}: `{q}` returned nothing");
        answers.insert(name, r);
    }
    let finite = |name: &str| -> Vec<f64> {
        answers[name]
            .iter()
            .map(|(_, v)| *v)
            .filter(|v| v.is_finite())
            .collect()
    };

    let p99 = finite("wake latency p99");
    assert!(
        p99.iter().any(|v| *v > 0.0 && *v <= 120.0),
        "wake p99 {p99:?}"
    );
    let rates = &answers["request rate per model"];
    let pods: Vec<&str> = rates
        .iter()
        .filter_map(|(m, _)| m.get("pod").and_then(Value::as_str))
        .collect();
    for pod in ["alpha-0", "beta-0", "gamma-0", "delta-0"] {
        assert!(pods.contains(&pod), "{pod} has a request rate: {pods:?}");
    }
    assert!(rates.iter().all(|(_, v)| *v > 0.0));
    assert_eq!(answers["models currently serving"][0].1, serving_now);
    assert_eq!(
        answers["queue depth across all models"][0].1, 0.0,
        "nothing queued when idle"
    );
    let roles: Vec<(&str, f64)> = answers["preemption rate"]
        .iter()
        .map(|(m, v)| (m["role"].as_str().unwrap(), *v))
        .collect();
    assert!(
        roles.iter().any(|(r, v)| *r == "preempted" && *v > 0.0),
        "{roles:?}"
    );
    assert!(
        roles.iter().any(|(r, v)| *r == "preemptor" && *v > 0.0),
        "{roles:?}"
    );
    let memory = &answers["gpu memory per model"];
    assert!(
        memory
            .iter()
            .all(|(m, v)| m.contains_key("model") && m.contains_key("gpu") && *v > 0.0),
        "{memory:?}"
    );
    assert!(finite("wakes per minute")[0] > 0.0);
    assert!(finite("sleeps per minute")[0] > 0.0);
}
