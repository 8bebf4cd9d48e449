//! The server loop: accept under a connection cap, serve HTTP/1 with header-read,
//! body-read and keep-alive timeouts, a concurrency cap and a body limit, and shut down
//! gracefully within a deadline.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use axum::{Router, body::Body, response::IntoResponse};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::Instant,
};
use tower_service::Service;

use crate::{
    ApiError, EdgeConfig, Shutdown,
    body::Bounded,
    transport::{Listener, Stream},
};

/// What a server refused and holds, for metrics and tests.
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Connections open now.
    pub connections: AtomicUsize,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed for stalled headers or keep-alive idleness.
    pub connections_timed_out: AtomicU64,
    /// Requests in progress now (a response counts until its body ends).
    pub requests: AtomicUsize,
    /// Requests answered 503 because `max_concurrency` were in progress.
    pub requests_refused: AtomicU64,
}

/// Serves `router` on `listener` until `shutdown`, then drains (see [`EdgeConfig`]).
pub async fn serve(
    listener: impl Into<Listener>,
    router: Router,
    cfg: EdgeConfig,
    shutdown: Shutdown,
) -> io::Result<()> {
    serve_with_stats(listener, router, cfg, shutdown, Arc::default()).await
}

pub async fn serve_with_stats(
    listener: impl Into<Listener>,
    router: Router,
    cfg: EdgeConfig,
    shutdown: Shutdown,
    stats: Arc<EdgeStats>,
) -> io::Result<()> {
    let listener: Listener = listener.into();
    let conns = Arc::new(Semaphore::new(cfg.max_connections));
    let requests = Arc::new(Semaphore::new(cfg.max_concurrency));
    let mut tasks = JoinSet::new();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            // In order: a fleet simulation replays the same run from the same seed.
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    let Ok(permit) = conns.clone().try_acquire_owned() else {
                        stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    };
                    tasks.spawn(connection(Conn {
                        stream,
                        router: router.clone(),
                        cfg: cfg.clone(),
                        requests: requests.clone(),
                        stats: stats.clone(),
                        shutdown: shutdown.clone(),
                        _permit: permit,
                    }));
                }
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(cfg.shutdown_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            open = tasks.len(),
            deadline = ?cfg.shutdown_timeout,
            "closing connections still open at the shutdown deadline"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

struct Conn {
    stream: Stream,
    router: Router,
    cfg: EdgeConfig,
    requests: Arc<Semaphore>,
    stats: Arc<EdgeStats>,
    shutdown: Shutdown,
    _permit: OwnedSemaphorePermit,
}

/// What the connection is doing, shared by its reader, its requests and its timer.
struct Activity {
    in_flight: AtomicUsize,
    served_any: AtomicBool,
    /// When the connection last had nothing in flight.
    idle_since: Mutex<Instant>,
    /// Set when idle; the first byte read after it marks the start of the next request.
    awaiting_first_byte: AtomicBool,
    first_byte_at: Mutex<Option<Instant>>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            served_any: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            awaiting_first_byte: AtomicBool::new(true),
            first_byte_at: Mutex::new(None),
        }
    }

    /// A request started. Nothing here wakes the connection's timer (a wake-up would poll
    /// the connection again, a wasted read per request): the timer looks at this record
    /// when it fires.
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served_any.store(true, Ordering::Relaxed);
        self.awaiting_first_byte.store(false, Ordering::SeqCst);
        *self.first_byte_at.lock().unwrap() = None;
    }

    /// A response ended; the last one starts the keep-alive clock.
    fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.idle_since.lock().unwrap() = Instant::now();
            self.awaiting_first_byte.store(true, Ordering::SeqCst);
        }
    }

    fn read_some(&self) {
        if self.awaiting_first_byte.swap(false, Ordering::SeqCst) {
            *self.first_byte_at.lock().unwrap() = Some(Instant::now());
        }
    }

    /// When the connection is to be closed if nothing changes: a request's headers are
    /// due `header_read_timeout` after its first byte (or after connecting), the next
    /// request `keep_alive_timeout` after the last ended. None while a request runs.
    fn deadline(&self, cfg: &EdgeConfig) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if let Some(t) = *self.first_byte_at.lock().unwrap() {
            return Some(t + cfg.header_read_timeout);
        }
        let idle = *self.idle_since.lock().unwrap();
        Some(if self.served_any.load(Ordering::SeqCst) {
            idle + cfg.keep_alive_timeout
        } else {
            idle + cfg.header_read_timeout
        })
    }
}

