//! A reference schedule, not the control plane: what a planner that decides every switch
//! of a GPU at once, first tokens first, would make of the same workload on the same
//! placement and engine rates. The control plane's decisions are taken per waker, each
//! from one GPU's record (`crates/ledger/src/policy/`); this module asks how far that is
//! from a plan kept per GPU, the shape a scheduler for the stage-2 goal would have, before
//! anyone builds one (`simulate --reference`, `docs/simulate.md`).
//!
//! The plan, per GPU, on a clock of [`TICK`]:
//! - A model that sleeps with a request waiting for its first token is woken at once if
//!   its memory is free, else in place of awake models whose every answer has its first
//!   token (their answers are stopped, to be continued after their next wake); those with
//!   the fewest requests in the last ten minutes go first, then the least recently busy,
//!   and one taken early that a later, larger one makes unneeded is spared.
//! - A model that sleeps with stopped answers alone is woken only into free memory or in
//!   place of models with nothing to do: a continuation never stops someone else's answer.
//! - First tokens go first, the longest waiting first; then continuations, likewise.
//! - One switch at a time per GPU, as the wake lock allows: the victims' sleeps, then the
//!   wake. A continuation's prefill covers its prompt and what it generated before.
//!
//! Everything else is the engines' own arithmetic as `sim-engine` does it (wake and sleep
//! times from the weights and the link, prefill and decode rates, at most so many
//! sequences at once), without the control plane's own latencies (heartbeats, ledger
//! writes, drains of answers that cannot be continued). It knows nothing of the future.
//!
//! With a lag it chooses victims from what it knew of them that long ago, as a waker in
//! the control plane knows its own queue at once and the other models through their
//! reports: their arrivals and first tokens are seen `lag` late (the models' phases, and
//! when each was last busy, the tie-breaker between equal victims, at once). A model
//! whose request it has not seen yet may be taken as a victim, and that request is
//! stopped before its first token; a first token it has not seen yet keeps its model
//! from being one.
//!
//! Two of the control plane's rules may be added ([`Rules`]): the `cost-aware` standing
//! (a waker for a first token stops only models in no more demand than it, until it has
//! waited a bound) and a `minRuntime` (a model just woken is no victim). With both (a
//! 120-s bound, a 6-s stay) the plan makes under a third of the wakes it makes without
//! them, within the wakes the stage-1 goal allows: what a per-GPU decider built on it
//! would have to do (`docs/simulate.md`).

use greenthread_ledger::policy::SECONDS_PER_AGED_REQUEST;

use crate::{
    demand::{Demand, seconds},
    run::Request,
};

/// The planner's clock: every decision and every token count moves in steps of this.
pub const TICK: f64 = 0.01;
/// How long after the last arrival stopped answers may take to finish; those still
/// unfinished then count as such.
pub const TAIL: f64 = 3600.0;
/// How far back a model's requests count when victims are chosen.
pub const RECENT: f64 = 600.0;

/// How the plan decides (`simulate --reference-lag`, `--reference-bound`,
/// `--reference-min-stay`); the default is the plan of the module's first paragraphs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rules {
    /// Seconds behind: victims are chosen from what was seen of them this long ago.
    pub lag: f64,
    /// `Some(bound)`: a waker for a first token stands as `cost-aware`'s does, at its
    /// requests of the last [`RECENT`] seconds plus one for every
    /// [`SECONDS_PER_AGED_REQUEST`] its oldest waiting request has waited, and stops
    /// only models with no more recent requests than that, until that request has waited
    /// `bound` seconds; then anyone. `None`: anyone at once.
    pub standing_bound: Option<f64>,
    /// A model woken less than this many seconds ago is no victim (a `minRuntime`).
    pub min_stay: f64,
}

/// What the plan made of each request, in the order of the requests given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Seconds from its arrival to its first token; `None`: none by the end.
    pub first_token: Vec<Option<f64>>,
    /// Seconds its answer stood stopped, between its first token and its end, beyond
    /// what decoding it takes; `None`: unfinished by the end.
    pub paused: Vec<Option<f64>>,
    /// Wakes planned.
    pub wakes: u64,
    /// Wakes planned of each model, by its position.
    pub wakes_by_model: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Asleep,
    /// Until then (the victims' sleeps, then its own wake).
    Waking(f64),
    Awake,
    /// Until then its memory is still held.
    Sleeping(f64),
}

