//! One error type for every HTTP answer we make ourselves: OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`), so clients' SDKs show it.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type` (`invalid_request_error`, `model_not_found`, …).
    pub kind: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body: also what an event stream that must end in an error sends.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.status.as_u16(),
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// An OpenAI-style error response.
pub fn api_error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, kind, message).into_response()
}

/// Longest piece of a client's input that an answer repeats back.
const ECHO_MAX: usize = 128;

/// `s` as it may be repeated in an answer or a log: at most 128 characters, debug-quoted
/// (control characters escaped), marked when cut. A client cannot make us reflect
/// megabytes, nor write raw control characters into a terminal.
pub fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cuts_long_input_and_escapes_control_characters() {
        assert_eq!(echo("llama"), "\"llama\"");
        assert_eq!(echo("a\u{1b}[2J"), "\"a\\u{1b}[2J\"");
        let long = "x".repeat(10 << 20);
        let e = echo(&long);
        assert!(e.len() < 200, "{}", e.len());
        assert!(e.ends_with(&format!("… ({} bytes)", 10 << 20)));
        // Cut on a character boundary, never inside one.
        let wide = "é".repeat(1000);
        assert!(echo(&wide).starts_with("\"éé"));
    }

    #[test]
    fn errors_have_openai_shape_and_retry_after() {
        let r = ApiError::unavailable("busy")
            .with_retry_after(2)
            .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
