//! The Helm chart, rendered and checked with real tools: Helm's engine (PyPI
//! `helm-python-sdk`, driven by `scripts/helm.py`), `kubernetes-validate` and the
//! Prometheus Operator's schemas (npm `@kubernetes-models/prometheus-operator`).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/greenthread")
}

/// `scripts/helm.py COMMAND CHART ARGS…`.
pub fn helm(command: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg(repo_root().join("scripts/helm.py"))
        .arg(command)
        .arg(chart_dir())
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("python3 with helm-python-sdk (scripts/test installs it)")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The rendered objects for these values arguments (`--set k=v`, `-f file`).
pub fn render(args: &[&str]) -> Vec<Value> {
    let out = helm("render", args);
    assert!(out.status.success(), "helm render {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("helm.py prints JSON")
}

/// Strict lint; the findings if any.
pub fn lint(args: &[&str]) -> Result<(), String> {
    let out = helm("lint", args);
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

/// `kubernetes-validate --strict` on every object given (core kinds and CRDs).
pub fn kubernetes_validate(objects: &[Value]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (i, obj) in objects.iter().enumerate() {
        let path = dir.path().join(format!("{i:03}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(obj).unwrap()).unwrap();
        paths.push(path);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            "1.33.0",
            "--quiet",
        ])
        .args(&paths)
        .output()
        .expect("kubernetes-validate (PyPI; scripts/test installs it)");
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

/// The Prometheus Operator's schemas on every monitor and rule given; its report.
pub fn validate_monitors(objects: &[Value]) -> Result<String, String> {
    let tests = repo_root().join("charts/tests");
    let mut child = Command::new("node")
        .arg("validate-monitors.mjs")
        .current_dir(&tests)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (with charts/tests/node_modules: scripts/test runs npm ci)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(objects).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(text(&out))
    } else {
        Err(text(&out))
    }
}

/// Objects of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// Whether `selector` (a `matchLabels` map) selects `labels`.
pub fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}