/// A request its model has taken and not finished.
struct Live {
    req: usize,
    generated: f64,
    /// When its (re)prefill ends; `None`: not running (stopped, or waiting for a slot).
    ready: Option<f64>,
    first_at: Option<f64>,
}

struct Model<'a> {
    demand: &'a Demand,
    phase: Phase,
    live: Vec<Live>,
    last_busy: f64,
    /// When its last wake ended.
    awake_since: f64,
    /// Its arrivals, in order: for its recent requests.
    arrivals: Vec<f64>,
}

impl Model<'_> {
    fn holds_memory(&self) -> bool {
        self.phase != Phase::Asleep
    }

    fn recent(&self, t: f64) -> usize {
        let to = self.arrivals.partition_point(|a| *a <= t);
        let from = self.arrivals.partition_point(|a| *a <= t - RECENT);
        to - from
    }

    /// The oldest arrival among its requests still waiting for a first token.
    fn oldest_fresh(&self, requests: &[Request]) -> Option<f64> {
        self.live
            .iter()
            .filter(|l| l.first_at.is_none())
            .map(|l| requests[l.req].at.as_secs_f64())
            .min_by(f64::total_cmp)
    }

    /// Whether, as seen at `known`, an answer of its waits for a first token.
    fn seen_waiting(&self, requests: &[Request], known: f64) -> bool {
        self.live.iter().any(|l| {
            requests[l.req].at.as_secs_f64() <= known && l.first_at.is_none_or(|f| f > known)
        })
    }
}

/// Plans `requests` (in arrival order, as a trace gives them) on GPUs of `memory` bytes
/// (by position) for `models`, each on one GPU, by `rules`. Errs naming a model that
/// spans more or fewer than one GPU.
pub fn first_tokens_first(
    memory: &[u64],
    models: &[Demand],
    requests: &[Request],
    rules: &Rules,
) -> Result<Plan, String> {
    if let Some((m, d)) = models.iter().enumerate().find(|(_, d)| d.gpus.len() != 1) {
        return Err(format!(
            "model {m} runs on {} GPUs: the reference plans one GPU per model",
            d.gpus.len()
        ));
    }
    let mut state: Vec<Model> = models
        .iter()
        .map(|demand| Model {
            demand,
            phase: Phase::Asleep,
            live: Vec::new(),
            last_busy: f64::MIN,
            awake_since: f64::MIN,
            arrivals: Vec::new(),
        })
        .collect();
    for r in requests {
        state[r.model].arrivals.push(r.at.as_secs_f64());
    }
    let on_gpu: Vec<Vec<usize>> = (0..memory.len())
        .map(|g| {
            (0..models.len())
                .filter(|m| models[*m].gpus[0] as usize == g)
                .collect()
        })
        .collect();
    let mut plan = Plan {
        first_token: vec![None; requests.len()],
        paused: vec![None; requests.len()],
        wakes: 0,
        wakes_by_model: vec![0; models.len()],
    };
    let mut switching_until = vec![f64::MIN; memory.len()];
    let end = requests.last().map_or(0.0, |r| r.at.as_secs_f64()) + TAIL;
    let mut next = 0;
    let mut done = 0;
    let mut step: u64 = 0;
    loop {
        let t = step as f64 * TICK;
        if t > end || (next == requests.len() && done == requests.len()) {
            break;
        }
        step += 1;
        while next < requests.len() && requests[next].at.as_secs_f64() <= t {
            state[requests[next].model].live.push(Live {
                req: next,
                generated: 0.0,
                ready: None,
                first_at: None,
            });
            next += 1;
        }
        for m in state.iter_mut() {
            match m.phase {
                Phase::Waking(until) if until <= t => {
                    m.phase = Phase::Awake;
                    m.awake_since = t;
                }
                Phase::Sleeping(until) if until <= t => m.phase = Phase::Asleep,
                _ => {}
            }
            if m.phase == Phase::Awake {
                done += serve(m, requests, &mut plan, t);
            }
        }
        for (g, models) in on_gpu.iter().enumerate() {
            if switching_until[g] > t {
                continue;
            }
            if let Some((woken, until)) = switch(&mut state, models, memory[g], requests, t, rules)
            {
                switching_until[g] = until;
                plan.wakes += 1;
                plan.wakes_by_model[woken] += 1;
            }
        }
    }
    Ok(plan)
}

