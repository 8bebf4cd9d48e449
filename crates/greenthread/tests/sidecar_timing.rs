//! The sidecar's clocks and its end, in one process on tokio's paused clock: the idle
//! timer sleeps a model exactly at `idleTimeout`, never before `minRuntime`, a request in
//! flight holds it awake, and a stopped sidecar leaves no task behind. Real sidecar and
//! ledger code with an in-process engine; waits of minutes take no time.

use std::{sync::Arc, time::Duration};

use greenthread_api::GpuSpec;
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{Clock, GpuRef, Rejection, Sidecar, SidecarConfig, state::State};
use greenthread_test_support::FakeEngine;
use tokio::time::Instant;

const GI: u64 = 1 << 30;

fn ledger() -> Arc<MemoryLedger> {
    let l = Arc::new(MemoryLedger::new());
    l.add_gpu(
        "g-0",
        GpuSpec {
            node: "n".into(),
            index: 0,
            memory_bytes: 100 * GI,
            ..Default::default()
        },
    );
    l
}

fn sidecar(l: &Arc<MemoryLedger>, model: &str, bytes: u64, args: &[&str]) -> Arc<Sidecar> {
    let engine = FakeEngine::with_times(
        model,
        bytes,
        Duration::from_millis(50),
        Duration::from_millis(50),
    );
    let mem = bytes.to_string();
    let mut all = vec!["--memory-bytes", &mem, "--wake-lock-ttl", "2s"];
    all.extend_from_slice(args);
    Sidecar::new(
        SidecarConfig::from_args(model, &all).unwrap(),
        engine.parts(
            l.clone() as Arc<dyn Ledger>,
            GpuRef {
                name: "g-0".into(),
                index: 0,
            },
            Clock::tokio(),
        ),
    )
}

async fn booted(l: &Arc<MemoryLedger>, model: &str, bytes: u64, args: &[&str]) -> Arc<Sidecar> {
    let sc = sidecar(l, model, bytes, args);
    sc.start().await.unwrap().unwrap();
    sc
}

/// Waits (in virtual time) until `sc` is in `state`; when it got there.
async fn until(sc: &Sidecar, state: State) -> Instant {
    let mut states = sc.subscribe();
    tokio::time::timeout(
        Duration::from_secs(24 * 3600),
        states.wait_for(|s| *s == state),
    )
    .await
    .unwrap_or_else(|_| panic!("never {state}"))
    .unwrap();
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn an_idle_model_sleeps_at_its_idle_timeout_and_not_before() {
    let l = ledger();
    let sc = booted(
        &l,
        "m",
        10 * GI,
        &["--idle-timeout", "5m", "--min-runtime", "0s"],
    )
    .await;
    sc.admit().await.unwrap();
    let served = Instant::now();
    assert_eq!(sc.state(), State::Serving);
    let slept = until(&sc, State::Deactivating).await;
    let idle = slept - served;
    assert!(
        idle >= Duration::from_secs(300) && idle < Duration::from_secs(301),
        "slept after {idle:?} idle, not 5m"
    );
    until(&sc, State::Sleeping).await;
    let record = l.get("g-0").await.unwrap();
    assert_eq!(
        record.status.occupant("m-0").unwrap().reserved_memory_bytes,
        0
    );
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_holds_the_model_awake_and_its_end_restarts_the_clock() {
    let l = ledger();
    let sc = booted(
        &l,
        "m",
        10 * GI,
        &["--idle-timeout", "1m", "--min-runtime", "0s"],
    )
    .await;
    let slot = sc.admit().await.unwrap();
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    assert_eq!(
        sc.state(),
        State::Serving,
        "a request in flight holds it awake"
    );
    drop(slot);
    let ended = Instant::now();
    let slept = until(&sc, State::Deactivating).await;
    assert!(
        slept - ended >= Duration::from_secs(60),
        "the clock restarts when the request ends ({:?})",
        slept - ended
    );
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn min_runtime_keeps_a_model_awake_past_its_idle_timeout() {
    let l = ledger();
    let sc = booted(
        &l,
        "m",
        10 * GI,
        &["--idle-timeout", "10s", "--min-runtime", "2m"],
    )
    .await;
    sc.admit().await.unwrap();
    let served = Instant::now();
    let slept = until(&sc, State::Deactivating).await;
    let ran = slept - served;
    assert!(
        ran >= Duration::from_secs(120) && ran < Duration::from_secs(121),
        "slept after {ran:?}, not at minRuntime 2m"
    );
    sc.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stopped_sidecar_leaves_no_task_behind() {
    let runtime = tokio::runtime::Handle::current().metrics();
    let before = runtime.num_alive_tasks();
    let l = ledger();
    // A serves and holds 60 Gi; B waits for memory (its wake loops on the ledger).
    let a = booted(
        &l,
        "a",
        60 * GI,
        &["--idle-timeout", "1h", "--min-runtime", "1h"],
    )
    .await;
    let b = booted(&l, "b", 60 * GI, &["--queue-timeout", "1h"]).await;
    a.admit().await.unwrap();
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.admit().await.map(drop) }
    });
    until(&b, State::Pending).await;
    assert!(a.tasks_running() > 0 && b.tasks_running() > 0);

    for sc in [&a, &b] {
        sc.shutdown().await;
        assert_eq!(
            sc.tasks_running(),
            0,
            "{}: tasks left after shutdown",
            sc.pod
        );
    }
    let rejected = waiting.await.unwrap().unwrap_err();
    assert!(
        matches!(rejected, Rejection::Failed(_)) && rejected.to_string().contains("shutting down"),
        "{rejected}"
    );
    // Nothing else holds either sidecar: no task, no loop, no timer.
    let (weak_a, weak_b) = (Arc::downgrade(&a), Arc::downgrade(&b));
    drop((a, b));
    assert!(
        weak_a.upgrade().is_none() && weak_b.upgrade().is_none(),
        "a stopped sidecar is still referenced"
    );
    assert_eq!(
        runtime.num_alive_tasks(),
        before,
        "tasks still alive in the runtime"
    );
    // And nothing of theirs is left in the ledger.
    assert!(l.get("g-0").await.unwrap().status.occupants.is_empty());
}
