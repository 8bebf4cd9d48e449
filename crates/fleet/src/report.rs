//! What a run comes to: per model and overall, as JSON (one object, stable field order)
//! and as a table.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::run::{Outcome, Run};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub requests: usize,
    pub answered: usize,
    pub rejected: usize,
    /// Accepted, then cut off mid-answer.
    pub broken: usize,
    pub hung: usize,
    /// Requests answered with a first token within the SLO, over all requests (refused,
    /// broken and hung ones count as misses).
    pub slo_attainment: f64,
    /// Over answered requests; `null` when none was.
    pub ttft_p50_seconds: Option<f64>,
    pub ttft_p99_seconds: Option<f64>,
    pub wakes: u64,
    pub preemptions: u64,
    /// Sleeps at level 2 for lack of host memory (`--host-memory`).
    pub sleep_demotions: u64,
    pub awake_gpu_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelRow {
    pub model: String,
    /// The GPUs its replicas were placed on (by position), one list per replica.
    pub gpus: Vec<Vec<u32>>,
    #[serde(flatten)]
    pub totals: Totals,
}

/// One GPU: the requests of the models placed on it, and how its memory was used over
/// the run. Where a GPU falls short, these say whether it was for memory (busy near 1),
/// for switching (much of it waking and deactivating), or for packing (much stranded).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuRow {
    /// By position, as `models[].gpus` gives it.
    pub gpu: u32,
    pub memory_gib: f64,
    /// The models with a replica here.
    pub models: Vec<String>,
    /// Requests to those models, and the fraction answered within the SLO.
    pub requests: usize,
    pub slo_attainment: f64,
    /// Wakes of the replicas here.
    pub wakes: u64,
    /// The fraction of its memory × the simulated time held by a replica: waking,
    /// serving or deactivating (each replica's reservation × its time in those states).
    pub memory_busy: f64,
    /// Of that, the fraction held while waking (nothing served yet).
    pub memory_waking: f64,
    /// Of that, the fraction held while deactivating (draining, then going to sleep).
    pub memory_deactivating: f64,
    /// The fraction of its memory × the simulated time left free while models waited for
    /// memory here, every one of them needing more than was free: the cost of packing
    /// whole models on one GPU.
    pub memory_stranded: f64,
    /// The fraction of the simulated time during which the models here with a request in
    /// progress, each request served the moment it arrived, would have needed more memory
    /// together than the GPU has: its load and placement, whatever the policy
    /// ([`crate::demand`]).
    pub oversubscribed: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(flatten)]
    pub totals: Totals,
    pub ttft_slo_seconds: f64,
    /// Refusals by their error code.
    pub rejections: BTreeMap<String, usize>,
    pub simulated_seconds: f64,
    /// Virtual time the replicas took to boot before the workload (not in the above).
    pub boot_seconds: f64,
    pub wall_seconds: f64,
    /// Requests by the state their model was in when they arrived (serving, sleeping,
    /// pending, waking, deactivating), each with its SLO attainment: where time is lost.
    pub by_state_at_arrival: BTreeMap<String, Totals>,
    pub models: Vec<ModelRow>,
    pub by_gpu: Vec<GpuRow>,
    /// The run's answers: how long they stood stopped (`--preemption resume`).
    #[serde(flatten)]
    pub pauses: Pauses,
    /// With `--faults`: what was injected and which invariants broke.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultsReport>,
    /// With `--reference`: the same requests under the reference plan ([`crate::plan`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
}

