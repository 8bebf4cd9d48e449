//! What one reconcile of a Model does, decided from what exists. Pure: the Model, a
//! snapshot of the world and the time in; the pods to delete and to create (placed and
//! rendered), the Service, the status out. [`crate::reconcile`] reads the world, then
//! carries the plan out.
//!
//! The steps: [`validate`] (the spec, and what this installation lets it run), then
//! [`plan`] (scale down, place and render the missing replicas, status).

use std::collections::{BTreeMap, BTreeSet};

use greenthread_api::{ByteSize, EngineKind, Gpu, GpuSpec, Model, ModelStatus, ValidModel};
use k8s_openapi::{
    api::core::v1::{Pod, Service},
    jiff::Timestamp,
};
use kube::ResourceExt;

use crate::{
    placement::{self, PlacementError},
    render::{self, MEMORY_ANNOTATION, Settings},
    status::{self, Problem},
};

/// What a reconcile reads before it decides.
#[derive(Debug, Clone, Copy)]
pub struct World<'a> {
    /// Every GPU record, as of the snapshot.
    pub gpus: &'a [Gpu],
    /// Every model pod in the cluster, all Models', terminating ones too (their sidecars
    /// still hold memory), listed after the GPU records.
    pub pods: &'a [Pod],
    /// The nodes the Model's `nodeSelector` allows; `None`: any.
    pub nodes: Option<&'a BTreeSet<String>>,
    /// The Models of the Model's namespace (itself among them or not), whose names and
    /// adapters its adapters must not repeat.
    pub neighbors: &'a [std::sync::Arc<Model>],
    /// The weights' download progress of pods whose `download` init container runs, by
    /// pod name (read from its log).
    pub downloads: &'a std::collections::BTreeMap<String, greenthread_api::DownloadStatus>,
}

/// A replica to create, and the GPU records placement chose for it.
#[derive(Debug, Clone)]
pub struct NewPod {
    pub pod: Pod,
    pub gpus: Vec<String>,
}

/// What to do, in the order to do it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The Model's pods to delete (replicas beyond the spec's count), by name.
    pub delete: Vec<String>,
    /// Whether the engine's API key Secret must exist before the pods are created.
    pub engine_key: bool,
    pub create: Vec<NewPod>,
    pub service: Service,
    /// The ConfigMap with the Model's adapters, for Models with LoRA on.
    pub adapters: Option<k8s_openapi::api::core::v1::ConfigMap>,
    /// Why not every replica could be placed, if so.
    pub problem: Option<Problem<'static>>,
    /// The status once the plan is carried out.
    pub status: ModelStatus,
}

/// The spec checked, and checked against what this installation can run: an invalid spec
/// or a forbidden image is a fatal problem, reported as the Model's condition.
pub fn validate(model: &Model, settings: &Settings) -> Result<ValidModel, Problem<'static>> {
    let valid = model.spec.validate("spec").map_err(|errors| Problem {
        reason: "InvalidSpec",
        message: render::InvalidSpec(errors).to_string(),
        fatal: true,
    })?;
    // A process engine's command lives in its own image: without one there is nothing to run.
    if model.spec.engine == EngineKind::Process && model.spec.image.is_none() {
        return Err(Problem {
            reason: "ImageRequired",
            message:
                "engine process on Kubernetes needs spec.image: the image that has spec.command"
                    .into(),
            fatal: true,
        });
    }
    let image = render::engine_image(model, settings);
    if !render::image_allowed(&image, &settings.allowed_images) {
        return Err(Problem {
            reason: "ImageNotAllowed",
            message: format!(
                "image {image:?} is not among the images this installation allows (controller.allowedImages: {})",
                settings.allowed_images.join(", ")
            ),
            fatal: true,
        });
    }
    Ok(valid)
}

