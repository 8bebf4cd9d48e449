//! Sidecar overhead, measured on loopback in one run against two baselines: the engine
//! called directly, and nginx as a plain reverse proxy in front of the same engine.
//!
//!     cargo bench -p greenthread --bench sidecar            (about two minutes)
//!     BENCH_SECONDS=3 cargo bench -p greenthread --bench sidecar   (longer cells)
//!
//! nginx is the baseline and is required: Debian's `nginx-light` (or `nginx`) package.
//! Without it the benchmark stops and says how to install it, as the tests do for
//! Prometheus: a ratio against a missing baseline is no result.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use greenthread_test_support::{
    Proc,
    bench::{ROUNDS, Stats, body, interleaved, median_round, ms, paired, percentile, wait_http},
    free_port, http,
};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

struct Engine {
    name: &'static str,
    /// Flags for `sim-engine`.
    flags: &'static [&'static str],
    max_tokens: u32,
}

const INSTANT: Engine = Engine {
    name: "instant",
    flags: &["--ttft", "0s", "--tokens-per-second", "0"],
    max_tokens: 1,
};
const REALISTIC: Engine = Engine {
    name: "realistic",
    flags: &["--ttft", "20ms", "--tokens-per-second", "1000"],
    max_tokens: 50,
};

struct Stack {
    direct: String,
    sidecar: String,
    nginx: Option<String>,
}

fn spawn_engine(model: &str, port: u16, flags: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "sim-engine",
        "--model",
        model,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--boot-time",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(flags.iter().map(|s| s.to_string()));
    Proc::spawn(BIN, &args)
}

