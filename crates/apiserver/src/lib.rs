//! The API server: one OpenAI-compatible endpoint for every model (routed by the
//! request's `model`, or a `/<model>/v1/…` prefix), `/v1/models` with each model's state
//! (never waking one), admin REST under `/api/v1`, a server-sent event stream of state
//! changes, API keys, and metrics.

mod auth;
mod events;
mod metrics;
mod routes;

use std::{collections::BTreeMap, sync::Arc};

use greenthread_ledger::Ledger;
use greenthread_sidecar::{Forwarder, Sidecar, metrics::SidecarFamilies};
use prometheus_client::registry::Registry;

pub use auth::Auth;
pub use events::StateEvent;
pub use metrics::ApiMetrics;
pub use routes::router;

/// One replica of a model: its sidecar, and the connection pool to its engine.
pub struct Replica {
    pub pod: String,
    pub sidecar: Arc<Sidecar>,
    pub forwarder: Arc<Forwarder>,
}

pub struct ModelRoute {
    /// The Model's name (what clients send as `model`).
    pub name: String,
    /// The engine's model id (also accepted as `model`).
    pub model_name: String,
    pub replicas: Vec<Replica>,
}

impl ModelRoute {
    /// A serving replica if there is one (no wake needed), else the first.
    pub fn pick(&self) -> &Replica {
        self.replicas
            .iter()
            .find(|r| r.sidecar.state() == greenthread_sidecar::state::State::Serving)
            .unwrap_or(&self.replicas[0])
    }

    /// `serving` if any replica serves, else the first replica's state.
    pub fn state(&self) -> &'static str {
        self.replicas
            .iter()
            .map(|r| r.sidecar.state())
            .find(|s| *s == greenthread_sidecar::state::State::Serving)
            .unwrap_or_else(|| self.replicas[0].sidecar.state())
            .as_str()
    }
}

pub struct ApiServer {
    pub models: BTreeMap<String, Arc<ModelRoute>>,
    pub ledger: Arc<dyn Ledger>,
    pub auth: Auth,
    pub metrics: ApiMetrics,
    /// Everything `/metrics` shows: sidecar families, the API server's own, GPUs.
    pub registry: Registry,
    pub families: Arc<SidecarFamilies>,
    pub events: events::EventHub,
    /// Brings scrape-time values (GPU stats) up to date before encoding.
    pub refresh: Box<dyn Fn() + Send + Sync>,
}

impl ApiServer {
    pub fn new(
        models: Vec<ModelRoute>,
        ledger: Arc<dyn Ledger>,
        auth: Auth,
        mut registry: Registry,
        families: Arc<SidecarFamilies>,
        refresh: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Self> {
        let metrics = ApiMetrics::register(&mut registry);
        let models: BTreeMap<String, Arc<ModelRoute>> = models
            .into_iter()
            .map(|m| (m.name.clone(), Arc::new(m)))
            .collect();
        let events = events::EventHub::new();
        for m in models.values() {
            for r in &m.replicas {
                events.follow(&m.name, &r.pod, r.sidecar.transitions());
            }
        }
        Arc::new(Self {
            models,
            ledger,
            auth,
            metrics,
            registry,
            families,
            events,
            refresh,
        })
    }

    /// The route for `model`, by Model name or engine model id.
    pub fn route(&self, model: &str) -> Option<&Arc<ModelRoute>> {
        self.models
            .get(model)
            .or_else(|| self.models.values().find(|m| m.model_name == model))
    }

    pub fn known_models(&self) -> String {
        self.models.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}