/// The reconcile of `model` in `world`: scale down (replicas beyond the spec's count go),
/// then each missing replica placed where it packs best and rendered, then the status.
pub fn plan(model: &Model, world: &World, settings: &Settings, now: Timestamp) -> Plan {
    let name = model.name_any();
    let ns = model.namespace().unwrap_or_default();
    let uid = model.uid().unwrap_or_default();
    let replicas = model.spec.replicas;
    let owned = |p: &Pod| {
        p.owner_references().iter().any(|o| o.uid == uid) && p.metadata.deletion_timestamp.is_none()
    };
    let mut mine: Vec<Pod> = world
        .pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && owned(p))
        .cloned()
        .collect();
    let keep = |p: &Pod| replica_index(&name, &p.name_any()).is_some_and(|i| i < replicas);
    let mut delete: Vec<String> = mine
        .iter()
        .filter(|p| !keep(p))
        .map(|p| p.name_any())
        .collect();
    mine.retain(keep);

    let mut create = Vec::new();
    let valid = validate(model, settings);
    let runnable = valid.is_ok();
    let problem = match valid {
        Err(problem) => Some(problem),
        Ok(valid) => {
            if let Some(old) = outdated(model, &valid, &mine, world.gpus, settings) {
                delete.push(old.clone());
                mine.retain(|p| p.name_any() != old);
            }
            place_missing(model, &valid, world, settings, &mut mine, &mut create)
        }
    };
    let mut status = status::model_status(
        model,
        &mine,
        world.gpus,
        world.downloads,
        problem.as_ref(),
        now,
    );
    if !model.spec.adapters.is_empty() {
        status
            .conditions
            .push(adapter_names(model, world.neighbors, now));
    }
    Plan {
        delete,
        engine_key: runnable && render::takes_engine_key(model),
        create,
        service: render::render_service(model),
        adapters: runnable
            .then(|| render::render_adapters_config_map(model))
            .flatten(),
        problem,
        status,
    }
}

/// The replica to roll now, if any: one whose pod was rendered from another spec than
/// its Model renders now on the same GPUs (`kubectl apply` of a changed spec, a new
/// image), deleted so that the next reconcile creates it anew — its sidecar drains it
/// first, within the pod's grace period. One at a time, and only while every other
/// replica is ready, so that a Model with several replicas keeps serving. Pods made
/// before their spec was summed up are left as they are.
fn outdated(
    model: &Model,
    valid: &ValidModel,
    mine: &[Pod],
    gpus: &[Gpu],
    settings: &Settings,
) -> Option<String> {
    let name = model.name_any();
    let stale = mine.iter().find(|p| {
        let Some(had) = p.annotations().get(render::SPEC_HASH_ANNOTATION) else {
            return false;
        };
        let Some(replica) = replica_index(&name, &p.name_any()) else {
            return false;
        };
        let on: Option<Vec<GpuSpec>> = status::pod_gpus(p)
            .iter()
            .map(|g| gpus.iter().find(|r| &r.name == g).map(|r| r.spec.clone()))
            .collect();
        let Some(on) = on.filter(|on| !on.is_empty()) else {
            return false;
        };
        let now = render::render_valid_pod(model, valid, replica, &on, settings);
        now.annotations().get(render::SPEC_HASH_ANNOTATION) != Some(had)
    })?;
    let others_ready = mine
        .iter()
        .filter(|p| p.name_any() != stale.name_any())
        .all(status::pod_ready);
    others_ready.then(|| stale.name_any())
}

/// The `AdapterNames` condition: whether each of the Model's adapters names it alone in
/// its namespace. A clash is not resolved by a silent pick: the API server refuses the
/// name as ambiguous until it is fixed.
fn adapter_names(
    model: &Model,
    neighbors: &[std::sync::Arc<Model>],
    now: Timestamp,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let name = model.name_any();
    let ns = model.namespace();
    let mut models: Vec<(String, &greenthread_api::ModelSpec)> = vec![(name.clone(), &model.spec)];
    models.extend(
        neighbors
            .iter()
            .filter(|m| m.namespace() == ns && m.name_any() != name)
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .map(|m| (m.name_any(), &m.spec)),
    );
    let named: Vec<(&str, &greenthread_api::ModelSpec)> =
        models.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let clashes: Vec<String> = greenthread_api::adapter_clashes(&named)
        .into_iter()
        .filter(|(i, _, _)| *i == 0)
        .map(|(_, _, clash)| clash)
        .collect();
    let previous = model
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let (reason, message) = if clashes.is_empty() {
        (
            "Unique",
            format!("{} adapters, each named alone", model.spec.adapters.len()),
        )
    } else {
        (
            "Clash",
            format!(
                "{}: requests naming them are refused as ambiguous until renamed",
                clashes.join("; ")
            ),
        )
    };
    status::condition(
        &previous,
        "AdapterNames",
        clashes.is_empty(),
        reason,
        message,
        model.metadata.generation,
        now,
    )
}