/// One tick of an awake model: free slots start (re)prefills, prefills that end give
/// first tokens, running answers decode. Returns how many answers ended.
fn serve(m: &mut Model, requests: &[Request], plan: &mut Plan, t: f64) -> usize {
    let d = m.demand;
    let running = m.live.iter().filter(|l| l.ready.is_some()).count();
    let slots = d.max_sequences.saturating_sub(running);
    for l in m.live.iter_mut().filter(|l| l.ready.is_none()).take(slots) {
        let r = &requests[l.req];
        let tokens = f64::from(r.prompt_tokens) + l.generated;
        l.ready = Some(t + d.ttft_seconds + seconds(tokens, d.prefill_tokens_per_second));
    }
    let mut ended = 0;
    m.live.retain_mut(|l| {
        let Some(ready) = l.ready.filter(|ready| *ready <= t) else {
            return true;
        };
        let r = &requests[l.req];
        let first_at = *l.first_at.get_or_insert_with(|| {
            plan.first_token[l.req] = Some(ready - r.at.as_secs_f64());
            ready
        });
        l.generated += d.tokens_per_second * TICK;
        if l.generated + 1e-9 < f64::from(r.output_tokens) {
            return true;
        }
        plan.paused[l.req] = Some((t - first_at - d.decode_seconds(r)).max(0.0));
        ended += 1;
        false
    });
    if !m.live.is_empty() {
        m.last_busy = t;
    }
    ended
}

