//! The API server: one OpenAI-compatible endpoint for every model (routed by the
//! request's `model`, or a `/<model>/v1/…` prefix), `/v1/models` with each model's state
//! (never waking one), admin REST under `/api/v1`, a server-sent event stream of state
//! changes, API keys, and metrics.

mod auth;
pub mod cluster;
mod events;
pub mod kube_discovery;
mod metrics;
mod replica;
mod routes;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use greenthread_ledger::Ledger;
use greenthread_sidecar::metrics::SidecarFamilies;
use prometheus_client::registry::Registry;

pub use auth::Auth;
pub use events::StateEvent;
pub use metrics::ApiMetrics;
pub use replica::{Backend, Replica, StateBoard};
pub use routes::router;

pub struct ModelRoute {
    /// The Model's name (what clients send as `model`).
    pub name: String,
    /// The engine's model id (also accepted as `model`).
    pub model_name: String,
    pub replicas: Vec<Replica>,
}

impl ModelRoute {
    /// A serving replica if there is one (no wake needed), else the first; none while
    /// no replica runs yet.
    pub fn pick(&self) -> Option<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.state() == "serving")
            .or(self.replicas.first())
    }

    /// `serving` if any replica serves, else the first replica's state.
    pub fn state(&self) -> &'static str {
        self.pick().map_or("pending", Replica::state)
    }
}

type Routes = Arc<BTreeMap<String, Arc<ModelRoute>>>;

pub struct ApiServer {
    models: RwLock<Routes>,
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
        let events = events::EventHub::new();
        for m in &models {
            for r in &m.replicas {
                if let Backend::Local(sidecar) = &r.backend {
                    events.follow(&m.name, &r.pod, sidecar.transitions());
                }
            }
        }
        let api = Arc::new(Self {
            models: RwLock::default(),
            ledger,
            auth,
            metrics,
            registry,
            families,
            events,
            refresh,
        });
        api.set_models(models);
        api
    }

    /// The current routes (a snapshot: discovery may replace them at any time).
    pub fn models(&self) -> Routes {
        self.models.read().unwrap().clone()
    }

    pub fn set_models(&self, models: Vec<ModelRoute>) {
        let map = models
            .into_iter()
            .map(|m| (m.name.clone(), Arc::new(m)))
            .collect();
        *self.models.write().unwrap() = Arc::new(map);
    }

    /// The route for `model`, by Model name or engine model id.
    pub fn route(&self, model: &str) -> Option<Arc<ModelRoute>> {
        let models = self.models();
        models
            .get(model)
            .or_else(|| models.values().find(|m| m.model_name == model))
            .cloned()
    }

    pub fn known_models(&self) -> String {
        self.models().keys().cloned().collect::<Vec<_>>().join(", ")
    }
}
