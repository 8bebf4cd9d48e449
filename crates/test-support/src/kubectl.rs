//! The seed's `kubectl get gpu -A -o jsonpath=…` query, evaluated offline by the real
//! kubectl on one object (`kubectl label --local -f FILE … -o jsonpath=…`).

use std::process::Command;

/// The jsonpath of the monitoring page's "quick overview of GPU occupants", for one GPU.
pub const SEED_GPU_JSONPATH: &str =
    r#"{.metadata.name}: {range .status.occupants[*]}{.modelName}({.state}) {end}"#;

/// What kubectl prints for `object` with `template`.
pub fn kubectl_jsonpath(object: &serde_json::Value, template: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "gt-kubectl-{}-{}",
        std::process::id(),
        crate::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("object.json");
    std::fs::write(&file, serde_json::to_vec(object).unwrap()).unwrap();
    let out = Command::new("kubectl")
        .args(["label", "--local", "-f"])
        .arg(&file)
        .args(["seen=yes", "-o", &format!("jsonpath={template}")])
        .output()
        .expect("kubectl is installed");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
