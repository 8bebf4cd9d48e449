//! Tenants and lost writes, in one process with the real sidecar, ledger and API server
//! code: two namespaces holding a Model of the same name on the same GPU (security review
//! finding 7), and ledger writes that fail (finding 10).

use std::{sync::Arc, time::Duration};

use greenthread_api::{GpuSpec, OccupantState};
use greenthread_apiserver::{ApiServer, Auth, ModelRoute, Replica};
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{Forwarder, GpuRef, Sidecar, SidecarConfig, metrics::SidecarFamilies};
use greenthread_test_support::{FailingLedger, FakeEngine, http, wait_until};
use prometheus_client::registry::Registry;
use serde_json::Value;

const GI: u64 = 1 << 30;
const WAIT: Duration = Duration::from_secs(20);

fn ledger() -> Arc<MemoryLedger> {
    let l = Arc::new(MemoryLedger::new());
    l.add_gpu(
        "gpu-0",
        GpuSpec {
            node: "n".into(),
            index: 0,
            memory_bytes: 80 * GI,
            ..Default::default()
        },
    );
    l
}

async fn sidecar(
    ledger: Arc<dyn Ledger>,
    namespace: &str,
    args: &[&str],
) -> (Arc<Sidecar>, Arc<FakeEngine>) {
    let engine = FakeEngine::new("org/llama", 20 * GI);
    let mut all = vec![
        "--pod-name",
        "llama-0",
        "--pod-namespace",
        namespace,
        "--memory-bytes",
        "20Gi",
        "--min-runtime",
        "0s",
        "--idle-timeout",
        "1h",
        "--wake-lock-ttl",
        "600ms",
    ];
    all.extend_from_slice(args);
    let cfg = SidecarConfig::from_args("org/llama", &all).unwrap();
    let sc = Sidecar::new(
        cfg,
        engine.parts(
            ledger,
            GpuRef {
                name: "gpu-0".into(),
                index: 0,
            },
            greenthread_sidecar::Clock::Wall,
        ),
    );
    sc.boot().await.unwrap();
    sc.spawn_background();
    (sc, engine)
}

