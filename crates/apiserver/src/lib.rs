//! The API server: one OpenAI-compatible endpoint for every model (routed by the
//! request's `model`, or a `/<model>/v1/…` prefix), `/v1/models` with each model's state
//! (never waking one), admin REST under `/api/v1`, a server-sent event stream of state
//! changes, API keys, metrics, and a status page at `/`.

mod auth;
pub mod balance;
pub mod batch;
pub mod cluster;
mod events;
pub mod issued;
pub mod keys;
pub mod kube_discovery;
mod metrics;
mod replica;
mod routes;
pub mod secret_store;
mod ui;
mod usage;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use greenthread_ledger::Ledger;
use greenthread_sidecar::metrics::SidecarFamilies;
use prometheus_client::registry::Registry;

pub use auth::{Auth, AuthError, AuthSources};
pub use events::{Event, EventHub, StateEvent};
pub use metrics::ApiMetrics;
pub use replica::{Backend, Replica, StateBoard};
pub use routes::router;

pub struct ModelRoute {
    /// The Model's namespace (`local` in local mode).
    pub namespace: String,
    /// The Model's name (what clients send as `model`, or `namespace/name` when two
    /// namespaces hold a Model of that name).
    pub name: String,
    /// The engine's model id (also accepted as `model`).
    pub model_name: String,
    pub replicas: Vec<Replica>,
    /// Requests outstanding on every serving replica at which another one wakes
    /// (`spec.scaleOut`; 0: never). See [`balance`].
    pub scale_out: usize,
    /// Advanced per request: round-robin among equals, and the two choices.
    turn: AtomicU64,
    /// A scale-out wake is under way from here.
    scaling: Arc<AtomicBool>,
    /// The LoRA adapters its replicas serve, by name (clients send them as `model`).
    pub adapters: Vec<String>,
    /// The routes it serves (`spec.endpoints`, or its `modelType`'s); `None`: all.
    pub endpoints: Option<Vec<String>>,
}

impl ModelRoute {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        model_name: impl Into<String>,
        replicas: Vec<Replica>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            model_name: model_name.into(),
            replicas,
            scale_out: 0,
            turn: AtomicU64::new(0),
            scaling: Arc::default(),
            adapters: Vec::new(),
            endpoints: None,
        }
    }

    pub fn with_scale_out(self, scale_out: usize) -> Self {
        Self { scale_out, ..self }
    }

    pub fn with_adapters(self, adapters: Vec<String>) -> Self {
        Self { adapters, ..self }
    }

    pub fn with_endpoints(self, endpoints: Option<Vec<String>>) -> Self {
        Self { endpoints, ..self }
    }

    /// Whether requests to `path` (`/v1/...`, no query) may go to this Model.
    pub fn serves(&self, path: &str) -> bool {
        self.endpoints
            .as_ref()
            .is_none_or(|list| list.iter().any(|e| e == path))
    }

    fn serves_adapter(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a == name)
    }

    /// `namespace/name`: unique across the cluster.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Where the next request goes ([`balance::choose`]); none while no replica runs
    /// yet. Starts a scale-out wake when the decision asks for one.
    pub fn pick(self: &Arc<Self>) -> Option<&Replica> {
        let loads: Vec<balance::Load> = self.replicas.iter().map(Replica::load).collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let pick = balance::choose(&loads, self.scale_out, turn)?;
        if let Some(w) = pick.wake
            && !self.scaling.swap(true, Ordering::AcqRel)
        {
            let route = self.clone();
            tokio::spawn(async move {
                let replica = &route.replicas[w];
                tracing::info!(model = %route.name, pod = %replica.pod, "every serving replica is busy: waking another");
                let _ = replica.wake().await;
                route.scaling.store(false, Ordering::Release);
            });
        }
        Some(&self.replicas[pick.send])
    }

    /// Where the next batch request goes: as [`ModelRoute::pick`], but batch work never
    /// starts a scale-out wake (a wake that could preempt someone).
    pub fn pick_for_batch(&self) -> Option<&Replica> {
        let loads: Vec<balance::Load> = self.replicas.iter().map(Replica::load).collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let pick = balance::choose(&loads, 0, turn)?;
        Some(&self.replicas[pick.send])
    }

    /// `serving` if any replica serves, else that of the replica a request would go to.
    pub fn state(&self) -> &'static str {
        if self.replicas.iter().any(|r| r.state() == "serving") {
            return "serving";
        }
        let loads: Vec<balance::Load> = self.replicas.iter().map(Replica::load).collect();
        balance::choose(&loads, 0, 0).map_or("pending", |p| self.replicas[p.send].state())
    }
}

