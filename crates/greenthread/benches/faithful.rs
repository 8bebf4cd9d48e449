//! Is the fleet simulator faithful? The same slice of a real trace (the Azure
//! conversation trace, Patel et al., ISCA 2024, CC-BY 4.0) through a real
//! `greenthread local` — real `sim-engine` processes, real sockets, wall-clock time — and
//! through `greenthread simulate`'s run, at the same configuration: the zoo of 28 models
//! on 4 simulated 80 GiB GPUs, seed 1, the default policy. TTFT p50/p99, wakes and
//! preemptions side by side; the issue asks for agreement within 15 %.
//!
//!     cargo bench -p greenthread --bench faithful       # FAITHFUL_MINUTES (10) of real time

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use greenthread_fleet::{
    assign,
    report::{quantile, report},
    run::{Setup, run},
    trace, zoo,
};
use greenthread_test_support::LocalProc;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const GPUS: usize = 4;
const GIB: u64 = 1 << 30;

fn main() {
    let minutes: f64 = std::env::var("FAITHFUL_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10.0);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../traces/AzureLLMInferenceTrace_conv.csv"
    );
    let w = trace::parse_azure(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .first_minutes(minutes);
    let models = zoo::zoo(28, 80 * GIB, 1).unwrap();
    let (requests, _) = assign(&w, models.len(), 1.0, 1);
    let names: Vec<String> = models.iter().map(|m| m.0.clone()).collect();
    let of: Vec<usize> = requests.iter().map(|r| r.model).collect();
    let slo = Duration::from_secs(3);

    // The simulator.
    let started = Instant::now();
    let sim = run(
        Setup {
            models: models.clone(),
            gpus: vec![80 * GIB; GPUS],
            requests: requests.clone(),
            seed: 1,
            policy: greenthread_ledger::Policy::CostAware,
            faults: None,
            preemption: greenthread_sidecar::Preemption::Drain,
            host_memory: None,
            link: Default::default(),
        },
        None,
    )
    .unwrap();
    let sim = report(&sim, &names, &of, slo, started.elapsed());

    // The real thing: the same models as a `local` config (engines load their weights
    // fast, so that 28 boots under the GPUs' wake locks fit the start-up wait).
    let config = serde_json::json!({
        "gpus": {"simulated": vec![serde_json::json!({"memory": "80Gi"}); GPUS]},
        "policy": "cost-aware",
        "models": models.iter().map(|(name, m)| {
            let mut spec = serde_json::to_value(&m.spec).unwrap();
            spec["extraArgs"].as_array_mut().unwrap().extend(
                ["--disk-bandwidth", "1000000000000"].map(serde_json::Value::from),
            );
            serde_json::json!({"name": name, "spec": spec})
        }).collect::<Vec<_>>(),
    })
    .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ttfts, answered, wakes, preemptions, wall) = rt.block_on(async {
        let local = Arc::new(LocalProc::start(BIN, &config).await);
        let counter =
            |e: &greenthread_test_support::Exposition, name: &str, labels: &[(&str, &str)]| {
                e.find(name, labels).map(|s| s.value).sum::<f64>()
            };
        let before = local.metrics().await;
        let wakes0 = counter(&before, "gthread_sidecar_wake_duration_seconds_count", &[]);
        let pre0 = counter(
            &before,
            "gthread_sidecar_preemptions_total",
            &[("role", "preempted")],
        );
        let start = tokio::time::Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for r in &requests {
            tokio::time::sleep_until(start + r.at).await;
            let (local, model) = (local.clone(), names[r.model].clone());
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "w ".repeat(r.prompt_tokens as usize)}],
                "max_tokens": r.output_tokens,
                "stream": true,
            });
            clients.spawn(async move {
                let sent = tokio::time::Instant::now();
                let resp = local
                    .client
                    .post(format!("{}/v1/chat/completions", local.url))
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let mut resp = resp;
                let mut ttft = None;
                // The first event with data, as SSE clients read it: the comments a
                // waiting stream gets every `wakeFeedback` (3 s) are no token.
                while let Ok(Some(chunk)) = resp.chunk().await {
                    if ttft.is_none() && chunk.windows(5).any(|w| w == b"data:") {
                        ttft = Some(sent.elapsed());
                    }
                }
                ttft
            });
        }
        let mut ttfts = Vec::new();
        let mut answered = 0;
        while let Some(t) = clients.join_next().await {
            if let Some(t) = t.unwrap() {
                ttfts.push(t);
                answered += 1;
            }
        }
        let after = local.metrics().await;
        let wakes = counter(&after, "gthread_sidecar_wake_duration_seconds_count", &[]) - wakes0;
        let pre = counter(
            &after,
            "gthread_sidecar_preemptions_total",
            &[("role", "preempted")],
        ) - pre0;
        (ttfts, answered, wakes, pre, start.elapsed())
    });
    let mut ttfts = ttfts;
    ttfts.sort();
    let within = ttfts.iter().filter(|t| **t <= slo).count() as f64 / requests.len() as f64;

    println!(
        "\n## Faithfulness: the first {minutes} minutes of the conversation trace ({} requests), 28 models on {GPUS} GPUs, seed 1, cost-aware\n",
        requests.len()
    );
    println!(
        "| | `greenthread local` (real processes, {:.0} s) | `simulate` ({:.1} s) | simulate / local |",
        wall.as_secs_f64(),
        sim.wall_seconds
    );
    println!("|---|---|---|---|");
    let row = |name: &str, real: f64, simulated: f64| {
        println!(
            "| {name} | {real:.3} | {simulated:.3} | {:+.1} % |",
            (simulated / real - 1.0) * 100.0
        );
    };
    row("answered", answered as f64, sim.totals.answered as f64);
    row("within 3 s", within, sim.totals.slo_attainment);
    row(
        "TTFT p50 s",
        quantile(&ttfts, 0.5).unwrap_or(f64::NAN),
        sim.totals.ttft_p50_seconds.unwrap_or(f64::NAN),
    );
    row(
        "TTFT p99 s",
        quantile(&ttfts, 0.99).unwrap_or(f64::NAN),
        sim.totals.ttft_p99_seconds.unwrap_or(f64::NAN),
    );
    row("wakes", wakes, sim.totals.wakes as f64);
    row("preemptions", preemptions, sim.totals.preemptions as f64);
}
