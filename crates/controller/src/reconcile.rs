//! The reconcile loop: Model → placed pods, a Service, status; and the GPU records kept
//! free of pods that no longer exist. Each reconcile reads the world, decides with the
//! pure [`crate::plan`] (which uses [`crate::placement`], [`crate::render`] and
//! [`crate::status`]) and carries the plan out; this module only reads and writes.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use greenthread_api::{Gpu, GpuResource, Model};
use greenthread_ledger::{Ledger, LedgerError, decide};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action,
        finalizer::{Event, finalizer},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    metrics::ControllerMetrics,
    plan,
    render::{self, COMPONENT_LABEL, MODEL_LABEL, Settings},
};

pub const FINALIZER: &str = "greenthread.ai/cleanup";

/// How often a Model is looked at again without any change (status freshness).
const RESYNC: Duration = Duration::from_secs(30);
/// How often a Model whose weights download reads their progress again.
const DOWNLOAD_POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("GPU ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("waiting for {0} pods to terminate")]
    Terminating(usize),
    #[error("no randomness for a key: {0}")]
    Random(String),
}

impl Error {
    /// Pods of the Model are still terminating: not a failure, a wait (retried soon).
    pub fn is_terminating(&self) -> bool {
        match self {
            Error::Terminating(_) => true,
            Error::Finalizer(e) => matches!(
                &**e,
                kube::runtime::finalizer::Error::ApplyFailed(e)
                    | kube::runtime::finalizer::Error::CleanupFailed(e) if e.is_terminating()
            ),
            _ => false,
        }
    }

    /// The `reason` label of `gthread_controller_errors_total`.
    pub fn reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) => s.reason.clone(),
            Error::Kube(_) => "Transport".into(),
            Error::Ledger(LedgerError::Conflict { .. }) => "Conflict".into(),
            Error::Ledger(_) => "Ledger".into(),
            Error::Finalizer(e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "Finalizer".into(),
            },
            Error::Terminating(_) => "Terminating".into(),
            Error::Random(_) => "Random".into(),
        }
    }
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: ControllerMetrics,
    /// The GPU records, read from a watch and written by compare-and-swap.
    pub ledger: Arc<dyn Ledger>,
    /// Generation last reconciled, per Model: what the queue-depth gauge compares with.
    reconciled: Mutex<HashMap<ObjectRef<Model>, i64>>,
    /// Models whose last reconcile failed and wait for a retry.
    failing: Mutex<HashSet<ObjectRef<Model>>>,
    /// Every Model watched, once the controller runs (adapter names are checked against
    /// the namespace's other Models).
    models: std::sync::OnceLock<Store<Model>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: ControllerMetrics,
        ledger: Arc<dyn Ledger>,
    ) -> Self {
        Self {
            client,
            settings,
            metrics,
            ledger,
            reconciled: Mutex::default(),
            failing: Mutex::default(),
            models: std::sync::OnceLock::new(),
        }
    }

    /// The Models of `model`'s namespace, as last watched.
    fn neighbors(&self, model: &Model) -> Vec<Arc<Model>> {
        let ns = model.namespace();
        self.models
            .get()
            .map(|s| s.state())
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.namespace() == ns)
            .collect()
    }

    /// Models with work outstanding: changed since their last reconcile, being deleted, or
    /// waiting for a retry.
    pub fn pending(&self, models: &Store<Model>) -> usize {
        let reconciled = self.reconciled.lock().unwrap();
        let failing = self.failing.lock().unwrap();
        models
            .state()
            .iter()
            .map(|m| &**m)
            .filter(|m| {
                let r = ObjectRef::from_obj(*m);
                failing.contains(&r)
                    || m.metadata.deletion_timestamp.is_some() && !m.finalizers().is_empty()
                    || reconciled.get(&r) != m.metadata.generation.as_ref()
            })
            .count()
    }
}

fn model_pods_selector() -> String {
    format!("{COMPONENT_LABEL}=model")
}

