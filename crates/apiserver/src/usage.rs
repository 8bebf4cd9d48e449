//! Tokens per key and model, from what the engines themselves report (`usage`), read as
//! answers pass through: a JSON answer whole, an event stream event by event. A streamed
//! chat or completion whose client did not ask for usage is asked for it
//! ([`ask_for_usage`]), and the usage-only event that adds is taken out again before the
//! client sees it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use axum::body::{Body, Bytes};
use memchr::memmem;
use serde_json::Value;

/// Tokens one answer used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// The usage in an answer or event: OpenAI's `prompt_tokens`/`completion_tokens`, the
/// Responses API's and Anthropic's `input_tokens`/`output_tokens` (also under
/// `response` in a Responses stream's last event, or `message` in Anthropic's first).
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = [&v["usage"], &v["response"]["usage"], &v["message"]["usage"]]
        .into_iter()
        .find(|u| u.is_object())?;
    let n = |a: &str, b: &str| u[a].as_u64().or(u[b].as_u64()).unwrap_or(0);
    Some(Usage {
        prompt: n("prompt_tokens", "input_tokens"),
        completion: n("completion_tokens", "output_tokens"),
    })
}

/// For a streamed OpenAI chat or completion that does not say whether it wants usage:
/// the body asking for it (`stream_options.include_usage`), every other byte as it was.
pub fn ask_for_usage(path: &str, body: &Bytes) -> Option<Bytes> {
    if path != "/v1/chat/completions" && path != "/v1/completions" {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        stream: Option<&'a serde_json::value::RawValue>,
        #[serde(borrow, default)]
        stream_options: Option<&'a serde_json::value::RawValue>,
    }
    let f: Fields = serde_json::from_slice(body).ok()?;
    if f.stream.map(|s| s.get()) != Some("true") || f.stream_options.is_some() {
        return None;
    }
    // A `stream` member exists, so the object has a member after the one we add.
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let mut out = Vec::with_capacity(body.len() + 40);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
    out.extend_from_slice(&body[open + 1..]);
    Some(Bytes::from(out))
}

/// The longest JSON answer read whole for its usage; a longer one is not counted.
const MAX_JSON: usize = 4 << 20;

enum Shape {
    Json(Vec<u8>),
    /// Bytes of an event not complete yet.
    Events(Vec<u8>),
    Other,
}

/// A response body that reports the usage it carried when it ends (or is dropped), and
/// drops the usage-only event when we asked for it (`strip`).
pub struct Metered {
    inner: Body,
    shape: Shape,
    strip: bool,
    usage: Option<Usage>,
    done: Option<Box<dyn FnOnce(Option<Usage>) + Send>>,
}

impl Metered {
    pub fn new(
        inner: Body,
        content_type: &str,
        strip: bool,
        done: impl FnOnce(Option<Usage>) + Send + 'static,
    ) -> Self {
        let shape = if content_type.starts_with("text/event-stream") {
            Shape::Events(Vec::new())
        } else if content_type.starts_with("application/json") {
            Shape::Json(Vec::new())
        } else {
            Shape::Other
        };
        Self {
            inner,
            shape,
            strip,
            usage: None,
            done: Some(Box::new(done)),
        }
    }

    fn record(&mut self, u: Usage) {
        // Anthropic's stream reports input first and output later, cumulatively.
        let seen = self.usage.get_or_insert_default();
        seen.prompt = seen.prompt.max(u.prompt);
        seen.completion = seen.completion.max(u.completion);
    }

    /// Reads `data`; what to pass on (all of it unless stripping).
    fn feed(&mut self, data: Bytes) -> Bytes {
        match &mut self.shape {
            Shape::Other => data,
            Shape::Json(buf) => {
                if buf.len() + data.len() <= MAX_JSON {
                    buf.extend_from_slice(&data);
                } else {
                    self.shape = Shape::Other;
                }
                data
            }
            Shape::Events(carry) => {
                carry.extend_from_slice(&data);
                let mut kept = Vec::new();
                let mut found = Vec::new();
                let mut start = 0;
                while let Some(end) = greenthread_edge::sse::event_end(&carry[start..]) {
                    let event = &carry[start..start + end];
                    let (usage, only_usage) = event_usage(event);
                    found.extend(usage);
                    if !(self.strip && only_usage) {
                        kept.extend_from_slice(event);
                    }
                    start += end;
                }
                carry.drain(..start);
                for u in found {
                    self.record(u);
                }
                if self.strip { Bytes::from(kept) } else { data }
            }
        }
    }

    fn finish(&mut self) {
        if let Shape::Json(buf) = &self.shape
            && let Some(u) = json_usage(buf)
        {
            self.record(u);
        }
        if let Some(done) = self.done.take() {
            done(self.usage);
        }
    }
}

/// The usage of a whole JSON answer, reading only its `usage` object: answers put it
/// last, and the rest (the text, every embedding) need not be parsed at all.
fn json_usage(buf: &[u8]) -> Option<Usage> {
    let at = memmem::rfind(buf, b"\"usage\"")?;
    let value = at + 7 + buf[at + 7..].iter().position(|b| *b == b'{')?;
    let between = &buf[at + 7..value];
    if !between
        .iter()
        .all(|b| b.is_ascii_whitespace() || *b == b':')
    {
        return None;
    }
    let object = serde_json::Deserializer::from_slice(&buf[value..])
        .into_iter::<Value>()
        .next()?
        .ok()?;
    usage_of(&serde_json::json!({ "usage": object }))
}

