//! The Batch API's decisions, pure: what an input file holds (or what is wrong with each
//! line), how long a completion window is, when a batch is urgent, what an answer means
//! for its request. Tested from tables; the runner does the I/O.

use std::time::Duration;

use serde_json::Value;

use super::store::LineError;

/// The routes a batch may run, as OpenAI's.
pub const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Requests in one batch at most (OpenAI's bound).
pub const MAX_LINES: usize = 50_000;

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    pub body: Value,
}

/// A batch's input, checked: its requests, all to one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub lines: Vec<Line>,
    pub model: String,
}

fn problem(code: &str, message: String, param: Option<&str>, line: usize) -> LineError {
    LineError {
        code: code.into(),
        message,
        param: param.map(String::from),
        line: Some(line as u64 + 1),
    }
}

/// Reads a batch's input file: one JSON object a line (`custom_id`, `method` POST,
/// `url` the batch's endpoint, `body` with a `model`), every `custom_id` distinct and
/// every request to the same model. Every problem is reported, by line (from 1).
pub fn parse_input(content: &[u8], endpoint: &str) -> Result<Input, Vec<LineError>> {
    let mut errors = Vec::new();
    let mut lines = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut model: Option<String> = None;
    let text = match std::str::from_utf8(content) {
        Ok(t) => t,
        Err(e) => {
            return Err(vec![LineError {
                code: "invalid_file".into(),
                message: format!("the file is not UTF-8 text: {e}"),
                param: None,
                line: None,
            }]);
        }
    };
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() + errors.len() >= MAX_LINES {
            errors.push(problem(
                "too_many_requests",
                format!("a batch holds at most {MAX_LINES} requests"),
                None,
                n,
            ));
            break;
        }
        let v: Value = match serde_json::from_str(raw) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                errors.push(problem(
                    "invalid_json_line",
                    "the line is not a JSON object".into(),
                    None,
                    n,
                ));
                continue;
            }
            Err(e) => {
                errors.push(problem(
                    "invalid_json_line",
                    format!("the line is not JSON: {e}"),
                    None,
                    n,
                ));
                continue;
            }
        };
        let Some(custom_id) = v["custom_id"].as_str().filter(|c| !c.is_empty()) else {
            errors.push(problem(
                "missing_required_parameter",
                "custom_id is required (a string)".into(),
                Some("custom_id"),
                n,
            ));
            continue;
        };
        if !v["method"]
            .as_str()
            .is_some_and(|m| m.eq_ignore_ascii_case("POST"))
        {
            errors.push(problem(
                "invalid_method",
                "method must be POST".into(),
                Some("method"),
                n,
            ));
            continue;
        }
        if v["url"].as_str() != Some(endpoint) {
            errors.push(problem(
                "invalid_url",
                format!("url must be the batch's endpoint, {endpoint}"),
                Some("url"),
                n,
            ));
            continue;
        }
        let body = v["body"].clone();
        let Some(this_model) = body["model"].as_str().filter(|m| !m.is_empty()) else {
            errors.push(problem(
                "missing_required_parameter",
                "body.model is required".into(),
                Some("body.model"),
                n,
            ));
            continue;
        };
        match &model {
            None => model = Some(this_model.to_string()),
            Some(m) if m != this_model => {
                errors.push(problem(
                    "mismatched_model",
                    format!("every request of a batch names one model: {m:?} before, {this_model:?} here"),
                    Some("body.model"),
                    n,
                ));
                continue;
            }
            Some(_) => {}
        }
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            errors.push(problem(
                "invalid_request",
                "a batch request cannot stream".into(),
                Some("body.stream"),
                n,
            ));
            continue;
        }
        if !seen.insert(custom_id.to_string()) {
            errors.push(problem(
                "duplicate_custom_id",
                format!("custom_id {custom_id:?} is used twice"),
                Some("custom_id"),
                n,
            ));
            continue;
        }
        lines.push(Line {
            custom_id: custom_id.to_string(),
            body,
        });
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "the input file holds no request".into(),
            param: None,
            line: None,
        });
    }
    match (errors.is_empty(), model) {
        (true, Some(model)) => Ok(Input { lines, model }),
        _ => Err(errors),
    }
}

