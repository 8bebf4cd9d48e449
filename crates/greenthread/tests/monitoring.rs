//! The monitoring assets the chart ships: alert rules checked and unit-tested with
//! promtool (the rejection alerts on the series real sidecars export, as Prometheus
//! stores them), and every dashboard query run against a real Prometheus scraping
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

/// The chart's relabelings of the sidecars' PodMonitor (the first one in the template),
/// as `(source label, target label)` pairs.
fn sidecar_monitor_relabelings() -> Vec<(String, String)> {
    let template = std::fs::read_to_string(chart().join("templates/monitoring.yaml")).unwrap();
    let first = template.split("\n---").next().unwrap();
    let mut pairs = Vec::new();
    let mut source = None;
    for line in first.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix("- sourceLabels: [") {
            source = Some(s.trim_end_matches(']').to_string());
        } else if let Some(t) = line.strip_prefix("targetLabel: ")
            && let Some(s) = source.take()
        {
            pairs.push((s, t.to_string()));
        }
    }
    assert!(
        !pairs.is_empty(),
        "no relabelings found in the sidecars' PodMonitor"
    );
    pairs
}

/// The two alerts on `gthread_sidecar_rejections_total` run on the series the real
/// binary exports, as Prometheus stores them: two `greenthread sidecar`s (the Kubernetes
/// shape) refuse for real, one because its engine never wakes (`failed`), one because
/// its wake outlasts the queue's deadline (`deadline`); a real Prometheus scrapes them
/// with the labels the Prometheus Operator gives a PodMonitor's targets and the chart's
/// own relabelings; `promtool test rules` then runs the alerts on exactly those label
/// sets. Only the counters' growth over the half hour is written by the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rejection_alerts_fire_on_the_series_the_real_sidecar_exports() {
    use greenthread_test_support::SidecarProc;
    let broken = SidecarProc::start(
        BIN,
        "broken",
        &["--wake-attempts", "1", "--max-restarts", "0"],
        &["--fail-wakes", "100"],
    )
    .await;
    let busy = SidecarProc::start(
        BIN,
        "busy",
        &["--queue-timeout", "400ms"],
        &["--h2d-bandwidth", "256Mi"],
    )
    .await;
    let sidecars = [(&broken, "broken"), (&busy, "busy")];
    for (sc, model) in sidecars {
        assert_eq!(sc.chat(model, 2, false).send().await.unwrap().status(), 503);
    }

    // What the Prometheus Operator makes of a PodMonitor target (namespace, pod,
    // container, endpoint from the pod's metadata), then the chart's relabelings.
    let mut relabel = String::new();
    for (source, target) in [
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_pod_name", "pod"),
        ("__meta_kubernetes_pod_container_name", "container"),
        ("__meta_kubernetes_pod_container_port_name", "endpoint"),
    ]
    .iter()
    .map(|(s, t)| (s.to_string(), t.to_string()))
    .chain(sidecar_monitor_relabelings())
    {
        relabel.push_str(&format!(
            "      - {{source_labels: [{source}], target_label: {target}}}\n"
        ));
    }
    let mut targets = String::new();
    for (sc, model) in sidecars {
        let address = sc.private.trim_start_matches("http://");
        targets.push_str(&format!(
            "      - targets: ['{address}']\n        labels: {{__meta_kubernetes_namespace: team-a, __meta_kubernetes_pod_name: {model}-7d9f-0, __meta_kubernetes_pod_container_name: sidecar, __meta_kubernetes_pod_container_port_name: metrics, __meta_kubernetes_pod_label_greenthread_ai_model: {model}}}\n"
        ));
    }
    let prom = Prometheus::start(&format!(
        "  - job_name: greenthread-system/greenthread-sidecars\n    static_configs:\n{targets}    relabel_configs:\n{relabel}"
    ))
    .await;
    prom.wait_up(2).await;
    let stored = greenthread_test_support::wait_until(
        "both refusals scraped",
        Duration::from_secs(30),
        || async {
            let s = prom.query("gthread_sidecar_rejections_total").await;
            let refused = s.iter().filter(|(_, v)| *v > 0.0).count();
            (refused == 2).then_some(s)
        },
    )
    .await;

    // The input series: every stored label set, as it is; the ones that refused grow.
    let label_set = |m: &serde_json::Map<String, Value>| {
        let mut pairs: Vec<String> = m
            .iter()
            .filter(|(k, _)| *k != "__name__")
            .map(|(k, v)| format!("{k}={:?}", v.as_str().unwrap()))
            .collect();
        pairs.sort();
        format!("gthread_sidecar_rejections_total{{{}}}", pairs.join(","))
    };
    // Two half hours of the same series: refusals that keep coming, and one refusal each.
    let input = |keep_coming: bool| {
        let mut input = String::new();
        for (labels, value) in &stored {
            let growth = match (labels.get("reason").and_then(Value::as_str), *value > 0.0) {
                (_, true) if !keep_coming => "0 1 1x28",
                // One more engine that does not wake each minute; six timeouts a minute.
                (Some("failed"), true) => "0+1x30",
                (Some("deadline"), true) => "0+6x30",
                _ => "0x30",
            };
            input.push_str(&format!(
                "      - series: '{}'\n        values: '{growth}'\n",
                label_set(labels)
            ));
        }
        input
    };
    let rules = chart().join("alerts/greenthread.rules.yaml");
    let test = format!(
        r#"rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - name: refusals that keep coming fire, on the real sidecar's series
    interval: 1m
    input_series:
{coming}    alert_rule_test:
      - eval_time: 20m
        alertname: GreenThreadModelFailing
        exp_alerts:
          - exp_labels: {{severity: critical, model: broken}}
            exp_annotations:
              summary: "Model broken cannot be brought up"
              description: "Requests to broken have been failing for 5 minutes because its engine does not wake, even after cold restarts."
      - eval_time: 20m
        alertname: GreenThreadQueueTimeouts
        exp_alerts:
          - exp_labels: {{severity: warning, model: busy}}
            exp_annotations:
              summary: "Requests to busy keep timing out in the queue"
              description: "busy has not served queued requests within their deadline for 10 minutes (100m/s)."
  - name: a single refusal each stays quiet, on the same series
    interval: 1m
    input_series:
{once}    alert_rule_test:
      - eval_time: 20m
        alertname: GreenThreadModelFailing
        exp_alerts: []
      - eval_time: 20m
        alertname: GreenThreadQueueTimeouts
        exp_alerts: []
"#,
        rules = rules.display(),
        coming = input(true),
        once = input(false),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("real-series.test.yaml");
    std::fs::write(&file, &test).unwrap();
    run_ok(
        Command::new("promtool").args(["test", "rules", file.to_str().unwrap()]),
        "Debian's prometheus package",
    );
    // The label sets are the real ones: the model comes from the chart's relabeling, the
    // reason from the sidecar.
    assert!(
        test.contains(r#"model="broken""#) && test.contains(r#"reason="failed""#),
        "{test}"
    );
}