/// Places and renders each replica missing from `mine` (adding it there); the first that
/// cannot be placed stops the rest and is the problem.
fn place_missing(
    model: &Model,
    valid: &ValidModel,
    world: &World,
    settings: &Settings,
    mine: &mut Vec<Pod>,
    create: &mut Vec<NewPod>,
) -> Option<Problem<'static>> {
    let name = model.name_any();
    let by_name: BTreeMap<&str, &Gpu> = world.gpus.iter().map(|g| (g.name.as_str(), g)).collect();
    let mut placed = placed_bytes(world.pods, world.gpus);
    let need = |g: &Gpu| need_on(model, valid, g);
    for replica in 0..model.spec.replicas {
        let pod_name = format!("{name}-{replica}");
        if mine.iter().any(|p| p.name_any() == pod_name) {
            continue;
        }
        let same_model: BTreeSet<String> = mine.iter().flat_map(status::pod_gpus).collect();
        let chosen = match placement::place(
            world.gpus,
            &placement::Request {
                gpus: valid.spec.gpus_per_replica(),
                // The node selector holds it (and GPU feature discovery's label decides).
                product: None,
                need: &need,
                placed: &placed,
                same_model: &same_model,
                nodes: world.nodes,
            },
        ) {
            Ok(chosen) => chosen,
            Err(e) => {
                return Some(Problem {
                    reason: e.reason(),
                    fatal: matches!(e, PlacementError::NoNodeFits { .. }),
                    message: e.to_string(),
                });
            }
        };
        let specs: Vec<GpuSpec> = chosen
            .iter()
            .map(|n| by_name[n.as_str()].spec.clone())
            .collect();
        let mut pod = render::render_valid_pod(model, valid, replica, &specs, settings);
        let estimate = need(by_name[chosen[0].as_str()]);
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert(MEMORY_ANNOTATION.into(), estimate.to_string());
        for g in &chosen {
            *placed.entry(g.clone()).or_default() += estimate;
        }
        mine.push(pod.clone());
        create.push(NewPod { pod, gpus: chosen });
    }
    None
}

/// Bytes each GPU already has placed on it: measured reservations where a sidecar has
/// reported one, the placement-time estimate otherwise.
fn placed_bytes(pods: &[Pod], gpus: &[Gpu]) -> BTreeMap<String, u64> {
    let by_name: BTreeMap<&str, &Gpu> = gpus.iter().map(|g| (g.name.as_str(), g)).collect();
    let mut placed = BTreeMap::new();
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        // The ledger knows a pod as `namespace/name`.
        let key = greenthread_api::ledger_key(
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
        );
        let estimate = pod
            .annotations()
            .get(MEMORY_ANNOTATION)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        for gpu in status::pod_gpus(pod) {
            let measured = by_name
                .get(gpu.as_str())
                .and_then(|g| g.status.occupant(&key))
                .map(|o| o.reserved_memory_bytes)
                .filter(|b| *b > 0);
            *placed.entry(gpu).or_default() += measured.unwrap_or(estimate);
        }
    }
    placed
}

/// What the model needs on `gpu`: its measured serving memory once known, else the share
/// of the GPU the spec gives the engine.
fn need_on(model: &Model, valid: &ValidModel, gpu: &Gpu) -> u64 {
    let measured = model
        .status
        .as_ref()
        .and_then(|s| s.serving_memory_per_gpu.as_deref())
        .and_then(|v| v.parse::<ByteSize>().ok())
        .map(ByteSize::bytes);
    measured.unwrap_or_else(|| valid.share_of(gpu.spec.memory_bytes))
}

pub(crate) fn replica_index(model: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(model)?.strip_prefix('-')?.parse().ok()
}