/// What the reference plan ([`crate::plan::first_tokens_first`]) made of the requests:
/// first tokens as the run's are counted, and what it cost the answers it stopped.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    /// How late the plan saw arrivals and first tokens (`--reference-lag`).
    pub lag_seconds: f64,
    /// The standing's bound (`--reference-bound`), when a waker stands on its demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_seconds: Option<f64>,
    /// How long a model stays awake before it may be a victim (`--reference-min-stay`).
    pub min_stay_seconds: f64,
    /// Requests with a first token within the SLO, over all requests.
    pub slo_attainment: f64,
    pub ttft_p50_seconds: Option<f64>,
    pub ttft_p99_seconds: Option<f64>,
    pub wakes: u64,
    #[serde(flatten)]
    pub pauses: Pauses,
    /// Answers not ended [`crate::plan::TAIL`] after the last arrival.
    pub unfinished: usize,
    /// Each model's part, in the order of the run's `models`: to read the plan against
    /// the run model by model.
    pub models: Vec<ReferenceModel>,
}

/// One model's requests and wakes under the reference plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferenceModel {
    pub model: String,
    pub requests: usize,
    /// Its requests with a first token within the SLO, over its requests.
    pub slo_attainment: f64,
    pub wakes: u64,
}

/// How long answers stood stopped between their first token and their end, beyond the
/// decoding they take (a preempted answer's wait for its next wake and its
/// continuation's prefill, or a wait for a free sequence slot), over the answers that
/// ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pauses {
    pub pause_p50_seconds: Option<f64>,
    pub pause_p90_seconds: Option<f64>,
    pub pause_p99_seconds: Option<f64>,
    pub pause_max_seconds: Option<f64>,
    /// Answers stopped for more than a minute in all.
    pub paused_over_a_minute: usize,
}

/// [`Pauses`] of `sorted`.
fn pauses(sorted: &[Duration]) -> Pauses {
    Pauses {
        pause_p50_seconds: quantile(sorted, 0.5),
        pause_p90_seconds: quantile(sorted, 0.9),
        pause_p99_seconds: quantile(sorted, 0.99),
        pause_max_seconds: sorted.last().map(Duration::as_secs_f64),
        paused_over_a_minute: sorted
            .iter()
            .filter(|p| **p > Duration::from_secs(60))
            .count(),
    }
}

impl Pauses {
    fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} max {}, {} over a minute",
            in_seconds(self.pause_p50_seconds),
            in_seconds(self.pause_p90_seconds),
            in_seconds(self.pause_p99_seconds),
            in_seconds(self.pause_max_seconds),
            self.paused_over_a_minute
        )
    }
}