/// Removes from every GPU record the occupants, intents and wake locks of pods not in
/// `alive`. The GPU snapshot must be read before `alive` is listed: a sidecar writes only
/// once its pod exists, so any pod named in the snapshot and missing from the later list
/// is gone for good.
async fn prune(
    ledger: &dyn Ledger,
    gpus: &[Gpu],
    alive: &BTreeSet<String>,
    metrics: &ControllerMetrics,
) -> Result<(), Error> {
    for g in gpus {
        let gone = decide::pods_named(&g.status)
            .into_iter()
            .filter(|p| !alive.contains(p))
            .collect::<BTreeSet<_>>();
        if gone.is_empty() {
            continue;
        }
        greenthread_ledger::update(ledger, &g.name, &|| {}, |gpu| {
            let mut next = gpu.status.clone();
            for pod in &gone {
                next = decide::remove_pod(&next, pod);
            }
            Ok::<_, LedgerError>((Some(next), ()))
        })
        .await?;
        metrics.ledger_entries_removed.inc_by(gone.len() as u64);
        tracing::info!(gpu = %g.name, pods = ?gone, "removed ledger entries of pods that no longer exist");
    }
    Ok(())
}

/// Every model pod in the cluster (terminating ones too: their sidecars still hold memory).
async fn all_model_pods(client: &Client) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::all(client.clone());
    Ok(api
        .list(&ListParams::default().labels(&model_pods_selector()))
        .await?
        .items)
}

/// The pods' keys in the ledger (`namespace/name`).
fn names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| {
            Some(greenthread_api::ledger_key(
                p.metadata.namespace.as_deref()?,
                p.metadata.name.as_deref()?,
            ))
        })
        .collect()
}

/// The GPU records as of now, then the pods: the order [`prune`] relies on. Read from
/// the API, not from a watch cache: the event that triggered this reconcile may have come
/// through another watch, ahead of any cache.
async fn snapshot(ctx: &Context) -> Result<(Vec<Gpu>, Vec<Pod>), Error> {
    let api: Api<GpuResource> = Api::namespaced(ctx.client.clone(), &ctx.settings.gpu_namespace);
    let gpus = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|r| Gpu {
            name: r.name_any(),
            spec: r.spec,
            status: r.status.unwrap_or_default(),
            resource_version: r.metadata.resource_version.unwrap_or_default(),
        })
        .collect();
    let pods = all_model_pods(&ctx.client).await?;
    Ok((gpus, pods))
}

/// One sweep of the GPU records (also run from every Model reconcile).
pub async fn sweep_ledger(ctx: &Context) -> Result<(), Error> {
    let start = Instant::now();
    let result = async {
        let (gpus, pods) = snapshot(ctx).await?;
        prune(&*ctx.ledger, &gpus, &names(&pods), &ctx.metrics).await
    }
    .await;
    ctx.metrics
        .record("gpu", result.is_ok(), start.elapsed().as_secs_f64());
    if let Err(e) = &result {
        ctx.metrics.error(&e.reason());
    }
    result
}

