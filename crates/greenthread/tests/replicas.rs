//! Replicas that share the load, through `greenthread local`: requests go to the least
//! loaded serving replica, and a sleeping replica wakes when every serving one has
//! `scaleOut` requests outstanding.

use std::time::Duration;

use greenthread_test_support::{LocalProc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// Two replicas of one model, on two GPUs; an answer of `max_tokens` takes that many
/// seconds (one token a second), so requests stay outstanding while the test looks.
const CONFIG: &str = r#"
gpus:
  simulated:
    - {memory: 10Gi}
    - {memory: 10Gi}
models:
  - name: duo
    spec:
      modelName: org/duo
      engine: sim
      replicas: 2
      scaleOut: 2
      gpuMemoryUtilization: "0.5"
      sleep: {idleTimeout: 1h}
      extraArgs: [--boot-time, 0s, --h2d-bandwidth, 64Gi, --ttft, 1ms, --tokens-per-second, "1"]
"#;

/// Each replica's (state, requests in flight at its sidecar), by pod.
async fn pods(local: &LocalProc) -> Vec<(String, String, u64)> {
    let m = local.get_json("/api/v1/models/duo").await;
    m["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap_or_default().to_string(),
                p["state"].as_str().unwrap().to_string(),
                p["queue"]["inFlight"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_loaded_replica_answers_and_a_busy_model_wakes_another() {
    let local = LocalProc::start(BIN, CONFIG).await;
    let long = |local: &LocalProc| tokio::spawn(local.chat("duo", 600).send());
    let in_flight = |want: u64| {
        let local = &local;
        async move {
            wait_until(
                &format!("{want} requests in flight"),
                Duration::from_secs(30),
                || async move {
                    let total: u64 = pods(local).await.iter().map(|p| p.2).sum();
                    (total == want).then_some(())
                },
            )
            .await
        }
    };

    // One replica wakes for the first request, not both.
    let mut held = vec![long(&local)];
    in_flight(1).await;
    let states: Vec<String> = pods(&local).await.into_iter().map(|p| p.1).collect();
    assert_eq!(
        states.iter().filter(|s| *s == "serving").count(),
        1,
        "{states:?}"
    );
    // A second: one outstanding is below scaleOut (2), nothing else wakes.
    held.push(long(&local));
    in_flight(2).await;
    assert!(pods(&local).await.iter().any(|p| p.1 == "sleeping"));

    // A third finds the serving replica at scaleOut: the other one wakes.
    held.push(long(&local));
    in_flight(3).await;
    wait_until(
        "the second replica to serve",
        Duration::from_secs(30),
        || async {
            pods(&local)
                .await
                .iter()
                .all(|p| p.1 == "serving")
                .then_some(())
        },
    )
    .await;

    // Six more at once: they go to the idle replica until both carry as much, then
    // alternate. Everything on the first replica (3 + 6 against 0) would be the old
    // first-serving rule.
    for _ in 0..6 {
        held.push(long(&local));
    }
    in_flight(9).await;
    // What an autoscaler reads: the API server's count of the same requests.
    assert_eq!(
        local.metrics().await.value(
            "gthread_apiserver_requests_in_flight",
            &[("model_namespace", "local"), ("model", "duo")]
        ),
        Some(9.0)
    );
    let load: Vec<u64> = pods(&local).await.into_iter().map(|p| p.2).collect();
    assert!(
        load.len() == 2 && load[0].abs_diff(load[1]) <= 2,
        "in flight per replica: {load:?}"
    );
    for h in held {
        h.abort();
    }
}
