//! What the workload asks of each GPU, whatever the policy: had every request been served
//! the moment it arrived, which models would need their memory at the same time. While
//! that is more than a GPU has, some model with work waits for another under any
//! scheduler that lets a model finish what it started; the figure says how much of a GPU's
//! shortfall is its load and its placement rather than its policy.

use crate::run::Request;

/// One model as the demand sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Demand {
    /// The GPUs its (first) replica spans, by position.
    pub gpus: Vec<u32>,
    /// What it holds awake on each of them.
    pub bytes: u64,
    /// Its engine's rates ([`greenthread_simulator::config::SimConfig`]).
    pub ttft_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub tokens_per_second: f64,
    /// A level-1 wake and sleep: the weights over the host link, plus the fixed costs.
    pub wake_seconds: f64,
    pub sleep_seconds: f64,
    /// Sequences its engine runs at once.
    pub max_sequences: usize,
}

impl Demand {
    /// How long `r` holds the model, served at once: its first token, its prompt's
    /// prefill and its output at the engine's rates.
    pub fn service_seconds(&self, r: &Request) -> f64 {
        self.ttft_seconds
            + seconds(f64::from(r.prompt_tokens), self.prefill_tokens_per_second)
            + self.decode_seconds(r)
    }

    /// How long `r`'s output takes to decode at the engine's rate: what an answer never
    /// stopped takes from its first token to its last.
    pub fn decode_seconds(&self, r: &Request) -> f64 {
        seconds(f64::from(r.output_tokens), self.tokens_per_second)
    }
}

/// `tokens` at `rate` tokens a second; none when the rate is 0 (the engine does not
/// model that step).
pub fn seconds(tokens: f64, rate: f64) -> f64 {
    if rate > 0.0 { tokens / rate } else { 0.0 }
}

/// Per GPU (by position, `memory[g]` bytes), the seconds during which the models there
/// with a request in progress — each request served from its arrival for
/// [`Demand::service_seconds`] — need more memory together than the GPU has. A model
/// counts once however many of its requests overlap (they share its memory).
pub fn oversubscribed_seconds(memory: &[u64], models: &[Demand], requests: &[Request]) -> Vec<f64> {
    memory
        .iter()
        .enumerate()
        .map(|(g, &memory)| {
            let g = g as u32;
            // (time, +1 arrival / -1 end, model); ends sort before arrivals at one instant.
            let mut events: Vec<(f64, i8, usize)> = Vec::new();
            for r in requests {
                let Some(d) = models.get(r.model).filter(|d| d.gpus.contains(&g)) else {
                    continue;
                };
                let at = r.at.as_secs_f64();
                events.push((at, 1, r.model));
                events.push((at + d.service_seconds(r), -1, r.model));
            }
            events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut active = vec![0u32; models.len()];
            let mut demand = 0u64;
            let mut over = 0.0;
            let mut last = 0.0;
            for (t, step, m) in events {
                if demand > memory {
                    over += t - last;
                }
                last = t;
                if step > 0 {
                    if active[m] == 0 {
                        demand += models[m].bytes;
                    }
                    active[m] += 1;
                } else {
                    active[m] -= 1;
                    if active[m] == 0 {
                        demand -= models[m].bytes;
                    }
                }
            }
            over
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const GI: u64 = 1 << 30;

    /// A model of `gib` on `gpus` whose requests last one second per output token.
    fn model(gib: u64, gpus: &[u32]) -> Demand {
        Demand {
            gpus: gpus.to_vec(),
            bytes: gib * GI,
            ttft_seconds: 0.0,
            prefill_tokens_per_second: 0.0,
            tokens_per_second: 1.0,
            ..Default::default()
        }
    }

    /// A request to `model` at `at` s lasting `secs` s.
    fn req(model: usize, at: u64, secs: u32) -> Request {
        Request {
            at: Duration::from_secs(at),
            model,
            prompt_tokens: 100,
            output_tokens: secs,
        }
    }

    #[test]
    fn a_gpu_is_oversubscribed_while_its_models_with_work_outgrow_it() {
        // 80 GiB GPUs; models: 0 and 1 of 50 GiB on GPU 0, 2 of 24 GiB on GPU 0, 3 of
        // 40 GiB spanning GPUs 0 and 1.
        let models = [
            model(50, &[0]),
            model(50, &[0]),
            model(24, &[0]),
            model(40, &[0, 1]),
        ];
        // (case, requests) → oversubscribed seconds on GPU 0, on GPU 1
        let cases: Vec<(&str, Vec<Request>, [f64; 2])> = vec![
            ("nothing", vec![], [0.0, 0.0]),
            (
                "two 50s overlap for 2 s",
                vec![req(0, 0, 5), req(1, 3, 5)],
                [2.0, 0.0],
            ),
            (
                "one model's requests share its memory",
                vec![req(0, 0, 5), req(0, 1, 5), req(0, 2, 5)],
                [0.0, 0.0],
            ),
            (
                "one ends as the other arrives: no overlap",
                vec![req(0, 0, 5), req(1, 5, 5)],
                [0.0, 0.0],
            ),
            (
                "24 + 40 fits; 50 more does not, for 2 s",
                vec![req(2, 0, 10), req(3, 2, 5), req(0, 4, 2)],
                [2.0, 0.0],
            ),
            (
                "a model spanning two GPUs counts on both (on GPU 1 it fits alone)",
                vec![req(3, 0, 4), req(0, 2, 4)],
                [2.0, 0.0],
            ),
        ];
        for (name, requests, want) in cases {
            let got = oversubscribed_seconds(&[80 * GI, 80 * GI], &models, &requests);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_request_holds_its_model_for_its_first_token_prefill_and_output() {
        let d = Demand {
            gpus: vec![0],
            bytes: GI,
            ttft_seconds: 0.02,
            prefill_tokens_per_second: 8000.0,
            tokens_per_second: 40.0,
            ..Default::default()
        };
        let r = Request {
            at: Duration::ZERO,
            model: 0,
            prompt_tokens: 1000,
            output_tokens: 120,
        };
        assert!((d.service_seconds(&r) - (0.02 + 0.125 + 3.0)).abs() < 1e-9);
    }
}
