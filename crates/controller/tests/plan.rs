//! The controller's pure plan from the table in `data/plan_cases.yaml`: scale up and
//! down, a pod gone, full GPUs, node selectors, tensor parallelism, invalid specs and
//! refused images. No API server: the world is given, the plan is compared.

use std::collections::{BTreeMap, BTreeSet};

use greenthread_api::{Gpu, GpuSpec, GpuStatus, Model, ModelSpec, ModelStatus, Occupant};
use greenthread_controller::{
    plan::{World, plan},
    render::{GPUS_ANNOTATION, MEMORY_ANNOTATION, Settings},
    status::pod_gpus,
};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::json;

const GI: u64 = 1 << 30;
const NS: &str = "team-a";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    name: String,
    spec: serde_json::Value,
    #[serde(default)]
    serving_memory: Option<String>,
    #[serde(default)]
    allowed_images: Vec<String>,
    gpus: Vec<GpuRow>,
    #[serde(default)]
    pods: Vec<PodRow>,
    #[serde(default)]
    nodes: Option<BTreeSet<String>>,
    /// Other Models of the namespace: name to spec (over `modelName: org/<name>`).
    #[serde(default)]
    neighbors: BTreeMap<String, serde_json::Value>,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuRow {
    node: String,
    index: u32,
    /// GiB.
    memory: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PodRow {
    name: String,
    of: String,
    gpus: String,
    #[serde(default)]
    deleting: bool,
    #[serde(default)]
    estimate: u64,
    #[serde(default)]
    measured: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    create: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    problem: Option<String>,
    /// A piece of the problem's message.
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    phase: Option<String>,
    /// The Scheduled condition's reason.
    #[serde(default)]
    scheduled: Option<String>,
    #[serde(default)]
    engine_key: Option<bool>,
    /// The AdapterNames condition's reason (absent: no such condition).
    #[serde(default)]
    adapter_names: Option<String>,
    /// The adapters the ConfigMap lists (absent: no ConfigMap).
    #[serde(default)]
    adapters_config: Option<Vec<String>>,
}

fn uid(model: &str) -> String {
    format!("uid-of-{model}")
}

fn model(case: &Case) -> Model {
    let mut m = named_model("m", &case.spec);
    m.status = case.serving_memory.as_ref().map(|s| ModelStatus {
        serving_memory_per_gpu: Some(s.clone()),
        ..Default::default()
    });
    m
}

fn named_model(name: &str, over: &serde_json::Value) -> Model {
    let mut spec = json!({"modelName": format!("org/{name}")});
    for (k, v) in over.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let spec: ModelSpec = serde_json::from_value(spec).unwrap();
    let mut m = Model::new(name, spec);
    m.metadata.namespace = Some(NS.into());
    m.metadata.uid = Some(uid(name));
    m.metadata.generation = Some(1);
    m
}

fn pod(row: &PodRow) -> Pod {
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": row.name,
            "namespace": NS,
            "ownerReferences": [{"apiVersion": "greenthread.ai/v1alpha1", "kind": "Model",
                                 "name": row.of, "uid": uid(&row.of), "controller": true}],
            "annotations": {GPUS_ANNOTATION: row.gpus, MEMORY_ANNOTATION: (row.estimate * GI).to_string()},
        },
        "spec": {"containers": []},
    }))
    .unwrap();
    if row.deleting {
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(1_700_000_000).unwrap(),
        ));
    }
    p
}

