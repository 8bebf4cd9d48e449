//! Sidecars sharing GPUs through one ledger: the documented policy's fairness wait, the
//! cost-aware policy's standing, victim choice on both sides,
//! lock expiry (the 16-sidecar race runs on both ledgers in `ledger_backends.rs`). Real
//! sidecar and ledger code, in one process, with in-process engines, on tokio's paused
//! clock: the ledger's time follows it ([`Clock::tokio`]), so waits of seconds take none.

use std::{sync::Arc, time::Duration};

use greenthread_api::{GpuSpec, OccupantState, WakeLock};
use greenthread_ledger::{Ledger, MemoryLedger, decide};
use greenthread_sidecar::{Clock, GpuRef, Rejection, Sidecar, SidecarConfig};
use greenthread_test_support::FakeEngine;
use tokio::time::Instant;

const GI: u64 = 1 << 30;

fn ledger(gpus: &[(&str, u64)]) -> Arc<MemoryLedger> {
    let l = Arc::new(MemoryLedger::new());
    for (i, (name, mem)) in gpus.iter().enumerate() {
        l.add_gpu(
            name,
            GpuSpec {
                node: "n".into(),
                index: i as u32,
                memory_bytes: *mem,
                ..Default::default()
            },
        );
    }
    l
}

async fn sidecar(
    ledger: &Arc<MemoryLedger>,
    gpu: &str,
    model: &str,
    bytes: u64,
    args: &[&str],
) -> (Arc<Sidecar>, Arc<FakeEngine>) {
    let engine = FakeEngine::with_times(
        model,
        bytes,
        Duration::from_millis(20),
        Duration::from_millis(20),
    );
    let mem = bytes.to_string();
    let mut all = vec![
        "--memory-bytes",
        &mem,
        "--min-runtime",
        "0s",
        "--idle-timeout",
        "1h",
        "--wake-lock-ttl",
        "2s",
    ];
    all.extend_from_slice(args);
    let cfg = SidecarConfig::from_args(model, &all).unwrap();
    let sc = Sidecar::new(
        cfg,
        engine.parts(
            ledger.clone() as Arc<dyn Ledger>,
            GpuRef {
                name: gpu.into(),
                index: 0,
            },
            Clock::tokio(),
        ),
    );
    sc.boot().await.unwrap();
    sc.spawn_background();
    (sc, engine)
}

/// One request: admitted (the model serves), then done.
async fn request(sc: &Arc<Sidecar>) -> Result<(), Rejection> {
    sc.admit().await.map(drop)
}

