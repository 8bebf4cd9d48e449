//! The release path: the GitHub workflows lint clean (actionlint), the image the chart
//! installs by default is the one the release workflow pushes, `image.digest` pins every
//! container by digest, and `imagePullSecrets` reach every pod, Model pods included.

use std::process::Command;

use greenthread_test_support::{
    chart::{find, render, repo_root},
    run_ok,
};
use serde_json::Value;

/// Every container image of every workload the chart renders, and the controller's
/// `--sidecar-image` (the image of every Model pod's sidecar).
fn images(objects: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for o in objects {
        let spec = &o["spec"]["template"]["spec"];
        for list in ["containers", "initContainers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                out.push(c["image"].as_str().unwrap().to_string());
            }
        }
    }
    let controller = find(objects, "Deployment", "greenthread-controller");
    let args = controller["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    out.extend(
        args.iter()
            .filter_map(|a| a.as_str()?.strip_prefix("--sidecar-image="))
            .map(String::from),
    );
    assert!(out.len() >= 4, "{out:?}");
    out
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_workflows_lint_clean() {
    let dir = repo_root().join(".github/workflows");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    files.sort();
    assert!(files.iter().any(|f| f.ends_with("ci.yml")), "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with("release.yml")),
        "{files:?}"
    );
    run_ok(
        Command::new("node")
            .arg(repo_root().join("charts/tests/lint-workflows.mjs"))
            .args(&files),
        "node; scripts/test installs charts/tests' packages",
    );
}

#[test]
fn the_chart_installs_the_image_the_release_pushes() {
    let release = yaml(".github/workflows/release.yml");
    let pushed = release["env"]["IMAGE"].as_str().unwrap();
    // The release pushes IMAGE:<tag without v>, and refuses a tag that is not the
    // crates' version, the chart's version and its appVersion.
    let push = release["jobs"]["image"].to_string();
    assert!(push.contains("--tag \\\"$IMAGE:$version\\\""), "{push}");
    let chart = yaml("charts/greenthread/Chart.yaml");
    let app_version = chart["appVersion"].as_str().unwrap();
    assert_eq!(app_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        chart["version"].as_str().unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    let expected = format!("{pushed}:{app_version}");
    for image in images(&render(&[])) {
        assert_eq!(image, expected);
    }
}

#[test]
fn a_digest_pins_every_container_and_pull_secrets_reach_every_pod() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let objects = render(&[
        "--set",
        &format!("image.digest={digest}"),
        "--set",
        "imagePullSecrets[0].name=regcred",
    ]);
    let pinned = format!("ghcr.io/greenthread/greenthread@{digest}");
    for image in images(&objects) {
        assert_eq!(image, pinned);
    }
    let mut pods = 0;
    for o in &objects {
        let spec = &o["spec"]["template"]["spec"];
        if spec.is_object() {
            pods += 1;
            assert_eq!(
                spec["imagePullSecrets"][0]["name"], "regcred",
                "{}",
                o["metadata"]["name"]
            );
        }
    }
    assert!(pods >= 3, "{pods} pod templates");
    let controller = find(&objects, "Deployment", "greenthread-controller");
    let args = controller["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--image-pull-secret=regcred"), "{args}");
    // A digest that is not one is refused, naming the field.
    let out = greenthread_test_support::chart::helm("schema", &["--set", "image.digest=latest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/image/digest"));
}
