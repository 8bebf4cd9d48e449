//! The router under test: `alpha` in one namespace, `beta` in two; no replica runs, so a
//! request that routes gets 503 "no replica", which tells routing apart from refusal.

use std::sync::Arc;

use axum::Router;
use greenthread_apiserver::{ApiServer, Auth, ModelRoute, router};
use greenthread_ledger::{Ledger, MemoryLedger};
use greenthread_sidecar::metrics::SidecarFamilies;
use prometheus_client::registry::Registry;

pub fn app(auth: Auth) -> Router {
    router(server(auth))
}

/// The server behind [`app`].
pub fn server(auth: Auth) -> Arc<ApiServer> {
    let route = |ns: &str, name: &str| ModelRoute::new(ns, name, format!("org/{name}"), vec![]);
    let mut registry = Registry::default();
    let families = SidecarFamilies::register(&mut registry);
    ApiServer::new(
        vec![
            route("team-a", "alpha"),
            route("team-a", "beta"),
            route("team-b", "beta"),
        ],
        Arc::new(MemoryLedger::new()) as Arc<dyn Ledger>,
        auth,
        registry,
        families,
        Box::new(|| {}),
    )
}
