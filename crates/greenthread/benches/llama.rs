//! Wake time of a real engine (llama.cpp's `llama-server`, Gemma 3 270M on CPU), each path
//! next to its baseline, interleaved round by round in one run:
//!
//! - cold start: `llama-server` started directly, until it answers a one-token chat;
//! - llama.cpp's own sleep (`--sleep-idle-seconds`): the first one-token chat after it has
//!   put itself to sleep;
//! - GreenThread: a sleeping `greenthread sidecar --engine llamacpp` (engine stopped),
//!   until a one-token chat answers through it — process start, model load, the warm-up
//!   token that verifies the wake, then the request;
//! - a one-token chat through the sidecar to the awake engine (the request's own cost).
//!
//! Every path is timed to the answer of the same request on the same endpoint (a one-token
//! `/v1/chat/completions`). GreenThread's own overhead is, per round, the wake minus that
//! round's cold start minus its awake request, reported signed as median [min, max].
//!
//!     cargo bench -p greenthread --bench llama

use std::{
    path::Path,
    time::{Duration, Instant},
};

use greenthread_test_support::{
    Proc,
    bench::{ms, paired},
    free_port, http, llama,
};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const ROUNDS: usize = 7;

fn engine_args(model: &Path, port: u16) -> Vec<String> {
    [
        "-m",
        &model.display().to_string(),
        "--no-jinja",
        "--chat-template",
        "gemma",
        "-c",
        "512",
        "-np",
        "1",
        "-t",
        "2",
        "--cache-ram",
        "0",
        "--no-warmup",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--alias",
        "gemma",
        "--metrics",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The one request every path is timed with: a one-token chat completion, the same
/// endpoint and body whether it goes to llama-server directly or through the sidecar.
fn chat() -> serde_json::Value {
    json!({"model": "gemma", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "temperature": 0})
}

async fn one_token(client: &reqwest::Client, url: &str) -> bool {
    client
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat())
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn until_one_token(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !one_token(client, url).await {
        assert!(Instant::now() < deadline, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn chat_one_token(client: &reqwest::Client, url: &str) {
    let r = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

fn row(name: &str, samples: &[Duration]) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    println!(
        "| {name} | {} | {} | {} |",
        ms(sorted[sorted.len() / 2]),
        ms(sorted[0]),
        ms(*sorted.last().unwrap())
    );
}

#[tokio::main]
async fn main() {
    let (server, model) = (llama::server(), llama::gemma());
    let client = http();
    let server_s = server.display().to_string();

    // The sidecar, owning its llama-server; booted (started, measured, stopped).
    let (public, private, engine) = (free_port(), free_port(), free_port());
    let command = std::iter::once(server_s.clone())
        .chain(engine_args(&model, engine))
        .collect::<Vec<_>>()
        .join(" ");
    let sidecar_args: Vec<String> = [
        "sidecar",
        "--model",
        "gemma",
        "--engine",
        "llamacpp",
        "--listen",
        &format!("127.0.0.1:{public}"),
        "--metrics-listen",
        &format!("127.0.0.1:{private}"),
        "--engine-url",
        &format!("http://127.0.0.1:{engine}"),
        "--engine-command",
        &command,
        "--idle-timeout",
        "1h",
        "--min-runtime",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _sidecar = Proc::spawn(BIN, &sidecar_args);
    let sidecar = format!("http://127.0.0.1:{public}");
    greenthread_test_support::wait_http(&format!("{sidecar}/ready")).await;

    // llama.cpp sleeping by itself after 1 s idle.
    let own_port = free_port();
    let mut own_args = engine_args(&model, own_port);
    own_args.extend(["--sleep-idle-seconds".to_string(), "1".to_string()]);
    let _own = Proc::spawn(&server_s, &own_args);
    let own = format!("http://127.0.0.1:{own_port}");
    until_one_token(&client, &own).await;

    let (mut cold, mut own_wake, mut wake, mut awake) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        // Cold start, direct.
        let port = free_port();
        let start = Instant::now();
        let mut p = Proc::spawn(&server_s, &engine_args(&model, port));
        until_one_token(&client, &format!("http://127.0.0.1:{port}")).await;
        cold.push(start.elapsed());
        p.terminate(Duration::from_secs(5));

        // llama.cpp's own sleep: idle past its timer, then one token.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let start = Instant::now();
        assert!(one_token(&client, &own).await);
        own_wake.push(start.elapsed());

        // GreenThread: asleep (engine stopped), then one token through the sidecar.
        let r = client
            .post(format!("http://127.0.0.1:{private}/admin/sleep"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success() || r.status() == 409);
        let start = Instant::now();
        chat_one_token(&client, &sidecar).await;
        wake.push(start.elapsed());
        // The same request to the awake engine.
        let start = Instant::now();
        chat_one_token(&client, &sidecar).await;
        awake.push(start.elapsed());
    }

    // GreenThread's own share of each wake, from that round's own cold start and awake
    // request: signed, never clamped.
    let overheads: Vec<f64> = (0..ROUNDS)
        .map(|i| (wake[i].as_secs_f64() - cold[i].as_secs_f64() - awake[i].as_secs_f64()) * 1e3)
        .collect();
    println!(
        "llama.cpp llama-server, Gemma 3 270M Q4_K_M, CPU; {ROUNDS} interleaved rounds; every path timed to the first answer of the same one-token /v1/chat/completions\n"
    );
    println!("| path | p50 ms | min ms | max ms |");
    println!("|---|---|---|---|");
    row(
        "cold start, direct (spawn → one-token chat, polled every 5 ms)",
        &cold,
    );
    row(
        "llama.cpp's own sleep (--sleep-idle-seconds) → one-token chat",
        &own_wake,
    );
    row(
        "GreenThread wake (engine stopped → one-token chat through the sidecar)",
        &wake,
    );
    row("one-token chat through the sidecar, engine awake", &awake);
    println!(
        "\nGreenThread's own overhead on a wake, per round (wake − that round's cold start − its awake request): {} ms",
        paired(&overheads, |x| *x, |x| format!("{x:+.1}"))
    );
}