/// The occupants of gpu-0 as (pod, state, reserved).
async fn occupants(ledger: &dyn Ledger) -> Vec<(String, OccupantState, u64)> {
    let g = ledger.get("gpu-0").await.unwrap();
    let mut v: Vec<_> = g
        .status
        .occupants
        .iter()
        .map(|o| (o.pod_name.clone(), o.state, o.reserved_memory_bytes))
        .collect();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_in_two_namespaces_shares_nothing_in_the_ledger() {
    let l = ledger();
    let (a, _) = sidecar(l.clone(), "team-a", &[]).await;
    let (b, _) = sidecar(l.clone(), "team-b", &[]).await;
    a.admit().await.map(drop).unwrap();
    b.admit().await.map(drop).unwrap();
    assert_eq!(
        occupants(&*l).await,
        [
            (
                "team-a/llama-0".to_string(),
                OccupantState::Serving,
                20 * GI
            ),
            (
                "team-b/llama-0".to_string(),
                OccupantState::Serving,
                20 * GI
            ),
        ]
    );
    // One tenant's sleep releases its own memory, never the other's.
    a.deactivate("test").await.unwrap();
    assert_eq!(
        occupants(&*l).await,
        [
            ("team-a/llama-0".to_string(), OccupantState::Sleeping, 0),
            (
                "team-b/llama-0".to_string(),
                OccupantState::Serving,
                20 * GI
            ),
        ]
    );
    assert_eq!(b.state().as_str(), "serving");
    a.shutdown().await;
    assert_eq!(
        occupants(&*l).await,
        [(
            "team-b/llama-0".to_string(),
            OccupantState::Serving,
            20 * GI
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_distinct_and_a_shared_name_is_a_conflict_not_a_guess() {
    let l = ledger();
    let (a, _) = sidecar(l.clone(), "team-a", &[]).await;
    let (b, _) = sidecar(l.clone(), "team-b", &[]).await;
    let (solo, _) = sidecar(l.clone(), "team-c", &["--pod-name", "solo-0"]).await;
    let route = |ns: &str, name: &str, sc: &Arc<Sidecar>| {
        ModelRoute::new(
            ns,
            name,
            "org/llama",
            vec![Replica::local(
                sc.pod.clone(),
                sc.clone(),
                Arc::new(Forwarder::new("http://127.0.0.1:9").unwrap()),
            )],
        )
    };
    let mut registry = Registry::default();
    let families = SidecarFamilies::register(&mut registry);
    let api = ApiServer::new(
        vec![
            route("team-a", "llama", &a),
            route("team-b", "llama", &b),
            route("team-c", "solo", &solo),
        ],
        l.clone() as Arc<dyn Ledger>,
        Auth::open(),
        registry,
        families,
        Box::new(|| {}),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(greenthread_edge::serve(
        listener,
        greenthread_apiserver::router(api.clone()),
        Default::default(),
        api.shutdown.clone(),
    ));
    let web = http();
    let models: Value = web
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["team-a/llama", "team-b/llama", "solo"]);
    // The bare name and the engine id are both ambiguous: 409, naming the choices.
    for model in ["llama", "org/llama"] {
        let r = web
            .post(format!("{base}/v1/chat/completions"))
            .json(&serde_json::json!({"model": model, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409, "{model}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "model_ambiguous");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("team-a/llama") && msg.contains("team-b/llama"),
            "{msg}"
        );
    }
    // namespace/name reaches exactly that tenant's replica.
    let r = web
        .post(format!("{base}/api/v1/models/team-b/llama/wake"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(b.state().as_str(), "serving");
    assert_eq!(a.state().as_str(), "sleeping");
    let m: Value = web
        .get(format!("{base}/api/v1/models/team-b/llama"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (m["namespace"].as_str(), m["state"].as_str()),
        (Some("team-b"), Some("serving"))
    );
    assert_eq!(
        web.get(format!("{base}/api/v1/models/llama"))
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    // A unique name needs no namespace.
    let r = web
        .post(format!("{base}/api/v1/models/solo/wake"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(solo.state().as_str(), "serving");
}

/// Finding 10: marking serving failed and the pod kept the GPU's wake lock for good
/// (its heartbeat kept it alive), so nothing else on that GPU could wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_never_leaves_a_lock_or_a_reservation_behind() {
    let mem = ledger();
    let l = FailingLedger::new(mem.clone());
    let (a, _) = sidecar(l.clone(), "team-a", &[]).await;
    let pod = a.pod.clone();
    // The write that marks the pod serving fails three times (retried with backoff).
    let p = pod.clone();
    l.fail_writes(3, move |cur, next| {
        cur.occupant(&p)
            .is_some_and(|o| o.state == OccupantState::Waking)
            && next
                .occupant(&p)
                .is_some_and(|o| o.state == OccupantState::Serving)
    });
    a.admit().await.map(drop).unwrap();
    assert_eq!(l.failed.load(std::sync::atomic::Ordering::SeqCst), 3);
    let g = mem.get("gpu-0").await.unwrap();
    assert_eq!(
        g.status.occupant(&pod).unwrap().state,
        OccupantState::Serving
    );
    assert!(g.status.wake_lock.is_none(), "the lock outlived the wake");

    // Every try at the release fails (more than the retries): the heartbeat's reconcile
    // puts the record right once the ledger takes writes again.
    let p = pod.clone();
    l.fail_writes(8, move |cur, next| {
        cur.occupant(&p)
            .is_some_and(|o| o.state == OccupantState::Serving)
            && next
                .occupant(&p)
                .is_some_and(|o| o.state == OccupantState::Sleeping)
    });
    a.deactivate("test").await.unwrap();
    assert_eq!(a.state().as_str(), "sleeping");
    wait_until(
        "the reservation released by the reconcile",
        Duration::from_secs(60),
        || async {
            let g = mem.get("gpu-0").await.unwrap();
            let o = g.status.occupant(&pod)?;
            (o.state == OccupantState::Sleeping && o.reserved_memory_bytes == 0).then_some(())
        },
    )
    .await;
    assert_eq!(l.failed.load(std::sync::atomic::Ordering::SeqCst), 3 + 8);
}

/// Finding 10: the boot-time engine sleep had no timeout and ran under the wake lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_whose_engine_never_sleeps_gives_the_lock_back() {
    let l = ledger();
    let engine = FakeEngine::with_times(
        "org/llama",
        20 * GI,
        Duration::from_secs(3600),
        Duration::ZERO,
    );
    let cfg = SidecarConfig::from_args(
        "org/llama",
        &[
            "--pod-namespace",
            "team-a",
            "--memory-bytes",
            "20Gi",
            "--wake-timeout",
            "300ms",
        ],
    )
    .unwrap();
    let sc = Sidecar::new(
        cfg,
        engine.parts(
            l.clone(),
            GpuRef {
                name: "gpu-0".into(),
                index: 0,
            },
            greenthread_sidecar::Clock::Wall,
        ),
    );
    let e = tokio::time::timeout(WAIT, sc.boot())
        .await
        .expect("boot is bounded")
        .unwrap_err();
    assert!(e.to_string().contains("sleep at boot"), "{e}");
    let g = l.get("gpu-0").await.unwrap();
    assert!(
        g.status.wake_lock.is_none(),
        "the boot kept the GPU's wake lock"
    );
    assert!(
        g.status
            .occupants
            .iter()
            .all(|o| o.reserved_memory_bytes == 0),
        "{:?}",
        g.status.occupants
    );
}