async fn connection(c: Conn) {
    let stats = c.stats.clone();
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: c.stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        let (router, cfg, requests, stats) = (c.router, c.cfg.clone(), c.requests, c.stats);
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let track = Tracked::new(activity.clone(), stats.clone());
            handle(req, router.clone(), cfg.clone(), requests.clone(), track)
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // Our own timer below closes stalled or idle connections; hyper's would arm a
        // timer for every request.
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let stop = c.shutdown.wait();
    tokio::pin!(stop);
    let mut stopping = false;
    // The timer is not told of activity; it looks when it fires, at the deadline or at
    // the latest every `check`. So a request whose headers start arriving after a long
    // idle wait is cut at most `check` later than its header-read timeout.
    let check = c.cfg.header_read_timeout.min(c.cfg.keep_alive_timeout);
    let timer = tokio::time::sleep(check);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            // In order: a fleet simulation replays the same run from the same seed.
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                break;
            }
            () = &mut stop, if !stopping => {
                // Finish the request in progress, then close; idle connections close now.
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
            () = &mut timer => {
                let now = Instant::now();
                match activity.deadline(&c.cfg) {
                    Some(d) if d <= now => {
                        // Nothing is in flight: closing loses nothing.
                        stats.connections_timed_out.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Some(d) => timer.as_mut().reset(d.min(now + check)),
                    None => timer.as_mut().reset(now + check),
                }
            }
        }
    }
    stats.connections.fetch_sub(1, Ordering::Relaxed);
}

async fn handle(
    req: Request<Incoming>,
    mut router: Router,
    cfg: EdgeConfig,
    requests: Arc<Semaphore>,
    track: Tracked,
) -> Result<Response<Body>, Infallible> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cfg.max_body) {
        let e = crate::BodyError::TooLarge {
            limit: cfg.max_body,
        };
        let mut resp = e.to_api_error().into_response();
        // The body is not read: the connection cannot be reused.
        resp.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return Ok(hold(resp, (track, None::<OwnedSemaphorePermit>)));
    }
    let Ok(permit) = requests.try_acquire_owned() else {
        track.stats.requests_refused.fetch_add(1, Ordering::Relaxed);
        let resp = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!(
                "server busy: {} requests in progress; retry later",
                cfg.max_concurrency
            ),
        )
        .with_retry_after(1)
        .into_response();
        return Ok(hold(resp, (track, None::<OwnedSemaphorePermit>)));
    };
    let req = req.map(|b| Body::new(Bounded::new(b, cfg.max_body, cfg.body_read_timeout)));
    let resp = match router.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    Ok(hold(resp, (track, Some(permit))))
}

/// One request's presence on its connection and in the server's count, until its
/// response body ends.
struct Tracked {
    activity: Arc<Activity>,
    stats: Arc<EdgeStats>,
}

impl Tracked {
    fn new(activity: Arc<Activity>, stats: Arc<EdgeStats>) -> Self {
        activity.begin();
        stats.requests.fetch_add(1, Ordering::Relaxed);
        Self { activity, stats }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.stats.requests.fetch_sub(1, Ordering::Relaxed);
        self.activity.end();
    }
}

fn hold<G: Send + Unpin + 'static>(resp: Response<Body>, guard: G) -> Response<Body> {
    resp.map(|inner| {
        Body::new(Held {
            inner,
            guard: Some(guard),
        })
    })
}

/// A body that keeps `guard` until it ends or is dropped.
struct Held<G> {
    inner: Body,
    guard: Option<G>,
}

impl<G: Unpin> HttpBody for Held<G> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || (polled.is_ready() && self.inner.is_end_stream())
        {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting the first byte of each request for the header-read timeout.
struct Watched {
    inner: Stream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