/// [`Reference`] of `plan` (made by `rules`) at the SLO `slo`; `names` are the models
/// by position, `models_of` each request's model.
pub fn reference(
    plan: &crate::plan::Plan,
    slo: Duration,
    rules: &crate::plan::Rules,
    names: &[String],
    models_of: &[usize],
) -> Reference {
    let secs = |v: &[Option<f64>]| {
        let mut d: Vec<Duration> = v
            .iter()
            .flatten()
            .map(|s| Duration::from_secs_f64(s.max(0.0)))
            .collect();
        d.sort();
        d
    };
    let ttfts = secs(&plan.first_token);
    let stopped = secs(&plan.paused);
    let requests = plan.first_token.len();
    let met = ttfts.iter().filter(|t| **t <= slo).count();
    // Each model's (requests, within the SLO), in one pass over the requests.
    let mut by_model = vec![(0usize, 0usize); names.len()];
    for (m, ttft) in models_of.iter().zip(&plan.first_token) {
        let in_time = ttft.is_some_and(|t| Duration::from_secs_f64(t.max(0.0)) <= slo);
        by_model[*m].0 += 1;
        by_model[*m].1 += usize::from(in_time);
    }
    let models = names
        .iter()
        .zip(by_model)
        .enumerate()
        .map(|(m, (name, (asked, met)))| ReferenceModel {
            model: name.clone(),
            requests: asked,
            slo_attainment: attainment(met, asked),
            wakes: plan.wakes_by_model.get(m).copied().unwrap_or(0),
        })
        .collect();
    Reference {
        lag_seconds: rules.lag,
        bound_seconds: rules.standing_bound,
        min_stay_seconds: rules.min_stay,
        slo_attainment: attainment(met, requests),
        ttft_p50_seconds: quantile(&ttfts, 0.5),
        ttft_p99_seconds: quantile(&ttfts, 0.99),
        wakes: plan.wakes,
        pauses: pauses(&stopped),
        unfinished: plan.paused.iter().filter(|p| p.is_none()).count(),
        models,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultsReport {
    pub seed: u64,
    pub injected: Vec<Injected>,
    /// Each with its seed, step and moment: `simulate --faults --seed N` replays it.
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Injected {
    pub at_seconds: f64,
    pub kind: &'static str,
    pub fault: String,
}

/// The `q`-quantile by nearest rank of sorted `v`, in seconds.
pub fn quantile(v: &[Duration], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1].as_secs_f64())
}

fn totals<'a>(outcomes: impl Iterator<Item = &'a Outcome>, slo: Duration) -> Totals {
    let mut t = Totals {
        requests: 0,
        answered: 0,
        rejected: 0,
        broken: 0,
        hung: 0,
        slo_attainment: 0.0,
        ttft_p50_seconds: None,
        ttft_p99_seconds: None,
        wakes: 0,
        preemptions: 0,
        sleep_demotions: 0,
        awake_gpu_seconds: 0.0,
    };
    let mut ttfts = Vec::new();
    let mut met = 0usize;
    for o in outcomes {
        t.requests += 1;
        match o {
            Outcome::Answered { ttft, .. } => {
                t.answered += 1;
                ttfts.push(*ttft);
                if *ttft <= slo {
                    met += 1;
                }
            }
            Outcome::Rejected { .. } => t.rejected += 1,
            Outcome::Broken { .. } => t.broken += 1,
            Outcome::Hung => t.hung += 1,
        }
    }
    ttfts.sort();
    t.ttft_p50_seconds = quantile(&ttfts, 0.5);
    t.ttft_p99_seconds = quantile(&ttfts, 0.99);
    t.slo_attainment = attainment(met, t.requests);
    t
}

/// `met` of `requests` as a fraction; 1 when there were none.
fn attainment(met: usize, requests: usize) -> f64 {
    if requests == 0 {
        1.0
    } else {
        met as f64 / requests as f64
    }
}

pub fn report(
    run: &Run,
    names: &[String],
    models_of: &[usize],
    slo: Duration,
    wall: Duration,
) -> Report {
    let mut overall = totals(run.outcomes.iter(), slo);
    let mut rows = Vec::with_capacity(names.len());
    for (m, name) in names.iter().enumerate() {
        let mut t = totals(
            run.outcomes
                .iter()
                .zip(models_of)
                .filter(|(_, of)| **of == m)
                .map(|(o, _)| o),
            slo,
        );
        for r in run.replicas.iter().filter(|r| r.model == m) {
            t.wakes += r.wakes;
            t.preemptions += r.preempted;
            t.sleep_demotions += r.demotions;
            t.awake_gpu_seconds += r.awake_gpu_seconds();
        }
        overall.wakes += t.wakes;
        overall.preemptions += t.preemptions;
        overall.sleep_demotions += t.sleep_demotions;
        overall.awake_gpu_seconds += t.awake_gpu_seconds;
        rows.push(ModelRow {
            model: name.clone(),
            gpus: run
                .replicas
                .iter()
                .filter(|r| r.model == m)
                .map(|r| r.gpus.clone())
                .collect(),
            totals: t,
        });
    }
    let gpus = gpu_rows(run, names, models_of, slo);
    let mut by_state_at_arrival = BTreeMap::new();
    for state in greenthread_sidecar::state::State::ALL {
        let t = totals(
            run.outcomes
                .iter()
                .zip(&run.arrived_to)
                .filter(|(_, s)| **s == state)
                .map(|(o, _)| o),
            slo,
        );
        if t.requests > 0 {
            by_state_at_arrival.insert(state.as_str().to_string(), t);
        }
    }
    let mut rejections = BTreeMap::new();
    for o in &run.outcomes {
        if let Outcome::Rejected { code, .. } = o {
            *rejections.entry(code.clone()).or_insert(0) += 1;
        }
    }
    let mut stopped: Vec<Duration> = run
        .outcomes
        .iter()
        .zip(&run.decode_seconds)
        .filter_map(|(o, decode)| match o {
            Outcome::Answered { ttft, total } => Some(Duration::from_secs_f64(
                (total.as_secs_f64() - ttft.as_secs_f64() - decode).max(0.0),
            )),
            _ => None,
        })
        .collect();
    stopped.sort();
    Report {
        totals: overall,
        ttft_slo_seconds: slo.as_secs_f64(),
        rejections,
        simulated_seconds: run.simulated.as_secs_f64(),
        boot_seconds: run.boot.as_secs_f64(),
        wall_seconds: wall.as_secs_f64(),
        by_state_at_arrival,
        models: rows,
        by_gpu: gpus,
        pauses: pauses(&stopped),
        faults: run.faults_seed.map(|seed| FaultsReport {
            seed,
            injected: run
                .injected
                .iter()
                .map(|i| Injected {
                    at_seconds: i.at.as_secs_f64(),
                    kind: i.kind,
                    fault: i.what.clone(),
                })
                .collect(),
            violations: run.violations.iter().map(|v| v.to_string()).collect(),
        }),
        reference: None,
    }
}

