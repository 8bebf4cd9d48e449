//! Test support: start real `greenthread` processes on loopback, read their metrics, and
//! wait for conditions with a deadline instead of sleeping and hoping.

pub mod bench;
pub mod chart;
mod exposition;
mod failing_ledger;
mod fake_apiserver;
mod fake_engine;
mod fake_hub;
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
pub use fake_hub::{FakeHub, HUB_COMMIT, HubFaults, HubFileSpec};
pub use fake_kubelet::FakeKubelet;
pub use kubectl::{SEED_GPU_JSONPATH, kubectl_jsonpath};
pub use local::{LocalProc, TEST_CONFIG, openai_script, python_script};
pub use procs::{
    Proc, SidecarProc, free_port, get_json, http, run_ok, scrape, scrape_text, sim_bin,
};
pub use prometheus::{Prometheus, Series};
pub use wait::{wait_http, wait_until};

/// One server-sent event read from a stream's text: its id, type and data.
#[derive(Debug, Clone)]
pub struct Sse {
    pub id: Option<u64>,
    pub kind: String,
    pub data: serde_json::Value,
}

/// The complete events in `text` (a stream read so far), in order: `event:` names the
/// type (`message` when absent, as for an EventSource).
pub fn sse_events(text: &str) -> Vec<Sse> {
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
    complete
        .split("\n\n")
        .filter_map(|frame| {
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            };
            Some(Sse {
                id: field("id").and_then(|v| v.parse().ok()),
                kind: field("event").unwrap_or("message").to_string(),
                data: serde_json::from_str(field("data")?).ok()?,
            })
        })
        .collect()
}

/// The `state` events in `text`: each replica's state changes (and, `from` null, the
/// snapshot a stream opens with).
pub fn state_events(text: &str) -> Vec<serde_json::Value> {
    sse_events(text)
        .into_iter()
        .filter(|e| e.kind == "state")
        .map(|e| e.data)
        .collect()
}

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
