//! Scheduling policies: when a waker that is short of memory may preempt, and whom. Each
//! is a pure module behind [`SchedulingPolicy`], chosen per installation by [`Policy`]:
//!
//! - [`Policy::Lru`] ([`lru`]), the documented behaviour, kept as it was: wait
//!   `maxWaitTime`, then the least recently accessed eligible models.
//! - [`Policy::CostAware`] ([`cost_aware`]), the default: weighs the waker's demand
//!   against its victims', preempts at once the cheapest it stands above, and past a
//!   bound anyone.
//!
//! What every policy shares is here: the priority classes decide before the policy
//! ([`victims`]). The rest of a wake (the lock, the claim, the intent, one victim at a
//! time) is [`crate::decide::wake_step`]'s. All are table-tested below.

use std::{fmt, str::FromStr, time::Duration};

use greenthread_api::{GpuSpec, GpuStatus, OccupantState, Priority};
use jiff::Timestamp;

use crate::decide::{NoVictim, available_bytes};

pub mod cost_aware;
pub mod lru;

pub use cost_aware::{CostAware, SECONDS_PER_AGED_REQUEST};
pub use lru::Lru;

/// The policy an installation chooses (`--policy`, `policy:` in a local config,
/// `controller.schedulingPolicy` in the chart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    Lru,
    #[default]
    CostAware,
}

impl Policy {
    pub const ALL: [Policy; 2] = [Policy::Lru, Policy::CostAware];

    /// Its decisions.
    pub fn rules(self) -> &'static dyn SchedulingPolicy {
        match self {
            Policy::Lru => &Lru,
            Policy::CostAware => &CostAware,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::CostAware => "cost-aware",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lru" => Ok(Policy::Lru),
            "cost-aware" | "default" => Ok(Policy::CostAware),
            other => Err(format!(
                "unknown scheduling policy {other:?}: expected lru or cost-aware (default)"
            )),
        }
    }
}

/// One GPU's record at a moment, as a policy weighs it.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub spec: &'a GpuSpec,
    pub status: &'a GpuStatus,
    pub now: Timestamp,
    /// How long a waker may wait before it stands above everyone (cost-aware: two
    /// fifths of its requests' queue deadline).
    pub bound: Duration,
}

/// What sets one scheduling policy apart from another: pure decisions over a GPU's
/// record.
pub trait SchedulingPolicy: Send + Sync {
    /// Whether a waker short of memory first waits out `maxWaitTime` for it to free by
    /// itself.
    fn waits_for_fairness(&self) -> bool {
        false
    }

    /// Whether demand weighs in: a waker's intent carries its recent requests, and
    /// sidecars report their traffic starting and stopping at once, not only with their
    /// heartbeat.
    fn weighs_demand(&self) -> bool {
        false
    }

    /// Whether a victim's answers may be stopped and continued after its next wake
    /// (`preemption: resume`) instead of drained.
    fn may_resume(&self) -> bool {
        false
    }

    /// The older waker this GPU's free memory is held for, when a claim of `bytes` by
    /// `pod` must wait for it. Wakers silent for longer than `ttl` hold nothing.
    fn held_for(&self, _gpu: View, _pod: &str, _bytes: u64, _ttl: Duration) -> Option<String> {
        None
    }

    /// The victims that free `needed` bytes for `waker` (none when that much is free),
    /// among the serving occupants not marked popular; why none when no set will do.
    fn victims(&self, gpu: View, waker: &str, needed: u64) -> Result<Vec<String>, NoVictim>;

    /// When only time can change a waiting `waker`'s answer, the moment it may: by
    /// default, an occupant passing its `minRuntime`.
    fn recheck_at(&self, gpu: View, waker: &str) -> Option<Timestamp> {
        crate::decide::next_eligibility(gpu.status, waker, gpu.now)
    }
}

