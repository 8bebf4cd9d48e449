//! The API server on Kubernetes: Models and their pods discovered by watch, each pod's
//! sidecar reached on the ports its container declares, and replica states read from the
//! GPU records (the same the sidecars write), so that routing prefers a serving replica
//! and `/api/v1/events` streams every change, exactly as in `local` mode.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use greenthread_api::Model;
use greenthread_ledger::Ledger;
use greenthread_sidecar::Forwarder;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, reflector, watcher},
};

use crate::{ApiServer, Backend, ModelRoute, Replica, StateBoard, StateEvent};

/// Label the controller puts on every Model pod, naming its Model.
pub const MODEL_LABEL: &str = "greenthread.ai/model";
const POD_SELECTOR: &str = "app.kubernetes.io/component=model";

/// Connection pools by address, kept across rebuilds of the routes (and dropped with the
/// pods they reach).
#[derive(Default)]
struct Pools {
    pools: Mutex<HashMap<String, Arc<Forwarder>>>,
    /// The token sidecars demand on their private port.
    sidecar_token: Option<String>,
}

/// Longest a request waits for a remote sidecar's response headers: its queue (5 min by
/// default) plus a long non-streamed generation.
const SIDECAR_RESPONSE_TIMEOUT: Duration = Duration::from_secs(20 * 60);

impl Pools {
    fn get(&self, addr: &str, private: bool) -> Option<Arc<Forwarder>> {
        let mut pools = self.pools.lock().unwrap();
        if let Some(f) = pools.get(addr) {
            return Some(f.clone());
        }
        let mut f = Forwarder::new(&format!("http://{addr}"))
            .ok()?
            .with_timeouts(Duration::from_secs(5), SIDECAR_RESPONSE_TIMEOUT);
        if private {
            f = f
                .with_credentials(&[], self.sidecar_token.as_deref())
                .ok()?;
        }
        let f = Arc::new(f);
        pools.insert(addr.to_string(), f.clone());
        Some(f)
    }

    /// Forgets the pools of addresses no route uses any more.
    fn retain(&self, routes: &[ModelRoute]) {
        let used: std::collections::HashSet<*const Forwarder> = routes
            .iter()
            .flat_map(|m| m.replicas.iter())
            .flat_map(|r| match &r.backend {
                Backend::Remote { admin, .. } => {
                    vec![Arc::as_ptr(&r.forwarder), Arc::as_ptr(admin)]
                }
                Backend::Local(_) => vec![Arc::as_ptr(&r.forwarder)],
            })
            .collect();
        self.pools
            .lock()
            .unwrap()
            .retain(|_, f| used.contains(&Arc::as_ptr(f)));
    }
}

/// The sidecar's public and private addresses, once the pod runs and has an IP.
fn sidecar_addrs(pod: &Pod) -> Option<(String, String)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref()?;
    let sidecar = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == "sidecar")?;
    let port = |name: &str| {
        sidecar
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    Some((
        format!("{ip}:{}", port("http")?),
        format!("{ip}:{}", port("metrics")?),
    ))
}

/// The routes for the Models and pods seen so far.
fn routes(
    models: &[Arc<Model>],
    pods: &[Arc<Pod>],
    pools: &Pools,
    states: &StateBoard,
) -> Vec<ModelRoute> {
    models
        .iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .map(|m| {
            let (name, ns) = (m.name_any(), m.namespace().unwrap_or_default());
            let mut replicas: Vec<Replica> = pods
                .iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(ns.as_str())
                        && p.labels().get(MODEL_LABEL) == Some(&name)
                })
                .filter_map(|p| {
                    let (public, private) = sidecar_addrs(p)?;
                    Some(Replica {
                        // The ledger's key: pods of the same name in two namespaces differ.
                        pod: greenthread_api::ledger_key(&ns, &p.name_any()),
                        forwarder: pools.get(&public, false)?,
                        backend: Backend::Remote {
                            admin: pools.get(&private, true)?,
                            states: states.clone(),
                        },
                        outstanding: Default::default(),
                    })
                })
                .collect();
            replicas.sort_by(|a, b| a.pod.cmp(&b.pod));
            ModelRoute::new(ns, name, m.spec.model_name.clone(), replicas)
                .with_scale_out(m.spec.scale_out as usize)
                .with_adapters(m.spec.adapters.iter().map(|a| a.name.clone()).collect())
                .with_endpoints(m.spec.served_endpoints())
        })
        .collect()
}

/// Keeps `api`'s routes in step with the cluster, and replica states with the GPU records,
/// until dropped.
pub async fn run(
    api: Arc<ApiServer>,
    client: Client,
    watch_namespace: Option<String>,
    ledger: Arc<dyn Ledger>,
    sidecar_token: Option<String>,
) {
    let states = StateBoard::default();
    let (models_api, pods_api): (Api<Model>, Api<Pod>) = match &watch_namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (models, models_writer) = reflector::store();
    let (pods, pods_writer) = reflector::store();
    let model_events = reflector(
        models_writer,
        watcher(models_api, watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ());
    let pod_events = reflector(
        pods_writer,
        watcher(pods_api, watcher::Config::default().labels(POD_SELECTOR)),
    )
    .default_backoff()
    .map(|_| ());
    let pools = Pools {
        pools: Mutex::default(),
        sidecar_token,
    };
    let discovery = {
        let (api, states) = (api.clone(), states.clone());
        let models = models.clone();
        async move {
            let mut changes =
                std::pin::pin!(futures_util::stream::select(model_events, pod_events));
            while changes.next().await.is_some() {
                let routes = routes(&models.state(), &pods.state(), &pools, &states);
                pools.retain(&routes);
                api.set_models(routes);
            }
        }
    };
    let watch_states = async move {
        // The GPU records arrive by watch; this reads the ledger's cache, not the API.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let Ok(gpus) = ledger.list().await else {
                continue;
            };
            let model_of: BTreeMap<String, String> = api
                .models()
                .values()
                .flat_map(|m| m.replicas.iter().map(|r| (r.pod.clone(), m.name.clone())))
                .collect();
            for g in &gpus {
                for o in &g.status.occupants {
                    let Some(model) = model_of.get(&o.pod_name) else {
                        continue;
                    };
                    let to = o.state.as_str();
                    if let Some(from) = states.set(&o.pod_name, to) {
                        let at = jiff::Timestamp::now().to_string();
                        api.events.publish(StateEvent {
                            model: model.clone(),
                            pod: o.pod_name.clone(),
                            from,
                            to,
                            at: at.clone(),
                        });
                        // As seen in the GPU records (the sidecar's wake phases are in
                        // its own /status).
                        if let Some(kind) = from.and_then(|f| crate::events::typed(f, to)) {
                            let data =
                                serde_json::json!({"model": model, "pod": o.pod_name, "at": at});
                            api.events.emit(kind, data);
                        }
                    }
                }
            }
            states.retain(|pod| model_of.contains_key(pod));
        }
    };
    tokio::select! {
        _ = discovery => {}
        _ = watch_states => {}
    }
}
