//! Scheduling policies: when a waker that is short of memory may preempt, and whom. Pure
//! functions of a GPU's record, chosen per installation.
//!
//! - [`Policy::Lru`], the documented behaviour: wait `maxWaitTime` for memory to free by
//!   itself, then preempt the least recently accessed serving models (not popular, past
//!   their `minRuntime`), as few as free enough memory, one at a time.
//! - [`Policy::CostAware`], the default, weighs demand. A waker *stands* at its requests
//!   of the last ten minutes plus one for every three seconds it has waited; it may preempt a
//!   serving model (not popular, past its `minRuntime`) whose recent requests do not
//!   exceed its standing, and does so at once (no `maxWaitTime`: waiting only adds to its
//!   requests' time to first token). Among those it takes the cheapest first: idle ones
//!   (nothing to drain), then the fewest recent requests, then the least recently
//!   accessed. A model with little traffic thus waits for one with much to finish rather
//!   than evict it — evicting a busy model makes every request that arrives while it
//!   drains, sleeps and wakes again wait — but not for ever: after two fifths of its
//!   requests' queue deadline it may preempt anyone, so that they are served well before
//!   they time out (the rest of the deadline covers a victim's drain, sleep and wake).
//!   Past that bound it still takes the victims in least demand (busy or not), waiting a
//!   few seconds for cheap ones inside their `minRuntime` rather than evicting the busiest
//!   model, and the memory freed meanwhile is held for it: younger wakers on the GPU
//!   must not take what it needs. Without the hold, a large model on a GPU whose other
//!   half rotates among small ones never finds its memory, and past the bound it evicts
//!   the one busy model big enough (on the conversation trace, the busiest of all).
//!   Measured with `greenthread simulate` (see `docs/simulate.md`).
//!
//! Both are table-tested below; `lru` is kept unchanged as the documented original.

use std::{fmt, str::FromStr, time::Duration};

use greenthread_api::{GpuSpec, GpuStatus, Occupant, OccupantState, Priority};
use jiff::Timestamp;

use crate::decide::{NoVictim, available_bytes};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    Lru,
    #[default]
    CostAware,
}

