//! The scheduling policies side by side (`lru`; `cost-aware` with its victims drained,
//! and with their answers stopped and resumed) on both Azure traces (Patel et al., "Splitwise",
//! ISCA 2024; CC-BY 4.0; see traces/README.md): the zoo at 1, 2, 4, 7 and 10 models per
//! GPU on 4 GPUs of 80 GiB, skew 1.0, seeds 1–3, whole traces. For each: SLO attainment
//! at 3 s and 10 s (mean, and the range over seeds), TTFT p50 and p99, wakes per hour,
//! awake GPU-seconds, and the fewest GPUs reaching 90 % within 3 s (seed 1).
//!
//! `cargo bench -p greenthread-fleet --bench policies` (about fifteen minutes on 2 cores);
//! `POLICY_BENCH_QUICK=1` runs the conversation trace at 7 models per GPU only.

use std::time::{Duration, Instant};

use greenthread_fleet::{
    assign, find_gpus,
    report::{Report, report},
    run::{Setup, run},
    trace, zoo,
};
use greenthread_ledger::Policy;
use greenthread_sidecar::Preemption;

const GPUS: usize = 4;
const GIB: u64 = 1 << 30;
const SEEDS: [u64; 3] = [1, 2, 3];

struct Row {
    slo3: Vec<f64>,
    slo10: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    wakes_per_hour: Vec<f64>,
    awake: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn range(v: &[f64], pct: bool) -> String {
    let k = if pct { 100.0 } else { 1.0 };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min) * k;
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max) * k;
    if pct {
        format!("{:.1} % [{min:.1}–{max:.1}]", mean(v) * k)
    } else {
        format!("{:.1} [{min:.1}–{max:.1}]", mean(v))
    }
}

fn simulate(
    w: &trace::Workload,
    models: &[(String, greenthread_api::ValidModel)],
    gpus: usize,
    (policy, preemption): (Policy, Preemption),
    seed: u64,
    slo: Duration,
) -> (Report, Report) {
    let (requests, _) = assign(w, models.len(), 1.0, seed);
    let of: Vec<usize> = requests.iter().map(|r| r.model).collect();
    let names: Vec<String> = models.iter().map(|m| m.0.clone()).collect();
    let wall = Instant::now();
    let ran = run(
        Setup {
            models: models.to_vec(),
            gpus: vec![80 * GIB; gpus],
            requests,
            seed,
            policy,
            faults: None,
            preemption,
            host_memory: None,
            link: Default::default(),
        },
        None,
    )
    .expect("the simulation runs");
    let wall = wall.elapsed();
    (
        report(&ran, &names, &of, slo, wall),
        report(&ran, &names, &of, Duration::from_secs(10), wall),
    )
}

fn main() {
    let quick = std::env::var_os("POLICY_BENCH_QUICK").is_some();
    let traces: &[(&str, &str)] = if quick {
        &[("conversation", "AzureLLMInferenceTrace_conv.csv")]
    } else {
        &[
            ("conversation", "AzureLLMInferenceTrace_conv.csv"),
            ("code", "AzureLLMInferenceTrace_code.csv"),
        ]
    };
    let densities: &[usize] = if quick { &[7] } else { &[1, 2, 4, 7, 10] };
    let started = Instant::now();
    for (label, file) in traces {
        let path = format!("{}/../../traces/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("the trace is in the repository");
        let w = trace::parse_azure(&text).expect("the trace parses");
        println!(
            "\n### {label} trace ({} requests), {GPUS} GPUs of 80 GiB, skew 1.0, seeds 1–3\n",
            w.arrivals.len()
        );
        println!(
            "| models/GPU | policy | within 3 s | within 10 s | TTFT p50 s | TTFT p99 s | wakes/h | awake GPU-s | GPUs for 90 % |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for &density in densities {
            let models = zoo::zoo(density * GPUS, 80 * GIB, 1).expect("the zoo fits");
            for how in [
                (Policy::Lru, Preemption::Drain),
                (Policy::CostAware, Preemption::Drain),
                (Policy::CostAware, Preemption::Resume),
            ] {
                let mut row = Row {
                    slo3: vec![],
                    slo10: vec![],
                    p50: vec![],
                    p99: vec![],
                    wakes_per_hour: vec![],
                    awake: vec![],
                };
                for seed in SEEDS {
                    let (r3, r10) = simulate(&w, &models, GPUS, how, seed, Duration::from_secs(3));
                    row.slo3.push(r3.totals.slo_attainment);
                    row.slo10.push(r10.totals.slo_attainment);
                    row.p50.push(r3.totals.ttft_p50_seconds.unwrap_or(f64::NAN));
                    row.p99.push(r3.totals.ttft_p99_seconds.unwrap_or(f64::NAN));
                    row.wakes_per_hour
                        .push(r3.totals.wakes as f64 * 3600.0 / r3.simulated_seconds);
                    row.awake.push(r3.totals.awake_gpu_seconds);
                }
                let needed = match find_gpus(0.9, models.len(), 1, |n| {
                    Ok(simulate(&w, &models, n, how, 1, Duration::from_secs(3)).0)
                }) {
                    Ok(found) => found.gpus.to_string(),
                    Err(_) => format!("> {}", models.len()),
                };
                let label = match how {
                    (Policy::Lru, _) => "lru".to_string(),
                    (p, pre) => format!("{p}, {}", pre.flag()),
                };
                println!(
                    "| {density} | {label} | {} | {} | {} | {} | {:.0} | {:.0} | {needed} |",
                    range(&row.slo3, true),
                    range(&row.slo10, true),
                    range(&row.p50, false),
                    range(&row.p99, false),
                    mean(&row.wakes_per_hour),
                    mean(&row.awake),
                );
            }
        }
    }
    eprintln!("({:.0} s wall)", started.elapsed().as_secs_f64());
}
