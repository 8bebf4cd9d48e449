//! Forwarding to the engine: one pooled HTTP/1 client, bodies streamed frame by frame
//! (SSE included), the in-flight slot held until the response body ends.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Body;
use bytes::Bytes;
use greenthread_edge::Connector;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::{Body as HttpBody, Frame};
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The request never reached the engine, so it is safe to send again.
    #[error("engine unreachable: {0}")]
    Unreachable(String),
    #[error("engine failed the request: {0}")]
    Failed(String),
    /// The engine took the request but sent no response headers in time.
    #[error("engine sent no response within {0:?}")]
    Timeout(Duration),
}

/// Idle connections kept per engine; more are closed when their response ends.
const MAX_IDLE: usize = 64;

/// Request headers that carry a client's credentials: they stop at our edge.
/// `x-api-key` is how Anthropic's SDKs send a key.
const CREDENTIALS: [header::HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
    header::HeaderName::from_static("x-api-key"),
];

pub(crate) type EngineConn = SendRequest<Full<Bytes>>;

/// Why no connection to the engine could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting to {to}: no answer within {after:?}")]
    Timeout { to: String, after: Duration },
    #[error("connecting to {to}: {error}")]
    Failed { to: String, error: String },
}

/// HTTP/1 connections to one engine, through one connector: an idle one the engine has
/// kept open, or a new one. The proxy and the engine adapters' control calls share this.
/// Cloned for every response body that hands its connection back: one `Arc`.
#[derive(Clone)]
pub(crate) struct Pool(Arc<PoolInner>);

struct PoolInner {
    idle: Mutex<Vec<EngineConn>>,
    connector: Connector,
    /// Idle connections kept; more are closed when handed back.
    max_idle: usize,
}

impl Pool {
    pub(crate) fn new(connector: Connector, max_idle: usize) -> Self {
        Self(Arc::new(PoolInner {
            idle: Mutex::default(),
            connector,
            max_idle,
        }))
    }

    pub(crate) async fn take(&self, timeout: Duration) -> Result<EngineConn, ConnectError> {
        loop {
            let pooled = self.0.idle.lock().unwrap().pop();
            let Some(mut conn) = pooled else { break };
            // A connection the engine closed while idle is dropped, not used.
            if conn.ready().await.is_ok() {
                return Ok(conn);
            }
        }
        let to = || self.0.connector.to_string();
        let stream = tokio::time::timeout(timeout, self.0.connector.connect())
            .await
            .map_err(|_| ConnectError::Timeout {
                to: to(),
                after: timeout,
            })?
            .map_err(|e| ConnectError::Failed {
                to: to(),
                error: e.to_string(),
            })?;
        let (conn, driver) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ConnectError::Failed {
                    to: to(),
                    error: e.to_string(),
                })?;
        // The connection lives while a handle to it does (in use or idle here).
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "engine connection closed");
            }
        });
        Ok(conn)
    }

    /// A connection whose last exchange ended: kept for the next one, up to `max_idle`.
    pub(crate) fn give_back(&self, conn: EngineConn) {
        let mut idle = self.0.idle.lock().unwrap();
        if idle.len() < self.0.max_idle {
            idle.push(conn);
        }
    }
}

/// HTTP/1 connections to the one engine. A connection goes back to the pool only once
/// its response body has ended, so a long stream never holds up another request.
#[derive(Clone)]
pub struct Forwarder {
    /// TCP to the URL's address, or an in-memory pipe in a simulated fleet.
    pool: Pool,
    authority: http::uri::Authority,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Headers removed from every request besides [`CREDENTIALS`].
    strip: Vec<header::HeaderName>,
    /// `Authorization` for the engine's own key, if it has one.
    authorization: Option<HeaderValue>,
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
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Ok(Self {
            pool: Pool::new(Connector::Tcp(addr), MAX_IDLE),
            authority,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(600),
            strip: Vec::new(),
            authorization: None,
        })
    }

    /// Reaches the engine through `connector` instead of TCP to the URL's address (the
    /// URL still names the `Host`).
    pub fn with_connector(mut self, connector: Connector) -> Self {
        self.pool = Pool::new(connector, MAX_IDLE);
        self
    }

    /// Longest waits for a connection and for the response headers.
    pub fn with_timeouts(mut self, connect: Duration, response: Duration) -> Self {
        self.connect_timeout = connect;
        self.response_timeout = response;
        self
    }

    /// Also strips `headers` from requests, and sends the engine's own `api_key`.
    pub fn with_credentials(
        mut self,
        headers: &[String],
        api_key: Option<&str>,
    ) -> anyhow::Result<Self> {
        for h in headers {
            self.strip.push(
                h.parse()
                    .map_err(|e| anyhow::anyhow!("--strip-header {h:?}: {e}"))?,
            );
        }
        if let Some(key) = api_key {
            self.authorization = Some(greenthread_edge::bearer_value(key).ok_or_else(|| {
                anyhow::anyhow!("the engine API key has characters a header cannot hold")
            })?);
        }
        Ok(self)
    }

    /// Sends `parts` + `body` to the engine; `guard` lives until the response body ends.
    pub async fn forward<G: Send + Sync + Unpin + 'static>(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        guard: G,
    ) -> Result<Response<Body>, ForwardError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(path)
            .body(Full::new(body))
            .map_err(|e| ForwardError::Failed(e.to_string()))?;
        *req.headers_mut() = parts.headers.clone();
        strip_hop_by_hop(req.headers_mut());
        for h in CREDENTIALS.iter().chain(&self.strip) {
            req.headers_mut().remove(h);
        }
        if let Some(auth) = &self.authorization {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        req.headers_mut().insert(
            header::HOST,
            http::HeaderValue::from_str(self.authority.as_str())
                .map_err(|e| ForwardError::Failed(e.to_string()))?,
        );
        req.headers_mut().remove(header::CONTENT_LENGTH);
        let mut conn = self
            .pool
            .take(self.connect_timeout)
            .await
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        // On a timeout the connection is dropped with the request: it is not reused.
        let resp = tokio::time::timeout(self.response_timeout, conn.send_request(req))
            .await
            .map_err(|_| ForwardError::Timeout(self.response_timeout))?
            .map_err(|e| {
                if e.is_canceled() || e.is_closed() {
                    // The engine closed the connection before reading the request.
                    ForwardError::Unreachable(e.to_string())
                } else {
                    ForwardError::Failed(e.to_string())
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
        let pool = Some((self.pool.clone(), conn));
        Ok(Response::from_parts(
            parts,
            Body::new(Guarded {
                inner: body,
                _guard: guard,
                pool,
            }),
        ))
    }
}

pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// A body that keeps `_guard` alive until it ends or is dropped, and returns its
/// engine connection to the pool when it ends.
struct Guarded<B, G> {
    inner: B,
    _guard: G,
    pool: Option<(Pool, EngineConn)>,
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // Servers stop polling once a sized body reports its end, so check both ways.
        let ended = matches!(polled, Poll::Ready(None))
            || (polled.is_ready() && self.inner.is_end_stream());
        if ended && let Some((pool, conn)) = self.pool.take() {
            pool.give_back(conn);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
