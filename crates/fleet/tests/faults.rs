//! Seeded faults through the real control plane: a run with faults replays exactly from
//! its seed, and the invariant checks catch a bug planted on purpose, naming the seed
//! and the step, the same on every replay.

use std::time::Duration;

use greenthread_fleet::{
    assign,
    faults::{Fault, FaultPlan},
    rng::Rng,
    run::{Outcome, Run, Setup, run},
    trace::{Arrivals, generate},
    zoo,
};

const GIB: u64 = 1 << 30;

fn setup(models: usize, gpus: usize, minutes: u64, seed: u64, faults: FaultPlan) -> Setup {
    let workload = generate(
        1.0,
        Duration::from_secs(minutes * 60),
        Arrivals::Poisson,
        &mut Rng::new(seed),
    );
    let (requests, _) = assign(&workload, models, 1.0, seed);
    Setup {
        models: zoo::zoo(models, 80 * GIB, 1).unwrap(),
        gpus: vec![80 * GIB; gpus],
        requests,
        seed,
        policy: Default::default(),
        faults: Some(faults),
        preemption: greenthread_sidecar::Preemption::Drain,
        host_memory: None,
        link: Default::default(),
    }
}

fn ended(run: &Run) -> bool {
    run.outcomes.iter().all(|o| *o != Outcome::Hung)
}

#[test]
fn a_run_with_faults_replays_exactly_from_its_seed() {
    let plan = || FaultPlan::generate(11, 8, Duration::from_secs(240), Duration::from_secs(10));
    let a = run(setup(8, 2, 5, 11, plan()), None).unwrap();
    let b = run(setup(8, 2, 5, 11, plan()), None).unwrap();
    assert!(a.injected.len() >= 10, "{:?}", a.injected);
    assert_eq!(a.injected, b.injected);
    assert_eq!(a.outcomes, b.outcomes);
    assert_eq!(a.violations, b.violations);
    assert!(a.violations.is_empty(), "{:#?}", a.violations);
    assert!(ended(&a));
    assert_eq!(a.faults_seed, Some(11));
}

#[test]
fn a_planted_bug_is_caught_with_its_seed_and_step_and_caught_again_on_replay() {
    let plan = || FaultPlan {
        seed: 42,
        until: Duration::from_secs(60),
        events: vec![(Duration::from_secs(30), Fault::Corrupt { gpu: 0 })],
    };
    let a = run(setup(4, 1, 2, 42, plan()), None).unwrap();
    let first = a.violations.first().expect("the planted record is caught");
    assert_eq!(first.seed, 42);
    assert!(
        first.what.contains("gpu-0") && first.what.contains("charged"),
        "{first}"
    );
    assert!(first.step > 0);
    // At the moment it was planted, not later.
    assert_eq!(first.at, Duration::from_secs(30), "{first}");
    let shown = first.to_string();
    assert!(shown.starts_with("seed 42 step "), "{shown}");
    let b = run(setup(4, 1, 2, 42, plan()), None).unwrap();
    assert_eq!(a.violations, b.violations, "the same seed reproduces it");
    assert_eq!(a.injected.len(), 1);
    assert_eq!(a.injected[0].kind, "corrupt");
}

#[test]
fn without_faults_nothing_is_checked_or_injected() {
    let mut s = setup(
        4,
        1,
        1,
        3,
        FaultPlan::generate(3, 4, Duration::from_secs(40), Duration::from_secs(5)),
    );
    s.faults = None;
    let r = run(s, None).unwrap();
    assert!(r.injected.is_empty() && r.violations.is_empty());
    assert_eq!(r.faults_seed, None);
}