/// The one switch a GPU starts now, if any: which sleeping model wakes, in place of
/// whom, the victims chosen by `rules` from what was seen of them `rules.lag` ago.
/// Returns the model woken and when its wake will be done.
fn switch(
    state: &mut [Model],
    models: &[usize],
    memory: u64,
    requests: &[Request],
    t: f64,
    rules: &Rules,
) -> Option<(usize, f64)> {
    let known = t - rules.lag;
    let arrived = |l: &Live| requests[l.req].at.as_secs_f64();
    // (continuation only, the oldest arrival waiting, model)
    let mut wanting: Vec<(bool, f64, usize)> = models
        .iter()
        .filter(|m| state[**m].phase == Phase::Asleep && !state[**m].live.is_empty())
        .map(|&m| match state[m].oldest_fresh(requests) {
            Some(at) => (false, at, m),
            None => {
                let at = requests[state[m].live[0].req].at.as_secs_f64();
                (true, at, m)
            }
        })
        .collect();
    wanting.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    let held: u64 = models
        .iter()
        .filter(|m| state[**m].holds_memory())
        .map(|m| state[*m].demand.bytes)
        .sum();
    for (continuation, oldest, m) in wanting {
        // Whom a first token may stop: with a standing, those in no more demand.
        let standing = match rules.standing_bound {
            Some(bound) if !continuation && t - oldest < bound => {
                let aged = (t - oldest) / SECONDS_PER_AGED_REQUEST as f64;
                state[m].recent(t) as f64 + aged.floor()
            }
            _ => f64::INFINITY,
        };
        let need = state[m].demand.bytes;
        let mut free = memory.saturating_sub(held);
        let mut victims = Vec::new();
        if free < need {
            let mut candidates: Vec<usize> = models
                .iter()
                .copied()
                .filter(|v| {
                    let o = &state[*v];
                    o.phase == Phase::Awake
                        && t - o.awake_since >= rules.min_stay
                        && o.recent(known) as f64 <= standing
                        && !o.seen_waiting(requests, known)
                        && (!continuation || o.live.iter().all(|l| arrived(l) > known))
                })
                .collect();
            candidates.sort_by(|a, b| {
                let (a, b) = (&state[*a], &state[*b]);
                a.recent(known)
                    .cmp(&b.recent(known))
                    .then(a.last_busy.total_cmp(&b.last_busy))
            });
            for v in candidates {
                if free >= need {
                    break;
                }
                victims.push(v);
                free += state[v].demand.bytes;
            }
            if free < need {
                continue;
            }
            // A victim taken early that a later, larger one makes unneeded is spared.
            for i in (0..victims.len()).rev() {
                let bytes = state[victims[i]].demand.bytes;
                if free - bytes >= need {
                    free -= bytes;
                    victims.remove(i);
                }
            }
        }
        let mut start = t;
        for v in victims {
            let o = &mut state[v];
            let until = t + o.demand.sleep_seconds;
            o.phase = Phase::Sleeping(until);
            start = start.max(until);
            for l in o.live.iter_mut() {
                l.ready = None;
            }
        }
        let o = &mut state[m];
        let until = start + o.demand.wake_seconds;
        o.phase = Phase::Waking(until);
        return Some((m, until));
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const GI: u64 = 1 << 30;

    /// A model of `gib` on GPU 0: wakes in 2 s, sleeps in 1 s, a first token 0.5 s after
    /// its prefill starts (no prompt cost), one token a second, `seqs` at once.
    fn model(gib: u64, seqs: usize) -> Demand {
        Demand {
            gpus: vec![0],
            bytes: gib * GI,
            ttft_seconds: 0.5,
            prefill_tokens_per_second: 0.0,
            tokens_per_second: 1.0,
            wake_seconds: 2.0,
            sleep_seconds: 1.0,
            max_sequences: seqs,
        }
    }

    fn req(model: usize, at: u64, tokens: u32) -> Request {
        Request {
            at: Duration::from_secs(at),
            model,
            prompt_tokens: 100,
            output_tokens: tokens,
        }
    }

    fn lag(secs: f64) -> Rules {
        Rules {
            lag: secs,
            ..Rules::default()
        }
    }

    fn near(got: Option<f64>, want: f64, what: &str) {
        let got = got.unwrap_or_else(|| panic!("{what}: none"));
        assert!(
            (got - want).abs() <= 5.0 * TICK,
            "{what}: {got:.3} s, expected {want:.3} s"
        );
    }

    #[test]
    fn a_first_token_stops_an_answer_under_way_and_the_answer_goes_on_after() {
        // A and B (60 GiB each) cannot share an 80 GiB GPU. A's answer (100 tokens)
        // starts at 0; B's request at 10 stops it: A sleeps (1 s), B wakes (2 s), B's
        // first token 0.5 s later, at 13.5, 3.5 s after it arrived. B's answer (5 tokens)
        // ends at 18.5; A, stopped with nothing but a continuation, may take B's place
        // only now that B has nothing to do: B sleeps (1 s), A wakes (2 s), and A's
        // continuation starts 0.5 s later, at 22.0, after 12.0 s stopped.
        let models = [model(60, 8), model(60, 8)];
        let requests = [req(0, 0, 100), req(1, 10, 5)];
        let plan = first_tokens_first(&[80 * GI], &models, &requests, &Rules::default()).unwrap();
        near(plan.first_token[0], 2.5, "A's first token");
        near(plan.first_token[1], 3.5, "B's first token");
        near(plan.paused[1], 0.0, "B's pause");
        near(plan.paused[0], 22.0 - 10.0, "A's pause");
        assert_eq!(plan.wakes, 3);
        assert_eq!(plan.wakes_by_model, [2, 1], "A woke twice, B once");
    }

    #[test]
    fn a_continuation_waits_for_a_model_with_work_and_first_tokens_go_first() {
        // As above, but B's answer is long (40 tokens) and C (60 GiB) asks at 15 while
        // B decodes: C's first token stops B (B has its first token); A, stopped
        // longer, waits, as it would only stop someone's answer. C's first token: B
        // sleeps from 15 (1 s), C wakes (2 s), +0.5 s: 3.5 s after its arrival.
        let models = [model(60, 8), model(60, 8), model(60, 8)];
        let requests = [req(0, 0, 100), req(1, 10, 40), req(2, 15, 40)];
        let plan = first_tokens_first(&[80 * GI], &models, &requests, &Rules::default()).unwrap();
        near(plan.first_token[1], 3.5, "B's first token");
        near(plan.first_token[2], 3.5, "C's first token");
        // C's answer ends at 18.5 + 40 = 58.5; then A (stopped since 10, the oldest)
        // takes C's place before B does: A's continuation starts at 58.5 + 1 + 2 + 0.5.
        near(plan.paused[2], 0.0, "C's pause");
        near(plan.paused[0], 62.0 - 10.0, "A's pause");
        // B, stopped at 15, goes on once A, at 62 with 92.5 tokens to go, is done: B
        // takes its place at 154.5 and its continuation starts at 158.
        near(plan.paused[1], 158.0 - 15.0, "B's pause");
    }

    #[test]
    fn victims_are_the_models_with_the_fewest_recent_requests_and_one_switch_runs_at_a_time() {
        // Three 40 GiB models on 80 GiB. "hot" (3 requests) and "cold" (1) ask at 0 and
        // wake one after the other (cold's first token at 2 + 2 + 0.5). "new" asks at 30
        // and takes the place of "cold", the one with fewer recent requests (cold sleeps
        // 1 s, new wakes 2 s: its first token 3.5 s after). "cold" asks again at 31: its
        // switch waits for new's wake to end (at 33), and takes hot's place, not new's,
        // whose first token is not out yet: hot sleeps, cold wakes, first token at 36.5.
        let models = [model(40, 8), model(40, 8), model(40, 8)];
        let requests = [
            req(0, 0, 2),
            req(1, 0, 2),
            req(0, 1, 2),
            req(0, 2, 2),
            req(2, 30, 2),
            req(1, 31, 2),
        ];
        let plan = first_tokens_first(&[80 * GI], &models, &requests, &Rules::default()).unwrap();
        near(plan.first_token[4], 3.5, "new's first token");
        near(plan.first_token[5], 5.5, "cold's first token again");
        near(plan.first_token[0], 2.5, "hot's first token");
        near(plan.first_token[1], 4.5, "cold's first token");
        assert_eq!(plan.wakes, 4);
    }

    #[test]
    fn when_both_could_go_a_first_token_goes_before_a_continuation() {
        // One 80 GiB GPU: X (60 GiB) awake with nothing to do; A (60) asleep with an
        // answer stopped since 5; C (60) asleep with a request waiting since 8. Either
        // could take X's place: C does, though A has waited longer.
        let d = model(60, 8);
        let requests = [req(0, 0, 2), req(1, 5, 50), req(2, 8, 2)];
        let live = |req, first_at| {
            vec![Live {
                req,
                generated: 10.0,
                ready: None,
                first_at,
            }]
        };
        let mut state: Vec<Model> = [
            (Phase::Awake, vec![]),
            (Phase::Asleep, live(1, Some(6.0))),
            (Phase::Asleep, live(2, None)),
        ]
        .into_iter()
        .map(|(phase, live)| Model {
            demand: &d,
            phase,
            live,
            last_busy: 0.0,
            awake_since: 0.0,
            arrivals: vec![],
        })
        .collect();
        let until = switch(
            &mut state,
            &[0, 1, 2],
            80 * GI,
            &requests,
            10.0,
            &Rules::default(),
        );
        assert_eq!(until, Some((2, 10.0 + 1.0 + 2.0)));
        assert_eq!(state[0].phase, Phase::Sleeping(11.0));
        assert_eq!(state[2].phase, Phase::Waking(13.0));
        assert_eq!(state[1].phase, Phase::Asleep);
    }

    #[test]
    fn a_victim_a_larger_one_makes_unneeded_is_spared() {
        // On 80 GiB: "small" (10 GiB, 1 request) and "large" (60 GiB, 2 requests) are
        // awake and idle at 20; "new" (60 GiB) asks: small, the fewest requests, is
        // taken first but frees too little (10 + 10 free), large alone frees enough, so
        // small stays awake and answers its next request at once (0.5 s).
        let models = [model(10, 8), model(60, 8), model(60, 8)];
        let requests = [
            req(0, 0, 2),
            req(1, 0, 2),
            req(1, 1, 2),
            req(2, 20, 2),
            req(0, 30, 2),
        ];
        let plan = first_tokens_first(&[80 * GI], &models, &requests, &Rules::default()).unwrap();
        near(plan.first_token[3], 3.5, "new's first token");
        near(plan.first_token[4], 0.5, "small's next first token");
        assert_eq!(plan.wakes, 3);
    }

    #[test]
    fn with_a_standing_and_a_min_stay_a_cold_waker_waits_for_a_model_in_more_demand() {
        // "hot" (60 GiB) answers five requests from 0 (awake at 2, idle from about 8);
        // "cold" (60 GiB) asks at 20. Each row: the rules, and cold's time to first
        // token. A switch is hot's sleep (1 s), cold's wake (2 s) and its prefill (0.5 s).
        let models = [model(60, 8), model(60, 8)];
        let mut requests: Vec<Request> = (0..5).map(|s| req(0, s, 2)).collect();
        requests.push(req(1, 20, 2));
        let rules = |standing_bound, min_stay| Rules {
            standing_bound,
            min_stay,
            ..Rules::default()
        };
        let table = [
            // Anyone at once.
            (Rules::default(), 3.5),
            // Cold stands at 1 + one per 3 s waited: above hot's 5 after 12 s.
            (rules(Some(60.0), 0.0), 12.0 + 3.5),
            // ...unless the bound comes first.
            (rules(Some(6.0), 0.0), 6.0 + 3.5),
            // Hot, awake since 2, is no victim before 27.
            (rules(None, 25.0), 7.0 + 3.5),
            // Both: the later of the two.
            (rules(Some(6.0), 25.0), 7.0 + 3.5),
        ];
        for (rules, want) in table {
            let plan = first_tokens_first(&[80 * GI], &models, &requests, &rules).unwrap();
            near(
                plan.first_token[5],
                want,
                &format!("cold's first token, {rules:?}"),
            );
            assert_eq!(plan.wakes, 2, "{rules:?}");
        }
    }

    #[test]
    fn deciding_behind_victims_are_chosen_from_first_tokens_and_arrivals_seen_late() {
        // A (60 GiB) answers a request from 0 (first token at 2.5) and gets another at
        // 9.8; B (60 GiB) asks at 10.
        let models = [model(60, 8), model(60, 8)];
        let at = |model, secs: f64, tokens| Request {
            at: Duration::from_secs_f64(secs),
            ..req(model, 0, tokens)
        };
        let requests = [at(0, 0.0, 100), at(0, 9.8, 100), at(1, 10.0, 5)];
        // Seeing at once: A's request of 9.8 waits for its first token (10.3), so B's
        // switch waits for it too: 10.3 + 1 + 2 + 0.5.
        let plan = first_tokens_first(&[80 * GI], &models, &requests, &Rules::default()).unwrap();
        near(
            plan.first_token[1],
            0.5,
            "A's second first token, seeing at once",
        );
        near(
            plan.first_token[2],
            13.8 - 10.0,
            "B's first token, seeing at once",
        );
        // Seeing a second late: at 10 A's request of 9.8 is not seen, A is taken at once
        // and that request stopped before its first token. A wakes again in B's place
        // once B's first token (13.5) is seen, at 14.5: 14.5 + 1 + 2 + 0.5 = 18.0.
        let plan = first_tokens_first(&[80 * GI], &models, &requests, &lag(1.0)).unwrap();
        near(plan.first_token[2], 3.5, "B's first token, a second behind");
        near(
            plan.first_token[1],
            18.0 - 9.8,
            "A's second first token, a second behind",
        );
    }

    #[test]
    fn an_engine_runs_so_many_sequences_at_once_and_a_model_on_two_gpus_is_refused() {
        // One sequence at a time: the second request starts when the first ends.
        let models = [model(10, 1)];
        let plan = first_tokens_first(
            &[80 * GI],
            &models,
            &[req(0, 0, 10), req(0, 0, 10)],
            &Rules::default(),
        )
        .unwrap();
        near(plan.first_token[0], 2.5, "first");
        near(plan.first_token[1], 2.5 + 10.0 + 0.5, "second");
        let mut wide = model(10, 1);
        wide.gpus = vec![0, 1];
        let err = first_tokens_first(&[80 * GI; 2], &[wide], &[], &Rules::default()).unwrap_err();
        assert!(err.contains("one GPU per model"), "{err}");
    }
}