fn spawn_sidecar(model: &str, engine_port: u16, public: u16, private: u16) -> Proc {
    let args: Vec<String> = [
        "sidecar",
        "--model",
        model,
        "--engine-url",
        &format!("http://127.0.0.1:{engine_port}"),
        "--listen",
        &format!("127.0.0.1:{public}"),
        "--metrics-listen",
        &format!("127.0.0.1:{private}"),
        "--idle-timeout",
        "1h",
        "--memory-bytes",
        "3Gi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Proc::spawn(BIN, &args)
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// nginx with one server per upstream, keep-alive to the engine, no buffering (SSE).
fn spawn_nginx(bin: &Path, dir: &Path, routes: &[(u16, u16)]) -> Proc {
    let mut servers = String::new();
    for (i, (listen, upstream)) in routes.iter().enumerate() {
        servers.push_str(&format!(
            "upstream u{i} {{ server 127.0.0.1:{upstream}; keepalive 256; }}\n\
             server {{ listen 127.0.0.1:{listen}; location / {{ proxy_pass http://u{i}; proxy_http_version 1.1; \
             proxy_set_header Connection \"\"; proxy_buffering off; proxy_request_buffering off; }} }}\n"
        ));
    }
    let d = dir.display();
    let conf = format!(
        "daemon off; worker_processes 2; pid {d}/nginx.pid; error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n{servers}}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    Proc::spawn(
        bin.to_str().unwrap(),
        &[
            "-p".into(),
            d.to_string(),
            "-c".into(),
            dir.join("nginx.conf").display().to_string(),
        ],
    )
}

/// Time to the first streamed event, `n` sequential requests.
async fn ttft(base: &str, model: &str, n: usize) -> (Duration, Duration) {
    let client = http();
    let url = format!("{base}/v1/chat/completions");
    let mut lat = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .post(&url)
            .json(&body(model, 50, true))
            .send()
            .await
            .unwrap();
        let mut s = r.bytes_stream();
        let _first = s.next().await;
        lat.push(t.elapsed());
        while s.next().await.is_some() {}
    }
    lat.sort();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

async fn stack(
    model: &str,
    engine: &Engine,
    nginx: Option<(&Path, &Path)>,
    procs: &mut Vec<Proc>,
) -> Stack {
    let (ep, sp, sa) = (free_port(), free_port(), free_port());
    procs.push(spawn_engine(model, ep, engine.flags));
    wait_http(&format!("http://127.0.0.1:{ep}/health")).await;
    procs.push(spawn_sidecar(model, ep, sp, sa));
    wait_http(&format!("http://127.0.0.1:{sp}/ready")).await;
    let admin = format!("http://127.0.0.1:{sa}");
    // Awake for the throughput runs (the sidecar's boot leaves the engine asleep).
    http()
        .post(format!("{admin}/admin/wake"))
        .send()
        .await
        .unwrap();
    let nginx = nginx.map(|(bin, dir)| {
        let np = free_port();
        let dir = dir.join(model);
        for sub in ["", "body", "proxy", "fcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        procs.push(spawn_nginx(bin, &dir, &[(np, ep)]));
        format!("http://127.0.0.1:{np}")
    });
    if let Some(n) = &nginx {
        wait_http(&format!("{n}/health")).await;
    }
    Stack {
        direct: format!("http://127.0.0.1:{ep}"),
        sidecar: format!("http://127.0.0.1:{sp}"),
        nginx,
    }
}

/// First byte of a request to a sleeping model through the sidecar, against the engine's
/// own wake time measured directly, `n` rounds each.
/// Per round, the same engine woken through the sidecar and then directly, back to back:
/// medians of each and of the per-round difference, with its min and max.
async fn wake_overhead(n: usize) -> (Duration, Duration, (f64, f64, f64)) {
    let mut procs = Vec::new();
    // 1 GiB of weights at 8 GiB/s: a 125 ms engine wake.
    let flags = [
        "--ttft",
        "0s",
        "--tokens-per-second",
        "0",
        "--weights-bytes",
        "1Gi",
        "--h2d-bandwidth",
        "8Gi",
    ];
    let (ep, sp, sa) = (free_port(), free_port(), free_port());
    procs.push(spawn_engine("wake", ep, &flags));
    wait_http(&format!("http://127.0.0.1:{ep}/health")).await;
    let engine = format!("http://127.0.0.1:{ep}");
    let client = http();
    procs.push(spawn_sidecar("wake", ep, sp, sa));
    wait_http(&format!("http://127.0.0.1:{sp}/ready")).await;
    let chat = |base: String| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&body("wake", 1, false))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            let _ = r.bytes().await;
        }
    };
    let (mut direct, mut through, mut diffs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        // Asleep (the sidecar's boot, or the end of the last round): through the sidecar.
        let state: serde_json::Value = client
            .get(format!("http://127.0.0.1:{sp}/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if state["state"] != "sleeping" {
            client
                .post(format!("http://127.0.0.1:{sa}/admin/sleep"))
                .send()
                .await
                .unwrap();
        }
        let t = Instant::now();
        chat(format!("http://127.0.0.1:{sp}")).await;
        let s = t.elapsed();
        // Asleep again through the sidecar, then woken directly, then put back to sleep
        // directly: the sidecar, asleep all along, finds it asleep next round.
        client
            .post(format!("http://127.0.0.1:{sa}/admin/sleep"))
            .send()
            .await
            .unwrap();
        let t = Instant::now();
        let r = client
            .post(format!("{engine}/wake_up"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        chat(engine.clone()).await;
        let d = t.elapsed();
        client
            .post(format!("{engine}/sleep?level=1"))
            .send()
            .await
            .unwrap();
        through.push(s);
        direct.push(d);
        diffs.push((s.as_secs_f64() - d.as_secs_f64()) * 1e3);
    }
    direct.sort();
    through.sort();
    diffs.sort_by(f64::total_cmp);
    (
        percentile(&direct, 0.5),
        percentile(&through, 0.5),
        (diffs[diffs.len() / 2], diffs[0], diffs[diffs.len() - 1]),
    )
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let nginx_bin = Some(nginx_binary().unwrap_or_else(|| {
        panic!(
            "nginx is this benchmark's baseline and is not installed: \
             sudo apt-get install -y --no-install-recommends nginx-light"
        )
    }));
    let dir = tempfile::tempdir().unwrap();
    // nginx workers run as an unprivileged user: let them write their temp files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut procs = Vec::new();
    let nginx = nginx_bin.as_deref().map(|b| (b, dir.path()));
    let stacks = [
        (
            &INSTANT,
            stack("instant", &INSTANT, nginx, &mut procs).await,
        ),
        (
            &REALISTIC,
            stack("realistic", &REALISTIC, nginx, &mut procs).await,
        ),
    ];

    println!(
        "\n## Throughput and latency ({ROUNDS} rounds of {seconds:.1} s per path and cell; closed-loop clients on loopback)\n"
    );
    println!(
        "Each round runs direct, sidecar and nginx back to back. The absolute columns are one \
         round's (the round with the median sidecar/nginx ratio); the paired columns are the \
         median of the per-round values [min, max], never clamped.\n"
    );
    println!(
        "| engine | conc | direct rps | direct p50 ms | sidecar rps | sidecar p50 ms | sidecar p99 ms | nginx rps | nginx p50 ms | nginx p99 ms | sidecar p50 added ms | nginx p50 added ms | sidecar/direct rps | sidecar/nginx rps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (engine, s) in &stacks {
        for conc in [1, 16, 64] {
            let nginx = s.nginx.clone().expect("nginx is required");
            let targets = [s.direct.clone(), s.sidecar.clone(), nginx];
            let rounds = interleaved(&targets, engine.name, engine.max_tokens, conc, seconds).await;
            let p50 = |x: &Stats| x.p50.as_secs_f64() * 1e3;
            let ratio = |r: &[Stats; 3]| r[1].rps / r[2].rps;
            let [d, sc, ng] = median_round(&rounds, ratio);
            let errors: usize = rounds.iter().flatten().map(|m| m.errors).sum();
            let ms3 = |x: f64| format!("{x:+.3}");
            let pct = |x: f64| format!("{:.1} %", 100.0 * x);
            println!(
                "| {} | {conc} | {:.0} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |{}",
                engine.name,
                d.rps,
                ms(d.p50),
                sc.rps,
                ms(sc.p50),
                ms(sc.p99),
                ng.rps,
                ms(ng.p50),
                ms(ng.p99),
                paired(&rounds, |r| p50(&r[1]) - p50(&r[0]), ms3),
                paired(&rounds, |r| p50(&r[2]) - p50(&r[0]), ms3),
                paired(&rounds, |r| r[1].rps / r[0].rps, pct),
                paired(&rounds, ratio, pct),
                if errors > 0 {
                    format!(" {errors} errors")
                } else {
                    String::new()
                },
            );
        }
    }

    println!("\n## Streaming time to first token (realistic engine, 50 sequential requests)\n");
    println!("| path | p50 ms | p99 ms |");
    println!("|---|---|---|");
    let s = &stacks[1].1;
    let mut paths = vec![("direct", s.direct.clone()), ("sidecar", s.sidecar.clone())];
    if let Some(n) = &s.nginx {
        paths.push(("nginx", n.clone()));
    }
    for (name, base) in paths {
        let (p50, p99) = ttft(&base, "realistic", 50).await;
        println!("| {name} | {} | {} |", ms(p50), ms(p99));
    }

    println!(
        "\n## Wake path (20 rounds, each through the sidecar and then direct; medians, and the per-round difference's median [min, max])\n"
    );
    let (engine, through, (mid, lo, hi)) = wake_overhead(20).await;
    println!(
        "| engine wake + first answer, direct ms | first byte through the sidecar from sleeping ms | sidecar overhead ms |"
    );
    println!("|---|---|---|");
    println!(
        "| {} | {} | {mid:+.3} [{lo:+.3}, {hi:+.3}] |",
        ms(engine),
        ms(through)
    );
    drop(stacks);
    drop(procs);
}
