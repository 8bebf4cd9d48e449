//! Streaming through the sidecar while it drains for sleep.

use std::time::Duration;

use futures_util::StreamExt;
use greenthread_test_support::{SidecarProc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// Reads an SSE response to its end; returns (content chunks, saw `[DONE]`).
async fn read_stream(resp: reqwest::Response) -> (usize, bool) {
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => body.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => break,
        }
    }
    let events: Vec<&str> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let content = events
        .iter()
        .filter(|e| **e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter(|v| v["choices"][0]["delta"]["content"].is_string())
        .count();
    (content, events.last() == Some(&"[DONE]"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_completes_before_sleep_and_later_requests_are_held() {
    // 30 tokens at 20 tokens/s: a 1.5 s stream.
    let sc = SidecarProc::start(
        BIN,
        "s",
        &["--drain-timeout", "30s"],
        &["--tokens-per-second", "20"],
    )
    .await;
    let resp = sc.chat("s", 30, true).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let reader = tokio::spawn(read_stream(resp));

    let admin = sc.client.post(format!("{}/admin/sleep", sc.private)).send();
    let sleeper = tokio::spawn(admin);
    sc.wait_state("deactivating", Duration::from_secs(5)).await;
    // Arrives during the drain: held, then served after the next wake.
    let held = tokio::spawn(sc.chat("s", 2, false).send());

    let (content, done) = reader.await.unwrap();
    assert_eq!(content, 30, "every token arrived");
    assert!(done, "stream ended with [DONE]");
    assert_eq!(sleeper.await.unwrap().unwrap().status(), 200);

    let held = held.await.unwrap().unwrap();
    assert_eq!(
        held.status(),
        200,
        "held request served after the next wake"
    );
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_preemption_barrier_timeouts_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        m.value("gthread_sidecar_sleep_duration_seconds_count", &[]),
        Some(1.0)
    );
    let engine = sc.engine_metrics().await;
    assert_eq!(
        engine.value("greenthread_sim_wake_calls_total", &[]),
        Some(4.0),
        "two wakes, each the weights then the KV cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_shorter_than_the_stream_counts_it_and_the_engine_finishes_the_stream() {
    // 100 tokens at 20 tokens/s: 5 s, far past the 300 ms drain timeout.
    let sc = SidecarProc::start(
        BIN,
        "t",
        &["--drain-timeout", "300ms"],
        &["--tokens-per-second", "20"],
    )
    .await;
    let resp = sc.chat("t", 100, true).send().await.unwrap();
    let reader = tokio::spawn(read_stream(resp));
    wait_until(
        "the stream to be in flight",
        Duration::from_secs(5),
        || async {
            let m = sc.metrics().await;
            (m.value("gthread_sidecar_in_flight_requests", &[]) == Some(1.0)).then_some(())
        },
    )
    .await;
    let r = sc.admin("sleep").await;
    assert_eq!(r.status(), 200);
    assert_eq!(sc.state().await, "sleeping");
    assert!(sc.engine_sleeping().await);
    let m = sc.metrics().await;
    assert_eq!(
        m.value("gthread_sidecar_preemption_barrier_timeouts_total", &[]),
        Some(1.0)
    );
    let (content, done) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    // The sidecar stopped waiting at the drain timeout, but slept the engine with
    // mode=wait: the stream was finished, not cut.
    assert!(
        content == 100 && done,
        "the stream ended after {content} tokens (done: {done})"
    );
}