fn gpus(case: &Case) -> Vec<Gpu> {
    case.gpus
        .iter()
        .map(|g| {
            let name = format!("{}-{}", g.node, g.index);
            let occupants = case
                .pods
                .iter()
                .filter(|p| p.gpus.split(',').any(|n| n == name))
                .filter_map(|p| {
                    Some(Occupant {
                        pod_name: greenthread_api::ledger_key(NS, &p.name),
                        model_name: p.of.clone(),
                        state: greenthread_api::OccupantState::Serving,
                        reserved_memory_bytes: p.measured? * GI,
                        residual_memory_bytes: 0,
                        popular: false,
                        priority: Default::default(),
                        last_accessed: None,
                        became_serving_at: None,
                        min_runtime: Default::default(),
                        heartbeat: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
                        in_flight: 0,
                        draining: 0,
                        recent_requests: 0,
                        host_memory_bytes: 0,
                        pinned: false,
                    })
                })
                .collect();
            Gpu {
                name,
                spec: GpuSpec {
                    node: g.node.clone(),
                    index: g.index,
                    uuid: format!("GPU-{}-{}", g.node, g.index),
                    product: "H100".into(),
                    memory_bytes: g.memory * GI,
                    host_memory_bytes: None,
                },
                status: GpuStatus {
                    occupants,
                    ..Default::default()
                },
                resource_version: "1".into(),
            }
        })
        .collect()
}

#[test]
fn plans_match_the_table() {
    let cases: Vec<Case> =
        serde_saphyr::from_str(include_str!("data/plan_cases.yaml")).expect("the table parses");
    assert!(cases.len() >= 15, "{} cases", cases.len());
    for case in &cases {
        let m = model(case);
        let gpus = gpus(case);
        let pods: Vec<Pod> = case.pods.iter().map(pod).collect();
        let settings = Settings {
            allowed_images: case.allowed_images.clone(),
            ..Settings::default()
        };
        let neighbors: Vec<std::sync::Arc<Model>> = case
            .neighbors
            .iter()
            .map(|(name, spec)| std::sync::Arc::new(named_model(name, spec)))
            .collect();
        let world = World {
            gpus: &gpus,
            pods: &pods,
            nodes: case.nodes.as_ref(),
            neighbors: &neighbors,
            downloads: &Default::default(),
        };
        let p = plan(
            &m,
            &world,
            &settings,
            Timestamp::from_second(1_800_000_000).unwrap(),
        );
        let what = &case.name;
        let e = &case.expect;

        let created: BTreeMap<String, Vec<String>> = p
            .create
            .iter()
            .map(|n| (n.pod.metadata.name.clone().unwrap(), n.gpus.clone()))
            .collect();
        assert_eq!(created, e.create, "{what}: created");
        for n in &p.create {
            // The rendered pod carries the placement it was planned with.
            assert_eq!(pod_gpus(&n.pod), n.gpus, "{what}: annotation");
            assert_eq!(n.pod.metadata.namespace.as_deref(), Some(NS), "{what}");
            assert_eq!(
                n.pod.metadata.owner_references.as_ref().unwrap()[0].uid,
                uid("m"),
                "{what}: owner"
            );
        }
        assert_eq!(p.delete, e.delete, "{what}: deleted");
        assert_eq!(
            p.problem.as_ref().map(|p| p.reason.to_string()),
            e.problem,
            "{what}: problem {:?}",
            p.problem
        );
        if let Some(piece) = &e.message {
            let message = &p.problem.as_ref().unwrap().message;
            assert!(message.contains(piece.as_str()), "{what}: {message}");
        }
        if let Some(phase) = &e.phase {
            assert_eq!(p.status.phase.as_ref(), Some(phase), "{what}: phase");
        }
        if let Some(reason) = &e.scheduled {
            let c = p.status.conditions.iter().find(|c| c.type_ == "Scheduled");
            assert_eq!(c.map(|c| &c.reason), Some(reason), "{what}: Scheduled");
        }
        // Replicas counted in the status are those kept plus those created.
        let kept = case
            .pods
            .iter()
            .filter(|r| r.of == "m" && !r.deleting && !e.delete.contains(&r.name))
            .count();
        assert_eq!(
            p.status.replicas as usize,
            kept + created.len(),
            "{what}: status replicas"
        );
        let c = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "AdapterNames");
        assert_eq!(
            c.map(|c| &c.reason),
            e.adapter_names.as_ref(),
            "{what}: AdapterNames {c:?}"
        );
        let listed = p.adapters.as_ref().map(|cm| {
            let json = &cm.data.as_ref().unwrap()["adapters.json"];
            let list: Vec<greenthread_api::AdapterSpec> = serde_json::from_str(json).unwrap();
            assert_eq!(cm.metadata.name.as_deref(), Some("m-adapters"), "{what}");
            list.into_iter().map(|a| a.name).collect::<Vec<_>>()
        });
        assert_eq!(listed, e.adapters_config, "{what}: adapters ConfigMap");
        let engine_key = e.engine_key.unwrap_or(true);
        assert_eq!(p.engine_key, engine_key, "{what}: engine key");
        assert_eq!(
            p.service.metadata.name.as_deref(),
            Some("m"),
            "{what}: service"
        );
    }
}

