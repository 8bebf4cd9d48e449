use axum::{
    http::header,
    response::{IntoResponse, Response},
};

/// The content type of every `/metrics` we serve.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An OpenMetrics exposition (prometheus-client's text encoding, `# EOF` included) as the
/// answer to a scrape.
pub fn metrics(exposition: String) -> Response {
    ([(header::CONTENT_TYPE, OPENMETRICS)], exposition).into_response()
}
