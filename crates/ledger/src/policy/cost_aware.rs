//! `cost-aware`, the default, weighs demand. A waker *stands* at its requests
//! of the last ten minutes plus one for every three seconds it has waited; it may preempt a
//! serving model (not popular, past its `minRuntime`) whose recent requests do not
//! exceed its standing and that has no answer a preemption would have to wait for
//! (`draining` in its record: answers drained under `preemption: drain`, or under
//! `resume` continuations and answers that cannot be continued), and does so at once (no
//! `maxWaitTime`: waiting only adds to its requests' time to first token). A victim whose
//! answers must finish holds the waker's requests for as long as they take — at 40 tokens
//! a second, often longer than the switch — so the waker waits for them to finish, or
//! takes a model whose answers are stopped at once (on the conversation trace at 7 models
//! per GPU, 74.2 % within 3 s and 78.9 % within 10 s instead of 73.6 % and 78.4 %).
//! Among those it takes the cheapest first: idle ones (nothing to drain), then the fewest
//! recent requests, then the least recently accessed. A model with little traffic thus
//! waits for one with much to finish rather than evict it — evicting a busy model makes
//! every request that arrives while it drains, sleeps and wakes again wait — but not for
//! ever: after two fifths of its requests' queue deadline it may preempt anyone, so that
//! they are served well before they time out (the rest of the deadline covers a victim's
//! drain, sleep and wake).
//! Past that bound it still takes the victims in least demand (busy or not), waiting a
//! few seconds for cheap ones inside their `minRuntime` rather than evicting the busiest
//! model, and the memory freed meanwhile is held for it: younger wakers on the GPU
//! must not take what it needs. Without the hold, a large model on a GPU whose other
//! half rotates among small ones never finds its memory, and past the bound it evicts
//! the one busy model big enough (on the conversation trace, the busiest of all).
//! Measured with `greenthread simulate` (see `docs/simulate.md`).

use std::time::Duration;

use greenthread_api::{GpuStatus, Occupant, OccupantState, Priority};
use jiff::Timestamp;

use super::{SchedulingPolicy, View};
use crate::decide::{NoVictim, available_bytes};

pub struct CostAware;

impl SchedulingPolicy for CostAware {
    fn weighs_demand(&self) -> bool {
        true
    }

    fn may_resume(&self) -> bool {
        true
    }

    fn held_for(&self, gpu: View, pod: &str, bytes: u64, ttl: Duration) -> Option<String> {
        held_for(gpu, pod, bytes, ttl)
    }

    fn victims(&self, gpu: View, waker: &str, needed: u64) -> Result<Vec<String>, NoVictim> {
        choose(gpu, waker, needed)
    }

    fn recheck_at(&self, gpu: View, waker: &str) -> Option<Timestamp> {
        recheck_at(gpu, waker)
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
fn choose(gpu: View, waker: &str, needed: u64) -> Result<Vec<String>, NoVictim> {
    let View {
        spec,
        status,
        now,
        bound,
    } = gpu;
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
                && o.draining == 0
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
                } else if o.draining > 0 {
                    format!(
                        "{} has {} answers to finish before it can sleep",
                        o.model_name, o.draining
                    )
                } else {
                    crate::decide::inside_min_runtime(o)
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
        .map(|o| crate::decide::inside_min_runtime(o))
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
fn held_for(gpu: View, pod: &str, bytes: u64, ttl: Duration) -> Option<String> {
    let View {
        spec,
        status,
        now,
        bound,
    } = gpu;
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

/// When only time can change a waiter's answer, the moment it may: an occupant passing
/// its `minRuntime`, the waker's standing rising past the next occupant's recent
/// requests, or reaching the bound.
fn recheck_at(gpu: View, waker: &str) -> Option<Timestamp> {
    let View {
        status, now, bound, ..
    } = gpu;
    let eligibility = crate::decide::next_eligibility(status, waker, now);
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
