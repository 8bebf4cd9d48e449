//! `greenthread simulate`: replays a request trace through the real control plane over
//! simulated engines in virtual time, and says how the fleet did — or, with
//! `--find-gpus`, how many GPUs it needs.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use greenthread_api::{ValidModel, arg};
use greenthread_fleet::{
    assign,
    faults::FaultPlan,
    report::{Report, report},
    run::{HostLink, OnProgress, Setup, run},
    trace::{self, Arrivals, Workload},
    zoo,
};
use greenthread_sidecar::Preemption;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Request trace in the Azure LLM inference format
    /// (`TIMESTAMP,ContextTokens,GeneratedTokens`), e.g. `traces/AzureLLMInferenceTrace_conv.csv`.
    #[arg(long, required_unless_present = "rate")]
    pub trace: Option<PathBuf>,
    /// A generated workload instead of a trace: this many requests per second (for
    /// `--minutes`, 60 by default).
    #[arg(long, conflicts_with = "trace")]
    pub rate: Option<f64>,
    /// Generated arrivals: the coefficient of variation of the gaps (1: Poisson; above 1:
    /// burstier, Gamma-distributed).
    #[arg(long, default_value_t = 1.0, requires = "rate")]
    pub arrival_cv: f64,
    /// A generated zoo of N models: half 8B-class, a quarter 3B, a quarter 14B, in a fixed order.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub models: Option<usize>,
    /// The models of a `greenthread local` configuration instead (and its GPUs unless
    /// `--gpus` is given).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// With `--models`: each model runs tensor-parallel over this many GPUs (1, 2, 4 or
    /// 8), holding its share of the weights and KV cache on each, so the GPUs of a
    /// group pool their memory for it.
    #[arg(long, default_value_t = 1, conflicts_with = "config")]
    pub tensor_parallel: u32,
    /// With `--models`: every zoo model's `fairness.minRuntime` (how long a model just
    /// woken is no victim). Default: a Model's, 10 s.
    #[arg(long, value_parser = arg::duration, conflicts_with = "config")]
    pub min_runtime: Option<Duration>,
    /// GPUs of `--gpu-memory` each.
    #[arg(long)]
    pub gpus: Option<usize>,
    #[arg(long, default_value = "80Gi", value_parser = arg::size)]
    pub gpu_memory: u64,
    /// Host memory for level-1 sleepers' weights per node of eight GPUs (e.g. `512Gi`):
    /// a sleep that does not fit goes to level 2 and its next wake reloads from disk
    /// (counted as `sleepDemotions`). Default: not accounted.
    #[arg(long, value_parser = arg::size)]
    pub host_memory: Option<u64>,
    /// The rate at which a level-1 wake copies a model's weights from host memory to
    /// its GPU, in GB/s (10^9 bytes a second), for every simulated engine. Default: each
    /// engine's own (the zoo's 25, what vLLM's published wakes on H100 over PCIe imply);
    /// a Grace Hopper's NVLink-C2C carries up to 450.
    #[arg(long, value_parser = gb_per_second)]
    pub wake_bandwidth: Option<u64>,
    /// The rate at which a level-1 sleep copies the weights back to host memory, in
    /// GB/s, for every simulated engine. Default: each engine's own (the zoo's 20).
    #[arg(long, value_parser = gb_per_second)]
    pub sleep_bandwidth: Option<u64>,
    /// Popularity skew: request shares ∝ 1/rank^skew over the models (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    pub skew: f64,
    /// Seeds the workload (which model each request goes to, generated arrivals).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The scheduling policy: `default` (cost-aware) or `lru` (the documented original).
    /// With `--config`, the config's `policy` unless this is given.
    #[arg(long, value_parser = |s: &str| s.parse::<greenthread_ledger::Policy>())]
    pub policy: Option<greenthread_ledger::Policy>,
    /// What a preempted model's running generations do: `resume` (stopped at once,
    /// continued after its next wake; the default of the cost-aware policy) or `drain`
    /// (finish before it sleeps; what `lru` always does). With `--config`, the config's
    /// `preemption` unless this is given.
    #[arg(long, value_enum)]
    pub preemption: Option<Preemption>,
    /// The TTFT a request must meet to count as served in time.
    #[arg(long, default_value = "3s", value_parser = arg::duration)]
    pub ttft_slo: Duration,
    /// Only the first M minutes of the workload.
    #[arg(long)]
    pub minutes: Option<f64>,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also plans the same requests as one planner per GPU would, first tokens first
    /// (stopped answers continued when memory is free), and prints what that gives
    /// beside the run: how far the control plane's decisions are from such a plan.
    /// Models of one replica on one GPU each.
    #[arg(long, conflicts_with_all = ["find_gpus", "faults"])]
    pub reference: bool,
    /// With `--reference`: the plan decides from what it saw this long ago (arrivals and
    /// first tokens), as a control plane sees them through its reports.
    #[arg(long, default_value = "0s", value_parser = arg::duration, requires = "reference")]
    pub reference_lag: Duration,
    /// With `--reference`: a waker for a first token stands as `cost-aware`'s does (its
    /// requests of the last ten minutes plus one for every three seconds it has waited)
    /// and stops only models in no more demand, until it has waited this long; then
    /// anyone. Default: anyone at once.
    #[arg(long, value_parser = arg::duration, requires = "reference")]
    pub reference_bound: Option<Duration>,
    /// With `--reference`: a model woken less than this long ago is no victim (a
    /// `minRuntime`).
    #[arg(long, default_value = "0s", value_parser = arg::duration, requires = "reference")]
    pub reference_min_stay: Duration,
    /// Searches for the fewest GPUs whose SLO attainment reaches `--target`.
    #[arg(long)]
    pub find_gpus: bool,
    /// The attainment `--find-gpus` looks for.
    #[arg(long, default_value_t = 0.99)]
    pub target: f64,
    /// Injects faults drawn from the seed — engine crashes (mid-wake, mid-stream, while
    /// asleep), failed and hung wakes, slow and conflicting ledger writes, sidecars killed
    /// and restarted — over the first two thirds of the workload, and checks the
    /// invariants at every ledger commit. Exits with 1 when one broke.
    #[arg(long, conflicts_with = "find_gpus")]
    pub faults: bool,
    /// With `--faults`: about one fault this often.
    #[arg(long, default_value = "30s", value_parser = arg::duration, requires = "faults")]
    pub fault_every: Duration,
    /// With `--faults`: every seed of `FIRST..=LAST` (its workload and its faults), runs
    /// in parallel; prints the seeds that broke an invariant.
    #[arg(long, requires = "faults", value_parser = seed_range)]
    pub seeds: Option<(u64, u64)>,
}

