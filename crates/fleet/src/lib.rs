//! `greenthread simulate`: how many GPUs do my models and my traffic need? The real
//! control plane over simulated engines, in virtual time, replaying a request trace.

pub mod demand;
pub mod faults;
pub mod plan;
pub mod report;
pub mod rng;
pub mod run;
pub mod trace;
pub mod zoo;

use rng::{Rng, Zipf};
use run::Request;
use trace::Workload;

/// Gives each arrival a model: a seeded Zipf popularity of skew `skew` over the models,
/// the ranks themselves in a seeded order (so that the most popular model is not always
/// the first declared). Returns the requests and the popularity rank of each model.
pub fn assign(
    workload: &Workload,
    models: usize,
    skew: f64,
    seed: u64,
) -> (Vec<Request>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let mut by_rank: Vec<usize> = (0..models).collect();
    rng.shuffle(&mut by_rank);
    let zipf = Zipf::new(models, skew);
    let requests = workload
        .arrivals
        .iter()
        .map(|a| Request {
            at: a.at,
            model: by_rank[zipf.sample(&mut rng)],
            prompt_tokens: a.prompt_tokens,
            output_tokens: a.output_tokens,
        })
        .collect();
    let mut rank_of = vec![0; models];
    for (rank, m) in by_rank.iter().enumerate() {
        rank_of[*m] = rank;
    }
    (requests, rank_of)
}

/// What [`find_gpus`] found.
pub struct Found {
    pub gpus: usize,
    /// The run on that many GPUs.
    pub report: report::Report,
    /// Every count tried, with its attainment, by count.
    pub tried: Vec<(usize, f64)>,
}

/// The fewest GPUs whose SLO attainment reaches `target`, running `on(n)` for each count
/// it tries: doubling from one until a count reaches it (at most `most`, every replica
/// alone), then bisecting between the last that did not and the first that did
/// (attainment grows with GPUs, give or take a seed's noise). An error when even `most`
/// fall short. Counts go in steps of `unit` GPUs (a tensor-parallel replica's group).
pub fn find_gpus(
    target: f64,
    most: usize,
    unit: usize,
    mut on: impl FnMut(usize) -> anyhow::Result<report::Report>,
) -> anyhow::Result<Found> {
    let unit = unit.max(1);
    // Below, counts are of groups of `unit` GPUs.
    let mut tried: Vec<(usize, report::Report)> = Vec::new();
    let mut attempt =
        |n: usize, tried: &mut Vec<(usize, report::Report)>| -> anyhow::Result<bool> {
            if let Some((_, r)) = tried.iter().find(|(g, _)| *g == n) {
                return Ok(r.totals.slo_attainment >= target);
            }
            let r = on(n * unit)?;
            let ok = r.totals.slo_attainment >= target;
            tried.push((n, r));
            Ok(ok)
        };
    let most = most.div_ceil(unit).max(1);
    let mut hi = 1;
    while !attempt(hi, &mut tried)? {
        if hi >= most {
            anyhow::bail!(
                "even {} GPUs (every replica alone) reach only {:.1}%, below the target of {:.1}%",
                hi * unit,
                tried
                    .last()
                    .map_or(0.0, |t| t.1.totals.slo_attainment * 100.0),
                target * 100.0
            );
        }
        hi = (hi * 2).min(most);
    }
    // `lo` fell short (or is 0, which nothing reaches).
    let mut lo = hi / 2;
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if attempt(mid, &mut tried)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let curve: Vec<(usize, f64)> = {
        let mut c: Vec<(usize, f64)> = tried
            .iter()
            .map(|(n, r)| (*n * unit, r.totals.slo_attainment))
            .collect();
        c.sort_by_key(|(n, _)| *n);
        c
    };
    let at = tried
        .into_iter()
        .find(|(g, _)| *g == hi)
        .map(|(_, r)| r)
        .expect("the count found was tried");
    Ok(Found {
        gpus: hi * unit,
        report: at,
        tried: curve,
    })
}
