//! `greenthread simulate` as a user runs it: the real control plane in virtual time,
//! replaying a real trace. The same seed must give the same run, byte for byte (but for
//! the wall time it took); every request must be accounted for.

use std::process::Command;

use serde_json::Value;

const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../traces/AzureLLMInferenceTrace_conv.csv"
);

fn simulate(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_greenthread"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {:?}", out.stdout))
}

fn without_wall(mut v: Value) -> String {
    v.as_object_mut().unwrap().remove("wallSeconds");
    v.to_string()
}

/// The conversation trace's first ten minutes on 28 zoo models and 4 GPUs, with `more`
/// arguments, as JSON.
fn ten_minutes(more: &[&'static str]) -> Vec<&'static str> {
    let mut a = vec![
        "--trace",
        TRACE,
        "--models",
        "28",
        "--gpus",
        "4",
        "--minutes",
        "10",
        "--json",
    ];
    a.extend_from_slice(more);
    a
}

/// Requests in the trace's first `minutes`, counted here from the file.
fn rows_in_first(minutes: f64) -> usize {
    let text = std::fs::read_to_string(TRACE).unwrap();
    let times: Vec<jiff::civil::DateTime> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    let first = *times.iter().min().unwrap();
    times
        .iter()
        .filter(|t| first.duration_until(**t).as_secs_f64() < minutes * 60.0)
        .count()
}

#[test]
fn the_same_seed_gives_the_same_run_and_every_request_is_accounted_for() {
    let a = simulate(&ten_minutes(&["--seed", "1"])).unwrap();
    let b = simulate(&ten_minutes(&["--seed", "1"])).unwrap();
    let c = simulate(&ten_minutes(&["--seed", "2"])).unwrap();
    assert_eq!(
        without_wall(a.clone()),
        without_wall(b),
        "same seed, same run"
    );
    assert_ne!(
        without_wall(a.clone()),
        without_wall(c),
        "another seed sends the requests to other models"
    );

    let n = |k: &str| a[k].as_u64().unwrap_or_else(|| panic!("{k} in {a}"));
    assert_eq!(n("requests") as usize, rows_in_first(10.0));
    assert_eq!(
        n("answered") + n("rejected") + n("broken") + n("hung"),
        n("requests")
    );
    assert_eq!(n("hung"), 0, "{a}");
    // 28 models on 4 GPUs of 80 GiB: at most 6 fit at once, so models take turns.
    assert!(n("wakes") > 28, "{a}");
    assert!(n("preemptions") > 0, "{a}");
    let attainment = a["sloAttainment"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&attainment), "{a}");
    let (p50, p99) = (
        a["ttftP50Seconds"].as_f64().unwrap(),
        a["ttftP99Seconds"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{a}");
    assert!(
        a["simulatedSeconds"].as_f64().unwrap() >= 600.0 * 0.95,
        "{a}"
    );
    // Per model: the rows add up to the whole.
    let models = a["models"].as_array().unwrap();
    assert_eq!(models.len(), 28);
    let sum = |k: &str| models.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("requests"), n("requests"));
    assert_eq!(sum("wakes"), n("wakes"));
    // Per GPU (each model on one): the rows add up too, and memory is never more than
    // fully held, the parts in transition within it.
    let gpus = a["byGpu"].as_array().unwrap();
    assert_eq!(gpus.len(), 4);
    let sum = |k: &str| gpus.iter().map(|g| g[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("requests"), n("requests"));
    assert_eq!(sum("wakes"), n("wakes"));
    for g in gpus {
        let f = |k: &str| g[k].as_f64().unwrap();
        assert!(0.0 < f("memoryBusy") && f("memoryBusy") <= 1.0, "{g}");
        assert!(
            f("memoryWaking") > 0.0 && f("memoryDeactivating") > 0.0,
            "{g}"
        );
        assert!(
            f("memoryWaking") + f("memoryDeactivating") < f("memoryBusy"),
            "{g}"
        );
        // Stranded memory is free memory: with what is held, no more than the whole.
        assert!(f("memoryStranded") > 0.0, "{g}");
        assert!(f("memoryBusy") + f("memoryStranded") <= 1.0 + 1e-9, "{g}");
        assert_eq!(g["models"].as_array().unwrap().len(), 7, "{g}");
    }
}

#[test]
fn the_reference_plan_sees_the_same_requests_and_gains_from_a_faster_link() {
    let a = simulate(&ten_minutes(&["--reference"])).unwrap();
    let b = simulate(&ten_minutes(&["--reference"])).unwrap();
    assert_eq!(
        a["reference"], b["reference"],
        "planned the same both times"
    );
    let r = &a["reference"];
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(r["unfinished"], 0, "{r}");
    assert!(f(r, "wakes") > 28.0, "28 models on 4 GPUs take turns: {r}");
    assert!((0.0..=1.0).contains(&f(r, "sloAttainment")), "{r}");
    assert!(
        f(r, "pauseP50Seconds") <= f(r, "pauseP99Seconds")
            && f(r, "pauseP99Seconds") <= f(r, "pauseMaxSeconds"),
        "{r}"
    );
    // The run's own answers: stopped and continued under `resume` (the default), some
    // for over a minute; never under `drain`, where an answer takes its decoding alone.
    assert!(a["pausedOverAMinute"].as_u64().unwrap() > 0, "{a}");
    let drained = simulate(&ten_minutes(&["--preemption", "drain"])).unwrap();
    assert!(f(&drained, "pauseMaxSeconds") < 0.5, "{drained}");
    assert!(
        drained.get("reference").is_none(),
        "no reference unasked: {drained}"
    );
    // Switches 16 times as fast: the plan's first tokens come within the SLO (over the
    // hour, seeds 1-3: 100 %; docs/simulate.md).
    let fast = simulate(&ten_minutes(&[
        "--reference",
        "--wake-bandwidth",
        "400",
        "--sleep-bandwidth",
        "320",
    ]))
    .unwrap();
    let fast = &fast["reference"];
    assert!(f(fast, "sloAttainment") >= 0.95, "{fast}");
    assert!(
        f(fast, "sloAttainment") >= f(r, "sloAttainment"),
        "{fast} against {r}"
    );
}

/// Five minutes of 2 requests/s to 8 zoo models, with `more` arguments, as JSON.
fn generated(more: &[&str]) -> Value {
    let mut args = vec!["--rate", "2", "--minutes", "5", "--models", "8", "--json"];
    args.extend_from_slice(more);
    simulate(&args).unwrap()
}

#[test]
fn a_generated_workload_runs_and_more_gpus_serve_it_better() {
    let few = generated(&["--gpus", "1"]);
    let many = generated(&["--gpus", "8"]);
    let (a, b) = (
        few["sloAttainment"].as_f64().unwrap(),
        many["sloAttainment"].as_f64().unwrap(),
    );
    // Eight models alone on eight GPUs never wait for a wake once all are awake.
    assert!(b > a, "1 GPU {a}, 8 GPUs {b}");
    assert_eq!(many["preemptions"], 0, "{many}");
}

#[test]
fn tensor_parallel_models_span_a_gpu_group_and_hold_their_share_on_each() {
    let run = |tp: &str| generated(&["--gpus", "4", "--tensor-parallel", tp]);
    let tp2 = run("2");
    assert_eq!(tp2["answered"], tp2["requests"], "{tp2}");
    for m in tp2["models"].as_array().unwrap() {
        let groups = m["gpus"].as_array().unwrap();
        assert_eq!(groups.len(), 1, "one replica: {m}");
        let pair: Vec<u64> = groups[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g.as_u64().unwrap())
            .collect();
        // Two GPUs of one node, a pair the placement keeps together.
        assert!(pair == [0, 1] || pair == [2, 3], "{m}");
    }
    // Each GPU of a pair holds the same halves, so their memory-time is the same.
    let busy = |g: usize| tp2["byGpu"][g]["memoryBusy"].as_f64().unwrap();
    assert!(busy(0) > 0.0 && (busy(0) - busy(1)).abs() < 1e-9, "{tp2}");
    assert!((busy(2) - busy(3)).abs() < 1e-9, "{tp2}");
    // The same models whole: one GPU each.
    let tp1 = run("1");
    for m in tp1["models"].as_array().unwrap() {
        assert_eq!(m["gpus"][0].as_array().unwrap().len(), 1, "{m}");
    }
}

#[test]
fn bad_input_is_refused_with_the_flag_or_the_line_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,x\n",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--trace",
                "/nonexistent.csv",
                "--models",
                "2",
                "--gpus",
                "1",
            ],
            "--trace /nonexistent.csv",
        ),
        (
            &["--trace", bad, "--models", "2", "--gpus", "1"],
            "line 2: GeneratedTokens \"x\"",
        ),
        (
            &[
                "--trace",
                TRACE,
                "--models",
                "2",
                "--gpus",
                "1",
                "--gpu-memory",
                "16Gi",
            ],
            "more than a 16 GiB GPU",
        ),
        (&["--trace", TRACE, "--gpus", "1"], "--models"),
        (
            &[
                "--rate",
                "1",
                "--models",
                "4",
                "--gpus",
                "2",
                "--tensor-parallel",
                "2",
                "--reference",
            ],
            "--reference plans models of one replica on one GPU each",
        ),
        (
            &["--rate", "0", "--models", "2", "--gpus", "1"],
            "--rate must be above 0",
        ),
        (
            &[
                "--rate", "1", "--models", "2", "--gpus", "1", "--faults", "--seeds", "9..2",
            ],
            "the first seed is after the last",
        ),
        (
            &[
                "--rate", "1", "--models", "2", "--gpus", "1", "--seeds", "1..2",
            ],
            "--faults",
        ),
        (
            &[
                "--rate",
                "1",
                "--models",
                "2",
                "--gpus",
                "1",
                "--policy",
                "lru",
                "--preemption",
                "resume",
            ],
            "lru always drains",
        ),
        (
            &[
                "--rate",
                "1",
                "--models",
                "2",
                "--gpus",
                "2",
                "--tensor-parallel",
                "3",
            ],
            "--tensor-parallel / --gpu-memory: tensor parallelism must be 1, 2, 4 or 8",
        ),
        (
            &[
                "--rate",
                "1",
                "--models",
                "2",
                "--gpus",
                "1",
                "--tensor-parallel",
                "2",
            ],
            "no node has 2 GPUs",
        ),
    ];
    for (args, expected) in cases {
        let err = simulate(args).unwrap_err();
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// The fault-seed run CI makes: 200 seeds, each ten simulated minutes of a generated
/// workload over eight models on two GPUs, with faults of every kind drawn from the
/// seed; the invariants are checked at every ledger commit and none may break. The
/// zoo's preemption is `resume`; the first hundred seeds run again with `drain`.
#[test]
fn two_hundred_fault_seeds_break_no_invariant() {
    let seeds = |range: &str, extra: &[&str]| {
        let mut args = vec![
            "--rate",
            "1",
            "--minutes",
            "10",
            "--models",
            "8",
            "--gpus",
            "2",
            "--faults",
            "--seeds",
            range,
            "--json",
        ];
        args.extend_from_slice(extra);
        simulate(&args).unwrap_or_else(|e| panic!("{e}"))
    };
    let drained = seeds("1..100", &["--preemption", "drain"]);
    assert_eq!(drained["seeds"], 100);
    assert_eq!(drained["failed"], serde_json::json!([]), "{drained}");
    assert_eq!(drained["hung"], 0, "{drained}");
    let v = seeds("1..200", &[]);
    assert_eq!(v["seeds"], 200);
    assert_eq!(v["failed"], serde_json::json!([]), "{v}");
    assert_eq!(v["hung"], 0, "{v}");
    assert!(v["faultsInjected"].as_u64().unwrap() >= 1000, "{v}");
    let kinds = v["injectedByKind"].as_object().unwrap();
    for kind in [
        "crash-waking",
        "crash-streaming",
        "crash-asleep",
        "wake-fails",
        "wake-hangs",
        "slow-ledger",
        "conflicting-writes",
        "sidecar-restart",
    ] {
        assert!(
            kinds.get(kind).and_then(Value::as_u64).unwrap_or(0) >= 20,
            "{kind}: {v}"
        );
    }
    // Ten simulated minutes each, and more for the settling after the faults.
    assert!(
        v["simulatedSeconds"].as_f64().unwrap() >= 200.0 * 600.0 * 0.95,
        "{v}"
    );
    assert!(v["answered"].as_u64().unwrap() > 100_000, "{v}");
}

/// One fault run replays from its seed: what struck, when, and every outcome.
#[test]
fn a_fault_run_replays_from_its_seed() {
    let args = [
        "--rate",
        "1",
        "--minutes",
        "5",
        "--models",
        "8",
        "--gpus",
        "2",
        "--faults",
        "--fault-every",
        "10s",
        "--seed",
        "7",
        "--json",
    ];
    let a = simulate(&args).unwrap();
    let b = simulate(&args).unwrap();
    assert_eq!(without_wall(a.clone()), without_wall(b));
    let f = &a["faults"];
    assert_eq!(f["seed"], 7);
    assert!(f["injected"].as_array().unwrap().len() >= 5, "{f}");
    assert_eq!(f["violations"], serde_json::json!([]), "{f}");
}

/// With host memory for sleepers (`--host-memory`), sleeps that do not fit go to level 2
/// and are counted, per model and overall; without it none is, and every request is
/// still answered or refused with a reason.
#[test]
fn host_memory_sends_sleepers_to_level_two() {
    let run = |host: Option<&str>| {
        let mut args = vec![
            "--rate",
            "2",
            "--minutes",
            "5",
            "--models",
            "8",
            "--gpus",
            "1",
            "--json",
        ];
        if let Some(h) = host {
            args.extend(["--host-memory", h]);
        }
        simulate(&args).unwrap()
    };
    let free = run(None);
    assert_eq!(free["sleepDemotions"], 0, "{free}");
    // Room for one 8B-class model's weights (16 GB) at a time.
    let tight = run(Some("16Gi"));
    let demotions = tight["sleepDemotions"].as_u64().unwrap();
    assert!(demotions > 0, "{tight}");
    let models = tight["models"].as_array().unwrap();
    let per_model: u64 = models
        .iter()
        .map(|m| m["sleepDemotions"].as_u64().unwrap())
        .sum();
    assert_eq!(per_model, demotions);
    assert_eq!(tight["requests"], free["requests"]);
    assert_eq!(tight["hung"], 0, "{tight}");
}
