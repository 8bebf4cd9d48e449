//! The monitoring assets the chart ships: alert rules checked and unit-tested with
//! promtool, and every dashboard query run against a real Prometheus scraping
//! `greenthread local` (its own metrics, and each engine's through HTTP discovery).

use std::{path::PathBuf, process::Command, time::Duration};

use greenthread_test_support::{LocalProc, Prometheus, TEST_CONFIG, run_ok};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../charts/greenthread")
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = chart().join("alerts");
    for args in [
        ["check", "rules", "greenthread.rules.yaml"],
        ["test", "rules", "greenthread.rules.test.yaml"],
    ] {
        run_ok(
            Command::new("promtool").args(args).current_dir(&dir),
            "Debian's prometheus package",
        );
    }
}

struct Dashboard {
    file: String,
    title: String,
    /// (panel title, expression with variables filled in)
    queries: Vec<(String, String)>,
}

fn dashboards() -> Vec<Dashboard> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(chart().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let json: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut queries = Vec::new();
        for panel in json["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                // What Grafana substitutes: "All" is `.*`, the rate interval a duration.
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$model", ".*")
                    .replace("$node", ".*");
                queries.push((panel["title"].as_str().unwrap().to_string(), expr));
            }
        }
        out.push(Dashboard {
            file: path.file_name().unwrap().to_string_lossy().into_owned(),
            title: json["title"].as_str().unwrap().to_string(),
            queries,
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    out
}

#[test]
fn the_four_dashboards_of_the_seed_exist() {
    let titles: Vec<String> = dashboards().into_iter().map(|d| d.title).collect();
    assert_eq!(
        titles,
        [
            "GreenThread GPU Dashboard",
            "GreenThread Models Dashboard",
            "GreenThread System Dashboard",
            "GreenThread vLLM Dashboard"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_runs_against_prometheus_scraping_local() {
    let config = TEST_CONFIG.replace("idleTimeout: 1h", "idleTimeout: 2s");
    let local = LocalProc::start(BIN, &config).await;
    let target = local.url.trim_start_matches("http://");
    let prom = Prometheus::start(&format!(
        "  - job_name: greenthread\n    static_configs: [{{targets: ['{target}']}}]\n  - job_name: greenthread-vllm\n    http_sd_configs: [{{url: '{}/prometheus/targets', refresh_interval: 5s}}]\n",
        local.url
    ))
    .await;
    // The API server and the four engines.
    prom.wait_up(5).await;
    for _ in 0..2 {
        for model in ["alpha", "beta", "gamma", "delta"] {
            assert_eq!(local.chat(model, 4).send().await.unwrap().status(), 200);
        }
    }
    // A few scrapes after the traffic, and at least one idle sleep (2 s).
    greenthread_test_support::wait_until(
        "sleeps to be scraped",
        Duration::from_secs(30),
        || async {
            let r = prom
                .query("sum(gthread_sidecar_sleep_duration_seconds_count)")
                .await;
            (r.first().is_some_and(|(_, v)| *v >= 2.0)).then_some(())
        },
    )
    .await;

    // Every query parses and runs; every panel but the controller's (no controller runs
    // in local mode) has data once Prometheus holds two scrapes of the traffic.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut empty = Vec::new();
        for d in dashboards() {
            for (panel, expr) in &d.queries {
                let result = prom
                    .try_query(expr)
                    .await
                    .unwrap_or_else(|e| panic!("{} / {panel}: `{expr}` fails: {e}", d.file));
                if result.is_empty() && !expr.contains("gthread_controller_") {
                    empty.push(format!("{} / {panel}: {expr}", d.title));
                }
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "panels without data:\n{}",
            empty.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The vLLM panels carry the model label from discovery.
    let ttft = prom
        .query("sum by (model) (rate(vllm:time_to_first_token_seconds_count[1m]))")
        .await;
    let models: Vec<&str> = ttft
        .iter()
        .filter_map(|(m, _)| m.get("model").and_then(Value::as_str))
        .collect();
    assert_eq!(models.len(), 4, "{models:?}");
}