/// GB/s as bytes a second.
fn gb_per_second(s: &str) -> Result<u64, String> {
    let gb: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a number of GB/s: {e}"))?;
    if !(gb.is_finite() && (0.001..=1e6).contains(&gb)) {
        return Err(format!(
            "{s:?}: expected GB/s between 0.001 and 1000000, e.g. 25"
        ));
    }
    Ok((gb * 1e9).round() as u64)
}

fn seed_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?}: expected FIRST..LAST, e.g. 1..200"))?;
    let b = b.strip_prefix('=').unwrap_or(b);
    let parse = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|e| format!("{s:?}: {v:?} is not a seed: {e}"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a > b {
        return Err(format!("{s:?}: the first seed is after the last"));
    }
    Ok((a, b))
}

fn workload(args: &SimulateArgs) -> anyhow::Result<Workload> {
    let w = match (&args.trace, args.rate) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--trace {}", path.display()))?;
            let w =
                trace::parse_azure(&text).with_context(|| format!("--trace {}", path.display()))?;
            if w.clamped > 0 {
                eprintln!(
                    "note: {} requests of the trace were cut to {} tokens",
                    w.clamped,
                    trace::MAX_TOKENS
                );
            }
            w
        }
        (None, Some(rate)) => {
            anyhow::ensure!(rate > 0.0, "--rate must be above 0");
            let arrivals = if (args.arrival_cv - 1.0).abs() < 1e-9 {
                Arrivals::Poisson
            } else {
                anyhow::ensure!(args.arrival_cv > 0.0, "--arrival-cv must be above 0");
                Arrivals::Gamma {
                    cv: args.arrival_cv,
                }
            };
            let minutes = args.minutes.unwrap_or(60.0);
            let mut rng = greenthread_fleet::rng::Rng::new(args.seed ^ 0x7261_7465);
            trace::generate(
                rate,
                Duration::from_secs_f64(minutes * 60.0),
                arrivals,
                &mut rng,
            )
        }
        (None, None) => anyhow::bail!("give --trace FILE or --rate R"),
    };
    Ok(match args.minutes {
        Some(m) => {
            anyhow::ensure!(m > 0.0, "--minutes must be above 0");
            w.first_minutes(m)
        }
        None => w,
    })
}

/// What the simulated installation declares.
struct Declared {
    models: Vec<(String, ValidModel)>,
    /// A configuration's GPUs.
    gpus: Option<Vec<u64>>,
    policy: greenthread_ledger::Policy,
    preemption: Preemption,
}