/// The victims `policy` would preempt for `waker` now.
///
/// Priority classes come first: a sheddable waker preempts nobody; victims are taken
/// from the sheddable models if the policy finds a set there, else from the sheddable
/// and standard ones, and only then from critical ones too. Within a class the policy
/// chooses as it always does.
pub fn victims(
    policy: Policy,
    gpu: View,
    waker: &str,
    needed: u64,
) -> Result<Vec<String>, NoVictim> {
    let rules = policy.rules();
    let (spec, status) = (gpu.spec, gpu.status);
    let others = || status.occupants.iter().filter(|o| o.pod_name != waker);
    if status
        .occupant(waker)
        .is_some_and(|o| o.priority == Priority::Sheddable)
        && available_bytes(spec, status, Some(waker)) < needed
    {
        return Err(NoVictim::Sheddable);
    }
    for class in [Priority::Sheddable, Priority::Standard] {
        let serving_in_class = others()
            .any(|o| o.state == OccupantState::Serving && o.priority <= class && !o.popular);
        if !serving_in_class || !others().any(|o| o.priority > class) {
            continue;
        }
        // Those above the class are spared, as popular ones are.
        let mut only = status.clone();
        for o in only.occupants.iter_mut() {
            if o.pod_name != waker && o.priority > class {
                o.popular = true;
            }
        }
        let within = View {
            status: &only,
            ..gpu
        };
        if let Ok(victims) = rules.victims(within, waker, needed) {
            return Ok(victims);
        }
    }
    rules.victims(gpu, waker, needed)
}

#[cfg(test)]
mod tests {
    use greenthread_api::{Occupant, PreemptionIntent};

    use super::*;
    use crate::decide::{Claim, GpuWait, WakeRequest, WakeStep, wake_step};

    const GI: u64 = 1 << 30;
    const BOUND: Duration = Duration::from_secs(150);

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn spec() -> GpuSpec {
        GpuSpec {
            memory_bytes: 80 * GI,
            ..Default::default()
        }
    }

    /// `status` on an 80 GiB GPU at `now`, with the test's bound.
    fn view<'a>(spec: &'a GpuSpec, status: &'a GpuStatus, now: i64) -> View<'a> {
        View {
            spec,
            status,
            now: t(now),
            bound: BOUND,
        }
    }

    /// A serving occupant: `gib` reserved, serving since `since`, `in_flight` requests
    /// now, `recent` in the last ten minutes, last accessed at `accessed`.
    fn serving(
        pod: &str,
        gib: u64,
        since: i64,
        in_flight: u32,
        recent: u32,
        accessed: i64,
    ) -> Occupant {
        Occupant {
            pod_name: pod.into(),
            model_name: pod.into(),
            state: OccupantState::Serving,
            reserved_memory_bytes: gib * GI,
            residual_memory_bytes: 0,
            popular: false,
            priority: Default::default(),
            last_accessed: Some(t(accessed)),
            became_serving_at: Some(t(since)),
            min_runtime: Duration::from_secs(10),
            heartbeat: t(0),
            in_flight,
            draining: 0,
            recent_requests: recent,
            host_memory_bytes: 0,
            pinned: false,
        }
    }

    /// A 40 GiB serving occupant, past its `minRuntime`, with 2 answers in flight and 5
    /// recent requests, `n` of those answers ones a preemption cannot stop.
    fn draining(n: u32) -> Occupant {
        Occupant {
            draining: n,
            ..serving("draining", 40, 0, 2, 5, 99)
        }
    }

    /// The waker, asleep, with `recent` requests, waiting since `since`.
    fn waker(recent: u32, since: i64) -> (Occupant, PreemptionIntent) {
        let mut o = serving("w", 0, 0, 0, recent, 0);
        o.state = OccupantState::Sleeping;
        o.became_serving_at = None;
        let i = PreemptionIntent {
            pod_name: "w".into(),
            model_name: "w".into(),
            needed_bytes: 24 * GI,
            since: t(since),
            victim_pod_name: None,
        };
        (o, i)
    }

