//! The security review's findings, one test each (numbered as in the review): what a
//! client of the API, or someone inside the cluster, tried against `greenthread local` or
//! a standalone sidecar, and what they must get now.

use std::time::Duration;

use greenthread_test_support::{
    LocalProc, Proc, SidecarProc, TEST_CONFIG, free_port, get_json, http, wait_until,
};
use serde_json::{Value, json};

/// The binary under test: this build's, or `GT_BIN` (how these tests were run against
/// the revision before the fixes, with `GT_SIM_BIN` naming today's simulator).
static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("GT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_greenthread").to_string())
});
const WAIT: Duration = Duration::from_secs(20);

fn error_type(v: &Value) -> &str {
    v["error"]["type"].as_str().unwrap_or_default()
}

/// 1 + 11. An engine's control API is not reachable from the public port: not directly,
/// not by traversal, not through the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f01_engine_control_api_is_not_public() {
    let sc = SidecarProc::start(&BIN, "m", &["--idle-timeout", "1h"], &[]).await;
    assert_eq!(sc.chat("m", 2, false).send().await.unwrap().status(), 200);
    assert!(!sc.engine_sleeping().await);
    for path in [
        "/sleep?level=1",
        "/wake_up",
        "/collective_rpc",
        "/reset_prefix_cache",
        "/release_memory_occupation",
        "/v1/load_lora_adapter",
        "/metrics",
    ] {
        let r = sc
            .client
            .post(format!("{}{path}", sc.public))
            .json(&json!({"method": "reload_weights"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(error_type(&e), "not_found", "{path}");
    }
    for path in [
        "/v1/%2e%2e/sleep",
        "/v1/chat%2F..%2F..%2Fsleep",
        "/v1/../sleep",
    ] {
        // reqwest would normalize `..`: send the path as written.
        let raw = raw_request(
            &sc.public,
            &format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{path}: {raw}");
    }
    // Nothing reached the engine: it still serves, awake.
    assert!(
        !sc.engine_sleeping().await,
        "the engine was put to sleep behind the sidecar's back"
    );
    assert_eq!(sc.state().await, "serving");
    assert_eq!(sc.chat("m", 2, false).send().await.unwrap().status(), 200);

    // Through the API server: the same allowlist, by body and by path prefix.
    let local = LocalProc::start(&BIN, TEST_CONFIG).await;
    let r = local
        .client
        .post(format!("{}/v1/load_lora_adapter", local.url))
        .json(&json!({"model": "alpha", "lora_name": "x", "lora_path": "/etc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let raw = raw_request(
        &local.url,
        "POST /alpha/v1/%2F..%2F..%2Fsleep HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("invalid request path"), "{raw}");
    let r = local
        .client
        .post(format!("{}/alpha/v1/collective_rpc", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(local.chat("alpha", 2).send().await.unwrap().status(), 200);
}

/// Sends `request` as written on a new connection to `base`; the answer's text.
async fn raw_request(base: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// 2. Clients' credentials stop at the sidecar; the engine gets its own key instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f02_client_credentials_never_reach_the_engine() {
    let with_credentials = |sc: &SidecarProc| {
        sc.chat("m", 2, false)
            .bearer_auth("user-key")
            .header("cookie", "session=abc")
            .header("proxy-authorization", "Basic dXNlcjpwYXNz")
            .header("x-api-key", "user-key")
            .header("x-team-secret", "t0p")
            .header("x-request-id", "r-1")
    };
    let seen = |sc: &SidecarProc| {
        let url = format!("{}/debug/last_request_headers", sc.engine);
        let client = sc.client.clone();
        async move { get_json(&client, &url).await }
    };
    // An engine without a key of its own: it sees no credentials at all.
    let sc = SidecarProc::start(&BIN, "m", &["--idle-timeout", "1h"], &[]).await;
    let r = with_credentials(&sc).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let headers = seen(&sc).await;
    for h in [
        "authorization",
        "cookie",
        "proxy-authorization",
        "x-api-key",
    ] {
        assert!(
            headers.get(h).is_none(),
            "{h} reached the engine: {headers}"
        );
    }
    assert_eq!(headers["x-request-id"], "r-1", "other headers pass");

    // An engine with its own key (as vLLM with --api-key): the sidecar sends that key,
    // and headers configured as secret are stripped too.
    let sc = SidecarProc::start_env(
        &BIN,
        "m",
        &["--idle-timeout", "1h", "--strip-header", "x-team-secret"],
        &["--api-key", "engine-key"],
        &[("GREENTHREAD_ENGINE_API_KEY", "engine-key")],
    )
    .await;
    let r = with_credentials(&sc).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let headers = seen(&sc).await;
    assert_eq!(headers["authorization"], "Bearer engine-key");
    for h in ["cookie", "proxy-authorization", "x-team-secret"] {
        assert!(
            headers.get(h).is_none(),
            "{h} reached the engine: {headers}"
        );
    }
}

/// 3. API keys without an admin token refuse to start; an open server refuses a public
/// address; the sidecar's admin endpoints take a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f03_the_admin_api_is_never_open_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, config: String, listen: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let p = Proc::spawn_logged(
            &BIN,
            &[
                "local".into(),
                "--config".into(),
                path.display().to_string(),
                "--listen".into(),
                listen.into(),
            ],
            &[],
            &log,
        );
        (p, log)
    };
    let refused = |mut p: Proc, log: std::path::PathBuf| async move {
        let status = p
            .wait_exit(WAIT)
            .await
            .expect("the server should refuse to start");
        assert!(!status.success());
        std::fs::read_to_string(log).unwrap()
    };
    let (p, log) = run(
        "keys-only",
        format!("apiKeys: [k1]\n{TEST_CONFIG}"),
        "127.0.0.1:0",
    );
    let msg = refused(p, log).await;
    assert!(
        msg.contains("adminToken") && msg.contains("adminOpen: true"),
        "{msg}"
    );
    let public = format!("0.0.0.0:{}", free_port());
    let (p, log) = run("public", TEST_CONFIG.to_string(), &public);
    let msg = refused(p, log).await;
    assert!(msg.contains("--allow-unauthenticated"), "{msg}");

    // Declared open on purpose: keys guard /v1, the admin API is open.
    let local = LocalProc::start(
        &BIN,
        &format!("apiKeys: [k1]\nadminOpen: true\n{TEST_CONFIG}"),
    )
    .await;
    let get = |p: &str| local.client.get(format!("{}{p}", local.url)).send();
    assert_eq!(get("/api/v1/gpus").await.unwrap().status(), 200);
    assert_eq!(get("/v1/models").await.unwrap().status(), 401);

    // The sidecar's private port: admin needs the token, metrics stay scrapeable.
    let sc = SidecarProc::start_env(
        &BIN,
        "m",
        &["--idle-timeout", "1h"],
        &[],
        &[("GREENTHREAD_SIDECAR_ADMIN_TOKEN", "side-token")],
    )
    .await;
    let r = sc.admin("wake").await;
    assert_eq!(r.status(), 401);
    assert_eq!(sc.state().await, "sleeping");
    let r = sc
        .client
        .post(format!("{}/admin/wake", sc.private))
        .bearer_auth("side-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sc.state().await, "serving");
    let r = sc
        .client
        .get(format!("{}/metrics", sc.private))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Peak resident memory of `pid` since the last reset (bytes).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Resets `pid`'s peak resident memory to its current (Linux ≥ 4.0).
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// 4. A request at the size limit costs a small multiple of its size, wherever its
/// `model` field is; a larger one is refused before it is read; names are not echoed whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f04_one_request_cannot_exhaust_memory() {
    let local = LocalProc::start(&BIN, TEST_CONFIG).await;
    let pid = local.proc.pid();
    // 31 MiB of tiny JSON values: a JSON tree of it would take over 500 MB.
    let pad_values = (31 << 20) / 2;
    let mut body = String::with_capacity(32 << 20);
    body.push_str(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"pad":["#);
    for _ in 0..pad_values - 1 {
        body.push_str("0,");
    }
    body.push_str(r#"0],"model":"alpha"}"#);
    let size = body.len() as u64;
    assert!(
        local
            .chat("alpha", 1)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let before = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_before: u64 = before
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    assert!(
        reset_peak_rss(pid),
        "clear_refs is needed to measure the peak"
    );
    let r = local
        .client
        .post(format!("{}/v1/chat/completions", local.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let answer = r.text().await.unwrap();
    let peak = peak_rss(pid);
    let growth = peak.saturating_sub(rss_before);
    println!(
        "one {:.1} MiB request: resident {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB, {:.2}× the body)",
        size as f64 / 1048576.0,
        rss_before as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        growth as f64 / size as f64
    );
    assert!(
        growth < 4 * size,
        "peak grew {growth} bytes for a {size}-byte body"
    );
    assert_eq!(status, 200, "{answer}");

    // Over the limit: 413 from the declared length, before a byte of it is read.
    let raw = raw_request(
        &local.url,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            33 << 20
        ),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    // A 10 MiB model name is not reflected back.
    let name = "x".repeat(10 << 20);
    let r = local
        .client
        .post(format!("{}/v1/chat/completions", local.url))
        .json(&json!({"model": name, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(text.len() < 2048, "{} bytes echoed", text.len());
    // A body whose `model` is not a string, or is given twice, is refused clearly.
    for (body, says) in [
        (r#"{"model": 7}"#, "must be a string"),
        (r#"{"model":"alpha","model":"beta"}"#, "duplicate field"),
        (r#"{"messages": []}"#, "no `model` field"),
        (r#"{"model": "alpha""#, "not valid JSON"),
    ] {
        let r = local
            .client
            .post(format!("{}/v1/chat/completions", local.url))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {e}"
        );
    }
}

/// 5. A hung engine does not pin a slot forever: 504 naming the model after the
/// response timeout, the slot freed, and repeated timeouts restart the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05_a_hung_engine_times_out_and_is_restarted() {
    let sc = SidecarProc::start(
        &BIN,
        "m",
        &[
            "--idle-timeout",
            "1h",
            "--engine-response-timeout",
            "300ms",
            "--engine-timeouts-before-restart",
            "2",
        ],
        // The wake's warm-up (request 1) answers; every request after it hangs.
        &["--hang-after-requests", "1"],
    )
    .await;
    for _ in 0..2 {
        let r = sc.chat("m", 2, false).send().await.unwrap();
        assert_eq!(r.status(), 504);
        let e: Value = r.json().await.unwrap();
        assert_eq!(error_type(&e), "timeout");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("model m"),
            "{e}"
        );
        assert_eq!(
            sc.status().await["queue"]["inFlight"],
            0,
            "the slot is freed"
        );
    }
    // Counted as lost: the next request cold-restarts it (and, wedged again, times out).
    wait_until("the wedged engine given up on", WAIT, || async {
        (sc.state().await != "serving").then_some(())
    })
    .await;
    let r = sc.chat("m", 2, false).send().await.unwrap();
    assert_eq!(r.status(), 504);
    let m = sc.metrics().await;
    assert!(
        m.value("gthread_sidecar_engine_restarts_total", &[])
            .unwrap()
            >= 1.0,
        "the engine was restarted"
    );
}

/// 6. SIGTERM ends `local` while a client watches the event stream, and within its
/// shutdown deadline even while another holds a half-sent request open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f06_shutdown_does_not_wait_for_clients_that_never_leave() {
    use tokio::io::AsyncWriteExt;
    let watched = |local: &LocalProc| {
        let (client, url) = (local.client.clone(), format!("{}/api/v1/events", local.url));
        async move {
            let events = client.get(url).send().await.unwrap();
            assert_eq!(events.status(), 200);
            events
        }
    };
    // An event stream alone: it ends at once, and so does `local`.
    let mut local = LocalProc::start(&BIN, TEST_CONFIG).await;
    let events = watched(&local).await;
    let start = std::time::Instant::now();
    let exited = tokio::task::spawn_blocking(move || local.proc.terminate(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(exited, "local did not exit on SIGTERM within 15 s");
    println!(
        "with an event stream open: exited {:?} after SIGTERM",
        start.elapsed()
    );
    // The stream was ended by the server, not cut.
    assert!(events.text().await.is_ok());

    // A half-sent request too: cut at the deadline (2 s here).
    let mut local = LocalProc::start_with(&BIN, TEST_CONFIG, &["--shutdown-timeout", "2s"]).await;
    let _events = watched(&local).await;
    let mut half = tokio::net::TcpStream::connect(local.url.trim_start_matches("http://"))
        .await
        .unwrap();
    half.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let start = std::time::Instant::now();
    // The deadline plus stopping four engines.
    let exited = tokio::task::spawn_blocking(move || local.proc.terminate(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(exited, "local did not exit on SIGTERM within 15 s");
    println!(
        "with a half-sent request open: exited {:?} after SIGTERM",
        start.elapsed()
    );
}

/// 9. Engine output that is not UTF-8 does not stop the sidecar reading it (an engine
/// whose output pipe closed fails its next write, and every request with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f09_engine_output_cannot_wedge_the_engine() {
    let sc = SidecarProc::start(
        &BIN,
        "proc-m",
        &["--engine", "process", "--idle-timeout", "1h"],
        &["--print-invalid-utf8", "--print-requests"],
    )
    .await;
    for i in 0..5 {
        let r = sc.chat("proc-m", 2, false).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}: {}", r.text().await.unwrap());
    }
}

/// 11. Smaller ones: `/prometheus/targets` does not reflect `Host`; secrets are refused
/// as flags; the engine command line is logged with its secrets hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_no_reflection_no_secret_flags_no_secrets_in_logs() {
    let local = LocalProc::start(&BIN, TEST_CONFIG).await;
    let r = local
        .client
        .get(format!("{}/prometheus/targets", local.url))
        .header("host", "evil.example:666")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(!text.contains("evil.example"), "{text}");
    assert!(
        text.contains(local.url.trim_start_matches("http://")),
        "{text}"
    );

    let out = std::process::Command::new(&*BIN)
        .args(["apiserver", "--api-keys", "k1", "--admin-token", "t"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unexpected argument '--api-keys'"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sidecar.log");
    let (public, private, engine) = (free_port(), free_port(), free_port());
    let command = format!(
        "{} sim-engine --listen 127.0.0.1:{engine} --model m --boot-time 0s --api-key sk-do-not-log",
        greenthread_test_support::sim_bin(&BIN)
    );
    let _sc = Proc::spawn_logged(
        &BIN,
        &[
            "sidecar".into(),
            "--model".into(),
            "m".into(),
            "--listen".into(),
            format!("127.0.0.1:{public}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{private}"),
            "--engine-url".into(),
            format!("http://127.0.0.1:{engine}"),
            "--engine-command".into(),
            command,
        ],
        &[
            ("RUST_LOG", "info"),
            ("GREENTHREAD_ENGINE_API_KEY", "sk-do-not-log"),
        ],
        &log,
    );
    greenthread_test_support::wait_http(&format!("http://127.0.0.1:{public}/health")).await;
    let text = wait_until("the engine start to be logged", WAIT, || async {
        let t = std::fs::read_to_string(&log).ok()?;
        t.contains("engine process started").then_some(t)
    })
    .await;
    assert!(text.contains("--api-key ***"), "{text}");
    assert!(!text.contains("sk-do-not-log"), "{text}");
    let client = http();
    let r = client
        .post(format!("http://127.0.0.1:{public}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the sidecar sends the engine its key");
}

/// 11. Event-stream subscribers are capped: one client cannot hold the server's memory
/// with thousands of streams; a stream that ends gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_event_subscribers_are_capped() {
    let local = LocalProc::start(&BIN, TEST_CONFIG).await;
    let url = format!("{}/api/v1/events", local.url);
    let mut streams = Vec::new();
    for _ in 0..256 {
        let r = local.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let r = local.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert!(error_type(&e) == "service_unavailable", "{e}");
    drop(streams.pop());
    wait_until("a place freed by a stream that ended", WAIT, || async {
        let r = local.client.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}