/// The models (a configuration's or the zoo), and what else a configuration sets.
fn declared(args: &SimulateArgs) -> anyhow::Result<Declared> {
    match (&args.config, args.models) {
        (Some(path), _) => {
            let plan = crate::local::config::load(Some(path))?;
            Ok(Declared {
                gpus: Some(plan.gpus.iter().map(|g| g.memory_bytes).collect()),
                policy: args.policy.unwrap_or(plan.policy),
                preemption: args.preemption.unwrap_or(plan.preemption),
                models: plan.models,
            })
        }
        (None, Some(n)) => {
            anyhow::ensure!(n > 0, "--models must be at least 1");
            let policy = args.policy.unwrap_or_default();
            let mut models = zoo::zoo(n, args.gpu_memory, args.tensor_parallel)
                .map_err(|e| anyhow::anyhow!("--tensor-parallel / --gpu-memory: {e}"))?;
            if let Some(d) = args.min_runtime {
                for (_, m) in &mut models {
                    m.min_runtime = d;
                }
            }
            Ok(Declared {
                models,
                gpus: None,
                policy,
                preemption: args.preemption.unwrap_or(default_preemption(policy)),
            })
        }
        (None, None) => anyhow::bail!("give --models N or --config FILE"),
    }
}

/// The zoo's preemption when none is given: `resume` under the cost-aware policy, which
/// uses it (stopped answers are continued after the victim's next wake: on the
/// conversation trace more requests within 3 s and 10 s and a lower p99 than `drain`,
/// see `docs/simulate.md`), `drain` under `lru`, which always drains.
fn default_preemption(policy: greenthread_ledger::Policy) -> Preemption {
    if policy.rules().may_resume() {
        Preemption::Resume
    } else {
        Preemption::Drain
    }
}

fn progress_line() -> OnProgress {
    let started = std::time::Instant::now();
    std::sync::Arc::new(move |p: greenthread_fleet::run::Progress| {
        eprintln!(
            "simulated {:>3.0} of {:.0} min: {} requests sent, {} done ({:.1} s wall)",
            p.simulated.as_secs_f64() / 60.0,
            p.total.as_secs_f64() / 60.0,
            p.sent,
            p.done,
            started.elapsed().as_secs_f64()
        );
    })
}

/// One run on `gpus`.
fn once(
    args: &SimulateArgs,
    policy: greenthread_ledger::Policy,
    preemption: Preemption,
    models: &[(String, ValidModel)],
    gpus: Vec<u64>,
    w: &Workload,
    quiet: bool,
) -> anyhow::Result<Report> {
    let (requests, _) = assign(w, models.len(), args.skew, args.seed);
    let faults = args.faults.then(|| {
        let span = requests.last().map_or(Duration::ZERO, |r| r.at);
        let replicas = models.iter().map(|m| m.1.spec.replicas as usize).sum();
        FaultPlan::generate(args.seed, replicas, span * 2 / 3, args.fault_every)
    });
    let models_of: Vec<usize> = requests.iter().map(|r| r.model).collect();
    let planned = args.reference.then(|| requests.clone());
    let names: Vec<String> = models.iter().map(|m| m.0.clone()).collect();
    let wall = std::time::Instant::now();
    let ran = run(
        Setup {
            models: models.to_vec(),
            gpus,
            requests,
            seed: args.seed,
            policy,
            faults,
            preemption,
            host_memory: args.host_memory,
            link: HostLink {
                wake: args.wake_bandwidth,
                sleep: args.sleep_bandwidth,
            },
        },
        (!quiet).then(progress_line),
    )?;
    let mut r = report(&ran, &names, &models_of, args.ttft_slo, wall.elapsed());
    if let Some(requests) = planned {
        let rules = greenthread_fleet::plan::Rules {
            lag: args.reference_lag.as_secs_f64(),
            standing_bound: args.reference_bound.map(|b| b.as_secs_f64()),
            min_stay: args.reference_min_stay.as_secs_f64(),
        };
        let plan = greenthread_fleet::plan::first_tokens_first(
            &ran.gpu_memory,
            &ran.demand,
            &requests,
            &rules,
        )
        .map_err(|e| anyhow::anyhow!("--reference: {e}"))?;
        r.reference = Some(greenthread_fleet::report::reference(
            &plan,
            args.ttft_slo,
            &rules,
            &names,
            &models_of,
        ));
    }
    Ok(r)
}

