//! One behavioural suite, run on both ledger backends: the in-memory one, and the
//! Kubernetes one (GPU status subresource) against the fake API server through a real
//! `kube::Client`.

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, TryStreamExt};
use greenthread_api::{GpuResource, GpuSpec, GpuStatus};
use greenthread_ledger::{KubeLedger, Ledger, LedgerError, MemoryLedger};
use greenthread_sidecar::{GpuRef, Sidecar, SidecarConfig};
use greenthread_test_support::{FakeApiServer, FakeEngine};
use kube::{
    Api,
    api::{PostParams, WatchEvent, WatchParams},
};
use tokio::sync::mpsc;

const GI: u64 = 1 << 30;
const GPU: &str = "n1-0";

fn spec() -> GpuSpec {
    GpuSpec {
        node: "n1".into(),
        index: 0,
        uuid: "GPU-1".into(),
        product: "H100".into(),
        memory_bytes: 100 * GI,
        host_memory_bytes: None,
    }
}

/// Ledger handles (one per participant, as each sidecar has its own) and a stream of
/// every committed record of the GPU.
struct Backend {
    ledgers: Vec<Arc<dyn Ledger>>,
    /// Every committed record: resource version, GPU memory, status.
    commits: mpsc::UnboundedReceiver<(String, u64, GpuStatus)>,
    _server: Option<FakeApiServer>,
}

async fn memory(participants: usize) -> Backend {
    // A millisecond per call, as over a network, so read-modify-writes interleave.
    let l = Arc::new(MemoryLedger::with_latency(Duration::from_millis(1)));
    l.add_gpu(GPU, spec());
    let mut commits = l.commits();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(g) = commits.recv().await {
            let _ = tx.send((g.resource_version, g.spec.memory_bytes, g.status));
        }
    });
    Backend {
        ledgers: (0..participants)
            .map(|_| l.clone() as Arc<dyn Ledger>)
            .collect(),
        commits: rx,
        _server: None,
    }
}

async fn kube(participants: usize) -> Backend {
    let server = FakeApiServer::start().await;
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    api.create(&PostParams::default(), &GpuResource::new(GPU, spec()))
        .await
        .unwrap();
    // The observer watches the API server itself: every write is an event.
    let stream = api.watch(&WatchParams::default(), "0").await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = stream.boxed();
        while let Ok(Some(e)) = stream.try_next().await {
            if let WatchEvent::Added(r) | WatchEvent::Modified(r) = e {
                let _ = tx.send((
                    r.metadata.resource_version.clone().unwrap_or_default(),
                    r.spec.memory_bytes,
                    r.status.unwrap_or_default(),
                ));
            }
        }
    });
    let mut ledgers: Vec<Arc<dyn Ledger>> = Vec::new();
    for _ in 0..participants {
        ledgers.push(Arc::new(
            KubeLedger::new(server.client(), "gt").await.unwrap(),
        ));
    }
    Backend {
        ledgers,
        commits: rx,
        _server: Some(server),
    }
}

async fn compare_and_swap(b: Backend) {
    let l = &b.ledgers[0];
    let first = l.get(GPU).await.unwrap();
    let mut rx = l.watch(GPU).unwrap();
    let status = GpuStatus {
        available_memory_bytes: Some(5),
        ..Default::default()
    };
    let written = l
        .replace_status(GPU, &first.resource_version, status.clone())
        .await
        .unwrap();
    assert_ne!(written.resource_version, first.resource_version);
    assert_eq!(written.status.available_memory_bytes, Some(5));
    let stale = l
        .replace_status(GPU, &first.resource_version, status)
        .await
        .unwrap_err();
    assert!(matches!(stale, LedgerError::Conflict { .. }), "{stale:?}");
    // The watch delivers the committed record.
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|g| g.resource_version == written.resource_version),
    )
    .await
    .expect("the watch sees the write")
    .unwrap();
    assert!(matches!(l.get("nope").await, Err(LedgerError::NotFound(_))));
}

async fn sixteen_sidecars_race(mut b: Backend) {
    let mut sidecars = Vec::new();
    for (i, ledger) in b.ledgers.iter().enumerate() {
        let model = format!("m{i}");
        let engine = FakeEngine::new(&model, 30 * GI);
        let cfg = SidecarConfig::from_args(
            &model,
            &[
                "--memory-bytes",
                "30Gi",
                "--min-runtime",
                "0s",
                "--max-wait-time",
                "50ms",
                "--idle-timeout",
                "100ms",
            ],
        )
        .unwrap();
        let sc = Sidecar::new(
            cfg,
            engine.parts(
                ledger.clone(),
                GpuRef {
                    name: GPU.into(),
                    index: 0,
                },
                greenthread_sidecar::Clock::Wall,
            ),
        );
        sidecars.push(sc);
    }
    futures_util::future::join_all(sidecars.iter().map(|s| s.boot()))
        .await
        .into_iter()
        .for_each(|r| r.unwrap());
    for s in &sidecars {
        s.spawn_background();
    }
    let tasks: Vec<_> = sidecars
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            let sc = sc.clone();
            tokio::spawn(async move {
                for j in 0..3 {
                    let slot = sc
                        .admit()
                        .await
                        .expect("every request is served eventually");
                    tokio::time::sleep(Duration::from_millis(((i * 7 + j * 13) % 40) as u64)).await;
                    drop(slot);
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("the race converges");
    let conflicts: u64 = sidecars.iter().map(|s| s.metrics.cas_conflicts.get()).sum();
    assert!(conflicts > 0, "16 racing sidecars conflict at least once");
    // Every committed record up to the last one: never more charged than the GPU has.
    // The observer's stream is drained to the record's final version before judging.
    let last = b.ledgers[0].get(GPU).await.unwrap().resource_version;
    let mut seen = 0;
    let mut reached = false;
    while !reached {
        let (rv, memory, status) = tokio::time::timeout(Duration::from_secs(20), b.commits.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("the observer never saw version {last} ({seen} commits seen)")
            })
            .expect("the observer runs");
        reached = rv == last;
        let charged =
            greenthread_test_support::charged_bytes(&serde_json::to_value(&status).unwrap());
        assert!(
            charged <= memory,
            "over-commit: {charged} > {memory}: {status:?}"
        );
        seen += 1;
    }
    assert!(seen > 16, "observed {seen} commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_compare_and_swap() {
    compare_and_swap(memory(1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_compare_and_swap() {
    compare_and_swap(kube(1).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_sixteen_sidecars_race() {
    sixteen_sidecars_race(memory(16).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_sixteen_sidecars_race() {
    sixteen_sidecars_race(kube(16).await).await;
}
