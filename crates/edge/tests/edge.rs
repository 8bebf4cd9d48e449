//! The edge against real sockets: each limit bites a misbehaving client and leaves a
//! well-behaved one alone.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::Request,
    response::IntoResponse,
    routing::{get, post},
};
use greenthread_edge::{
    EdgeConfig, EdgeStats, Shutdown, end_on_shutdown, read_body, serve_with_stats,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
    time::timeout,
};

const DEADLINE: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    stats: Arc<EdgeStats>,
    shutdown: Shutdown,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    release: Arc<Notify>,
}

fn limits() -> EdgeConfig {
    EdgeConfig {
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        keep_alive_timeout: Duration::from_millis(500),
        max_connections: 8,
        max_concurrency: 2,
        max_body: 1024,
        shutdown_timeout: Duration::from_millis(800),
    }
}

async fn start(cfg: EdgeConfig) -> Server {
    let shutdown = Shutdown::new();
    let release = Arc::new(Notify::new());
    let app = {
        let (release, sd) = (release.clone(), shutdown.clone());
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/echo",
                post(|req: Request| async move {
                    match read_body(req.into_body(), usize::MAX).await {
                        Ok(b) => format!("{} bytes", b.len()).into_response(),
                        Err(e) => e.into_response(),
                    }
                }),
            )
            .route(
                "/hold",
                get(move || {
                    let release = release.clone();
                    async move {
                        release.notified().await;
                        "released"
                    }
                }),
            )
            .route(
                "/events",
                get(move || {
                    let s = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
                    let body = Body::from_stream(end_on_shutdown(s, &sd));
                    async move { body }
                }),
            )
            .route(
                "/forever",
                get(|| async {
                    Body::from_stream(futures_util::stream::pending::<
                        Result<bytes::Bytes, std::io::Error>,
                    >())
                }),
            )
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(EdgeStats::default());
    let done = tokio::spawn({
        let (stats, shutdown) = (stats.clone(), shutdown.clone());
        async move { serve_with_stats(listener, app, cfg, shutdown, stats).await }
    });
    Server {
        addr,
        stats,
        shutdown,
        done,
        release,
    }
}

/// Reads until the peer closes; what was read.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the server should close the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn stalled_headers_and_silent_connections_are_closed() {
    let srv = start(limits()).await;
    let mut silent = TcpStream::connect(srv.addr).await.unwrap();
    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    assert_eq!(read_to_close(&mut slow).await, "");
    assert!(srv.stats.connections_timed_out.load(Ordering::Relaxed) >= 2);
    // A well-behaved client is still served.
    let body = reqwest::get(format!("http://{}/", srv.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "ok");
}

#[tokio::test]
async fn trickled_headers_do_not_extend_the_deadline() {
    let srv = start(limits()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let trickle = async {
        for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = timeout(DEADLINE, trickle).await;
    // 66 bytes at one per 50 ms would take 3.3 s; the header deadline is 300 ms.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(read_to_close(&mut s).await, "");
}

#[tokio::test]
async fn idle_keep_alive_connections_close_but_busy_ones_stay() {
    let srv = start(limits()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        read_to_close(&mut s).await,
        "",
        "idle past keep-alive: closed"
    );

    // A request that takes longer than every timeout is not cut.
    let mut busy = TcpStream::connect(srv.addr).await.unwrap();
    busy.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let waited = timeout(Duration::from_secs(1), busy.read(&mut buf)).await;
    assert!(waited.is_err(), "nothing to read while the handler holds");
    srv.release.notify_one();
    let n = timeout(DEADLINE, busy.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("released"),
        "{text}"
    );
}

#[tokio::test]
async fn slow_and_oversize_bodies_get_clear_errors() {
    let srv = start(limits()).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/echo", srv.addr);
    // Declared too large: refused before reading.
    let r = client
        .post(&url)
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1024 bytes")
    );
    // Chunked, with no length: cut off once past the limit.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 512]))),
    );
    let r = client
        .post(&url)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Within the limit: fine.
    let r = client
        .post(&url)
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "1000 bytes");
    // A body that stalls: 408 once its deadline passes.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer = read_to_close(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("request body not received within"),
        "{answer}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_the_rest_served() {
    let srv = start(EdgeConfig {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(30),
        ..limits()
    })
    .await;
    let _a = TcpStream::connect(srv.addr).await.unwrap();
    let _b = TcpStream::connect(srv.addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while srv.stats.connections.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(read_to_close(&mut c).await, "");
    assert_eq!(srv.stats.connections_refused.load(Ordering::Relaxed), 1);
    drop(_a);
    // Once one leaves, a new client gets in (after the server notices the close).
    let url = format!("http://{}/", srv.addr);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = reqwest::get(&url).await {
            assert_eq!(r.text().await.unwrap(), "ok");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never admitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_past_the_concurrency_cap_get_503_with_retry_after() {
    let srv = start(limits()).await;
    let url = |p: &str| format!("http://{}{p}", srv.addr);
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(reqwest::get(url("/hold"))))
        .collect();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while srv.stats.requests.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = reqwest::get(url("/")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(srv.stats.requests_refused.load(Ordering::Relaxed), 1);
    srv.release.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().text().await.unwrap(), "released");
    }
    assert_eq!(reqwest::get(url("/")).await.unwrap().status(), 200);
}

#[tokio::test]
async fn shutdown_finishes_requests_ends_streams_and_cuts_the_rest_at_the_deadline() {
    let srv = start(EdgeConfig {
        shutdown_timeout: Duration::from_secs(5),
        ..limits()
    })
    .await;
    let url = |p: &str| format!("http://{}{p}", srv.addr);
    let events = reqwest::get(url("/events")).await.unwrap();
    let held = tokio::spawn(reqwest::get(url("/hold")));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while srv.stats.requests.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    srv.shutdown.trigger();
    // The event stream ends by itself.
    assert_eq!(timeout(DEADLINE, events.text()).await.unwrap().unwrap(), "");
    // New connections are refused once the listener is closed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while TcpStream::connect(srv.addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The request in progress finishes, then the server returns.
    srv.release.notify_one();
    assert_eq!(
        held.await.unwrap().unwrap().text().await.unwrap(),
        "released"
    );
    timeout(DEADLINE, srv.done).await.unwrap().unwrap().unwrap();

    // A response that never ends is cut at the deadline.
    let srv = start(limits()).await;
    let forever = reqwest::get(format!("http://{}/forever", srv.addr))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    srv.shutdown.trigger();
    timeout(DEADLINE, srv.done).await.unwrap().unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    assert!(
        timeout(DEADLINE, forever.text()).await.unwrap().is_err(),
        "cut, not ended"
    );
}