/// A completion window: a duration such as `24h` (OpenAI's only one), 1 minute to 7 days.
pub fn window(s: &str) -> Result<Duration, String> {
    let d = greenthread_api::parse_duration(s).map_err(|e| format!("completion_window: {e}"))?;
    if d < Duration::from_secs(60) || d > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!(
            "completion_window: {s:?} is outside 1m to 168h (OpenAI's is 24h)"
        ));
    }
    Ok(d)
}

/// Whether a batch is close enough to the end of its window (its last tenth) to run as
/// interactive traffic does: waking its model as any request would.
pub fn urgent(now: i64, created_at: i64, expires_at: i64) -> bool {
    let window = (expires_at - created_at).max(1);
    (expires_at - now) * 10 <= window
}

/// What an answer means for its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered 2xx: a line of the output file.
    Completed,
    /// Answered otherwise: a line of the error file.
    Failed,
    /// Not now (the capacity is not idle, the queue is full, the model is not up): sent
    /// again later.
    Later,
}

pub fn outcome(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Completed,
        429 | 502 | 503 | 504 => Outcome::Later,
        _ => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(custom_id: &str, url: &str, model: &str) -> String {
        serde_json::json!({"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
    }

    #[test]
    fn an_input_file_is_read_line_by_line_with_every_problem_named() {
        let chat = "/v1/chat/completions";
        let good = [line("a", chat, "m"), String::new(), line("b", chat, "m")].join("\n");
        let input = parse_input(good.as_bytes(), chat).unwrap();
        assert_eq!(input.model, "m");
        let ids: Vec<&str> = input.lines.iter().map(|l| l.custom_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);

        // (file, the codes and lines of its problems)
        type Problems = Vec<(&'static str, Option<u64>)>;
        let cases: Vec<(String, Problems)> = vec![
            (String::new(), vec![("empty_file", None)]),
            ("not json".into(), vec![("invalid_json_line", Some(1))]),
            ("[1]".into(), vec![("invalid_json_line", Some(1))]),
            (
                [line("a", chat, "m"), line("a", chat, "m")].join("\n"),
                vec![("duplicate_custom_id", Some(2))],
            ),
            (
                [line("a", chat, "m"), line("b", "/v1/embeddings", "m")].join("\n"),
                vec![("invalid_url", Some(2))],
            ),
            (
                [line("a", chat, "m"), line("b", chat, "other")].join("\n"),
                vec![("mismatched_model", Some(2))],
            ),
            (
                [line("", chat, "m"), line("b", chat, "")].join("\n"),
                vec![
                    ("missing_required_parameter", Some(1)),
                    ("missing_required_parameter", Some(2)),
                ],
            ),
            (
                r#"{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}}"#.into(),
                vec![("invalid_method", Some(1))],
            ),
            (
                r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "stream": true}}"#.into(),
                vec![("invalid_request", Some(1))],
            ),
        ];
        for (file, want) in cases {
            let errors = parse_input(file.as_bytes(), chat).unwrap_err();
            let got: Vec<(&str, Option<u64>)> =
                errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
            assert_eq!(got, want, "{file}");
        }
        let bad = parse_input(&[0xff, 0xfe], chat).unwrap_err();
        assert_eq!(bad[0].code, "invalid_file");
    }

    #[test]
    fn windows_urgency_and_outcomes() {
        assert_eq!(window("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(window("10m"), Ok(Duration::from_secs(600)));
        for bad in ["30s", "8d", "200h", "soon", ""] {
            assert!(window(bad).is_err(), "{bad}");
        }
        // A 100 s window created at 0: urgent over its last 10 s.
        for (now, want) in [
            (0, false),
            (50, false),
            (89, false),
            (90, true),
            (100, true),
            (150, true),
        ] {
            assert_eq!(urgent(now, 0, 100), want, "at {now}");
        }
        for (status, want) in [
            (200, Outcome::Completed),
            (201, Outcome::Completed),
            (400, Outcome::Failed),
            (404, Outcome::Failed),
            (500, Outcome::Failed),
            (429, Outcome::Later),
            (503, Outcome::Later),
            (504, Outcome::Later),
        ] {
            assert_eq!(outcome(status), want, "{status}");
        }
    }
}