    /// The waker's claim for 24 GiB with `recent` requests.
    fn waker_claim(recent: u32) -> Claim {
        Claim {
            pod: "w".into(),
            model: "w".into(),
            bytes: 24 * GI,
            popular: false,
            priority: Default::default(),
            min_runtime: Duration::from_secs(10),
            recent_requests: recent,
        }
    }

    fn status(others: Vec<Occupant>, waker_recent: u32, waiting_since: i64) -> GpuStatus {
        let (w, i) = waker(waker_recent, waiting_since);
        let mut occupants = others;
        occupants.push(w);
        GpuStatus {
            occupants,
            preemption_intents: vec![i],
            ..Default::default()
        }
    }

    #[test]
    fn the_cost_aware_policy_takes_the_cheapest_victims_it_stands_above() {
        // (others, waker's recent requests, waited since, now, needed GiB) → victims
        type Case = (
            &'static str,
            Vec<Occupant>,
            u32,
            i64,
            i64,
            u64,
            Result<Vec<&'static str>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "idle before busy, though the busy one has fewer recent requests",
                vec![
                    serving("busy", 24, 0, 2, 5, 50),
                    serving("idle", 24, 0, 0, 9, 99),
                    serving("big", 24, 0, 1, 40, 1),
                ],
                50,
                100,
                100,
                24,
                Ok(vec!["idle"]),
            ),
            (
                "among idle ones, the fewest recent requests, then the least recently used",
                vec![
                    serving("a", 24, 0, 0, 7, 10),
                    serving("b", 24, 0, 0, 3, 90),
                    serving("c", 24, 0, 0, 3, 20),
                ],
                50,
                100,
                100,
                24,
                Ok(vec!["c"]),
            ),
            (
                "a model in more demand than the waker stands is spared",
                vec![
                    serving("hot", 40, 0, 0, 800, 99),
                    serving("warm", 24, 0, 3, 60, 99),
                ],
                20,
                100,
                100,
                24,
                Err("in more demand"),
            ),
            (
                "three seconds waited add one: after 120 s, 20 + 40 reaches warm's 60",
                vec![
                    serving("hot", 40, 0, 0, 800, 99),
                    serving("warm", 24, 0, 3, 60, 99),
                ],
                20,
                100,
                220,
                24,
                Ok(vec!["warm"]),
            ),
            (
                "past the bound the waker stands above everyone",
                vec![
                    serving("hot", 40, 0, 0, 800, 99),
                    serving("warm", 24, 0, 3, 60, 99),
                ],
                0,
                100,
                250,
                24,
                Ok(vec!["warm"]),
            ),
            (
                "past the bound, the least demand first even if busy: an idle hot model is spared",
                vec![
                    serving("hot", 40, 0, 0, 800, 99),
                    serving("a", 24, 0, 2, 30, 99),
                    serving("b", 24, 0, 1, 20, 99),
                ],
                0,
                100,
                250,
                40,
                Ok(vec!["b", "a"]),
            ),
            (
                "past the bound, it waits for a cheap model inside its minRuntime rather than \
                 take the hot one that is eligible now",
                vec![
                    serving("hot", 40, 0, 3, 800, 99),
                    serving("fresh", 24, 245, 1, 10, 99),
                    serving("b", 24, 0, 1, 20, 99),
                ],
                0,
                100,
                250,
                40,
                Err("fresh has not served its minRuntime"),
            ),
            (
                "past the bound, the hot one when nothing cheaper frees enough",
                vec![
                    serving("hot", 60, 0, 3, 800, 99),
                    serving("b", 12, 0, 1, 20, 99),
                ],
                0,
                100,
                250,
                40,
                Ok(vec!["hot"]),
            ),
            (
                "one whose answers must finish before it sleeps is spared for one whose \
                 answers can be stopped, though in more demand",
                vec![draining(2), serving("stoppable", 40, 0, 3, 10, 99)],
                50,
                100,
                100,
                24,
                Ok(vec!["stoppable"]),
            ),
            (
                "only such a one: the waker waits for its answers to finish",
                vec![draining(1), serving("hot", 40, 0, 0, 800, 99)],
                50,
                100,
                100,
                24,
                Err("draining has 1 answers to finish"),
            ),
            (
                "past the bound, it is taken all the same",
                vec![draining(1), serving("hot", 40, 0, 0, 800, 99)],
                50,
                100,
                250,
                24,
                Ok(vec!["draining"]),
            ),
            (
                "never a popular model, nor one inside its minRuntime",
                vec![
                    Occupant {
                        popular: true,
                        priority: Default::default(),
                        ..serving("popular", 24, 0, 0, 0, 0)
                    },
                    serving("fresh", 24, 95, 0, 0, 0),
                    serving("ok", 24, 0, 0, 5, 0),
                ],
                50,
                100,
                100,
                24,
                Ok(vec!["ok"]),
            ),
            (
                "a small victim taken before a large one that alone suffices is spared",
                vec![
                    serving("small", 12, 0, 0, 1, 0),
                    serving("large", 40, 0, 0, 2, 0),
                    serving("mid", 24, 0, 0, 30, 0),
                ],
                50,
                100,
                100,
                32,
                Ok(vec!["large"]),
            ),
            (
                "not enough memory among those it may take",
                vec![
                    serving("only", 12, 0, 0, 1, 0),
                    serving("hot", 60, 0, 0, 900, 0),
                ],
                50,
                100,
                100,
                24,
                Err("frees"),
            ),
        ];
        for (name, others, recent, since, now, gib, expected) in cases {
            let status = status(others, recent, since);
            let got = CostAware.victims(view(&spec(), &status, now), "w", gib * GI);
            match (&got, &expected) {
                (Ok(v), Ok(e)) => assert_eq!(v, e, "{name}"),
                (Err(err), Err(e)) => assert!(err.to_string().contains(e), "{name}: {err}"),
                _ => panic!("{name}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn memory_is_held_for_an_older_waker_past_the_bound() {
        // "w" (40 GiB) has waited since t=100; 16 GiB are free (hot 40 + small 24 serve).
        let mut st = status(
            vec![
                serving("hot", 40, 0, 3, 800, 99),
                serving("small", 24, 0, 0, 5, 99),
            ],
            0,
            100,
        );
        st.preemption_intents[0].needed_bytes = 40 * GI;
        let young = |st: &GpuStatus, bytes: u64, now: i64| {
            CostAware.held_for(
                view(&spec(), st, now),
                "y",
                bytes * GI,
                Duration::from_secs(30),
            )
        };
        // Before the bound nothing is held.
        assert_eq!(young(&st, 12, 240), None);
        // Past it, a younger claim that would leave less than 40 GiB free waits...
        st.occupants.iter_mut().for_each(|o| o.heartbeat = t(240));
        assert_eq!(young(&st, 12, 260).as_deref(), Some("w"));
        // ...also a younger waker with an intent of its own...
        let mut with_intent = st.clone();
        with_intent.preemption_intents.push(PreemptionIntent {
            pod_name: "y".into(),
            model_name: "y".into(),
            needed_bytes: 12 * GI,
            since: t(200),
            victim_pod_name: None,
        });
        assert_eq!(young(&with_intent, 12, 260).as_deref(), Some("w"));
        // ...but not an older one, nor "w" itself.
        with_intent.preemption_intents[1].since = t(50);
        assert_eq!(young(&with_intent, 12, 260), None);
        assert_eq!(
            CostAware.held_for(
                view(&spec(), &st, 260),
                "w",
                40 * GI,
                Duration::from_secs(30)
            ),
            None
        );
        // The documented policy holds nothing for anyone.
        assert_eq!(
            Lru.held_for(
                view(&spec(), &st, 260),
                "y",
                12 * GI,
                Duration::from_secs(30)
            ),
            None
        );
        // A claim that leaves enough for both goes ahead (56 GiB free).
        let mut roomy = st.clone();
        roomy.occupants.retain(|o| o.pod_name != "hot");
        assert_eq!(young(&roomy, 12, 260), None);
        // A waker that stopped heartbeating holds nothing.
        assert_eq!(young(&st, 12, 300), None);
    }

    #[test]
    fn a_held_wake_waits_and_ages_without_claiming() {
        let mut st = status(
            vec![
                serving("hot", 40, 0, 3, 800, 99),
                serving("small", 24, 0, 0, 5, 99),
            ],
            0,
            100,
        );
        st.preemption_intents[0].needed_bytes = 40 * GI;
        st.occupants.iter_mut().for_each(|o| o.heartbeat = t(250));
        let claim = Claim {
            pod: "y".into(),
            model: "y".into(),
            bytes: 12 * GI,
            popular: false,
            priority: Default::default(),
            min_runtime: Duration::from_secs(10),
            recent_requests: 3,
        };
        let req = WakeRequest {
            claim: &claim,
            lock_ttl: Duration::from_secs(30),
            max_wait: Duration::from_secs(5),
            policy: Policy::CostAware,
            starvation_bound: BOUND,
            short_since: None,
        };
        let (next, step) = wake_step(&spec(), &st, &req, t(260));
        match step {
            WakeStep::Wait {
                why: GpuWait::NoVictim(NoVictim::HeldFor(w)),
                ..
            } => assert_eq!(w, "w"),
            other => panic!("expected a held wait, got {other:?}"),
        }
        let next = next.expect("the intent is written");
        assert!(next.preemption_intents.iter().any(|i| i.pod_name == "y"));
        assert!(
            next.occupant("y")
                .is_none_or(|o| o.reserved_memory_bytes == 0)
        );
        // The documented policy holds nothing: it claims the free memory.
        let lru = WakeRequest {
            policy: Policy::Lru,
            ..req
        };
        assert_eq!(wake_step(&spec(), &st, &lru, t(260)).1, WakeStep::Claimed);
    }

    #[test]
    fn a_waiting_waker_looks_again_when_its_standing_reaches_the_next_victim() {
        let st = status(vec![serving("warm", 24, 0, 3, 60, 99)], 20, 100);
        // Standing 20 at t=100; warm has 60: forty requests, 120 s, later.
        assert_eq!(
            Policy::CostAware
                .rules()
                .recheck_at(view(&spec(), &st, 100), "w"),
            Some(t(220))
        );
        // Part of the way there, the rest of it.
        assert_eq!(
            Policy::CostAware
                .rules()
                .recheck_at(view(&spec(), &st, 190), "w"),
            Some(t(220))
        );
        // The bound comes first when it is nearer.
        let st = status(vec![serving("hot", 24, 0, 3, 900, 99)], 0, 100);
        assert_eq!(
            Policy::CostAware
                .rules()
                .recheck_at(view(&spec(), &st, 200), "w"),
            Some(t(250))
        );
        // The documented policy looks again only when someone becomes eligible.
        assert_eq!(
            Policy::Lru.rules().recheck_at(view(&spec(), &st, 200), "w"),
            None
        );
    }

    #[test]
    fn only_the_documented_policy_waits_out_max_wait_before_preempting() {
        let others = vec![serving("a", 40, 0, 0, 1, 0), serving("b", 40, 0, 0, 1, 5)];
        let claim = waker_claim(5);
        // The waker's entry exists from its boot; only the cost-aware step writes its demand.
        let mut occupants = others;
        occupants.push(waker(0, 0).0);
        let status = GpuStatus {
            occupants,
            ..Default::default()
        };
        for (policy, expected_victim) in [(Policy::Lru, None), (Policy::CostAware, Some("a"))] {
            let req = WakeRequest {
                claim: &claim,
                lock_ttl: Duration::from_secs(30),
                max_wait: Duration::from_secs(5),
                policy,
                starvation_bound: BOUND,
                short_since: None,
            };
            let (next, step) = wake_step(&spec(), &status, &req, t(100));
            let named = next
                .as_ref()
                .and_then(|n| n.preemption_intents.first())
                .and_then(|i| i.victim_pod_name.as_deref());
            assert_eq!(named, expected_victim, "{policy}");
            match (policy, step) {
                (
                    Policy::Lru,
                    WakeStep::Wait {
                        why: GpuWait::Fairness { .. },
                        ..
                    },
                ) => {}
                (
                    Policy::CostAware,
                    WakeStep::Wait {
                        why: GpuWait::Preempting { .. },
                        ..
                    },
                ) => {}
                (p, s) => panic!("{p}: {s:?}"),
            }
            // The cost-aware intent carries the waker's demand; the documented one does not touch its record.
            let recorded = next.unwrap().occupant("w").map(|o| o.recent_requests);
            let expected = if policy == Policy::CostAware { 5 } else { 0 };
            assert_eq!(recorded, Some(expected), "{policy}");
        }
    }

    /// The priority rules, under both policies: (case, others, waker's class, waited
    /// since, now) → victims. `a` is always the least recently used and the cheapest, so
    /// that a victim other than `a` shows the class deciding.
    #[test]
    fn priority_classes_decide_before_the_policy() {
        use Priority::{Critical, Sheddable, Standard};
        let of = |p: Priority, mut o: Occupant| {
            o.priority = p;
            o
        };
        type Case = (
            &'static str,
            Vec<Occupant>,
            Priority,
            u64,
            Result<Vec<&'static str>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "a sheddable model is the first victim",
                vec![
                    serving("a", 24, 0, 0, 1, 0),
                    of(Sheddable, serving("b", 24, 0, 0, 9, 90)),
                ],
                Standard,
                40,
                Ok(vec!["b"]),
            ),
            (
                "a critical model is spared while a standard one frees enough",
                vec![
                    of(Critical, serving("a", 24, 0, 0, 1, 0)),
                    serving("b", 24, 0, 0, 9, 90),
                ],
                Standard,
                40,
                Ok(vec!["b"]),
            ),
            (
                "and taken when nothing else frees enough",
                vec![
                    of(Critical, serving("a", 60, 0, 0, 1, 0)),
                    serving("b", 4, 0, 0, 1, 90),
                ],
                Standard,
                40,
                Ok(vec!["a"]),
            ),
            (
                "sheddable and standard together before critical",
                vec![
                    of(Critical, serving("a", 24, 0, 0, 1, 0)),
                    of(Sheddable, serving("b", 12, 0, 0, 1, 90)),
                    serving("c", 12, 0, 0, 1, 90),
                    serving("d", 4, 0, 0, 1, 90),
                ],
                Standard,
                48,
                Ok(vec!["b", "c"]),
            ),
            (
                "a sheddable waker preempts nobody",
                vec![of(Sheddable, serving("a", 24, 0, 0, 0, 0))],
                Sheddable,
                70,
                Err("a sheddable model never preempts"),
            ),
        ];
        for policy in Policy::ALL {
            for (name, others, class, gib, want) in &cases {
                let mut st = status(others.clone(), 50, 100);
                st.occupant_mut("w").unwrap().priority = *class;
                let got = victims(policy, view(&spec(), &st, 100), "w", gib * GI);
                let got = got.map(|mut v| {
                    v.sort();
                    v
                });
                match (want, got) {
                    (Ok(w), Ok(g)) => assert_eq!(&g, w, "{policy}: {name}"),
                    (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{policy}: {name}: {e}"),
                    (w, g) => panic!("{policy}: {name}: want {w:?}, got {g:?}"),
                }
            }
        }
    }

    #[test]
    fn a_critical_wake_preempts_without_waiting_its_turn() {
        // Under lru it skips maxWaitTime; under cost-aware it stands above a busy model
        // in far more demand than its own.
        let mut hot = serving("hot", 60, 0, 3, 800, 0);
        hot.priority = Priority::Standard;
        for policy in Policy::ALL {
            let claim = Claim {
                priority: Priority::Critical,
                ..waker_claim(1)
            };
            let mut st = status(vec![hot.clone()], 1, 100);
            st.occupant_mut("w").unwrap().priority = Priority::Critical;
            let req = WakeRequest {
                claim: &claim,
                lock_ttl: Duration::from_secs(30),
                max_wait: Duration::from_secs(5),
                policy,
                starvation_bound: BOUND,
                short_since: Some(t(100)),
            };
            let (_, step) = wake_step(&spec(), &st, &req, t(100));
            assert!(
                matches!(&step, WakeStep::Wait { why: GpuWait::Preempting { victim, .. }, .. } if victim == "hot"),
                "{policy}: {step:?}"
            );
            // The same wake at standard priority waits (lru: its fairness time;
            // cost-aware: hot is in more demand).
            let standard = Claim {
                priority: Priority::Standard,
                ..claim.clone()
            };
            st.occupant_mut("w").unwrap().priority = Priority::Standard;
            let req = WakeRequest {
                claim: &standard,
                ..req
            };
            let (_, step) = wake_step(&spec(), &st, &req, t(100));
            assert!(
                !matches!(
                    step,
                    WakeStep::Wait {
                        why: GpuWait::Preempting { .. },
                        ..
                    }
                ),
                "{policy}: {step:?}"
            );
        }
    }

    #[test]
    fn a_waiting_step_that_finds_nothing_new_leaves_the_record_as_it_is() {
        // A waker below a busy model's demand waits; its next look, a second later, must
        // not rewrite the record (on the wall clock, a rewrite wakes the waker itself:
        // it spun on its own writes).
        let st = status(vec![serving("hot", 60, 0, 2, 900, 99)], 5, 100);
        let claim = waker_claim(5);
        let req = WakeRequest {
            claim: &claim,
            lock_ttl: Duration::from_secs(30),
            max_wait: Duration::from_secs(5),
            policy: Policy::CostAware,
            starvation_bound: BOUND,
            short_since: Some(t(100)),
        };
        let (first, step) = wake_step(&spec(), &st, &req, t(101));
        assert!(
            matches!(
                step,
                WakeStep::Wait {
                    why: GpuWait::NoVictim(_),
                    ..
                }
            ),
            "{step:?}"
        );
        let first = first.unwrap_or(st);
        let (again, _) = wake_step(&spec(), &first, &req, t(102));
        assert_eq!(again.unwrap_or_else(|| first.clone()), first);
    }

    /// What every policy keeps, whatever the record: checked for each policy on 3,000
    /// records drawn from a fixed seed (occupants of every state, size, class and load on
    /// an 80 GiB GPU; wakers of every class that waited from nothing to past the bound).
    /// A victim set frees enough, holds no victim it could do without, and names only
    /// serving models that are not popular, are past their `minRuntime` and are not the
    /// waker; a sheddable waker names nobody; a waiter looks again in the future or not
    /// at all.
    #[test]
    fn every_policy_keeps_the_contract_on_drawn_records() {
        use OccupantState::{Serving, Sleeping, Waking};
        use Priority::{Critical, Sheddable, Standard};
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut draw = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let sizes = [4, 12, 24, 40];
        let classes = [Sheddable, Standard, Standard, Critical];
        let mut outcomes = std::collections::BTreeMap::<(&str, &str), usize>::new();
        for _ in 0..3_000 {
            let now = 300 + draw(200) as i64;
            let mut others = Vec::new();
            let mut charged = 0;
            for k in 0..1 + draw(7) {
                let gib = sizes[draw(4) as usize];
                let since = now - draw(40) as i64;
                let in_flight = draw(3) as u32;
                let recent = draw(120) as u32;
                let mut o = serving(&format!("o{k}"), gib, since, in_flight, recent, since);
                o.state = [Serving, Serving, Waking, Sleeping][draw(4) as usize];
                if o.state == Sleeping {
                    o.residual_memory_bytes = gib * GI / 8;
                    o.reserved_memory_bytes = 0;
                }
                o.popular = draw(6) == 0;
                o.priority = classes[draw(4) as usize];
                o.heartbeat = t(now);
                let bytes = crate::decide::charged_bytes(&o);
                if charged + bytes <= 80 * GI {
                    charged += bytes;
                    others.push(o);
                }
            }
            let waited = draw(BOUND.as_secs() + 60) as i64;
            let mut st = status(others, draw(120) as u32, now - waited);
            let needed = sizes[draw(4) as usize] * GI;
            st.preemption_intents[0].needed_bytes = needed;
            let class = classes[draw(4) as usize];
            st.occupant_mut("w").unwrap().priority = class;
            let spec = spec();
            let gpu = view(&spec, &st, now);
            let available = available_bytes(&spec, &st, Some("w"));
            for policy in Policy::ALL {
                let got = victims(policy, gpu, "w", needed);
                let outcome = match &got {
                    Ok(v) if v.is_empty() => "fits",
                    Ok(_) => "named",
                    Err(_) => "waits",
                };
                *outcomes.entry((policy.as_str(), outcome)).or_default() += 1;
                let Ok(names) = got else {
                    let next = policy.rules().recheck_at(gpu, "w");
                    assert!(next.is_none_or(|at| at > gpu.now), "{policy}: {next:?}");
                    continue;
                };
                let chosen: Vec<&Occupant> = names
                    .iter()
                    .map(|n| st.occupant(n).expect("a victim is an occupant"))
                    .collect();
                let freed: u64 = chosen.iter().map(|o| o.reserved_memory_bytes).sum();
                assert!(
                    available + freed >= needed,
                    "{policy}: frees too little: {st:?}"
                );
                let mut unique = names.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(unique.len(), names.len(), "{policy}: {names:?}");
                if class == Sheddable {
                    assert!(
                        names.is_empty(),
                        "{policy}: a sheddable waker named {names:?}"
                    );
                }
                for o in &chosen {
                    assert_ne!(o.pod_name, "w", "{policy}");
                    assert_eq!(o.state, Serving, "{policy}: {}", o.pod_name);
                    assert!(!o.popular, "{policy}: {} is popular", o.pod_name);
                    let served = crate::decide::eligible_at(o).is_some_and(|at| at <= gpu.now);
                    assert!(served, "{policy}: {} is inside its minRuntime", o.pod_name);
                    assert!(
                        available + freed - o.reserved_memory_bytes < needed,
                        "{policy}: {} is not needed: {names:?} in {st:?}",
                        o.pod_name
                    );
                }
            }
        }
        // The draw reaches every answer under every policy.
        for policy in Policy::ALL {
            for outcome in ["fits", "named", "waits"] {
                let n = outcomes
                    .get(&(policy.as_str(), outcome))
                    .copied()
                    .unwrap_or(0);
                assert!(n >= 200, "{policy}: only {n} records where it {outcome}");
            }
        }
    }

    #[test]
    fn policies_parse_from_their_names() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
        }
        assert_eq!("default".parse::<Policy>(), Ok(Policy::CostAware));
        assert!(
            "fifo"
                .parse::<Policy>()
                .unwrap_err()
                .contains("lru or cost-aware")
        );
    }
}
