//! Forwarding to the engine: one pooled HTTP/1 client, bodies streamed frame by frame
//! (SSE included), the in-flight slot held until the response body ends.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::{Body as HttpBody, Frame};
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request never reached the engine, so it is safe to send again.
    #[error("engine unreachable: {0}")]
    Unreachable(String),
    #[error("engine failed the request: {0}")]
    Failed(String),
}

#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
    authority: http::uri::Authority,
}

const HOP_BY_HOP: [header::HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove("keep-alive");
}

impl Forwarder {
    pub fn new(engine_url: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = engine_url
            .parse()
            .map_err(|e| anyhow::anyhow!("--engine-url {engine_url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            anyhow::bail!(
                "--engine-url {engine_url:?}: the engine is reached over plain http on loopback"
            );
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("--engine-url {engine_url:?} has no host:port"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        Ok(Self { client, authority })
    }

    /// Sends `parts` + `body` to the engine; `guard` lives until the response body ends.
    pub async fn forward<G: Send + Sync + Unpin + 'static>(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        guard: G,
    ) -> Result<Response<Body>, ForwardError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ForwardError::Failed(e.to_string()))?;
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| ForwardError::Failed(e.to_string()))?;
        *req.headers_mut() = parts.headers.clone();
        strip_hop_by_hop(req.headers_mut());
        req.headers_mut().remove(header::HOST);
        req.headers_mut().remove(header::CONTENT_LENGTH);
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                ForwardError::Unreachable(e.to_string())
            } else {
                ForwardError::Failed(format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ))
            }
        })?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if is_event_stream(&parts.headers) {
            // Tell buffering proxies in front of us (nginx) to pass events through.
            parts
                .headers
                .insert("x-accel-buffering", HeaderValue::from_static("no"));
        }
        Ok(Response::from_parts(
            parts,
            Body::new(Guarded {
                inner: body,
                _guard: guard,
            }),
        ))
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// A body that keeps `_guard` alive until it ends or is dropped.
struct Guarded<B, G> {
    inner: B,
    _guard: G,
}

impl<B, G> HttpBody for Guarded<B, G>
where
    B: HttpBody<Data = Bytes> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