#[tokio::test(start_paused = true)]
async fn a_model_that_does_not_fit_preempts_after_the_fairness_wait() {
    let l = ledger(&[("g-0", 100 * GI)]);
    let lru = ["--policy", "lru"];
    let (a, a_engine) = sidecar(
        &l,
        "g-0",
        "a",
        60 * GI,
        &[&lru[..], &["--min-runtime", "0s"]].concat(),
    )
    .await;
    let (b, _) = sidecar(
        &l,
        "g-0",
        "b",
        60 * GI,
        &[
            &lru[..],
            &["--max-wait-time", "300ms", "--min-runtime", "3s"],
        ]
        .concat(),
    )
    .await;
    request(&a).await.unwrap();
    assert_eq!(a.state().as_str(), "serving");

    let t = Instant::now();
    request(&b).await.unwrap();
    let took = t.elapsed();
    // On the paused clock only the policy's wait and the engines' simulated calls take
    // time: the switch is exactly maxWaitTime (300 ms) + A's sleep (20 ms) + B's wake
    // (20 ms). A needless poll or a missed wake-up would show here; how long the real
    // code takes on a real clock is the `local` benchmark's (its model-switch table).
    assert_eq!(took, Duration::from_millis(300 + 20 + 20));
    // B's status says where the wake's time went, phase by phase: the fairness wait,
    // A's drain and sleep, B's engine wake (the warm-up takes no virtual time).
    let last = &b.status_json()["lastWake"];
    assert_eq!(last["seconds"], 0.34, "{last}");
    let phases: Vec<(String, f64)> = last["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap().to_string(),
                p["seconds"].as_f64().unwrap(),
            )
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    assert_eq!(
        phases,
        [
            ("fairness wait".to_string(), 0.3),
            ("victim drain and sleep".to_string(), 0.02),
            ("engine wake".to_string(), 0.02),
        ],
        "{last}"
    );
    assert_eq!(b.state().as_str(), "serving");
    assert_eq!(a.state().as_str(), "sleeping");
    assert!(a_engine.is_asleep());
    assert_eq!(
        (
            a.metrics.preemptions("preempted"),
            a.metrics.preemptions("preemptor")
        ),
        (1, 0)
    );
    assert_eq!(
        (
            b.metrics.preemptions("preempted"),
            b.metrics.preemptions("preemptor")
        ),
        (0, 1)
    );

    // B has not served its minRuntime (3 s): A's next request waits, and says why.
    let waiting = tokio::spawn({
        let a = a.clone();
        async move { request(&a).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !waiting.is_finished(),
        "A must not preempt B before B's minRuntime"
    );
    assert_eq!(b.state().as_str(), "serving");
    let status = a.status_json();
    assert_eq!(status["state"], "pending");
    let record = l.get("g-0").await.unwrap();
    assert!(
        record
            .status
            .preemption_intents
            .iter()
            .all(|i| i.victim_pod_name.is_none())
    );
    // Once B's minRuntime has passed, A gets its turn.
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(a.state().as_str(), "serving");
    assert_eq!(b.state().as_str(), "sleeping");
    assert_eq!(b.metrics.preemptions("preempted"), 1);
    assert_eq!(a.metrics.preemptions("preemptor"), 1);
}

#[tokio::test(start_paused = true)]
async fn the_cost_aware_policy_preempts_less_demand_at_once_and_more_demand_after_a_wait() {
    let l = ledger(&[("g-0", 100 * GI)]);
    let cost_aware = ["--policy", "cost-aware", "--max-wait-time", "5s"];
    let (a, _) = sidecar(&l, "g-0", "a", 60 * GI, &cost_aware).await;
    let (b, _) = sidecar(&l, "g-0", "b", 60 * GI, &cost_aware).await;
    request(&a).await.unwrap();

    // B (1 recent request) stands at A's 1: it preempts at once, not after maxWaitTime.
    let t = Instant::now();
    request(&b).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(a.state().as_str(), "sleeping");
    assert_eq!(
        (
            a.metrics.preemptions("preempted"),
            b.metrics.preemptions("preemptor")
        ),
        (1, 1)
    );

    // B takes five more: six recent requests, reported as it goes busy and idle.
    for _ in 0..5 {
        request(&b).await.unwrap();
    }
    let reported = async {
        loop {
            let r = l.get("g-0").await.unwrap();
            if r.status
                .occupant(&b.pod)
                .is_some_and(|o| o.recent_requests == 6)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), reported)
        .await
        .expect("B's demand reaches the ledger");

    // A (now 2) stands below B's 6 and gains one every three seconds: four requests,
    // twelve seconds of waiting.
    let t = Instant::now();
    request(&a).await.unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(12),
        "waited for its standing ({took:?})"
    );
    assert!(took < Duration::from_secs(13), "{took:?}");
    assert_eq!(b.state().as_str(), "sleeping");
    assert_eq!(b.metrics.preemptions("preempted"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_voluntary_idle_sleep_inside_the_fairness_wait_is_not_a_preemption() {
    let l = ledger(&[("g-0", 100 * GI)]);
    let (a, _) = sidecar(
        &l,
        "g-0",
        "a",
        60 * GI,
        &["--policy", "lru", "--idle-timeout", "300ms"],
    )
    .await;
    let (b, _) = sidecar(
        &l,
        "g-0",
        "b",
        60 * GI,
        &["--policy", "lru", "--max-wait-time", "5s"],
    )
    .await;
    request(&a).await.unwrap();
    let t = Instant::now();
    request(&b).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "served before the fairness wait ended"
    );
    for sc in [&a, &b] {
        assert_eq!(
            sc.metrics.preemptions("preempted") + sc.metrics.preemptions("preemptor"),
            0
        );
    }
    let record = l.get("g-0").await.unwrap();
    assert!(
        record.status.preemption_intents.is_empty(),
        "the claim cleared the intent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_gpu_held_by_popular_models_makes_requests_time_out_with_the_reason() {
    let l = ledger(&[("g-0", 100 * GI)]);
    let (a, _) = sidecar(&l, "g-0", "a", 80 * GI, &["--popular"]).await;
    let (b, _) = sidecar(
        &l,
        "g-0",
        "b",
        60 * GI,
        &["--max-wait-time", "100ms", "--queue-timeout", "600ms"],
    )
    .await;
    request(&a).await.unwrap();
    let err = request(&b).await.unwrap_err();
    let Rejection::Deadline { reason, .. } = err else {
        panic!("{err:?}")
    };
    let reason = reason.to_string();
    assert!(reason.contains("popular (a)"), "{reason}");
    assert_eq!(
        a.state().as_str(),
        "serving",
        "nothing crashed, nothing preempted"
    );
    // Capacity appears: the popular model is put to sleep by an operator.
    a.deactivate("admin").await.unwrap();
    request(&b).await.unwrap();
    assert_eq!(b.state().as_str(), "serving");
}

#[tokio::test(start_paused = true)]
async fn a_wake_lock_held_by_a_dead_sidecar_expires() {
    let l = ledger(&[("g-0", 100 * GI)]);
    let (b, _) = sidecar(&l, "g-0", "b", 10 * GI, &["--wake-lock-ttl", "1s"]).await;
    // A sidecar that took the lock and died: it never heartbeats again.
    let g = l.get("g-0").await.unwrap();
    let dead = decide::Claim {
        recent_requests: 0,
        pod: "dead-0".into(),
        model: "dead".into(),
        bytes: 0,
        popular: false,
        priority: Default::default(),
        min_runtime: Duration::ZERO,
    };
    let now = jiff::Timestamp::now();
    let mut status = decide::register(&g.status, &dead, now);
    status.wake_lock = Some(WakeLock {
        pod_name: "dead-0".into(),
        since: now,
    });
    l.replace_status("g-0", &g.resource_version, status)
        .await
        .unwrap();

    let t = Instant::now();
    request(&b).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "served only after the lock lapsed ({:?})",
        t.elapsed()
    );
    let record = l.get("g-0").await.unwrap();
    assert!(record.status.wake_lock.is_none());
    assert_eq!(
        record.status.occupant("b-0").unwrap().state,
        OccupantState::Serving
    );
}
