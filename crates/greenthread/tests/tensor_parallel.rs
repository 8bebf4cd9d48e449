//! Tensor-parallel sidecars, as the README describes them, in one process on tokio's
//! paused clock: a model on two GPUs preempts on each GPU where it does not fit, and two
//! such models that need each other's GPUs take turns instead of deadlocking. Real
//! sidecar and ledger code with in-process engines.

use std::{sync::Arc, time::Duration};

use greenthread_api::{GpuSpec, OccupantState};
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{Clock, GpuRef, Parts, Sidecar, SidecarConfig};
use greenthread_test_support::FakeEngine;

const GI: u64 = 1 << 30;

fn ledger(gpus: &[&str]) -> Arc<MemoryLedger> {
    let l = Arc::new(MemoryLedger::new());
    for (i, name) in gpus.iter().enumerate() {
        l.add_gpu(
            name,
            GpuSpec {
                node: "n".into(),
                index: i as u32,
                memory_bytes: 100 * GI,
                ..Default::default()
            },
        );
    }
    l
}

/// A booted sidecar for `model` reserving `bytes` on each of `gpus`.
async fn sidecar(
    l: &Arc<MemoryLedger>,
    gpus: &[&str],
    model: &str,
    bytes: u64,
    args: &[&str],
) -> Arc<Sidecar> {
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
        "--max-wait-time",
        "300ms",
        "--idle-timeout",
        "1h",
        "--wake-lock-ttl",
        "2s",
    ];
    all.extend_from_slice(args);
    let sc = Sidecar::new(
        SidecarConfig::from_args(model, &all).unwrap(),
        Parts {
            engine: engine.clone(),
            process: None,
            ledger: l.clone() as Arc<dyn Ledger>,
            gpus: gpus
                .iter()
                .map(|g| GpuRef {
                    name: g.to_string(),
                    index: g.trim_start_matches("g-").parse().unwrap(),
                })
                .collect(),
            probe: None,
            clock: Clock::tokio(),
        },
    );
    sc.start().await.unwrap().unwrap();
    sc
}

/// `pod`'s state on `gpu`, and what it reserves there.
async fn on(l: &MemoryLedger, gpu: &str, pod: &str) -> Option<(OccupantState, u64)> {
    let g = l.get(gpu).await.unwrap();
    g.status
        .occupant(pod)
        .map(|o| (o.state, o.reserved_memory_bytes))
}

#[tokio::test(start_paused = true)]
async fn a_model_on_two_gpus_preempts_on_each_gpu_where_it_does_not_fit() {
    let l = ledger(&["g-0", "g-1"]);
    let a = sidecar(&l, &["g-0"], "a", 60 * GI, &[]).await;
    let b = sidecar(&l, &["g-1"], "b", 60 * GI, &[]).await;
    drop(a.admit().await.unwrap());
    drop(b.admit().await.unwrap());
    let tp = sidecar(&l, &["g-0", "g-1"], "tp", 60 * GI, &[]).await;
    tokio::time::timeout(Duration::from_secs(30), tp.admit())
        .await
        .expect("tp is served")
        .map(drop)
        .unwrap();
    assert_eq!(
        (a.state().as_str(), b.state().as_str(), tp.state().as_str()),
        ("sleeping", "sleeping", "serving")
    );
    // One preemption per victim: tp was the preemptor twice, once on each GPU.
    assert_eq!(
        (
            a.metrics.preemptions("preempted"),
            b.metrics.preemptions("preempted"),
            tp.metrics.preemptions("preemptor")
        ),
        (1, 1, 2)
    );
    for gpu in ["g-0", "g-1"] {
        assert_eq!(
            on(&l, gpu, "tp-0").await,
            Some((OccupantState::Serving, 60 * GI))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn two_models_that_need_each_others_gpus_take_turns_instead_of_deadlocking() {
    let l = ledger(&["g-0", "g-1"]);
    // Each GPU holds one of them: x claims g-0 then g-1, y g-1 then g-0.
    let x = sidecar(&l, &["g-0", "g-1"], "x", 60 * GI, &[]).await;
    let y = sidecar(&l, &["g-1", "g-0"], "y", 60 * GI, &[]).await;
    for round in 0..3 {
        let (rx, ry) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(60), x.admit()),
            tokio::time::timeout(Duration::from_secs(60), y.admit()),
        );
        let (sx, sy) = (
            rx.unwrap_or_else(|_| panic!("round {round}: x never served (deadlock)")),
            ry.unwrap_or_else(|_| panic!("round {round}: y never served (deadlock)")),
        );
        drop((sx.unwrap(), sy.unwrap()));
    }
    // Never both at once: at most one serves, on both GPUs.
    let serving = [&x, &y]
        .iter()
        .filter(|s| s.state().as_str() == "serving")
        .count();
    assert!(serving <= 1, "both serving on GPUs that hold one");
    assert!(x.metrics.preemptions("preemptor") + y.metrics.preemptions("preemptor") >= 2);
}

/// A tensor-parallel wake that waits on one GPU holds nothing on the others: neither
/// memory nor the wake lock, so another model can wake there meanwhile.
#[tokio::test(start_paused = true)]
async fn a_waiting_tensor_parallel_wake_holds_nothing_on_its_other_gpus() {
    let l = ledger(&["g-0", "g-1"]);
    let other = sidecar(&l, &["g-1"], "other", 60 * GI, &[]).await;
    let tp = sidecar(&l, &["g-0", "g-1"], "tp", 60 * GI, &[]).await;
    // A request in flight: `other` cannot sleep until it ends (or its 30 s drain timeout).
    let busy = other.admit().await.unwrap();
    let waking = tokio::spawn({
        let tp = tp.clone();
        async move { tp.admit().await.map(drop) }
    });
    // Well past the fairness wait, `other` is tp's victim on g-1 and still draining.
    tokio::time::sleep(Duration::from_secs(10)).await;
    if waking.is_finished() {
        panic!("tp cannot serve while other drains: {:?}", waking.await);
    }
    assert_eq!(
        on(&l, "g-1", "other-0").await.map(|o| o.0),
        Some(OccupantState::Serving)
    );
    let g0 = l.get("g-0").await.unwrap();
    assert_eq!(
        on(&l, "g-0", "tp-0").await.map(|o| o.1).unwrap_or(0),
        0,
        "tp reserves nothing on g-0 while it waits on g-1: {:?}",
        g0.status
    );
    assert!(
        g0.status.wake_lock.is_none(),
        "tp holds no wake lock on g-0 while it waits on g-1: {:?}",
        g0.status.wake_lock
    );
    // So another model wakes on g-0 meanwhile.
    let c = sidecar(&l, &["g-0"], "c", 50 * GI, &[]).await;
    tokio::time::timeout(Duration::from_secs(5), c.admit())
        .await
        .expect("c wakes on g-0 while tp waits on g-1")
        .map(drop)
        .unwrap();
    assert_eq!(c.state().as_str(), "serving");
    // Once other drains, tp takes both GPUs (preempting the now idle c on g-0).
    drop(busy);
    tokio::time::timeout(Duration::from_secs(60), waking)
        .await
        .expect("tp is served once other drains")
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            other.state().as_str(),
            c.state().as_str(),
            tp.state().as_str()
        ),
        ("sleeping", "sleeping", "serving")
    );
    for gpu in ["g-0", "g-1"] {
        assert_eq!(
            on(&l, gpu, "tp-0").await,
            Some((OccupantState::Serving, 60 * GI))
        );
    }
}
