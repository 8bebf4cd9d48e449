//! A soak of `greenthread local`: four models on two GPUs under skewed Poisson traffic
//! through the API server, for `GT_SOAK_SECONDS` (120 by default). Every request is
//! answered or given a clear error, none is lost or hangs, the ledger never over-commits,
//! and it is consistent once traffic stops.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use greenthread_api::GpuStatus;
use greenthread_test_support::{LocalProc, TEST_CONFIG, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// xorshift64*: a seeded, dependency-free generator for arrivals and model choice.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Default)]
struct Outcomes {
    sent: AtomicU64,
    ok: AtomicU64,
    clear_errors: AtomicU64,
    bad: AtomicU64,
}

fn check_no_overcommit(gpus: &serde_json::Value) {
    for g in gpus["items"].as_array().unwrap() {
        let memory = g["spec"]["memoryBytes"].as_u64().unwrap();
        let committed = greenthread_test_support::charged_bytes(&g["status"]);
        assert!(
            committed <= memory,
            "over-commit on {}: {committed} > {memory}",
            g["metadata"]["name"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_four_models_on_two_gpus() {
    let seconds: u64 = std::env::var("GT_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    // Idle sleeps and preemptions both happen: short idle timeouts, short fairness waits.
    let config = TEST_CONFIG
        .replace("idleTimeout: 1h", "idleTimeout: 1500ms")
        .replace("minRuntime: 0s", "minRuntime: 300ms");
    let local = Arc::new(LocalProc::start(BIN, &config).await);
    let outcomes = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));

    let monitor = {
        let (local, stop) = (local.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.load(Ordering::SeqCst) {
                check_no_overcommit(&local.get_json("/api/v1/gpus").await);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        })
    };

    // Skewed popularity: alpha most, then beta, gamma, delta.
    let weights = [
        ("alpha", 0.45),
        ("beta", 0.25),
        ("gamma", 0.2),
        ("delta", 0.1),
    ];
    let rate = 12.0; // requests per second, all models together
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    while Instant::now() < end {
        let gap = -(1.0 - rng.next_f64()).ln() / rate;
        tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        let mut pick = rng.next_f64();
        let model = weights.iter().find(|(_, w)| {
            pick -= w;
            pick <= 0.0
        });
        let model = model.map_or("delta", |(m, _)| m);
        let stream = rng.next_f64() < 0.3;
        let (local, outcomes) = (local.clone(), outcomes.clone());
        outcomes.sent.fetch_add(1, Ordering::SeqCst);
        tasks.push(tokio::spawn(async move {
            let req = local
                .client
                .post(format!("{}/v1/chat/completions", local.url))
                .timeout(Duration::from_secs(120))
                .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "soak"}], "max_tokens": 8, "stream": stream}));
            let outcome = match req.send().await {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(body) if (stream && body.ends_with("data: [DONE]\n\n")) || (!stream && body.contains("\"choices\"")) => &outcomes.ok,
                    _ => &outcomes.bad,
                },
                Ok(r) => {
                    let status = r.status();
                    let body: Option<serde_json::Value> = r.json().await.ok();
                    let clear = body.as_ref().and_then(|b| b["error"]["message"].as_str()).is_some_and(|m| !m.is_empty());
                    if clear {
                        eprintln!("clear error {status}: {}", body.unwrap()["error"]["message"]);
                        &outcomes.clear_errors
                    } else {
                        &outcomes.bad
                    }
                }
                Err(e) => {
                    eprintln!("lost or hung: {e}");
                    &outcomes.bad
                }
            };
            outcome.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let samples = monitor.await.unwrap();

    let (sent, ok, clear, bad) = (
        outcomes.sent.load(Ordering::SeqCst),
        outcomes.ok.load(Ordering::SeqCst),
        outcomes.clear_errors.load(Ordering::SeqCst),
        outcomes.bad.load(Ordering::SeqCst),
    );
    eprintln!(
        "soak: {sent} sent, {ok} ok, {clear} clear errors, {bad} bad; {samples} ledger samples"
    );
    assert_eq!(ok + clear + bad, sent, "every request was accounted for");
    assert_eq!(
        bad, 0,
        "no request lost, hung or answered without a clear error"
    );
    assert!(ok > sent * 9 / 10, "most requests are served ({ok}/{sent})");
    assert!(samples > 100);

    // Quiet again: the ledger is consistent with the sidecars, and nothing is left behind.
    // Idle models still go to sleep (1.5 s after their last request), so the two are
    // compared on one snapshot taken where both say the same, serving or sleeping.
    let (gpus, states) = wait_until(
        "every model serving or sleeping, as the ledger says",
        Duration::from_secs(30),
        || async {
            let gpus = local.get_json("/api/v1/gpus").await;
            let states = local.states().await;
            let settled = states.values().all(|s| s == "serving" || s == "sleeping");
            let agree = gpus["items"].as_array()?.iter().all(|g| {
                g["status"]["occupants"].as_array().is_some_and(|os| {
                    os.iter().all(|o| {
                        let pod = o["podName"].as_str().unwrap_or_default();
                        states.get(pod.trim_end_matches("-0")).map(String::as_str)
                            == o["state"].as_str()
                    })
                })
            });
            (settled && agree).then_some((gpus, states))
        },
    )
    .await;
    check_no_overcommit(&gpus);
    for g in gpus["items"].as_array().unwrap() {
        let status: GpuStatus = serde_json::from_value(g["status"].clone()).unwrap();
        assert!(
            status.wake_lock.is_none(),
            "stale wake lock: {:?}",
            status.wake_lock
        );
        assert!(
            status.preemption_intents.is_empty(),
            "stale intents: {:?}",
            status.preemption_intents
        );
        for o in &status.occupants {
            let model = o.pod_name.trim_end_matches("-0");
            assert_eq!(
                o.state.as_str(),
                states[model],
                "ledger and sidecar agree on {}",
                o.pod_name
            );
            if o.state.as_str() == "sleeping" {
                assert_eq!(
                    o.reserved_memory_bytes, 0,
                    "no reservation kept by sleeping {}",
                    o.pod_name
                );
            }
        }
    }
    let m = local.metrics().await;
    let preempted: f64 = m
        .find(
            "gthread_sidecar_preemptions_total",
            &[("role", "preempted")],
        )
        .map(|s| s.value)
        .sum();
    let sleeps: f64 = m
        .find("gthread_sidecar_sleep_duration_seconds_count", &[])
        .map(|s| s.value)
        .sum();
    eprintln!("soak: {preempted} preemptions, {sleeps} sleeps");
    assert!(sleeps > 0.0, "models went to sleep during the soak");
    assert!(
        preempted > 0.0,
        "the setup makes models preempt each other: beta and gamma do not fit together"
    );
}