pub fn main(args: SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.skew >= 0.0, "--skew must be 0 or more");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.target),
        "--target must be a fraction between 0 and 1"
    );
    let w = workload(&args)?;
    anyhow::ensure!(!w.arrivals.is_empty(), "the workload has no requests");
    let Declared {
        models,
        gpus: config_gpus,
        policy,
        preemption,
    } = declared(&args)?;
    // Whether `lru` came from --policy or from --config's `policy:`.
    preemption
        .check(policy)
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    if args.reference
        && let Some((name, _)) = models
            .iter()
            .find(|(_, m)| m.spec.replicas != 1 || m.spec.gpus_per_replica() != 1)
    {
        anyhow::bail!("--reference plans models of one replica on one GPU each; {name} has more");
    }
    let gpus_of = |n: usize| vec![args.gpu_memory; n];
    if args.find_gpus {
        return find_gpus(&args, policy, preemption, &models, &w);
    }
    let gpus = match (args.gpus, config_gpus) {
        (Some(n), _) => gpus_of(n),
        (None, Some(g)) => g,
        (None, None) => anyhow::bail!("give --gpus G"),
    };
    anyhow::ensure!(!gpus.is_empty(), "--gpus must be at least 1");
    if let Some(seeds) = args.seeds {
        return many_seeds(&args, policy, preemption, &models, &gpus, seeds);
    }
    let r = once(&args, policy, preemption, &models, gpus, &w, args.json)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", r.table());
    }
    match &r.faults {
        Some(f) if !f.violations.is_empty() => {
            anyhow::bail!("{} invariants broken (seed {})", f.violations.len(), f.seed)
        }
        _ => Ok(()),
    }
}

/// `--faults --seeds A..B`: each seed's workload and faults, on every core.
fn many_seeds(
    args: &SimulateArgs,
    policy: greenthread_ledger::Policy,
    preemption: Preemption,
    models: &[(String, ValidModel)],
    gpus: &[u64],
    (first, last): (u64, u64),
) -> anyhow::Result<()> {
    let wall = std::time::Instant::now();
    let seeds: Vec<u64> = (first..=last).collect();
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(seeds.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(i) else { return };
                    let mut a = args.clone();
                    a.seed = seed;
                    let r = workload(&a).and_then(|w| {
                        once(&a, policy, preemption, models, gpus.to_vec(), &w, true)
                    });
                    results.lock().unwrap().push((seed, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(seed, _)| *seed);
    let (mut injected, mut broken_seeds, mut totals) = (0, Vec::new(), [0usize; 4]);
    let mut by_kind = std::collections::BTreeMap::<&str, usize>::new();
    let mut simulated = 0.0;
    for (seed, r) in results {
        let r = r.with_context(|| format!("seed {seed}"))?;
        let f = r
            .faults
            .as_ref()
            .expect("--faults runs report their faults");
        injected += f.injected.len();
        for i in &f.injected {
            *by_kind.entry(i.kind).or_default() += 1;
        }
        simulated += r.simulated_seconds;
        let t = &r.totals;
        for (sum, n) in totals
            .iter_mut()
            .zip([t.answered, t.rejected, t.broken, t.hung])
        {
            *sum += n;
        }
        if !f.violations.is_empty() {
            if !args.json {
                for v in &f.violations {
                    println!("BROKEN {v}");
                }
            }
            broken_seeds.push(serde_json::json!({"seed": seed, "violations": f.violations}));
        }
    }
    let [answered, rejected, broken, hung] = totals;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "seeds": seeds.len(),
                "faultsInjected": injected,
                "injectedByKind": by_kind,
                "simulatedSeconds": simulated,
                "answered": answered,
                "rejected": rejected,
                "broken": broken,
                "hung": hung,
                "failed": broken_seeds,
                "wallSeconds": wall.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "{} seeds, {:.0} simulated minutes, {injected} faults injected: {} broke an invariant; requests {answered} answered, {rejected} refused, {broken} cut off, {hung} hung ({:.1} s wall)",
            seeds.len(),
            simulated / 60.0,
            broken_seeds.len(),
            wall.elapsed().as_secs_f64()
        );
        let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("faults by kind: {}", kinds.join(", "));
    }
    anyhow::ensure!(
        broken_seeds.is_empty(),
        "{} of {} seeds broke an invariant",
        broken_seeds.len(),
        seeds.len()
    );
    Ok(())
}

