//! Workloads: request arrivals with their prompt and output lengths, from a trace file in
//! the Azure LLM inference format (`TIMESTAMP,ContextTokens,GeneratedTokens`) or
//! generated (Poisson or Gamma arrivals, log-normal lengths).

use std::time::Duration;

use crate::rng::Rng;

/// One request of the workload, before it is given a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Since the start of the workload.
    pub at: Duration,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error(
        "the header must be TIMESTAMP,ContextTokens,GeneratedTokens (the Azure LLM inference trace format), found {0:?}"
    )]
    Header(String),
    #[error("the trace has no requests")]
    Empty,
}

/// The longest prompt or answer taken from a trace: longer ones are cut to it (and said so
/// by [`Workload::clamped`]).
pub const MAX_TOKENS: u32 = 32_768;

#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub arrivals: Vec<Arrival>,
    /// Requests whose prompt or output was cut to [`MAX_TOKENS`].
    pub clamped: usize,
}

/// Parses a trace; arrivals are relative to its first row and sorted.
pub fn parse_azure(text: &str) -> Result<Workload, TraceError> {
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, h)| h.trim().trim_start_matches('\u{feff}'))
        .unwrap_or("");
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    if columns != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"] {
        return Err(TraceError::Header(header.to_string()));
    }
    let mut rows: Vec<(jiff::civil::DateTime, u32, u32)> = Vec::new();
    for (i, line) in lines {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| TraceError::Line {
            line: line_no,
            message,
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [ts, context, generated] = fields[..] else {
            return Err(err(format!("expected 3 fields, found {}", fields.len())));
        };
        let at: jiff::civil::DateTime = ts
            .parse()
            .map_err(|e| err(format!("TIMESTAMP {ts:?}: {e}")))?;
        let tokens = |name: &str, v: &str| {
            v.parse::<u64>()
                .map_err(|e| err(format!("{name} {v:?}: {e}")))
        };
        let context = tokens("ContextTokens", context)?;
        let generated = tokens("GeneratedTokens", generated)?;
        rows.push((
            at,
            context.min(u64::from(u32::MAX)) as u32,
            generated.min(u64::from(u32::MAX)) as u32,
        ));
    }
    let first = rows.iter().map(|r| r.0).min().ok_or(TraceError::Empty)?;
    let mut clamped = 0;
    let mut arrivals: Vec<Arrival> = rows
        .into_iter()
        .map(|(at, p, o)| {
            if p > MAX_TOKENS || o > MAX_TOKENS {
                clamped += 1;
            }
            let since = first.duration_until(at);
            Arrival {
                at: Duration::try_from(since).unwrap_or_default(),
                // An empty prompt still has its end-of-prompt token; an empty answer is
                // still one token (the end of the sequence).
                prompt_tokens: p.clamp(1, MAX_TOKENS),
                output_tokens: o.clamp(1, MAX_TOKENS),
            }
        })
        .collect();
    arrivals.sort_by_key(|a| a.at);
    Ok(Workload { arrivals, clamped })
}

/// How generated arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    Poisson,
    /// Gamma-distributed gaps with this coefficient of variation (1: Poisson; above 1:
    /// burstier).
    Gamma {
        cv: f64,
    },
}

/// A generated workload: `rate` requests per second for `length`, lengths log-normal
/// around the medians of the conversation trace (1,020 prompt and 129 output tokens).
pub fn generate(rate: f64, length: Duration, arrivals: Arrivals, rng: &mut Rng) -> Workload {
    let mean_gap = 1.0 / rate.max(f64::MIN_POSITIVE);
    let mut at = 0.0;
    let mut out = Vec::new();
    loop {
        at += match arrivals {
            Arrivals::Poisson => rng.exponential(mean_gap),
            Arrivals::Gamma { cv } => {
                let shape = 1.0 / (cv * cv).max(1e-6);
                rng.gamma(shape, mean_gap)
            }
        };
        if at >= length.as_secs_f64() {
            break;
        }
        let tokens = |rng: &mut Rng, median: f64| {
            rng.log_normal(median, 1.0)
                .round()
                .clamp(1.0, f64::from(MAX_TOKENS)) as u32
        };
        out.push(Arrival {
            at: Duration::from_secs_f64(at),
            prompt_tokens: tokens(rng, 1020.0),
            output_tokens: tokens(rng, 129.0),
        });
    }
    Workload {
        arrivals: out,
        clamped: 0,
    }
}

impl Workload {
    /// The first `minutes` of the workload.
    pub fn first_minutes(mut self, minutes: f64) -> Self {
        let end = Duration::from_secs_f64(minutes * 60.0);
        self.arrivals.retain(|a| a.at < end);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_azure_trace_parses_relative_to_its_first_row() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
            2023-11-16 18:15:46.6805900,374,44\n\
            2023-11-16 18:15:50.9951690,396,109\n\
            \n\
            2023-11-16 18:16:46.6805900,0,40000\n";
        let w = parse_azure(text).unwrap();
        assert_eq!(
            w.arrivals,
            vec![
                Arrival {
                    at: Duration::ZERO,
                    prompt_tokens: 374,
                    output_tokens: 44
                },
                Arrival {
                    at: Duration::from_nanos(4_314_579_000),
                    prompt_tokens: 396,
                    output_tokens: 109
                },
                Arrival {
                    at: Duration::from_secs(60),
                    prompt_tokens: 1,
                    output_tokens: MAX_TOKENS
                },
            ]
        );
        assert_eq!(w.clamped, 1);
        assert_eq!(w.clone().first_minutes(0.5).arrivals.len(), 2);
    }

    #[test]
    fn a_bad_trace_names_the_line_and_the_column() {
        let cases = [
            ("time,a,b\n", "the header must be TIMESTAMP"),
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12\n",
                "line 2: expected 3 fields, found 2",
            ),
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,3\n",
                "line 2: ContextTokens \"x\"",
            ),
            (
                "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,3\n",
                "line 2: TIMESTAMP \"yesterday\"",
            ),
            ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
        ];
        for (text, expected) in cases {
            let e = parse_azure(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn generated_arrivals_have_the_asked_rate() {
        for arrivals in [Arrivals::Poisson, Arrivals::Gamma { cv: 4.0 }] {
            let mut rng = Rng::new(11);
            let w = generate(5.0, Duration::from_secs(3600), arrivals, &mut rng);
            let n = w.arrivals.len() as f64;
            // 18,000 expected; bursty gaps vary more, the mean stays.
            assert!((n - 18_000.0).abs() < 18_000.0 * 0.1, "{arrivals:?}: {n}");
            assert!(w.arrivals.windows(2).all(|p| p[0].at <= p[1].at));
        }
    }
}