impl Policy {
    pub const ALL: [Policy; 2] = [Policy::Lru, Policy::CostAware];

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

/// Seconds of waiting that add one request to a waker's standing: as if it received a
/// request every three seconds it has waited. Slower aging keeps the models in demand
/// awake longer, faster aging serves the others sooner; on the conversation trace at 7
/// models per GPU (28 models, 4 GPUs, seeds 1–3) one a second gave 71.2 % within 3 s and
/// 77.6 % within 10 s with 1,459 wakes (drained victims), one every three seconds
/// 72.7 % and 77.2 % with 1,055, none (wait for the bound) 73.1 % and 76.6 % with 777
/// but p99 130 s (`docs/simulate.md`).
pub const SECONDS_PER_AGED_REQUEST: u64 = 3;

/// The waker's requests of the last ten minutes, as its record says.
fn own_requests(status: &GpuStatus, waker: &str) -> u64 {
    status
        .occupant(waker)
        .map_or(0, |o| u64::from(o.recent_requests))
}

/// How long the waker has waited for memory on this GPU (since its intent).
fn waited(status: &GpuStatus, waker: &str, now: Timestamp) -> u64 {
    status
        .preemption_intents
        .iter()
        .find(|i| i.pod_name == waker)
        .map_or(0, |i| now.duration_since(i.since).as_secs().max(0) as u64)
}

/// The waker's standing at `now`: its recent requests plus one for every
/// [`SECONDS_PER_AGED_REQUEST`] waited; past `bound` of waiting, above everyone.
fn standing(status: &GpuStatus, waker: &str, bound: Duration, now: Timestamp) -> u64 {
    let waited = waited(status, waker, now);
    // A critical model does not wait its way up: it stands above everyone at once.
    let critical = status
        .occupant(waker)
        .is_some_and(|o| o.priority == Priority::Critical);
    if waited >= bound.as_secs() || critical {
        return u64::MAX;
    }
    own_requests(status, waker) + waited / SECONDS_PER_AGED_REQUEST
}

/// The cost-aware choice: the victims that free `needed` bytes for `waker` at the least
/// cost, cheapest first, among those it stands above. Cost, in order: requests in flight
/// (they must drain while the waker's requests wait), recent requests (they would wait
/// for a wake), least recently accessed.
pub fn cost_aware_victims(
    spec: &GpuSpec,
    status: &GpuStatus,
    waker: &str,
    needed: u64,
    bound: Duration,
    now: Timestamp,
) -> Result<Vec<String>, NoVictim> {
    let deficit = needed.saturating_sub(available_bytes(spec, status, Some(waker)));
    if deficit == 0 {
        return Ok(vec![]);
    }
    let serving = crate::decide::serving_others(status, waker)?;
    let standing = standing(status, waker, bound, now);
    if standing == u64::MAX {
        return starved_victims(&serving, deficit, now);
    }
    let mut eligible: Vec<&Occupant> = serving
        .iter()
        .copied()
        .filter(|o| {
            crate::decide::eligible_at(o).is_some_and(|t| t <= now)
                && u64::from(o.recent_requests) <= standing
        })
        .collect();
    if eligible.is_empty() {
        let why: Vec<String> = serving
            .iter()
            .filter(|o| !o.popular)
            .map(|o| {
                if u64::from(o.recent_requests) > standing {
                    format!(
                        "{} is in more demand ({} recent requests, this wake stands at {standing})",
                        o.model_name, o.recent_requests
                    )
                } else {
                    format!(
                        "{} has not served its minRuntime of {:?}",
                        o.model_name, o.min_runtime
                    )
                }
            })
            .collect();
        return Err(NoVictim::NotEligible(why.join("; ")));
    }
    eligible.sort_by_key(|o| {
        (
            o.in_flight > 0,
            o.recent_requests,
            o.last_accessed.unwrap_or(Timestamp::MIN),
            o.pod_name.clone(),
        )
    });
    crate::decide::frees_enough(&eligible, deficit)?;
    Ok(names(&cheapest_first(eligible, deficit)))
}

fn names(victims: &[&Occupant]) -> Vec<String> {
    victims.iter().map(|o| o.pod_name.clone()).collect()
}

/// Takes `candidates` (cheapest first) until `deficit` bytes are freed; then spares the
/// dearest of those that turn out not to be needed (a large one taken late can make small
/// ones before it redundant).
fn cheapest_first(candidates: Vec<&Occupant>, deficit: u64) -> Vec<&Occupant> {
    let mut chosen: Vec<&Occupant> = Vec::new();
    let mut freed = 0u64;
    for o in candidates {
        if freed >= deficit {
            break;
        }
        freed += o.reserved_memory_bytes;
        chosen.push(o);
    }
    for i in (0..chosen.len()).rev() {
        let bytes = chosen[i].reserved_memory_bytes;
        if freed - bytes >= deficit {
            freed -= bytes;
            chosen.remove(i);
        }
    }
    chosen
}

/// Past the bound the waker may preempt anyone, and takes the victims in least demand,
/// whether or not they are busy: for a large waker the only eligible model that frees
/// enough is often the busiest one on the GPU (the others rotate through their
/// `minRuntime`), and evicting it makes every request it would have served wait. When the
/// cheapest set includes models still inside their `minRuntime`, it waits for them (at
/// most that long; the memory others free meanwhile is held for it, see [`held_for`]).
fn starved_victims(
    serving: &[&Occupant],
    deficit: u64,
    now: Timestamp,
) -> Result<Vec<String>, NoVictim> {
    let mut candidates: Vec<&Occupant> = serving.iter().copied().filter(|o| !o.popular).collect();
    candidates.sort_by_key(|o| {
        (
            o.recent_requests,
            o.in_flight > 0,
            o.last_accessed.unwrap_or(Timestamp::MIN),
            o.pod_name.clone(),
        )
    });
    crate::decide::frees_enough(&candidates, deficit)?;
    let chosen = cheapest_first(candidates, deficit);
    let young: Vec<String> = chosen
        .iter()
        .filter(|o| crate::decide::eligible_at(o).is_none_or(|t| t > now))
        .map(|o| {
            format!(
                "{} has not served its minRuntime of {:?}",
                o.model_name, o.min_runtime
            )
        })
        .collect();
    if young.is_empty() {
        Ok(names(&chosen))
    } else {
        Err(NoVictim::NotEligible(young.join("; ")))
    }
}

/// The older waker that has waited past the bound and for which this GPU's free memory is
/// held: a claim of `bytes` by `pod` that would leave less than it needs must wait.
/// Without this a large waker starves behind small ones that keep taking the memory
/// freed by each other, and past the bound it evicts the one busy model big enough.
/// Intents of wakers that stopped heartbeating for `ttl` hold nothing.
pub fn held_for(
    spec: &GpuSpec,
    status: &GpuStatus,
    pod: &str,
    bytes: u64,
    bound: Duration,
    ttl: Duration,
    now: Timestamp,
) -> Option<String> {
    let mine = status
        .preemption_intents
        .iter()
        .find(|i| i.pod_name == pod)
        .map_or(now, |i| i.since);
    let available = available_bytes(spec, status, Some(pod));
    status
        .preemption_intents
        .iter()
        .filter(|i| i.pod_name != pod && i.since < mine)
        .filter(|i| now.duration_since(i.since).unsigned_abs() >= bound)
        .filter(|i| {
            status.occupant(&i.pod_name).is_some_and(|o| {
                o.state == OccupantState::Sleeping
                    && now.duration_since(o.heartbeat).unsigned_abs() <= ttl
            })
        })
        .find(|i| available.saturating_sub(bytes) < i.needed_bytes)
        .map(|i| i.model_name.clone())
}

/// The victims `policy` would preempt for `waker` now. `bound`: how long a waker may
/// wait before it stands above everyone (cost-aware).
///
/// Priority classes come first: a sheddable waker preempts nobody; victims are taken
/// from the sheddable models if the policy finds a set there, else from the sheddable
/// and standard ones, and only then from critical ones too. Within a class the policy
/// chooses as it always does.
pub fn victims(
    policy: Policy,
    spec: &GpuSpec,
    status: &GpuStatus,
    waker: &str,
    needed: u64,
    bound: Duration,
    now: Timestamp,
) -> Result<Vec<String>, NoVictim> {
    let choose = |status: &GpuStatus| match policy {
        Policy::Lru => crate::decide::choose_victims(spec, status, waker, needed, now),
        Policy::CostAware => cost_aware_victims(spec, status, waker, needed, bound, now),
    };
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
        if let Ok(victims) = choose(&only) {
            return Ok(victims);
        }
    }
    choose(status)
}

