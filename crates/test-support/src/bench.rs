//! Load generation and statistics shared by the benchmarks (closed-loop clients on
//! loopback, percentiles, medians over interleaved rounds).

use std::time::{Duration, Instant};

use crate::http;
pub use crate::wait::wait_http;

pub struct Stats {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub errors: usize,
}

pub const ROUNDS: usize = 3;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn body(model: &str, max_tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "bench"}], "max_tokens": max_tokens, "stream": stream})
}

/// `concurrency` clients in closed loops for `seconds`.
pub async fn load(
    base: &str,
    model: &str,
    max_tokens: u32,
    concurrency: usize,
    seconds: f64,
) -> Stats {
    let client = http();
    let url = format!("{base}/v1/chat/completions");
    let payload = body(model, max_tokens, false);
    // Warm the connection pools on both hops.
    for _ in 0..concurrency.max(8) {
        if let Ok(r) = client.post(&url).json(&payload).send().await {
            let _ = r.bytes().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, payload) = (client.clone(), url.clone(), payload.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = match client.post(&url).json(&payload).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Stats {
        rps: all.len() as f64 / elapsed,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        errors,
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// [`ROUNDS`] rounds of [`load`], each running every target back to back, so that a slow
/// moment of a shared machine hits every path of the same round.
pub async fn interleaved<const N: usize>(
    targets: &[String; N],
    model: &str,
    max_tokens: u32,
    concurrency: usize,
    seconds: f64,
) -> Vec<[Stats; N]> {
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let mut round = Vec::new();
        for t in targets {
            round.push(load(t, model, max_tokens, concurrency, seconds).await);
        }
        rounds.push(round.try_into().ok().expect("one result per target"));
    }
    rounds
}

/// A per-round value over paired rounds (each round ran every path back to back), as
/// "median [min, max]" in `fmt`: never a difference of medians from different rounds,
/// never clamped.
pub fn paired<R>(rounds: &[R], value: impl Fn(&R) -> f64, fmt: impl Fn(f64) -> String) -> String {
    let mut v: Vec<f64> = rounds.iter().map(value).collect();
    v.sort_by(f64::total_cmp);
    format!(
        "{} [{}, {}]",
        fmt(v[v.len() / 2]),
        fmt(v[0]),
        fmt(v[v.len() - 1])
    )
}

/// The round whose `value` is the median: where one row's absolute columns come from.
pub fn median_round<R>(rounds: &[R], value: impl Fn(&R) -> f64) -> &R {
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|a, b| value(&rounds[*a]).total_cmp(&value(&rounds[*b])));
    &rounds[order[order.len() / 2]]
}