/// `kubectl apply` of a changed spec rolls the Model's pods: one replica at a time (the
/// others ready meanwhile), each deleted and created anew from the new spec; a pod of the
/// same spec, or one made before specs were summed up, stays.
#[test]
fn a_changed_spec_rolls_one_replica_at_a_time() {
    use greenthread_controller::render::SPEC_HASH_ANNOTATION;
    let gpus = vec![
        Gpu {
            name: "a-0".into(),
            spec: GpuSpec {
                node: "a".into(),
                index: 0,
                uuid: "GPU-a-0".into(),
                product: "H100".into(),
                memory_bytes: 80 * GI,
                host_memory_bytes: None,
            },
            status: GpuStatus::default(),
            resource_version: "1".into(),
        },
        Gpu {
            name: "a-1".into(),
            spec: GpuSpec {
                node: "a".into(),
                index: 1,
                uuid: "GPU-a-1".into(),
                product: "H100".into(),
                memory_bytes: 80 * GI,
                host_memory_bytes: None,
            },
            status: GpuStatus::default(),
            resource_version: "1".into(),
        },
    ];
    let settings = Settings::default();
    let now = Timestamp::from_second(1_800_000_000).unwrap();
    let model = named_model("m", &json!({"replicas": 2, "gpuMemoryUtilization": "0.4"}));
    let plan_with = |m: &Model, pods: &[Pod]| {
        plan(
            m,
            &World {
                gpus: &gpus,
                pods,
                nodes: None,
                neighbors: &[],
                downloads: &Default::default(),
            },
            &settings,
            now,
        )
    };
    let ready = |mut p: Pod| {
        p.status = Some(
            serde_json::from_value(json!({"conditions": [{"type": "Ready", "status": "True"}]}))
                .unwrap(),
        );
        p
    };
    let created: Vec<Pod> = plan_with(&model, &[])
        .create
        .into_iter()
        .map(|n| ready(n.pod))
        .collect();
    assert_eq!(created.len(), 2);
    assert!(created[0].annotations().contains_key(SPEC_HASH_ANNOTATION));
    // The same spec: nothing to do.
    let p = plan_with(&model, &created);
    assert!(p.delete.is_empty() && p.create.is_empty());
    // A new idle timeout: the first replica rolls, the second waits.
    let changed = named_model(
        "m",
        &json!({"replicas": 2, "gpuMemoryUtilization": "0.4", "sleep": {"idleTimeout": "1m"}}),
    );
    let p = plan_with(&changed, &created);
    assert_eq!(p.delete, ["m-0"]);
    let again: Vec<String> = p.create.iter().map(|n| n.pod.name_any()).collect();
    assert_eq!(again, ["m-0"]);
    let args = p.create[0].pod.spec.as_ref().unwrap().containers[1]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(args.contains("--idle-timeout 1m"), "{args}");
    // While the new m-0 is not ready, m-1 does not roll.
    let fresh = p.create[0].pod.clone();
    let p = plan_with(&changed, &[fresh.clone(), created[1].clone()]);
    assert!(p.delete.is_empty(), "{:?}", p.delete);
    // Once it is, m-1 rolls.
    let p = plan_with(&changed, &[ready(fresh), created[1].clone()]);
    assert_eq!(p.delete, ["m-1"]);
    // A pod without a sum is left alone.
    let mut old = created[0].clone();
    old.metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove(SPEC_HASH_ANNOTATION);
    let p = plan_with(&changed, &[old, created[1].clone()]);
    assert_eq!(p.delete, ["m-1"], "only the summed-up pod rolls");
}
