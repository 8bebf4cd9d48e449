//! Shared-GPU benchmarks, each with its baseline in the same run:
//!
//! 1. the API server's added latency: `greenthread local` (API server → in-process
//!    sidecar → engine) against a standalone `greenthread sidecar` in front of an
//!    identical engine, and the engine called directly;
//! 2. preemption reaction time: victim named in the ledger → the victim's barrier up
//!    (the original product polls every 2 s);
//! 3. a model switch on a full GPU, broken into fairness wait, drain, engine sleep,
//!    engine wake (timed inside the engines) and GreenThread's own overhead, per switch.
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
    bench::{ROUNDS, Stats, interleaved, median_round, ms, paired, percentile, wait_http},
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
        "\n## 1. API server added latency (instant engine; {ROUNDS} rounds of {seconds:.1} s, each running direct, sidecar and API server back to back)\n"
    );
    println!(
        "The absolute columns are one round's (the round with the median API server/sidecar ratio); the paired columns are the median of the per-round values [min, max], never clamped.\n"
    );
    println!(
        "| conc | direct p50 ms | sidecar p50 ms | API server p50 ms | sidecar rps | API server rps | API server added over sidecar, p50 ms | API server/sidecar rps |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let targets = [
        format!("http://127.0.0.1:{ep}"),
        format!("http://127.0.0.1:{sp}"),
        local.clone(),
    ];
    for conc in [1, 16] {
        let rounds = interleaved(&targets, "inst", 1, conc, seconds).await;
        let p50 = |x: &Stats| x.p50.as_secs_f64() * 1e3;
        let ratio = |r: &[Stats; 3]| r[2].rps / r[1].rps;
        let [d, sc, api] = median_round(&rounds, ratio);
        println!(
            "| {conc} | {} | {} | {} | {:.0} | {:.0} | {} | {} |",
            ms(d.p50),
            ms(sc.p50),
            ms(api.p50),
            sc.rps,
            api.rps,
            paired(&rounds, |r| p50(&r[2]) - p50(&r[1]), |x| format!("{x:+.3}")),
            paired(&rounds, ratio, |x| format!("{:.1} %", 100.0 * x)),
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
    let engines = [
        FakeEngine::with_times("a", 60 * GI, sleep_time, wake_time),
        FakeEngine::with_times("b", 60 * GI, sleep_time, wake_time),
    ];
    let a = sidecar(&l, "a", engines[0].clone(), &["--max-wait-time", &wait]).await;
    let b = sidecar(&l, "b", engines[1].clone(), &["--max-wait-time", &wait]).await;
    // Per switch: request → admitted, fairness wait, drain, engine sleep, engine wake,
    // the drain's tail after the last request ended, GreenThread's own share (signed).
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for i in 0..rounds {
        let (holder, waker, holder_engine, waker_engine) = if i % 2 == 0 {
            (&a, &b, &engines[0], &engines[1])
        } else {
            (&b, &a, &engines[1], &engines[0])
        };
        if holder.state() != State::Serving {
            drop(holder.admit().await.unwrap());
        }
        // The holder is busy with a request when it is named: it must drain first.
        let slot = holder.admit().await.unwrap();
        let named_then_released = {
            let named = victim_named(&l, &holder.pod);
            tokio::spawn(async move {
                let named = named.await.unwrap();
                tokio::time::sleep(in_flight).await;
                drop(slot);
                (named, Instant::now())
            })
        };
        let t0 = Instant::now();
        drop(waker.admit().await.unwrap());
        let admitted = Instant::now();
        let (named, released) = named_then_released.await.unwrap();
        // What the engines saw: when each call began and ended.
        let since = tokio::time::Instant::from_std(t0);
        let slept = holder_engine
            .last_call(false, since)
            .expect("the victim slept");
        let woke = waker_engine.last_call(true, since).expect("the waker woke");
        let (sleep_began, sleep_ended) = (slept.began.into_std(), slept.ended.into_std());
        let (wake_began, wake_ended) = (woke.began.into_std(), woke.ended.into_std());
        let secs = |later: Instant, earlier: Instant| {
            if later >= earlier {
                (later - earlier).as_secs_f64() * 1e3
            } else {
                -((earlier - later).as_secs_f64() * 1e3)
            }
        };
        let total = secs(admitted, t0);
        let fairness = secs(named, t0);
        let drain = secs(sleep_began, named);
        let sleep = secs(sleep_ended, sleep_began);
        let wake = secs(wake_ended, wake_began);
        let tail = secs(sleep_began, released);
        rows.push([
            total,
            fairness,
            drain,
            sleep,
            wake,
            tail,
            total - (fairness + drain + sleep + wake),
        ]);
    }
    println!(
        "\n## 3. Model switch on a full GPU ({rounds} switches; engines that take {} ms to sleep and {} ms to wake, maxWaitTime {} ms (the cost-aware policy names a victim of no more demand than the waker at once), the victim's request ends {} ms after it is named)\n",
        sleep_time.as_millis(),
        wake_time.as_millis(),
        max_wait.as_millis(),
        in_flight.as_millis()
    );
    println!(
        "Each phase measured per switch: fairness wait (request → victim named in the ledger), drain (named → the victim's engine told to sleep), engine sleep and wake (as long as the engines' calls took, timed inside the engines), the drain's tail (the victim's last request ended → its engine told to sleep), and GreenThread's own share (request → admitted, less the four phases). Median [min, max].\n"
    );
    println!(
        "| request → admitted ms | fairness wait ms | drain ms | engine sleep ms | engine wake ms | drain tail ms | GreenThread overhead ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cells: Vec<String> = (0..7)
        .map(|k| {
            if k >= 5 {
                paired(&rows, |r| r[k], |x| format!("{x:+.3}"))
            } else {
                paired(&rows, |r| r[k], |x| format!("{x:.1}"))
            }
        })
        .collect();
    println!("| {} |", cells.join(" | "));
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