fn gpu_rows(run: &Run, names: &[String], models_of: &[usize], slo: Duration) -> Vec<GpuRow> {
    let span = run.simulated.as_secs_f64();
    run.gpu_memory
        .iter()
        .enumerate()
        .map(|(g, &memory)| {
            let g = g as u32;
            let here: Vec<&crate::run::ReplicaStats> = run
                .replicas
                .iter()
                .filter(|r| r.gpus.contains(&g))
                .collect();
            let mut models: Vec<usize> = here.iter().map(|r| r.model).collect();
            models.sort_unstable();
            models.dedup();
            let t = totals(
                run.outcomes
                    .iter()
                    .zip(models_of)
                    .filter(|(_, m)| models.contains(m))
                    .map(|(o, _)| o),
                slo,
            );
            // Byte-seconds held, as a fraction of the GPU's over the run.
            let share = |secs: &dyn Fn(&crate::run::ReplicaStats) -> f64| {
                let held: f64 = here.iter().map(|r| r.reserved_bytes as f64 * secs(r)).sum();
                if memory == 0 || span <= 0.0 {
                    0.0
                } else {
                    held / (memory as f64 * span)
                }
            };
            // Seconds recorded per GPU, as a fraction of the run.
            let per_span = |seconds: &[f64]| {
                if span <= 0.0 {
                    0.0
                } else {
                    seconds.get(g as usize).copied().unwrap_or(0.0) / span
                }
            };
            GpuRow {
                gpu: g,
                memory_gib: memory as f64 / (1u64 << 30) as f64,
                models: models.iter().map(|&m| names[m].clone()).collect(),
                requests: t.requests,
                slo_attainment: t.slo_attainment,
                wakes: here.iter().map(|r| r.wakes).sum(),
                memory_busy: share(&|r| {
                    r.waking_seconds + r.serving_seconds + r.deactivating_seconds
                }),
                memory_waking: share(&|r| r.waking_seconds),
                memory_deactivating: share(&|r| r.deactivating_seconds),
                memory_stranded: per_span(&run.stranded_seconds),
                oversubscribed: per_span(&run.oversubscribed_seconds),
            }
        })
        .collect()
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.2}"))
}

/// `v` seconds in a sentence of the table's summary ("12.3 s"; "-" when there is none).
fn in_seconds(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} s"))
}