/// Whether `policy` waits out `maxWaitTime` before preempting: only the documented one.
pub fn waits_for_fairness(policy: Policy) -> bool {
    policy == Policy::Lru
}

/// When only time can change a waiter's answer, the moment it may: an occupant passing
/// its `minRuntime`, and for the cost-aware policy the waker's standing rising past the
/// next occupant's recent requests, or reaching the bound.
pub fn recheck_at(
    policy: Policy,
    status: &GpuStatus,
    waker: &str,
    bound: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    let eligibility = crate::decide::next_eligibility(status, waker, now);
    if policy == Policy::Lru {
        return eligibility;
    }
    let standing = standing(status, waker, bound, now);
    let waited = waited(status, waker, now);
    let own = own_requests(status, waker);
    let after = |secs: u64| {
        now.checked_add(jiff::SignedDuration::from_secs(
            secs.min(i64::MAX as u64) as i64
        ))
        .unwrap_or(Timestamp::MAX)
    };
    let rises = status
        .occupants
        .iter()
        .filter(|o| o.pod_name != waker && o.state == OccupantState::Serving && !o.popular)
        .map(|o| u64::from(o.recent_requests))
        .filter(|r| *r > standing)
        .min()
        .map(|r| {
            let to_bound = bound.as_secs().saturating_sub(waited).max(1);
            let to_rise = (r - own)
                .saturating_mul(SECONDS_PER_AGED_REQUEST)
                .saturating_sub(waited)
                .max(1);
            after(to_rise.min(to_bound))
        });
    match (eligibility, rises) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use greenthread_api::PreemptionIntent;

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
            recent_requests: recent,
            host_memory_bytes: 0,
            pinned: false,
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
            let got = cost_aware_victims(&spec(), &status, "w", gib * GI, BOUND, t(now));
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
            held_for(
                &spec(),
                st,
                "y",
                bytes * GI,
                BOUND,
                Duration::from_secs(30),
                t(now),
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
            held_for(
                &spec(),
                &st,
                "w",
                40 * GI,
                BOUND,
                Duration::from_secs(30),
                t(260)
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
            recheck_at(Policy::CostAware, &st, "w", BOUND, t(100)),
            Some(t(220))
        );
        // Part of the way there, the rest of it.
        assert_eq!(
            recheck_at(Policy::CostAware, &st, "w", BOUND, t(190)),
            Some(t(220))
        );
        // The bound comes first when it is nearer.
        let st = status(vec![serving("hot", 24, 0, 3, 900, 99)], 0, 100);
        assert_eq!(
            recheck_at(Policy::CostAware, &st, "w", BOUND, t(200)),
            Some(t(250))
        );
        // The documented policy looks again only when someone becomes eligible.
        assert_eq!(recheck_at(Policy::Lru, &st, "w", BOUND, t(200)), None);
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
                let got = victims(policy, &spec(), &st, "w", gib * GI, BOUND, t(100));
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
