//! `docs/kubernetes.md` says what the chart does: its commands are run through real Helm
//! (the same values, namespace and release name), and every name, value key, dashboard
//! and Model it mentions exists in what the chart renders.

use std::collections::BTreeSet;

use greenthread_api::Model;
use greenthread_test_support::chart::{find, helm, render, repo_root};
use kube::CustomResourceExt;
use serde_json::Value;

fn doc() -> String {
    std::fs::read_to_string(repo_root().join("docs/kubernetes.md")).unwrap()
}

/// Fenced blocks of `lang`, with shell line continuations joined.
fn blocks(doc: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l == format!("```{lang}") => current = Some(String::new()),
            (Some(_), "```") => out.push(current.take().unwrap().replace("\\\n", " ")),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    out
}

fn commands(doc: &str) -> Vec<Vec<String>> {
    blocks(doc, "sh")
        .iter()
        .flat_map(|b| b.lines().map(str::to_string).collect::<Vec<_>>())
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .collect()
}

fn flag_values(words: &[String], flag: &str) -> Vec<String> {
    words
        .windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

fn defaults() -> Value {
    serde_json::from_slice(&helm("values", &[]).stdout).unwrap()
}

fn has_key(values: &Value, dotted: &str) -> bool {
    let mut v = values;
    for part in dotted.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return false,
        }
    }
    true
}

/// The objects the documented install renders, and its namespace.
fn documented_install() -> (Vec<Value>, String, Vec<String>) {
    let doc = doc();
    let install = commands(&doc)
        .into_iter()
        .find(|w| w.starts_with(&["helm".into(), "install".into(), "greenthread".into()]))
        .expect("the docs install GreenThread with helm install greenthread");
    assert_eq!(install[3], "charts/greenthread", "the chart path");
    let namespace = flag_values(&install, "--namespace")
        .pop()
        .expect("--namespace");
    let sets = flag_values(&install, "--set");
    let mut args = vec!["--namespace".to_string(), namespace.clone()];
    for s in &sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (render(&args), namespace, sets)
}

#[test]
fn the_install_command_uses_the_charts_namespace_and_values() {
    let (objects, namespace, sets) = documented_install();
    assert_eq!(namespace, "greenthread-system");
    let values = defaults();
    for s in &sets {
        let key = s.split('=').next().unwrap();
        assert!(
            has_key(&values, key),
            "--set {key}: no such value in values.yaml"
        );
    }
    // The docs promise monitors and dashboards: the install they show must deploy them.
    assert!(objects.iter().any(|o| o["kind"] == "PodMonitor"));
    // Prometheus picks up monitors from every namespace, and Grafana the folder.
    let stack = commands(&doc())
        .into_iter()
        .find(|w| {
            w.starts_with(&[
                "helm".into(),
                "install".into(),
                "kube-prometheus-stack".into(),
            ])
        })
        .expect("the docs install kube-prometheus-stack");
    let stack_sets = flag_values(&stack, "--set");
    for needed in [
        "prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false",
        "prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues=false",
    ] {
        assert!(stack_sets.iter().any(|s| s == needed), "{needed} missing");
    }
    let annotation = values["monitoring"]["dashboards"]["folderAnnotation"]
        .as_str()
        .unwrap();
    assert!(
        stack_sets
            .iter()
            .any(|s| *s == format!("grafana.sidecar.dashboards.folderAnnotation={annotation}")),
        "Grafana must read the chart's folder annotation {annotation}"
    );
}

