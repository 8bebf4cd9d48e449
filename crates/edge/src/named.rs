//! Where a request names its model — the `model` of a JSON body, or the `model` field of
//! a `multipart/form-data` one — found without building the body's JSON tree, and the
//! body with another name spliced in, every other byte as it came.

use bytes::Bytes;
use http::header;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{ApiError, multipart};

/// Just the `model` of a request body, borrowed from it: every other field is skipped
/// without being built (no JSON tree of a 30 MB prompt). A duplicate `model` is an error,
/// so the engine cannot be shown a different one than we routed by.
#[derive(Deserialize)]
struct ModelField<'a> {
    /// Absent: `None`; present, even `null`: its raw value.
    #[serde(borrow, default, deserialize_with = "present")]
    model: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// `body` with the bytes at `at` replaced by `with`, every other byte as it was.
pub fn splice(body: &Bytes, at: std::ops::Range<usize>, with: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() - at.len() + with.len());
    out.extend_from_slice(&body[..at.start]);
    out.extend_from_slice(with);
    out.extend_from_slice(&body[at.end..]);
    Bytes::from(out)
}

/// Where a request names its model: the `model` of a JSON body, or the `model` field of
/// a `multipart/form-data` one (OpenAI's audio endpoints).
pub enum Named<'a> {
    Json(std::borrow::Cow<'a, str>, std::ops::Range<usize>),
    Form(&'a str, std::ops::Range<usize>),
}

impl Named<'_> {
    pub fn model(&self) -> &str {
        match self {
            Named::Json(m, _) => m,
            Named::Form(m, _) => m,
        }
    }

    /// The body naming `name` instead (the engine's own id).
    pub fn rename(self, body: &Bytes, name: &str) -> Bytes {
        match self {
            Named::Json(_, at) => {
                let name = serde_json::to_string(name).expect("a string serializes");
                splice(body, at, name.as_bytes())
            }
            Named::Form(_, at) => splice(body, at, name.as_bytes()),
        }
    }
}

/// The model a request body names, or the 400 that says why it names none.
pub fn named<'a>(headers: &http::HeaderMap, body: &'a Bytes) -> Result<Named<'a>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some(boundary) = multipart::boundary(content_type) {
        let bad = |e: multipart::MultipartError| {
            ApiError::bad_request(format!("request body is not a valid form: {e}"))
        };
        let at = multipart::field(body, boundary.map_err(bad)?, "model")
            .map_err(bad)?
            .ok_or_else(|| ApiError::bad_request("the form has no `model` field"))?;
        let model = std::str::from_utf8(&body[at.clone()])
            .map_err(|_| ApiError::bad_request("the form's `model` must be UTF-8 text"))?;
        return Ok(Named::Form(model, at));
    }
    let field: ModelField = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    let raw = field
        .model
        .ok_or_else(|| ApiError::bad_request("the request body has no `model` field (a string)"))?;
    let model = serde_json::from_str::<std::borrow::Cow<str>>(raw.get())
        .map_err(|_| ApiError::bad_request("the request body's `model` must be a string"))?;
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    Ok(Named::Json(model, start..start + raw.get().len()))
}
