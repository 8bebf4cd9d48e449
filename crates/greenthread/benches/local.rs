//! Shared-GPU benchmarks, each with its baseline in the same run:
//!
//! 1. the API server's added latency: `greenthread local` (API server → in-process
//!    sidecar → engine) against a standalone `greenthread sidecar` in front of an
//!    identical engine, and the engine called directly;
//! 2. preemption reaction time: victim named in the ledger → the victim's barrier up
//!    (the original product polls every 2 s);
//! 3. a model switch on a full GPU, broken into fairness wait, drain, engine sleep,
//!    engine wake and GreenThread's own overhead.
//!
//!     cargo bench -p greenthread --bench local

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use greenthread_api::GpuSpec;
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::{GpuRef, Sidecar, SidecarConfig, state::State};
use greenthread_test_support::{
    FakeEngine, Proc,
    bench::{ROUNDS, Stats, load, median, ms, percentile, wait_http},
    free_port, http,
};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const GI: u64 = 1 << 30;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn api_server_overhead(seconds: f64) {
    let mut procs = Vec::new();
    let (ep, sp, sa, lp) = (free_port(), free_port(), free_port(), free_port());
    let instant = [
        "--ttft",
        "0s",
        "--tokens-per-second",
        "0",
        "--boot-time",
        "0s",
    ];
    let mut engine = args(&[
        "sim-engine",
        "--model",
        "inst",
        "--listen",
        &format!("127.0.0.1:{ep}"),
    ]);
    engine.extend(args(&instant));
    procs.push(Proc::spawn(BIN, &engine));
    wait_http(&format!("http://127.0.0.1:{ep}/health")).await;
    procs.push(Proc::spawn(
        BIN,
        &args(&[
            "sidecar",
            "--model",
            "inst",
            "--engine-url",
            &format!("http://127.0.0.1:{ep}"),
            "--listen",
            &format!("127.0.0.1:{sp}"),
            "--metrics-listen",
            &format!("127.0.0.1:{sa}"),
            "--idle-timeout",
            "1h",
            "--memory-bytes",
            "3Gi",
        ]),
    ));
    wait_http(&format!("http://127.0.0.1:{sp}/ready")).await;
    http()
        .post(format!("http://127.0.0.1:{sa}/admin/wake"))
        .send()
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("local.yaml");
    std::fs::write(
        &config,
        "gpus: {simulated: [{memory: 80Gi}]}\nmodels:\n  - name: inst\n    spec: {modelName: inst, engine: sim, gpuMemoryUtilization: \"0.5\", sleep: {idleTimeout: 1h}, extraArgs: [--ttft, 0s, --tokens-per-second, \"0\", --boot-time, 0s]}\n",
    )
    .unwrap();
    procs.push(Proc::spawn(
        BIN,
        &args(&[
            "local",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{lp}"),
        ]),
    ));
    let local = format!("http://127.0.0.1:{lp}");
    wait_http(&format!("{local}/health")).await;
    greenthread_test_support::wait_until(
        "local's model to boot",
        Duration::from_secs(30),
        || async {
            let r = http()
                .post(format!("{local}/api/v1/models/inst/wake"))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;

    println!(
        "\n## 1. API server added latency (instant engine; {ROUNDS} interleaved rounds of {seconds:.1} s, medians)\n"
    );
    println!(
        "| conc | direct p50 ms | sidecar p50 ms | API server p50 ms | API server rps | sidecar rps | API server added over sidecar, p50 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let targets = [
        format!("http://127.0.0.1:{ep}"),
        format!("http://127.0.0.1:{sp}"),
        local.clone(),
    ];
    for conc in [1, 16] {
        let mut rounds: Vec<Vec<Stats>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..ROUNDS {
            for (i, t) in targets.iter().enumerate() {
                rounds[i].push(load(t, "inst", 1, conc, seconds).await);
            }
        }
        let m: Vec<Stats> = rounds.into_iter().map(median).collect();
        println!(
            "| {conc} | {} | {} | {} | {:.0} | {:.0} | {:+.3} |",
            ms(m[0].p50),
            ms(m[1].p50),
            ms(m[2].p50),
            m[2].rps,
            m[1].rps,
            (m[2].p50.as_secs_f64() - m[1].p50.as_secs_f64()) * 1e3
        );
    }
    drop(procs);
}

fn gpu_ledger() -> Arc<MemoryLedger> {
    let l = Arc::new(MemoryLedger::new());
    l.add_gpu(
        "g-0",
        GpuSpec {
            node: "bench".into(),
            index: 0,
            memory_bytes: 100 * GI,
            ..Default::default()
        },
    );
    l
}

async fn sidecar(
    l: &Arc<MemoryLedger>,
    model: &str,
    engine: Arc<FakeEngine>,
    extra: &[&str],
) -> Arc<Sidecar> {
    let mut flags = vec![
        "--memory-bytes",
        "60Gi",
        "--min-runtime",
        "0s",
        "--idle-timeout",
        "1h",
        "--max-wait-time",
        "0s",
    ];
    flags.extend_from_slice(extra);
    let sc = Sidecar::new(
        SidecarConfig::from_args(model, &flags).unwrap(),
        engine.parts(
            l.clone() as Arc<dyn Ledger>,
            GpuRef {
                name: "g-0".into(),
                index: 0,
            },
            greenthread_sidecar::Clock::Wall,
        ),
    );
    sc.boot().await.unwrap();
    sc.spawn_background();
    sc
}

/// Instant at which the ledger first names `victim` from now on.
fn victim_named(l: &MemoryLedger, victim: &str) -> tokio::task::JoinHandle<Instant> {
    let mut commits = l.commits();
    let victim = victim.to_string();
    tokio::spawn(async move {
        loop {
            let g = commits.recv().await.unwrap();
            if greenthread_ledger::decide::is_victim(&g.status, &victim) {
                return Instant::now();
            }
        }
    })
}

/// Instant at which `sc` enters `state` from now on.
fn entered(sc: &Arc<Sidecar>, state: State) -> tokio::task::JoinHandle<Instant> {
    let mut t = sc.transitions();
    tokio::spawn(async move {
        loop {
            let (_, to) = t.recv().await.unwrap();
            if to == state {
                return Instant::now();
            }
        }
    })
}

async fn preemption_reaction(rounds: usize) {
    let l = gpu_ledger();
    let a = sidecar(&l, "a", FakeEngine::new("a", 60 * GI), &[]).await;
    let b = sidecar(&l, "b", FakeEngine::new("b", 60 * GI), &[]).await;
    let mut reactions = Vec::new();
    for i in 0..rounds {
        // Alternate who preempts whom.
        let (holder, waker) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        if holder.state() != State::Serving {
            drop(holder.admit().await.unwrap());
        }
        let named = victim_named(&l, &holder.pod);
        let barrier = entered(holder, State::Deactivating);
        drop(waker.admit().await.unwrap());
        let (named, barrier) = (named.await.unwrap(), barrier.await.unwrap());
        reactions.push(barrier.saturating_duration_since(named));
    }
    reactions.sort();
    println!(
        "\n## 2. Preemption reaction time: victim named → victim's barrier up ({rounds} preemptions, in-process ledger)\n"
    );
    println!("| p50 ms | p99 ms | max ms | original product, documented (not measured here) |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} | up to 2000 (it polls every 2 s) |",
        ms(percentile(&reactions, 0.5)),
        ms(percentile(&reactions, 0.99)),
        ms(*reactions.last().unwrap())
    );
}

async fn model_switch(rounds: usize) {
    let (sleep_time, wake_time, max_wait, in_flight) = (
        Duration::from_millis(200),
        Duration::from_millis(300),
        Duration::from_millis(500),
        Duration::from_millis(150),
    );
    let l = gpu_ledger();
    let wait = format!("{}ms", max_wait.as_millis());
    let a = sidecar(
        &l,
        "a",
        FakeEngine::with_times("a", 60 * GI, sleep_time, wake_time),
        &["--max-wait-time", &wait],
    )
    .await;
    let b = sidecar(
        &l,
        "b",
        FakeEngine::with_times("b", 60 * GI, sleep_time, wake_time),
        &["--max-wait-time", &wait],
    )
    .await;
    let mut rows: Vec<[Duration; 5]> = Vec::new();
    // GreenThread's own share of each switch, signed: never clamped at zero.
    let mut overheads: Vec<f64> = Vec::new();
    for i in 0..rounds {
        let (holder, waker) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        if holder.state() != State::Serving {
            drop(holder.admit().await.unwrap());
        }
        // The holder is busy with a request when it is named: it must drain first.
        let slot = holder.admit().await.unwrap();
        let named_then_drained = {
            let named = victim_named(&l, &holder.pod);
            tokio::spawn(async move {
                let named = named.await.unwrap();
                tokio::time::sleep(in_flight).await;
                drop(slot);
                (named, Instant::now())
            })
        };
        let slept = entered(holder, State::Sleeping);
        let waking = entered(waker, State::Waking);
        let serving = entered(waker, State::Serving);
        let t0 = Instant::now();
        drop(waker.admit().await.unwrap());
        let first = Instant::now();
        let ((named, drained), slept, waking, serving) = (
            named_then_drained.await.unwrap(),
            slept.await.unwrap(),
            waking.await.unwrap(),
            serving.await.unwrap(),
        );
        let fairness = named - t0;
        let drain = drained.saturating_duration_since(named);
        let sleep = slept.saturating_duration_since(drained);
        let wake = serving.saturating_duration_since(waking);
        let total = first - t0;
        overheads
            .push((total.as_secs_f64() - (fairness + drain + sleep + wake).as_secs_f64()) * 1e3);
        rows.push([total, fairness, drain, sleep, wake]);
    }
    let med = |k: usize| {
        let mut v: Vec<Duration> = rows.iter().map(|r| r[k]).collect();
        v.sort();
        percentile(&v, 0.5)
    };
    println!(
        "\n## 3. Model switch on a full GPU ({rounds} switches, medians; engine sleep {} ms and wake {} ms simulated, maxWaitTime {} ms, the victim busy for {} ms)\n",
        sleep_time.as_millis(),
        wake_time.as_millis(),
        max_wait.as_millis(),
        in_flight.as_millis()
    );
    overheads.sort_by(f64::total_cmp);
    println!(
        "| request → first byte ms | fairness wait ms | drain ms | engine sleep ms | engine wake ms | GreenThread overhead ms, median [min, max] per switch |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {:+.3} [{:+.3}, {:+.3}] |",
        ms(med(0)),
        ms(med(1)),
        ms(med(2)),
        ms(med(3)),
        ms(med(4)),
        overheads[overheads.len() / 2],
        overheads[0],
        overheads[overheads.len() - 1]
    );
}

#[tokio::main]
async fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    api_server_overhead(seconds).await;
    preemption_reaction(40).await;
    model_switch(10).await;
}