/// The usage an event reports, and whether it is nothing else (an OpenAI usage chunk:
/// no choices). Only events that name a usage object are parsed.
fn event_usage(event: &[u8]) -> (Option<Usage>, bool) {
    let Some(at) = memmem::find(event, b"\"usage\"") else {
        return (None, false);
    };
    let after = &event[at + 7..];
    let value = after
        .iter()
        .find(|b| !(b.is_ascii_whitespace() || **b == b':'));
    if value != Some(&b'{') {
        return (None, false);
    }
    let data: Vec<u8> = event
        .split(|b| *b == b'\n')
        .filter_map(|l| l.strip_prefix(b"data:"))
        .flat_map(|l| l.trim_ascii().iter().copied().chain([b'\n']))
        .collect();
    let Ok(v) = serde_json::from_slice::<Value>(&data) else {
        return (None, false);
    };
    let only = v["choices"].as_array().is_some_and(|c| c.is_empty());
    (usage_of(&v), only)
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        // Every field is Unpin (axum's body is boxed).
        let this = self.get_mut();
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.feed(data);
                        // A frame that held only what was taken out: read on.
                        if out.is_empty() && this.strip {
                            continue;
                        }
                        Poll::Ready(Some(Ok(http_body::Frame::data(out))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(None) => {
                    // An unfinished last event held back while stripping goes out as it is.
                    if this.strip
                        && let Shape::Events(carry) = &mut this.shape
                        && !carry.is_empty()
                    {
                        let rest = Bytes::from(std::mem::take(carry));
                        return Poll::Ready(Some(Ok(http_body::Frame::data(rest))));
                    }
                    this.finish();
                    Poll::Ready(None)
                }
                other => other,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.strip {
            http_body::SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for Metered {
    /// A client that went away mid-answer: what was seen is counted.
    fn drop(&mut self) {
        if self.done.is_some() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn pass(chunks: &[&str], content_type: &str, strip: bool) -> (String, Option<Usage>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let owned: Vec<Result<Bytes, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Bytes::from(c.to_string())))
            .collect();
        let body = Body::from_stream(futures_util::stream::iter(owned));
        let m = Metered::new(body, content_type, strip, move |u| tx.send(u).unwrap());
        let out = Body::new(m).collect().await.unwrap().to_bytes();
        (String::from_utf8(out.to_vec()).unwrap(), rx.recv().unwrap())
    }

    const CHAT: [&str; 3] = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"choi",
        "ces\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    ];

    #[tokio::test]
    async fn a_stream_usage_split_across_frames_is_counted_and_taken_out_when_we_asked() {
        let (out, u) = pass(&CHAT, "text/event-stream", false).await;
        assert_eq!(out, CHAT.concat());
        assert_eq!(
            u,
            Some(Usage {
                prompt: 7,
                completion: 2
            })
        );
        let (out, u) = pass(&CHAT, "text/event-stream", true).await;
        assert_eq!(
            out,
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(
            u,
            Some(Usage {
                prompt: 7,
                completion: 2
            })
        );
    }

    #[tokio::test]
    async fn json_answers_of_each_api_are_counted() {
        for (body, want) in [
            (
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#,
                (3, 4),
            ),
            (
                r#"{"output":[],"usage":{"input_tokens":5,"output_tokens":6}}"#,
                (5, 6),
            ),
            (
                r#"{"data":[],"usage":{"prompt_tokens":9,"total_tokens":9}}"#,
                (9, 0),
            ),
        ] {
            let (half, rest) = body.split_at(10);
            let (out, u) = pass(&[half, rest], "application/json", false).await;
            assert_eq!(out, body);
            assert_eq!(
                u,
                Some(Usage {
                    prompt: want.0,
                    completion: want.1
                })
            );
        }
        let (_, u) = pass(&["{\"error\":{}}"], "application/json", false).await;
        assert_eq!(u, None);
    }

    #[tokio::test]
    async fn anthropic_streams_report_input_first_and_output_later() {
        let events = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        ];
        let (_, u) = pass(&events, "text/event-stream", false).await;
        assert_eq!(
            u,
            Some(Usage {
                prompt: 11,
                completion: 15
            })
        );
    }

    #[test]
    fn usage_is_asked_for_only_when_the_client_did_not_say() {
        let ask = |p: &str, b: &'static str| {
            ask_for_usage(p, &Bytes::from_static(b.as_bytes()))
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        assert_eq!(
            ask("/v1/chat/completions", r#" {"model":"m","stream":true}"#).as_deref(),
            Some(r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#)
        );
        assert_eq!(
            ask("/v1/chat/completions", r#"{"model":"m","stream":false}"#),
            None
        );
        assert_eq!(ask("/v1/chat/completions", r#"{"model":"m"}"#), None);
        assert_eq!(
            ask(
                "/v1/chat/completions",
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#
            ),
            None
        );
        assert_eq!(ask("/v1/messages", r#"{"model":"m","stream":true}"#), None);
    }
}