/// The fewest GPUs whose attainment reaches the target ([`greenthread_fleet::find_gpus`]).
fn find_gpus(
    args: &SimulateArgs,
    policy: greenthread_ledger::Policy,
    preemption: Preemption,
    models: &[(String, ValidModel)],
    w: &Workload,
) -> anyhow::Result<()> {
    // Every replica alone on its GPUs; counts in steps of the largest replica's GPUs.
    let per_replica = |m: &(String, ValidModel)| m.1.spec.gpus_per_replica() as usize;
    let most = models
        .iter()
        .map(|m| m.1.spec.replicas as usize * per_replica(m))
        .sum::<usize>();
    let unit = models.iter().map(per_replica).max().unwrap_or(1);
    let greenthread_fleet::Found {
        gpus: n,
        report: r,
        tried: curve,
    } = greenthread_fleet::find_gpus(args.target, most, unit, |n| {
        let r = once(
            args,
            policy,
            preemption,
            models,
            vec![args.gpu_memory; n],
            w,
            true,
        )?;
        if !args.json {
            eprintln!(
                "{n:>4} GPUs: {:.1}% within {:?} ({:.1} s wall)",
                r.totals.slo_attainment * 100.0,
                args.ttft_slo,
                r.wall_seconds
            );
        }
        Ok(r)
    })?;
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["gpus"] = n.into();
        v["target"] = args.target.into();
        v["tried"] = curve
            .iter()
            .map(|(g, a)| serde_json::json!({"gpus": g, "sloAttainment": a}))
            .collect();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{n} GPUs of {} GiB reach {:.1}% of requests within {:?} (target {:.1}%)",
            args.gpu_memory >> 30,
            r.totals.slo_attainment * 100.0,
            args.ttft_slo,
            args.target * 100.0
        );
        print!("{}", r.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn declared_by(line: &[&str]) -> Declared {
        let cli = Cli::try_parse_from(std::iter::once("simulate").chain(line.iter().copied()))
            .expect("the line parses");
        declared(&cli.args).expect("the models are declared")
    }

    /// The host link is given in GB/s; what is not a rate is refused naming the flag.
    #[test]
    fn the_host_link_is_read_in_gb_per_second() {
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(
                ["simulate", "--rate", "1", "--models", "4"]
                    .iter()
                    .chain(extra)
                    .copied(),
            )
        };
        let cli = parse(&["--wake-bandwidth", "450", "--sleep-bandwidth", "12.5"]).unwrap();
        assert_eq!(cli.args.wake_bandwidth, Some(450_000_000_000));
        assert_eq!(cli.args.sleep_bandwidth, Some(12_500_000_000));
        assert_eq!(parse(&[]).unwrap().args.wake_bandwidth, None);
        for bad in ["0", "-25", "fast", "inf"] {
            let flag = format!("--wake-bandwidth={bad}");
            let e = parse(&[&flag]).err().unwrap().to_string();
            assert!(
                e.contains("--wake-bandwidth") && e.contains("GB/s"),
                "{bad}: {e}"
            );
        }
    }

    /// The zoo resumes under the cost-aware policy and drains under `lru`, unless told;
    /// a config's `preemption` (drain when it says nothing) is what `local` would run.
    #[test]
    fn the_preemption_follows_the_policy_the_flag_and_the_config() {
        use greenthread_ledger::Policy;
        let zoo = ["--rate", "1", "--models", "4"];
        for (extra, policy, preemption) in [
            (&[][..], Policy::CostAware, Preemption::Resume),
            (&["--policy", "lru"][..], Policy::Lru, Preemption::Drain),
            (
                &["--preemption", "drain"][..],
                Policy::CostAware,
                Preemption::Drain,
            ),
        ] {
            let d = declared_by(&[&zoo[..], extra].concat());
            assert_eq!((d.policy, d.preemption), (policy, preemption), "{extra:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let config = |text: &str| {
            let path = dir.path().join("models.yaml");
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_string()
        };
        let base = "gpus:\n  simulated:\n    - {memory: 80Gi}\nmodels:\n  - name: a\n    spec: {modelName: org/a, engine: sim, gpuMemoryUtilization: \"0.3\"}\n";
        let plain = config(base);
        let d = declared_by(&["--rate", "1", "--config", &plain]);
        assert_eq!(
            d.preemption,
            Preemption::Drain,
            "a config that says nothing drains"
        );
        let resumes = config(&format!("preemption: resume\n{base}"));
        let d = declared_by(&["--rate", "1", "--config", &resumes]);
        assert_eq!(d.preemption, Preemption::Resume);
        let d = declared_by(&["--rate", "1", "--config", &resumes, "--preemption", "drain"]);
        assert_eq!(d.preemption, Preemption::Drain, "the flag wins");
    }
}
