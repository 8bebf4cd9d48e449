//! Test support: start real `greenthread` processes on loopback, read their metrics, and
//! wait for conditions with a deadline instead of sleeping and hoping.

pub mod bench;
pub mod chart;
mod exposition;
mod failing_ledger;
mod fake_apiserver;
mod fake_engine;
mod fake_kubelet;
mod kubectl;
pub mod llama;
mod local;
mod procs;
mod prometheus;
mod wait;

pub use exposition::{Exposition, Sample};
pub use failing_ledger::FailingLedger;
pub use fake_apiserver::FakeApiServer;
pub use fake_engine::FakeEngine;
pub use fake_kubelet::FakeKubelet;
pub use kubectl::{SEED_GPU_JSONPATH, kubectl_jsonpath};
pub use local::{LocalProc, TEST_CONFIG, openai_script, python_script};
pub use procs::{
    Proc, SidecarProc, free_port, get_json, http, run_ok, scrape, scrape_text, sim_bin,
};
pub use prometheus::{Prometheus, Series};
pub use wait::{wait_http, wait_until};

/// Bytes a GPU record charges, computed here from its JSON and not with the ledger's own
/// `decide::committed_bytes`, so that an over-commit check does not share the code it
/// checks: what serving and waking occupants reserve, plus what sleeping ones still hold.
pub fn charged_bytes(status: &serde_json::Value) -> u64 {
    status["occupants"]
        .as_array()
        .map(|occupants| {
            occupants
                .iter()
                .map(|o| match o["state"].as_str() {
                    Some("serving" | "waking") => o["reservedMemoryBytes"].as_u64().unwrap_or(0),
                    Some("sleeping") => o["residualMemoryBytes"].as_u64().unwrap_or(0),
                    other => panic!("an occupant in an unknown state {other:?}: {o}"),
                })
                .sum()
        })
        .unwrap_or(0)
}
