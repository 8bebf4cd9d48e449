//! Sidecars on the Kubernetes ledger (GPU objects behind the fake API server, through a
//! real `kube::Client`): API requests and bytes per wake, and wake latency with 64
//! sidecars sharing 8 GPUs under random traffic; the in-memory ledger alongside as the
//! baseline.
//!
//!     cargo bench -p greenthread --bench kube

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use greenthread_api::{GpuResource, GpuSpec};
use greenthread_ledger::{KubeLedger, Ledger, MemoryLedger};
use greenthread_sidecar::{GpuRef, Sidecar, SidecarConfig, state::State};
use greenthread_test_support::{
    FakeApiServer, FakeEngine,
    bench::{ROUNDS, median_round, ms, paired, percentile},
};
use kube::{Api, api::PostParams};

const GI: u64 = 1 << 30;

fn spec(i: u32) -> GpuSpec {
    GpuSpec {
        node: "n1".into(),
        index: i,
        uuid: format!("GPU-{i}"),
        product: "H100".into(),
        memory_bytes: 80 * GI,
        host_memory_bytes: None,
    }
}

async fn sidecar(ledger: Arc<dyn Ledger>, model: &str, gpu: u32, bytes: &str) -> Arc<Sidecar> {
    let engine = FakeEngine::with_times(
        model,
        30 * GI,
        Duration::from_millis(5),
        Duration::from_millis(20),
    );
    let cfg = SidecarConfig::from_args(
        model,
        &[
            "--memory-bytes",
            bytes,
            "--min-runtime",
            "0s",
            "--max-wait-time",
            "100ms",
            "--idle-timeout",
            "200ms",
            "--wake-lock-ttl",
            "30s",
        ],
    )
    .unwrap();
    let sc = Sidecar::new(
        cfg,
        engine.parts(
            ledger,
            GpuRef {
                name: format!("n1-{gpu}"),
                index: gpu,
            },
            greenthread_sidecar::Clock::Wall,
        ),
    );
    sc.boot().await.unwrap();
    sc.spawn_background();
    sc
}

async fn per_wake() {
    let server = FakeApiServer::start().await;
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    api.create(&PostParams::default(), &GpuResource::new("n1-0", spec(0)))
        .await
        .unwrap();
    let ledger: Arc<dyn Ledger> = Arc::new(KubeLedger::new(server.client(), "gt").await.unwrap());
    let sc = sidecar(ledger, "m", 0, "30Gi").await;
    let cycles = 50;
    let (req0, put0, bytes0) = (
        server.store.requests(""),
        server.store.requests("PUT"),
        server.store.bytes(),
    );
    for _ in 0..cycles {
        drop(sc.admit().await.unwrap());
        sc.deactivate("bench").await.unwrap();
    }
    let requests = (server.store.requests("") - req0) as f64 / cycles as f64;
    let bytes = (server.store.bytes() - bytes0) as f64 / cycles as f64;
    let writes = (server.store.requests("PUT") - put0) as f64 / cycles as f64;
    println!(
        "\n## API requests per wake (one sidecar, {cycles} wake + sleep cycles; writes are status replaces, reads come from the watch)\n"
    );
    println!(
        "| API requests per wake+sleep | of which status writes | request body bytes per wake+sleep |"
    );
    println!("|---|---|---|");
    println!("| {requests:.1} | {writes:.1} | {bytes:.0} |");
}

async fn crowd(kube: bool, seconds: u64) -> (Vec<Duration>, u64) {
    let server = FakeApiServer::start().await;
    let memory = Arc::new(MemoryLedger::with_latency(Duration::from_micros(300)));
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    for g in 0..8 {
        api.create(
            &PostParams::default(),
            &GpuResource::new(&format!("n1-{g}"), spec(g)),
        )
        .await
        .unwrap();
        memory.add_gpu(&format!("n1-{g}"), spec(g));
    }
    let mut sidecars = Vec::new();
    for i in 0..64u32 {
        // Each sidecar has its own client and watch, as pods do.
        let ledger: Arc<dyn Ledger> = if kube {
            Arc::new(KubeLedger::new(server.client(), "gt").await.unwrap())
        } else {
            memory.clone()
        };
        sidecars.push(sidecar(ledger, &format!("m{i}"), i % 8, "30Gi").await);
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (i, sc) in sidecars.iter().enumerate() {
        let sc = sc.clone();
        tasks.push(tokio::spawn(async move {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 * 0x1234_5678);
            let mut rand = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % 1000
            };
            let mut wakes = Vec::new();
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(200 + rand() * 3)).await;
                let asleep = sc.state() == State::Sleeping;
                let t = Instant::now();
                if let Ok(slot) = sc.admit().await {
                    if asleep {
                        wakes.push(t.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(rand() / 20)).await;
                    drop(slot);
                }
            }
            wakes
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let conflicts = sidecars.iter().map(|s| s.metrics.cas_conflicts.get()).sum();
    (all, conflicts)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    per_wake().await;
    let seconds = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!(
        "\n## 64 sidecars on 8 GPUs (3 fit per GPU), the same random traffic for {seconds} s on each ledger: wake latency (request to a sleeping model → admitted)\n"
    );
    println!(
        "{ROUNDS} rounds, each running the in-memory ledger (0.3 ms per call) and then the Kubernetes one (the fake API server, through kube::Client). The absolute columns are one round's (the round with the median p50 difference); the paired columns are the median of the per-round differences [min, max], never clamped.\n"
    );
    println!(
        "| in-memory wakes | in-memory p50 ms | in-memory p99 ms | Kubernetes wakes | Kubernetes p50 ms | Kubernetes p99 ms | Kubernetes CAS conflicts | p50 added by Kubernetes ms | p99 added by Kubernetes ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // Per round: (memory wakes, kube wakes, kube's conflicts).
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let memory = crowd(false, seconds).await;
        let kube = crowd(true, seconds).await;
        rounds.push((memory.0, kube.0, kube.1));
    }
    let at = |w: &Vec<Duration>, p: f64| percentile(w, p).as_secs_f64() * 1e3;
    let (m, k, conflicts) = median_round(&rounds, |r| at(&r.1, 0.5) - at(&r.0, 0.5));
    let signed = |x: f64| format!("{x:+.3}");
    println!(
        "| {} | {} | {} | {} | {} | {} | {conflicts} | {} | {} |",
        m.len(),
        ms(percentile(m, 0.5)),
        ms(percentile(m, 0.99)),
        k.len(),
        ms(percentile(k, 0.5)),
        ms(percentile(k, 0.99)),
        paired(&rounds, |r| at(&r.1, 0.5) - at(&r.0, 0.5), signed),
        paired(&rounds, |r| at(&r.1, 0.99) - at(&r.0, 0.99), signed),
    );
}