async fn allowed_nodes(ctx: &Context, model: &Model) -> Result<Option<BTreeSet<String>>, Error> {
    // Normalized: `spec.product` is a node selector on the GPU product label.
    let node_selector = model.spec.normalized().node_selector;
    if node_selector.is_empty() {
        return Ok(None);
    }
    let selector = node_selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let list = nodes.list(&ListParams::default().labels(&selector)).await?;
    Ok(Some(list.items.iter().map(|n| n.name_any()).collect()))
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One reconcile of a live Model: read the world, sweep the ledger, plan (pure, in
/// [`crate::plan`]), carry the plan out.
async fn apply(model: Arc<Model>, ctx: &Context) -> Result<Action, Error> {
    let (gpus, all_pods) = snapshot(ctx).await?;
    prune(&*ctx.ledger, &gpus, &names(&all_pods), &ctx.metrics).await?;
    let nodes = allowed_nodes(ctx, &model).await?;
    let neighbors = ctx.neighbors(&model);
    let downloads = download_progress(ctx, &model, &all_pods).await;
    let world = plan::World {
        gpus: &gpus,
        pods: &all_pods,
        nodes: nodes.as_ref(),
        neighbors: &neighbors,
        downloads: &downloads,
    };
    let plan = plan::plan(&model, &world, &ctx.settings, Timestamp::now());
    let downloading = plan.status.phase.as_deref() == Some("Downloading");
    ctx.metrics.set_download(
        &model.namespace().unwrap_or_default(),
        &model.name_any(),
        plan.status.download,
    );
    execute(ctx, &model, plan).await?;
    // Nothing announces a download's progress: it is read again soon.
    Ok(Action::requeue(if downloading {
        DOWNLOAD_POLL
    } else {
        RESYNC
    }))
}

/// The progress of each pod `model` owns whose `download` init container runs, from
/// the last lines of that container's log (`greenthread download` ends each progress
/// line with its exact bytes). A log that cannot be read leaves its pod out: the phase
/// still says Downloading, without the bytes.
async fn download_progress(
    ctx: &Context,
    model: &Model,
    pods: &[Pod],
) -> std::collections::BTreeMap<String, greenthread_api::DownloadStatus> {
    let ns = model.namespace().unwrap_or_default();
    let uid = model.metadata.uid.as_deref();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let params = LogParams {
        container: Some(render::DOWNLOAD_CONTAINER.into()),
        tail_lines: Some(8),
        ..LogParams::default()
    };
    let mut out = std::collections::BTreeMap::new();
    // Owned, never matched by label: a look-alike pod's log must not speak for the Model.
    for pod in pods.iter().filter(|p| {
        p.namespace().as_deref() == Some(ns.as_str())
            && owned_by(p.owner_references(), uid)
            && crate::status::downloading(p)
    }) {
        let pod_name = pod.name_any();
        match api.logs(&pod_name, &params).await {
            Ok(log) => {
                if let Some(p) = greenthread_weights::last_progress(&log) {
                    out.insert(
                        pod_name,
                        greenthread_api::DownloadStatus {
                            downloaded_bytes: p.done,
                            total_bytes: p.total,
                        },
                    );
                }
            }
            Err(e) => {
                tracing::debug!(pod = %pod_name, error = %e, "download progress not readable")
            }
        }
    }
    out
}

/// Carries out a plan: deletions, the engine key, creations, the Service, the status.
/// Each write tolerates having been done already (a 404 on delete, a 409 on create).
async fn execute(ctx: &Context, model: &Model, plan: plan::Plan) -> Result<(), Error> {
    let name = model.name_any();
    let ns = model.namespace().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for pod in &plan.delete {
        match pods_api.delete(pod, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(model = %name, pod = %pod, "replica removed"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if plan.engine_key {
        ensure_engine_key(ctx, model).await?;
    }
    for new in &plan.create {
        match pods_api.create(&PostParams::default(), &new.pod).await {
            Ok(_) => {}
            Err(e) if is_already_exists(&e) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(model = %name, pod = %new.pod.name_any(), gpus = ?new.gpus, "replica placed");
    }
    ensure_service(ctx, model, &plan.service).await?;
    if let Some(adapters) = &plan.adapters {
        ensure_adapters(ctx, model, adapters).await?;
    }
    ctx.metrics
        .set_phase(&ns, &name, plan.status.phase.as_deref());
    if model.status.as_ref() != Some(&plan.status) {
        let api: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status_patch(&plan.status) })),
        )
        .await?;
    }
    Ok(())
}

/// A merge patch that also clears the fields the new status leaves out.
fn status_patch(status: &greenthread_api::ModelStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        for key in [
            "phase",
            "observedGeneration",
            "node",
            "servingMemoryPerGPU",
            "url",
            "download",
        ] {
            m.entry(key).or_insert(Value::Null);
        }
        for key in ["gpus", "conditions"] {
            m.entry(key).or_insert(json!([]));
        }
    }
    v
}

/// 32 random bytes as hex, from the kernel's generator.
fn random_key() -> Result<String, Error> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The Secret with the Model's engine API key, created once with a random key.
async fn ensure_engine_key(ctx: &Context, model: &Model) -> Result<(), Error> {
    if !render::takes_engine_key(model) {
        return Ok(());
    }
    let api: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    if api
        .get_opt(&render::engine_key_secret_name(model))
        .await?
        .is_some()
    {
        return Ok(());
    }
    let secret = render::render_engine_key_secret(model, &random_key()?);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(e) if is_already_exists(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn ensure_service(ctx: &Context, model: &Model, wanted: &Service) -> Result<(), Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let wanted = wanted.clone();
    match api.get_opt(&model.name_any()).await? {
        None => match api.create(&PostParams::default(), &wanted).await {
            Ok(_) => Ok(()),
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(e.into()),
        },
        Some(existing) => {
            let (have, want) = (
                existing.spec.unwrap_or_default(),
                wanted.spec.unwrap_or_default(),
            );
            if have.selector != want.selector || have.ports != want.ports {
                let patch = json!({"spec": {"selector": want.selector, "ports": want.ports}});
                api.patch(
                    &model.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await?;
            }
            Ok(())
        }
    }
}

/// The ConfigMap with the Model's adapters, as the spec says now: the kubelet updates
/// the pods' copies in place, and their sidecars load or unload what changed.
async fn ensure_adapters(ctx: &Context, model: &Model, wanted: &ConfigMap) -> Result<(), Error> {
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let name = render::adapters_config_map_name(model);
    match api.get_opt(&name).await? {
        None => match api.create(&PostParams::default(), wanted).await {
            Ok(_) => Ok(()),
            Err(e) if is_already_exists(&e) => Ok(()),
            Err(e) => Err(e.into()),
        },
        Some(existing) if existing.data != wanted.data => {
            let patch = json!({"data": wanted.data});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
            tracing::info!(model = %model.name_any(), "adapters changed");
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// Whether `Model` `uid` owns the object with these owner references: only what the
/// controller made for a Model is ever deleted with it, never a look-alike by name or label.
fn owned_by(
    refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    uid: Option<&str>,
) -> bool {
    uid.is_some_and(|uid| refs.iter().any(|o| o.uid == uid))
}

/// The Model is being deleted: its pods and Service go, and so do their ledger entries.
async fn cleanup(model: Arc<Model>, ctx: &Context) -> Result<Action, Error> {
    let name = model.name_any();
    let ns = model.namespace().unwrap_or_default();
    let uid = model.metadata.uid.as_deref();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let owned_pods = || async {
        Ok::<_, Error>(
            pods_api
                .list(&ListParams::default().labels(&format!("{MODEL_LABEL}={name}")))
                .await?
                .items
                .into_iter()
                .filter(|p| owned_by(p.owner_references(), uid))
                .collect::<Vec<_>>(),
        )
    };
    for pod in &owned_pods().await? {
        match pods_api
            .delete(&pod.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(svc) = services.get_opt(&name).await?
        && owned_by(svc.owner_references(), uid)
    {
        match services.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let remaining = owned_pods().await?;
    if !remaining.is_empty() {
        // Their sidecars release their memory as they stop; the finalizer stays until then.
        return Err(Error::Terminating(remaining.len()));
    }
    let (gpus, alive) = snapshot(ctx).await?;
    prune(&*ctx.ledger, &gpus, &names(&alive), &ctx.metrics).await?;
    ctx.metrics.set_phase(&ns, &name, None);
    ctx.metrics.set_download(&ns, &name, None);
    tracing::info!(model = %name, namespace = %ns, "model deleted; its pods, Service and ledger entries are gone");
    Ok(Action::await_change())
}

pub async fn reconcile(model: Arc<Model>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let r = ObjectRef::from_obj(&*model);
    ctx.failing.lock().unwrap().remove(&r);
    let api: Api<Model> =
        Api::namespaced(ctx.client.clone(), &model.namespace().unwrap_or_default());
    let generation = model.metadata.generation;
    let result = finalizer(&api, FINALIZER, model, |event| async {
        match event {
            Event::Apply(m) => apply(m, &ctx).await,
            Event::Cleanup(m) => cleanup(m, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let waiting = matches!(&result, Err(e) if e.is_terminating());
    ctx.metrics.record(
        "model",
        result.is_ok() || waiting,
        start.elapsed().as_secs_f64(),
    );
    match &result {
        Ok(_) => {
            if let Some(g) = generation {
                ctx.reconciled.lock().unwrap().insert(r, g);
            }
        }
        Err(e) => {
            if !waiting {
                ctx.metrics.error(&e.reason());
                tracing::warn!(model = %r, error = %e, "reconcile failed");
            }
            ctx.failing.lock().unwrap().insert(r);
        }
    }
    result
}

fn error_policy(_model: Arc<Model>, err: &Error, _ctx: Arc<Context>) -> Action {
    if err.is_terminating() {
        Action::requeue(Duration::from_millis(500))
    } else {
        Action::requeue(Duration::from_secs(5))
    }
}

/// What about an occupant matters to its Model's status: pod, state, reservation.
type OccupantDigest = (String, &'static str, u64);

/// Triggers a Model when the occupants of a GPU it is placed on change state (not on
/// every stats update).
fn gpu_mapper(
    models: Store<Model>,
) -> impl Fn(GpuResource) -> Vec<ObjectRef<Model>> + Send + Sync + 'static {
    let seen: Mutex<HashMap<String, Vec<OccupantDigest>>> = Mutex::default();
    move |gpu| {
        let name = gpu.name_any();
        let digest: Vec<OccupantDigest> = gpu
            .status
            .as_ref()
            .map(|s| {
                s.occupants
                    .iter()
                    .map(|o| {
                        (
                            o.pod_name.clone(),
                            o.state.as_str(),
                            o.reserved_memory_bytes,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let previous = seen.lock().unwrap().insert(name.clone(), digest.clone());
        if previous.as_ref() == Some(&digest) {
            return Vec::new();
        }
        // The Models placed here (by their status), and the Models of the occupants that
        // changed (by pod name: their status may not name this GPU yet).
        let changed: Vec<&str> = digest
            .iter()
            .filter(|d| !previous.as_ref().is_some_and(|p| p.contains(d)))
            .chain(previous.iter().flatten().filter(|p| !digest.contains(p)))
            .map(|d| d.0.as_str())
            .collect();
        models
            .state()
            .iter()
            .map(|m| &**m)
            .filter(|m| {
                let (model, ns) = (m.name_any(), m.namespace().unwrap_or_default());
                m.status.as_ref().is_some_and(|s| s.gpus.contains(&name))
                    || changed.iter().any(|key| {
                        key.split_once('/').is_some_and(|(pod_ns, pod)| {
                            pod_ns == ns && plan::replica_index(&model, pod).is_some()
                        })
                    })
            })
            .map(ObjectRef::from_obj)
            .collect()
    }
}

/// Runs the Model controller and the periodic ledger sweep until the future is dropped.
pub async fn run(ctx: Arc<Context>, models_namespace: Option<String>) {
    let client = ctx.client.clone();
    let (models, pods, services): (Api<Model>, Api<Pod>, Api<Service>) = match &models_namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let gpus: Api<GpuResource> = Api::namespaced(client.clone(), &ctx.settings.gpu_namespace);
    let controller = Controller::new(models.clone(), watcher::Config::default().any_semantic());
    let store = controller.store();
    let _ = ctx.models.set(store.clone());
    // A Model's names are what its neighbors' adapters must not repeat: when one changes,
    // the namespace's Models with adapters look again (their AdapterNames condition).
    let neighbors_with_adapters = {
        let store = store.clone();
        move |m: Model| {
            let (ns, name) = (m.namespace(), m.name_any());
            store
                .state()
                .iter()
                .filter(|o| o.namespace() == ns && o.name_any() != name)
                .filter(|o| !o.spec.adapters.is_empty())
                .map(|o| ObjectRef::from_obj(&**o))
                .collect::<Vec<_>>()
        }
    };
    let children = watcher::Config::default().labels(&model_pods_selector());
    let controller = controller
        .owns(pods, children.clone())
        .owns(services, children)
        .watches(gpus, watcher::Config::default(), gpu_mapper(store.clone()))
        .watches(models, watcher::Config::default(), neighbors_with_adapters);

    let sweeper = {
        let ctx = ctx.clone();
        let store = store.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                ctx.metrics.set_depth("model", ctx.pending(&store));
                // A sweep for pods whose Model is gone too (their owners no longer reconcile).
                if n.is_multiple_of(RESYNC.as_secs()) {
                    let _ = sweep_ledger(&ctx).await;
                }
                n += 1;
            }
        }
    };
    let controller = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    tokio::select! {
        _ = controller => {}
        _ = sweeper => {}
    }
}