#[test]
fn every_object_the_docs_name_is_rendered() {
    let (objects, namespace, _) = documented_install();
    let controller = find(&objects, "Deployment", "greenthread-controller");
    for words in commands(&doc()) {
        if words.first().map(String::as_str) != Some("kubectl") {
            continue;
        }
        let ns = flag_values(&words, "-n").pop();
        if ns.as_deref() != Some(namespace.as_str()) {
            continue;
        }
        let verb = words.iter().position(|w| w == "get" || w == "port-forward");
        let Some(at) = verb else { continue };
        if words[at] == "port-forward" {
            let (what, ports) = (&words[at + 1], &words[at + 2]);
            let name = what.strip_prefix("svc/").expect("port-forward svc/NAME");
            let remote: u64 = ports.split(':').nth(1).unwrap().parse().unwrap();
            let svc = find(&objects, "Service", name);
            assert!(
                svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == remote),
                "Service {name} has no port {remote}"
            );
            continue;
        }
        let kind = match words[at + 1].as_str() {
            "deployment" => "Deployment",
            "daemonset" => "DaemonSet",
            "lease" => "Lease",
            "models" | "gpu" => continue,
            other => panic!("the docs get a {other}: teach this test about it"),
        };
        for name in &words[at + 2..] {
            if kind == "Lease" {
                // The controller creates its Lease at run time, named by this flag.
                let args = controller.to_string();
                assert!(
                    args.contains(&format!("--lease-name={name}")),
                    "Lease {name}"
                );
            } else {
                let o = find(&objects, kind, name);
                assert_eq!(o["metadata"]["namespace"], namespace.as_str());
            }
        }
    }
    // Every `greenthread-…` name in the text is a rendered object (or the namespace):
    // of the install, or of an upgrade the docs show (`helm upgrade … --reuse-values
    // --set …`: the install's values and these), whose values exist.
    let (_, _, install_sets) = documented_install();
    let mut upgraded = Vec::new();
    for words in commands(&doc()) {
        if !words.starts_with(&["helm".into(), "upgrade".into(), "greenthread".into()]) {
            continue;
        }
        let mut args = vec!["--namespace".to_string(), namespace.clone()];
        for set in install_sets.iter().chain(&flag_values(&words, "--set")) {
            let key = set.split('=').next().unwrap();
            assert!(
                has_key(&defaults(), key),
                "--set {key}: no such value in values.yaml"
            );
            args.extend(["--set".to_string(), set.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        upgraded.extend(render(&args));
    }
    let rendered: BTreeSet<&str> = objects
        .iter()
        .chain(&upgraded)
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    let doc = doc();
    for token in doc.split('`').skip(1).step_by(2) {
        if token.starts_with("greenthread-")
            && !token.contains(' ')
            && token != "greenthread-system"
        {
            assert!(
                rendered.contains(token),
                "the docs name `{token}`, which the chart does not render"
            );
        }
    }
    // CRD names are those the chart installs; value keys the docs mention exist.
    let crds =
        std::fs::read_to_string(repo_root().join("charts/greenthread/crds/greenthread.ai.yaml"))
            .unwrap();
    let values = defaults();
    for token in doc.split('`').skip(1).step_by(2) {
        if token.ends_with(".greenthread.ai") && !token.contains(' ') {
            assert!(crds.contains(&format!("name: {token}")), "CRD `{token}`");
            continue;
        }
        let key = token.trim_end_matches(".*");
        let top = key.split('.').next().unwrap();
        if key.contains('.')
            && [
                "models",
                "networkPolicy",
                "apiserver",
                "controller",
                "agent",
                "monitoring",
            ]
            .contains(&top)
            && !key.contains(' ')
        {
            assert!(
                has_key(&values, key),
                "the docs mention `{token}`, not in values.yaml"
            );
        }
    }
    // The dashboards by title.
    for title in ["GPU", "Models", "System", "vLLM"] {
        let title = format!("GreenThread {title} Dashboard");
        let flat = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(&title), "{title} not in the docs");
        let file = repo_root().join(format!(
            "charts/greenthread/dashboards/greenthread-{}.json",
            title.split(' ').nth(1).unwrap().to_lowercase()
        ));
        let json: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        assert_eq!(json["title"], title);
    }
    find(&objects, "PrometheusRule", "greenthread");
}

#[test]
fn the_documented_model_is_valid_and_lands_where_model_pods_may_run() {
    let (objects, _, _) = documented_install();
    let yaml = blocks(&doc(), "yaml")
        .into_iter()
        .find(|b| b.contains("\nkind: Model\n"))
        .expect("a Model in the docs");
    let model: Model = serde_saphyr::from_str(&yaml).unwrap();
    model.spec.validate("spec").unwrap();
    let ns = model.metadata.namespace.clone().unwrap();
    // Its pods' service account exists there.
    assert!(objects.iter().any(|o| o["kind"] == "ServiceAccount"
        && o["metadata"]["name"] == "greenthread-model"
        && o["metadata"]["namespace"] == ns.as_str()));
}

/// The autoscaling example: a valid ScaledObject by KEDA's own schema, aimed at the
/// documented Model through `/scale` (which the CRD declares), scaling on a series the
/// API server exports, for that Model.
#[test]
fn the_keda_example_is_valid_and_scales_the_documented_model_on_a_real_series() {
    let blocks = blocks(&doc(), "yaml");
    let find = |kind: &str| {
        let b = blocks
            .iter()
            .find(|b| b.contains(&format!("\nkind: {kind}\n")))
            .unwrap_or_else(|| panic!("a {kind} in the docs"));
        serde_saphyr::from_str::<serde_json::Value>(b).unwrap()
    };
    let (model, scaled) = (find("Model"), find("ScaledObject"));
    let report = greenthread_test_support::chart::validate_monitors(std::slice::from_ref(&scaled))
        .unwrap_or_else(|e| panic!("KEDA's schema refuses the example: {e}"));
    assert!(report.contains("valid ScaledObject/qwen"), "{report}");
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!(target["apiVersion"], "greenthread.ai/v1alpha1");
    assert_eq!(target["kind"], "Model");
    assert_eq!(target["name"], model["metadata"]["name"]);
    assert_eq!(
        scaled["metadata"]["namespace"],
        model["metadata"]["namespace"]
    );
    let crd = Model::crd();
    let scale = crd.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("the Model CRD has a /scale subresource");
    assert_eq!(
        (
            scale.spec_replicas_path.as_str(),
            scale.status_replicas_path.as_str()
        ),
        (".spec.replicas", ".status.replicas")
    );
    let query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap();
    assert!(
        query.contains("gthread_apiserver_requests_in_flight{")
            && query.contains(&format!(
                "model_namespace=\"{}\"",
                model["metadata"]["namespace"].as_str().unwrap()
            ))
            && query.contains(&format!(
                "model=\"{}\"",
                model["metadata"]["name"].as_str().unwrap()
            )),
        "{query}"
    );
}