impl Report {
    /// The human table: one row per model, then the whole fleet.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let header = format!(
            "{:<12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>8} {:>10}\n",
            "MODEL",
            "REQUESTS",
            "ANSWERED",
            "REJECTED",
            "SLO",
            "TTFT P50",
            "TTFT P99",
            "WAKES",
            "PREEMPT",
            "AWAKE GPU-S"
        );
        out.push_str(&header);
        let row = |name: &str, t: &Totals| {
            format!(
                "{:<12} {:>8} {:>8} {:>8} {:>7.1}% {:>8}s {:>8}s {:>7} {:>8} {:>10.0}\n",
                name,
                t.requests,
                t.answered,
                t.rejected + t.broken + t.hung,
                t.slo_attainment * 100.0,
                secs(t.ttft_p50_seconds),
                secs(t.ttft_p99_seconds),
                t.wakes,
                t.preemptions,
                t.awake_gpu_seconds
            )
        };
        for m in &self.models {
            out.push_str(&row(&m.model, &m.totals));
        }
        out.push_str(&row("ALL", &self.totals));
        out.push_str(&format!(
            "TTFT SLO {}s; {:.0} s simulated (after {:.0} s of boots) in {:.1} s of wall time",
            self.ttft_slo_seconds, self.simulated_seconds, self.boot_seconds, self.wall_seconds
        ));
        if !self.rejections.is_empty() {
            let r: Vec<String> = self
                .rejections
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            out.push_str(&format!("; refused: {}", r.join(", ")));
        }
        out.push('\n');
        if self.by_gpu.len() > 1 {
            out.push_str(&format!(
                "\n{:<5} {:>7} {:>6} {:>8} {:>8} {:>7} {:>12} {:>8} {:>13} {:>9} {:>15}\n",
                "GPU",
                "GIB",
                "MODELS",
                "REQUESTS",
                "SLO",
                "WAKES",
                "MEMORY BUSY",
                "WAKING",
                "DEACTIVATING",
                "STRANDED",
                "OVERSUBSCRIBED"
            ));
            for g in &self.by_gpu {
                out.push_str(&format!(
                    "{:<5} {:>7.0} {:>6} {:>8} {:>7.1}% {:>7} {:>11.1}% {:>7.1}% {:>12.1}% {:>8.1}% {:>14.1}%\n",
                    g.gpu,
                    g.memory_gib,
                    g.models.len(),
                    g.requests,
                    g.slo_attainment * 100.0,
                    g.wakes,
                    g.memory_busy * 100.0,
                    g.memory_waking * 100.0,
                    g.memory_deactivating * 100.0,
                    g.memory_stranded * 100.0,
                    g.oversubscribed * 100.0
                ));
            }
        }
        let states: Vec<String> = self
            .by_state_at_arrival
            .iter()
            .map(|(state, t)| {
                format!(
                    "{state} {} ({:.1}% in SLO)",
                    t.requests,
                    t.slo_attainment * 100.0
                )
            })
            .collect();
        out.push_str(&format!(
            "requests by their model's state at arrival: {}\n",
            states.join(", ")
        ));
        out.push_str(&format!(
            "answers stopped mid-way (beyond their decoding): {}\n",
            self.pauses.line()
        ));
        if let Some(r) = &self.reference {
            out.push_str(&format!(
                "reference plan (first tokens first, one planner per GPU{}): {:.1} % within the SLO, \
                 TTFT p50 {} p99 {}, {} wakes; answers stopped {}, {} unfinished\n",
                [
                    (r.lag_seconds > 0.0).then(|| format!(", deciding {} s behind", r.lag_seconds)),
                    r.bound_seconds.map(|b| format!(", wakers standing on their demand for {b} s")),
                    (r.min_stay_seconds > 0.0)
                        .then(|| format!(", models awake {} s before they may be victims", r.min_stay_seconds)),
                ]
                .into_iter()
                .flatten()
                .collect::<String>(),
                r.slo_attainment * 100.0,
                in_seconds(r.ttft_p50_seconds),
                in_seconds(r.ttft_p99_seconds),
                r.wakes,
                r.pauses.line(),
                r.unfinished
            ));
        }
        if let Some(f) = &self.faults {
            out.push_str(&format!(
                "faults (seed {}): {} injected, {} invariants broken\n",
                f.seed,
                f.injected.len(),
                f.violations.len()
            ));
            for i in &f.injected {
                out.push_str(&format!("  {:>8.1} s  {}\n", i.at_seconds, i.fault));
            }
            for v in &f.violations {
                out.push_str(&format!("  BROKEN: {v}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::ReplicaStats;
    use greenthread_sidecar::state::State;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_reference_counts_first_tokens_as_the_run_does_and_the_pauses_of_ended_answers() {
        let plan = crate::plan::Plan {
            first_token: vec![Some(1.0), Some(5.0), None, Some(2.0)],
            paused: vec![Some(0.0), Some(90.0), None, Some(10.0)],
            wakes: 3,
            wakes_by_model: vec![2, 1],
        };
        let names = ["a".to_string(), "b".to_string()];
        let r = reference(
            &plan,
            Duration::from_secs(3),
            &crate::plan::Rules::default(),
            &names,
            &[0, 1, 1, 0],
        );
        // By model: a's first tokens at 1 and 2 s, b's at 5 s and never.
        let by_model: Vec<(&str, usize, f64, u64)> = r
            .models
            .iter()
            .map(|m| (m.model.as_str(), m.requests, m.slo_attainment, m.wakes))
            .collect();
        assert_eq!(by_model, [("a", 2, 1.0, 2), ("b", 2, 0.0, 1)]);
        // Two of four within 3 s: one too late, one never.
        assert_eq!(r.slo_attainment, 0.5);
        assert_eq!(
            (r.ttft_p50_seconds, r.ttft_p99_seconds),
            (Some(2.0), Some(5.0))
        );
        assert_eq!(
            (
                r.pauses.pause_p50_seconds,
                r.pauses.pause_p90_seconds,
                r.pauses.pause_max_seconds
            ),
            (Some(10.0), Some(90.0), Some(90.0))
        );
        assert_eq!(
            (r.pauses.paused_over_a_minute, r.unfinished, r.wakes),
            (1, 1, 3)
        );
        let mut report = report(
            &Run {
                outcomes: vec![],
                replicas: vec![],
                simulated: Duration::ZERO,
                boot: Duration::ZERO,
                arrived_to: vec![],
                gpu_memory: vec![],
                stranded_seconds: vec![],
                oversubscribed_seconds: vec![],
                demand: vec![],
                decode_seconds: vec![],
                injected: vec![],
                violations: vec![],
                faults_seed: None,
            },
            &[],
            &[],
            Duration::from_secs(3),
            Duration::ZERO,
        );
        report.reference = Some(r);
        assert!(
            report.table().contains(
                "reference plan (first tokens first, one planner per GPU): 50.0 % within the SLO"
            ),
            "{}",
            report.table()
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["reference"]["pausedOverAMinute"], 1, "{json}");
    }

    #[test]
    fn attainment_counts_refusals_as_misses_and_quantiles_are_nearest_rank() {
        let s = Duration::from_secs;
        let run = Run {
            outcomes: vec![
                Outcome::Answered {
                    ttft: s(1),
                    total: s(2),
                },
                Outcome::Answered {
                    ttft: s(5),
                    total: s(6),
                },
                Outcome::Rejected {
                    status: 429,
                    code: "queue_full".into(),
                },
                Outcome::Answered {
                    ttft: s(2),
                    total: s(9),
                },
            ],
            replicas: vec![
                ReplicaStats {
                    model: 0,
                    gpus: vec![0],
                    wakes: 2,
                    preempted: 1,
                    reserved_bytes: 8 * GIB,
                    waking_seconds: 1.0,
                    serving_seconds: 8.0,
                    deactivating_seconds: 1.0,
                    ..Default::default()
                },
                ReplicaStats {
                    model: 1,
                    gpus: vec![1],
                    wakes: 1,
                    reserved_bytes: 16 * GIB,
                    serving_seconds: 4.0,
                    ..Default::default()
                },
            ],
            gpu_memory: vec![16 * GIB, 32 * GIB],
            stranded_seconds: vec![12.0, 0.0],
            oversubscribed_seconds: vec![0.0, 25.0],
            demand: vec![],
            decode_seconds: vec![1.0, 0.5, 0.0, 3.0],
            simulated: s(100),
            boot: s(3),
            arrived_to: vec![
                State::Serving,
                State::Sleeping,
                State::Sleeping,
                State::Serving,
            ],
            injected: vec![],
            violations: vec![],
            faults_seed: None,
        };
        let r = report(&run, &["a".into(), "b".into()], &[0, 0, 1, 1], s(3), s(1));
        assert_eq!(r.totals.requests, 4);
        assert_eq!(r.totals.answered, 3);
        // 1 s and 2 s are within 3 s; 5 s is not; the refusal is a miss.
        assert_eq!(r.totals.slo_attainment, 0.5);
        assert_eq!(r.totals.ttft_p50_seconds, Some(2.0));
        assert_eq!(r.totals.ttft_p99_seconds, Some(5.0));
        assert_eq!((r.totals.wakes, r.totals.preemptions), (3, 1));
        assert_eq!(r.totals.awake_gpu_seconds, 14.0);
        assert_eq!(r.rejections.get("queue_full"), Some(&1));
        assert_eq!(r.models[0].totals.slo_attainment, 0.5);
        assert_eq!(r.models[1].totals.ttft_p50_seconds, Some(2.0));
        // Answered after 2 s, 6 s and 9 s with first tokens at 1, 5 and 2 s and outputs
        // of 1, 0.5 and 3 s to decode: stopped 0, 0.5 and 4 s.
        assert_eq!(
            (r.pauses.pause_p50_seconds, r.pauses.pause_max_seconds),
            (Some(0.5), Some(4.0))
        );
        assert_eq!(r.pauses.paused_over_a_minute, 0);
        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "requests",
            "answered",
            "rejected",
            "sloAttainment",
            "ttftP50Seconds",
            "ttftP99Seconds",
            "wakes",
            "preemptions",
            "awakeGpuSeconds",
            "simulatedSeconds",
            "wallSeconds",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert!(r.table().contains("ALL"));
        let serving = &r.by_state_at_arrival["serving"];
        assert_eq!((serving.requests, serving.slo_attainment), (2, 1.0));
        assert_eq!(r.by_state_at_arrival["sleeping"].slo_attainment, 0.0);
        assert!(!r.by_state_at_arrival.contains_key("waking"));
        // Per GPU: its models' requests, and its memory × time held, by state.
        let g0 = &r.by_gpu[0];
        assert_eq!((g0.models.clone(), g0.requests), (vec!["a".to_string()], 2));
        assert_eq!((g0.slo_attainment, g0.wakes), (0.5, 2));
        // 8 GiB for 10 s of a 16 GiB GPU's 100 s, 1 s of it waking and 1 s deactivating.
        assert_eq!(g0.memory_busy, 0.05);
        assert_eq!((g0.memory_waking, g0.memory_deactivating), (0.005, 0.005));
        assert_eq!(g0.memory_stranded, 0.12);
        let g1 = &r.by_gpu[1];
        assert_eq!((g1.requests, g1.slo_attainment), (2, 0.5));
        // 16 GiB for 4 s of a 32 GiB GPU's 100 s.
        assert_eq!((g1.memory_busy, g1.memory_waking), (0.02, 0.0));
        // Oversubscribed: the seconds recorded over the run's 100.
        assert_eq!((g0.oversubscribed, g1.oversubscribed), (0.0, 0.25));
        assert!(json["byGpu"][1].get("memoryBusy").is_some(), "{json}");
        assert_eq!(json["byGpu"][1]["oversubscribed"], 0.25, "{json}");
        assert!(r.table().contains("MEMORY BUSY"), "{}", r.table());
        assert!(r.table().contains("OVERSUBSCRIBED"), "{}", r.table());
    }
}