/// Routes by `namespace/name`.
type Routes = Arc<BTreeMap<String, Arc<ModelRoute>>>;

/// What a `model` a client sent names.
pub enum Lookup {
    Found(Arc<ModelRoute>),
    /// An adapter (its own name) served by the Model's replicas.
    Adapter(Arc<ModelRoute>, String),
    Unknown,
    /// Several Models answer to the name: the client must say `namespace/name`.
    Ambiguous(Vec<String>),
}

/// Adds, replaces and removes Models at run time through the admin API (`local`, which
/// runs their engines). None on Kubernetes, where the Model resource is the API.
pub trait ModelManager: Send + Sync {
    /// `POST /api/v1/models`: `{name, spec}`, as a model of the config file.
    fn add(&self, body: serde_json::Value) -> futures_util::future::BoxFuture<'_, Managed>;
    /// `PUT /api/v1/models/{name}`: a new spec; only that model restarts, drained first.
    fn replace(
        &self,
        name: String,
        body: serde_json::Value,
    ) -> futures_util::future::BoxFuture<'_, Managed>;
    /// `DELETE /api/v1/models/{name}`: drained, put to sleep, stopped, its memory released.
    fn remove(&self, name: String) -> futures_util::future::BoxFuture<'_, Managed>;
    /// `PATCH /api/v1/models/{name}`: `{"spec": {"fairness": {"popular": bool}}}` alone,
    /// applied without a restart.
    fn patch(
        &self,
        name: String,
        body: serde_json::Value,
    ) -> futures_util::future::BoxFuture<'_, Managed>;
}

/// What a change of the Models came to: the changed Model's admin view, or an error
/// (its status, and a message naming the field).
pub type Managed = Result<serde_json::Value, (http::StatusCode, String)>;

/// Event-stream subscribers at once; more get 503.
pub const MAX_EVENT_SUBSCRIBERS: usize = 256;

