//! `greenthread local` under normal traffic mixed with clients that misbehave: slow
//! headers, slow bodies, abandoned streams, oversize bodies, idle connections. Normal
//! requests keep succeeding, memory stays bounded, and nothing leaks after (connections,
//! file descriptors, in-flight slots). Prints the figures. `GT_LOAD_SECONDS` sets the
//! length (10 s by default).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use greenthread_test_support::{LocalProc, TEST_CONFIG, wait_until};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Misbehaving connections the server closed (or answered and closed).
    cut: AtomicU64,
    /// Misbehaving connections still open when the run ended.
    survived: AtomicU64,
}

/// Reads until the server closes or `until`; true when it closed.
async fn closed_by_server(s: &mut TcpStream, until: Instant) -> (bool, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (false, String::from_utf8_lossy(&got).into_owned()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_do_not_hurt_normal_ones_and_leave_nothing_behind() {
    let seconds: u64 = std::env::var("GT_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let local = LocalProc::start_with(
        BIN,
        TEST_CONFIG,
        &[
            "--header-read-timeout",
            "1s",
            "--body-read-timeout",
            "2s",
            "--keep-alive-timeout",
            "2s",
            "--max-body",
            "1Mi",
        ],
    )
    .await;
    let pid = local.proc.pid();
    let addr = local.url.trim_start_matches("http://").to_string();
    // Warm: both models of gpu 0 serving, pools filled.
    for m in ["alpha", "delta"] {
        assert_eq!(local.chat(m, 2).send().await.unwrap().status(), 200);
    }
    let (fds_before, rss_before) = (fds(pid), proc_status(pid, "VmRSS:"));
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();

    let normal = Arc::new(Tally::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Well-configured clients drop idle connections before the server's keep-alive
    // timeout (2 s here), so that none is reused just as the server closes it.
    let normal_client = reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for i in 0..4 {
        let (client, url, normal, latencies, failures) = (
            normal_client.clone(),
            local.url.clone(),
            normal.clone(),
            latencies.clone(),
            failures.clone(),
        );
        tasks.spawn(async move {
            let model = if i % 2 == 0 { "alpha" } else { "delta" };
            while Instant::now() < end {
                let start = Instant::now();
                let r = client
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
                    .send()
                    .await;
                let outcome = match r {
                    Ok(r) if r.status() == 200 => r.bytes().await.map(drop).map_err(|e| format!("body: {e:?}")),
                    Ok(r) => Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => Err(format!("{e:?}")),
                };
                match outcome {
                    Ok(()) => {
                        normal.ok.fetch_add(1, Ordering::Relaxed);
                        latencies.lock().unwrap().push(start.elapsed().as_secs_f64() * 1000.0);
                    }
                    Err(e) => {
                        normal.failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(e);
                    }
                }
            }
        });
    }

    // Slow headers: a byte every 300 ms, forever.
    let slow_headers = Arc::new(Tally::default());
    for _ in 0..40 {
        let (addr, t) = (addr.clone(), slow_headers.clone());
        tasks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let _ = s
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await;
            let (mut r, mut w) = s.into_split();
            let trickle = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if w.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            };
            let mut buf = [0u8; 64];
            let closed = tokio::select! {
                () = trickle => true,
                r = r.read(&mut buf) => matches!(r, Ok(0) | Err(_)),
                () = tokio::time::sleep_until(end) => false,
            };
            if closed { &t.cut } else { &t.survived }.fetch_add(1, Ordering::Relaxed);
        });
    }
    // Slow bodies: 10 of 1000 declared bytes every 500 ms.
    let slow_bodies = Arc::new(Tally::default());
    for _ in 0..20 {
        let (addr, t) = (addr.clone(), slow_bodies.clone());
        tasks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let _ = s
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":\"alpha\",")
                .await;
            let (mut r, mut w) = s.into_split();
            tokio::spawn(async move {
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if w.write_all(b"          ").await.is_err() {
                        return;
                    }
                }
            });
            let mut got = Vec::new();
            let closed = tokio::time::timeout_at(end + Duration::from_secs(3), r.read_to_end(&mut got)).await.is_ok();
            let answer = String::from_utf8_lossy(&got);
            if closed && answer.starts_with("HTTP/1.1 408") { &t.cut } else { &t.survived }.fetch_add(1, Ordering::Relaxed);
        });
    }
    // Abandoned streams: read the first event, then go away.
    let abandoned = Arc::new(Tally::default());
    for _ in 0..20 {
        let (client, url, t) = (local.client.clone(), local.url.clone(), abandoned.clone());
        tasks.spawn(async move {
            while Instant::now() < end {
                let r = client
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&serde_json::json!({"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": true}))
                    .send()
                    .await;
                if let Ok(mut r) = r {
                    let _ = r.chunk().await;
                    t.cut.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Oversize bodies: declared (refused before reading) and chunked (cut when past it).
    let oversize = Arc::new(Tally::default());
    for i in 0..10 {
        let (addr, client, url, t) = (
            addr.clone(),
            local.client.clone(),
            local.url.clone(),
            oversize.clone(),
        );
        tasks.spawn(async move {
            let status = if i % 2 == 0 {
                let mut s = TcpStream::connect(&addr).await.unwrap();
                let _ = s
                    .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
                    .await;
                let (_, answer) = closed_by_server(&mut s, end).await;
                answer.split(' ').nth(1).unwrap_or_default().to_string()
            } else {
                let chunks = futures_util::stream::iter(
                    (0..32).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 << 10])),
                );
                match client
                    .post(format!("{url}/v1/chat/completions"))
                    .body(reqwest::Body::wrap_stream(chunks))
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_str().to_string(),
                    // The server answered 413 and closed while the client was still
                    // sending: the client may see the close before the answer.
                    Err(e) if e.is_request() || e.is_body() => "413".into(),
                    Err(e) => format!("{e:?}"),
                }
            };
            if status == "413" { &t.cut } else { &t.survived }.fetch_add(1, Ordering::Relaxed);
        });
    }
    // Idle connections: opened, never used.
    let idle = Arc::new(Tally::default());
    for _ in 0..200 {
        let (addr, t) = (addr.clone(), idle.clone());
        tasks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let (closed, _) = closed_by_server(&mut s, end).await;
            if closed { &t.cut } else { &t.survived }.fetch_add(1, Ordering::Relaxed);
        });
    }

    let mut rss_peak = 0;
    let sample = async {
        while Instant::now() < end {
            rss_peak = rss_peak.max(proc_status(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    sample.await;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }

    // Nothing left behind: no request in flight at any sidecar, descriptors back.
    wait_until(
        "every in-flight slot released",
        Duration::from_secs(20),
        || async {
            let v = local.get_json("/api/v1/models").await;
            v["items"]
                .as_array()?
                .iter()
                .flat_map(|m| m["pods"].as_array().unwrap().iter())
                .all(|p| p["queue"]["inFlight"] == 0 && p["queue"]["depth"] == 0)
                .then_some(())
        },
    )
    .await;
    let fds_after = wait_until(
        "descriptors back to where they were",
        Duration::from_secs(20),
        || async {
            let n = fds(pid);
            (n <= fds_before + 4).then_some(n)
        },
    )
    .await;
    let rss_after = proc_status(pid, "VmRSS:");

    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    let pct = |q: f64| l[((l.len() - 1) as f64 * q) as usize];
    println!("\n{seconds} s of `greenthread local` under mixed traffic:\n");
    println!("| clients | count | outcome |\n|---|---|---|");
    println!(
        "| normal chat (4 loops) | {} requests | {} ok, {} failed; p50 {:.1} ms, p99 {:.1} ms |",
        normal.ok.load(Ordering::Relaxed) + normal.failed.load(Ordering::Relaxed),
        normal.ok.load(Ordering::Relaxed),
        normal.failed.load(Ordering::Relaxed),
        pct(0.5),
        pct(0.99)
    );
    for (name, n, t, what) in [
        (
            "slow headers (1 B / 300 ms)",
            40,
            &slow_headers,
            "closed by the server",
        ),
        (
            "slow bodies (10 B / 500 ms)",
            20,
            &slow_bodies,
            "answered 408",
        ),
        (
            "abandoned streams",
            0,
            &abandoned,
            "streams dropped after the first event",
        ),
        (
            "oversize bodies (64 MiB declared, 2 MiB chunked)",
            10,
            &oversize,
            "refused (413, or cut while still sending)",
        ),
        ("idle connections", 200, &idle, "closed by the server"),
    ] {
        let total = if n == 0 {
            t.cut.load(Ordering::Relaxed)
        } else {
            n
        };
        println!(
            "| {name} | {total} | {} {what}, {} not |",
            t.cut.load(Ordering::Relaxed),
            t.survived.load(Ordering::Relaxed)
        );
    }
    println!(
        "\nlocal's resident memory: {:.1} MiB before, {:.1} MiB peak, {:.1} MiB after; file descriptors: {fds_before} before, {fds_after} after\n",
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );

    assert!(
        normal.ok.load(Ordering::Relaxed) > 20,
        "normal traffic made progress"
    );
    assert_eq!(
        normal.failed.load(Ordering::Relaxed),
        0,
        "every normal request succeeded: {:?}",
        failures.lock().unwrap()
    );
    assert_eq!(slow_headers.cut.load(Ordering::Relaxed), 40);
    assert_eq!(slow_bodies.cut.load(Ordering::Relaxed), 20);
    assert!(abandoned.cut.load(Ordering::Relaxed) > 0);
    assert_eq!(oversize.cut.load(Ordering::Relaxed), 10);
    assert_eq!(idle.cut.load(Ordering::Relaxed), 200);
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "memory grew by {} KiB under load",
        rss_peak - rss_before
    );
}
