//! The CRDs shipped in the repository are exactly what `greenthread crds` generates, and
//! they pass `kubernetes-validate --strict`.

use std::{path::PathBuf, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../charts/greenthread/crds/greenthread.ai.yaml")
}

#[test]
fn shipped_crds_match_the_generated_ones() {
    let out = Command::new(BIN).arg("crds").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let shipped = std::fs::read_to_string(shipped()).unwrap();
    assert!(
        generated == shipped,
        "charts/greenthread/crds/greenthread.ai.yaml is stale: run `cargo run -q -- crds > charts/greenthread/crds/greenthread.ai.yaml`"
    );
    for name in ["models.greenthread.ai", "gpus.greenthread.ai"] {
        assert!(generated.contains(&format!("name: {name}")), "{name}");
    }
}

#[test]
fn shipped_crds_pass_kubernetes_validate_strict() {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(shipped())
        .output()
        .expect("kubernetes-validate (PyPI; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("passed for resource customresourcedefinition")
            .count(),
        2,
        "{text}"
    );
}