pub struct ApiServer {
    models: RwLock<Routes>,
    pub ledger: Arc<dyn Ledger>,
    pub auth: Auth,
    pub metrics: ApiMetrics,
    /// Everything `/metrics` shows: sidecar families, the API server's own, GPUs.
    pub registry: Registry,
    pub families: Arc<SidecarFamilies>,
    pub events: Arc<events::EventHub>,
    /// Brings scrape-time values (GPU stats) up to date before encoding.
    pub refresh: Box<dyn Fn() + Send + Sync>,
    /// Ends event streams when the server shuts down.
    pub shutdown: greenthread_edge::Shutdown,
    /// Subscribers to `/api/v1/events` now.
    pub subscribers: Arc<tokio::sync::Semaphore>,
    /// The address Prometheus reaches this server at (for `/prometheus/targets`).
    pub advertise: RwLock<String>,
    /// Changes the Models at run time, where this server can (`local`).
    pub manager: std::sync::OnceLock<Arc<dyn ModelManager>>,
    /// The Batch API, where this server keeps a batch directory.
    pub batches: std::sync::OnceLock<Arc<batch::Batches>>,
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
        let metrics = ApiMetrics::registered(&mut registry);
        let events = Arc::new(events::EventHub::new());
        for m in &models {
            for r in &m.replicas {
                if let Backend::Local(sidecar) = &r.backend {
                    events.follow(&m.name, &r.pod, sidecar.clone());
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
            shutdown: greenthread_edge::Shutdown::new(),
            subscribers: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_SUBSCRIBERS)),
            advertise: RwLock::new("127.0.0.1:8000".into()),
            manager: std::sync::OnceLock::new(),
            batches: std::sync::OnceLock::new(),
        });
        api.set_models(models);
        api
    }

    /// The current routes (a snapshot: discovery may replace them at any time).
    pub fn models(&self) -> Routes {
        self.models.read().unwrap().clone()
    }

    pub fn set_models(&self, models: Vec<ModelRoute>) {
        let map = models.into_iter().map(|m| (m.key(), Arc::new(m))).collect();
        *self.models.write().unwrap() = Arc::new(map);
    }

    /// Routes `route` from now on (its local replicas' events followed); the others are
    /// kept as they are, counters and all.
    pub fn add_model(&self, route: ModelRoute) -> Arc<ModelRoute> {
        for r in &route.replicas {
            if let Backend::Local(sidecar) = &r.backend {
                self.events.follow(&route.name, &r.pod, sidecar.clone());
            }
        }
        let route = Arc::new(route);
        self.change_models(|m| m.insert(route.key(), route.clone()));
        route
    }

    /// Stops routing to Model `key` (requests under way finish on the route they hold).
    pub fn remove_model(&self, key: &str) -> Option<Arc<ModelRoute>> {
        self.change_models(|m| m.remove(key))
    }

    /// `change` applied to a copy of the routes, which then replaces them: readers keep
    /// the snapshot they took.
    fn change_models<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Arc<ModelRoute>>) -> T,
    ) -> T {
        let mut models = self.models.write().unwrap();
        let mut next = (**models).clone();
        let out = change(&mut next);
        *models = Arc::new(next);
        out
    }

    /// The Model `model` names: `namespace/name`, else a name no other namespace uses,
    /// else an engine model id only one Model serves. Adapters answer to their names like
    /// Models (`namespace/adapter` too); a name that a Model and an adapter, or two
    /// adapters, share is ambiguous. Never a guess between tenants.
    pub fn lookup(&self, model: &str) -> Lookup {
        let models = self.models();
        if let Some(m) = models.get(model) {
            return Lookup::Found(m.clone());
        }
        if let Some((ns, name)) = model.split_once('/')
            && let Some(m) = models
                .values()
                .find(|m| m.namespace == ns && m.serves_adapter(name))
        {
            return Lookup::Adapter(m.clone(), name.to_string());
        }
        let mut found: Vec<Lookup> = models
            .values()
            .filter(|m| m.name == model)
            .map(|m| Lookup::Found(m.clone()))
            .collect();
        found.extend(
            models
                .values()
                .filter(|m| m.serves_adapter(model))
                .map(|m| Lookup::Adapter(m.clone(), model.to_string())),
        );
        if found.is_empty() {
            found = models
                .values()
                .filter(|m| m.model_name == model)
                .map(|m| Lookup::Found(m.clone()))
                .collect();
        }
        match found.len() {
            0 => Lookup::Unknown,
            1 => found.pop().unwrap(),
            _ => Lookup::Ambiguous(
                found
                    .iter()
                    .map(|l| match l {
                        Lookup::Found(m) => m.key(),
                        Lookup::Adapter(m, a) => {
                            format!("{}/{a} (adapter of {})", m.namespace, m.key())
                        }
                        _ => unreachable!("only matches are collected"),
                    })
                    .collect(),
            ),
        }
    }

    /// What clients call adapter `name` of `route`: its name, or `namespace/name` when
    /// another Model or adapter answers to the same name.
    pub fn adapter_display(&self, routes: &Routes, route: &ModelRoute, name: &str) -> String {
        let uses = routes
            .values()
            .filter(|m| m.name == name || m.serves_adapter(name))
            .count();
        if uses > 1 {
            format!("{}/{name}", route.namespace)
        } else {
            name.to_string()
        }
    }

    /// What clients call `route`: its name, or `namespace/name` when another namespace
    /// has a Model of the same name.
    pub fn display_name(&self, routes: &Routes, route: &ModelRoute) -> String {
        if routes.values().filter(|m| m.name == route.name).count() > 1 {
            route.key()
        } else {
            route.name.clone()
        }
    }

    pub fn known_models(&self) -> String {
        let routes = self.models();
        let mut names: Vec<String> = routes
            .values()
            .map(|m| self.display_name(&routes, m))
            .collect();
        names.truncate(50);
        names.join(", ")
    }
}
