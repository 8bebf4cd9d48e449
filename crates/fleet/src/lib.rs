//! `greenthread simulate`: how many GPUs do my models and my traffic need? The real
//! control plane over simulated engines, in virtual time, replaying a request trace.

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
