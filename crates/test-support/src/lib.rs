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
pub use local::{LocalProc, TEST_CONFIG};
pub use procs::{Proc, SidecarProc, free_port, get_json, http, scrape, scrape_text, sim_bin};
pub use prometheus::{Prometheus, Series};
pub use wait::{wait_http, wait_until};
