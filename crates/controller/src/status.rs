//! A Model's status from what exists: its pods, and its occupants on the GPU records.
//! Pure: objects and the time in, status out.

use std::collections::BTreeSet;

use greenthread_api::{ByteSize, Gpu, Model, ModelStatus, OccupantState};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::render::GPUS_ANNOTATION;

/// Why a Model's replicas could not all be placed, if they could not.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem<'a> {
    pub reason: &'a str,
    pub message: String,
    /// `Failed` (nothing will change until the spec or the cluster does) or `Pending`.
    pub fatal: bool,
}

pub fn pod_gpus(pod: &Pod) -> Vec<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GPUS_ANNOTATION))
        .map(|s| {
            s.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_failed(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Failed")
}

/// Keeps a condition's transition time when its status did not change.
pub(crate) fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Whether `pod`'s weights are still coming: its `download` init container has not
/// finished.
pub fn downloading(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .is_some_and(|all| {
            all.iter().any(|c| {
                c.name == crate::render::DOWNLOAD_CONTAINER
                    && c.state.as_ref().is_some_and(|s| s.terminated.is_none())
            })
        })
}

pub fn model_status(
    model: &Model,
    pods: &[Pod],
    gpus: &[Gpu],
    downloads: &std::collections::BTreeMap<String, greenthread_api::DownloadStatus>,
    problem: Option<&Problem>,
    now: Timestamp,
) -> ModelStatus {
    let name = model.metadata.name.clone().unwrap_or_default();
    let namespace = model.metadata.namespace.clone().unwrap_or_default();
    let generation = model.metadata.generation;
    let previous = model
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    // The ledger knows pods as `namespace/name` (the Model's pods live in its namespace).
    let pod_keys: BTreeSet<String> = live
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .map(|p| greenthread_api::ledger_key(&namespace, p))
        .collect();
    // A pod's state is its occupant's; with tensor parallelism every GPU has one, alike.
    let mut states: std::collections::BTreeMap<&str, OccupantState> = Default::default();
    let mut serving_memory = 0u64;
    for g in gpus {
        for o in &g.status.occupants {
            if let Some(pod) = pod_keys.get(o.pod_name.as_str()) {
                states.insert(pod, o.state);
                serving_memory = serving_memory.max(o.reserved_memory_bytes);
            }
        }
    }
    let count = |s: OccupantState| states.values().filter(|v| **v == s).count() as i32;
    let ready = live.iter().filter(|p| pod_ready(p)).count() as i32;
    let failed: Vec<&str> = live
        .iter()
        .filter(|p| pod_failed(p))
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    let nodes: BTreeSet<String> = live
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    let placed: BTreeSet<String> = live.iter().flat_map(|p| pod_gpus(p)).collect();
    // Pods whose weights are still coming: the `download` init container not done.
    let downloading: Vec<&str> = live
        .iter()
        .filter(|p| downloading(p))
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    let wanted = model.spec.replicas as i32;

    let (phase, reason, message) = if let Some(p) = problem.filter(|p| p.fatal) {
        ("Failed", p.reason.to_string(), p.message.clone())
    } else if !failed.is_empty() {
        (
            "Failed",
            "PodFailed".to_string(),
            format!("pods failed: {}", failed.join(", ")),
        )
    } else if ready >= wanted {
        (
            "Ready",
            "AllReplicasReady".to_string(),
            format!("{ready} of {wanted} replicas ready"),
        )
    } else if !downloading.is_empty() {
        let progress: Vec<String> = downloading
            .iter()
            .map(|pod| match downloads.get(*pod) {
                Some(d) => format!(
                    "{pod} {:.2} of {:.2} GiB",
                    d.downloaded_bytes as f64 / ByteSize::GI as f64,
                    d.total_bytes as f64 / ByteSize::GI as f64
                ),
                None => pod.to_string(),
            })
            .collect();
        (
            "Downloading",
            "DownloadingWeights".to_string(),
            format!(
                "downloading weights into the node's cache: {} (kubectl logs POD -c download shows the progress)",
                progress.join(", ")
            ),
        )
    } else if let Some(p) = problem {
        ("Pending", p.reason.to_string(), p.message.clone())
    } else {
        (
            "Pending",
            "ReplicasNotReady".to_string(),
            format!("{ready} of {wanted} replicas ready"),
        )
    };
    let scheduled = problem.is_none();
    let conditions = vec![
        condition(
            &previous,
            "Ready",
            phase == "Ready",
            &reason,
            message,
            generation,
            now,
        ),
        condition(
            &previous,
            "Scheduled",
            scheduled,
            problem.map_or("Placed", |p| p.reason),
            problem.map_or_else(
                || format!("{} replicas placed on {}", live.len(), join(&placed)),
                |p| p.message.clone(),
            ),
            generation,
            now,
        ),
    ];
    ModelStatus {
        phase: Some(phase.into()),
        observed_generation: generation,
        replicas: live.len() as i32,
        ready_replicas: ready,
        serving_replicas: count(OccupantState::Serving),
        sleeping_replicas: count(OccupantState::Sleeping),
        node: (!nodes.is_empty()).then(|| join(&nodes)),
        gpus: placed.into_iter().collect(),
        // A sleeping engine reserves nothing: the last measurement stands until the next.
        serving_memory_per_gpu: if serving_memory > 0 {
            Some(ByteSize(serving_memory.div_ceil(ByteSize::MI) * ByteSize::MI).to_string())
        } else {
            model
                .status
                .as_ref()
                .and_then(|s| s.serving_memory_per_gpu.clone())
        },
        url: Some(format!("http://{name}.{namespace}.svc")),
        download: (phase == "Downloading")
            .then(|| {
                let mut sum = greenthread_api::DownloadStatus::default();
                for d in downloading.iter().filter_map(|p| downloads.get(*p)) {
                    sum.downloaded_bytes += d.downloaded_bytes;
                    sum.total_bytes += d.total_bytes;
                }
                (sum.total_bytes > 0).then_some(sum)
            })
            .flatten(),
        selector: Some(format!("{}={name}", crate::render::MODEL_LABEL)),
        conditions,
    }
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use greenthread_api::{GpuSpec, GpuStatus, ModelSpec, Occupant};
    use serde_json::json;

    use super::*;

    fn model(replicas: u32) -> Model {
        let spec: ModelSpec =
            serde_json::from_value(json!({"modelName": "org/m", "replicas": replicas})).unwrap();
        let mut m = Model::new("m", spec);
        m.metadata.namespace = Some("ns".into());
        m.metadata.generation = Some(3);
        m
    }

    fn pod(name: &str, gpu: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {GPUS_ANNOTATION: gpu}},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .unwrap()
    }

    fn gpu(name: &str, occupants: Vec<(&str, OccupantState, u64)>) -> Gpu {
        Gpu {
            name: name.into(),
            spec: GpuSpec {
                node: "node-a".into(),
                index: 0,
                uuid: "u".into(),
                product: "H100".into(),
                memory_bytes: 80 << 30,
                host_memory_bytes: None,
            },
            status: GpuStatus {
                occupants: occupants
                    .into_iter()
                    .map(|(p, state, reserved)| Occupant {
                        pod_name: p.into(),
                        model_name: "org/m".into(),
                        state,
                        reserved_memory_bytes: reserved,
                        residual_memory_bytes: 0,
                        popular: false,
                        priority: Default::default(),
                        last_accessed: None,
                        became_serving_at: None,
                        min_runtime: Default::default(),
                        heartbeat: jiff::Timestamp::now(),
                        in_flight: 0,
                        draining: 0,
                        recent_requests: 0,
                        host_memory_bytes: 0,
                        pinned: false,
                    })
                    .collect(),
                ..Default::default()
            },
            resource_version: "1".into(),
        }
    }

    #[test]
    fn a_model_whose_weights_are_downloading_says_so() {
        let mut downloading = pod("m-0", "n-0", false);
        downloading.status.as_mut().unwrap().init_container_statuses = Some(vec![
            serde_json::from_value(serde_json::json!({
                "name": "download", "image": "greenthread", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"running": {}},
            }))
            .unwrap(),
        ]);
        let s = model_status(
            &model(1),
            &[downloading.clone()],
            &[],
            &Default::default(),
            None,
            Timestamp::now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Downloading"));
        assert!(
            s.conditions[0].message.contains("m-0"),
            "{:?}",
            s.conditions[0]
        );
        assert_eq!(s.download, None, "no progress read yet");
        // With the progress its download container logged: the bytes, in the status.
        let progress = greenthread_api::DownloadStatus {
            downloaded_bytes: 3 << 29,
            total_bytes: 6 << 30,
        };
        let s = model_status(
            &model(1),
            &[downloading.clone()],
            &[],
            &[("m-0".to_string(), progress)].into(),
            None,
            Timestamp::now(),
        );
        assert_eq!(s.download, Some(progress));
        assert!(
            s.conditions[0].message.contains("m-0 1.50 of 6.00 GiB"),
            "{:?}",
            s.conditions[0]
        );
        // Done downloading: pending like any pod that is not ready yet.
        downloading.status.as_mut().unwrap().init_container_statuses = Some(vec![
            serde_json::from_value(serde_json::json!({
                "name": "download", "image": "greenthread", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0}},
            }))
            .unwrap(),
        ]);
        let s = model_status(
            &model(1),
            &[downloading],
            &[],
            &Default::default(),
            None,
            Timestamp::now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Pending"));
    }

    #[test]
    fn counts_come_from_pods_and_occupants() {
        let pods = [pod("m-0", "node-a-0", true), pod("m-1", "node-a-1", false)];
        let gpus = [
            gpu(
                "node-a-0",
                vec![("ns/m-0", OccupantState::Serving, 21 << 30)],
            ),
            gpu(
                "node-a-1",
                vec![
                    ("ns/m-1", OccupantState::Sleeping, 0),
                    ("ns/other-0", OccupantState::Serving, 9),
                    // Another tenant's pod of the same name is not ours.
                    ("team-b/m-1", OccupantState::Serving, 9),
                ],
            ),
        ];
        let s = model_status(
            &model(2),
            &pods,
            &gpus,
            &Default::default(),
            None,
            Timestamp::now(),
        );
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(
            (
                s.replicas,
                s.ready_replicas,
                s.serving_replicas,
                s.sleeping_replicas
            ),
            (2, 1, 1, 1)
        );
        assert_eq!(s.gpus, ["node-a-0", "node-a-1"]);
        assert_eq!(s.node.as_deref(), Some("node-a"));
        assert_eq!(s.serving_memory_per_gpu.as_deref(), Some("21Gi"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.url.as_deref(), Some("http://m.ns.svc"));
        // What `/scale` gives an autoscaler: the selector of exactly these pods.
        assert_eq!(s.selector.as_deref(), Some("greenthread.ai/model=m"));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ReplicasNotReady")
        );
    }

    #[test]
    fn a_fatal_placement_problem_fails_the_model_and_transition_times_stick() {
        let problem = Problem {
            reason: "Unschedulable",
            message: "no node has 8 GPUs".into(),
            fatal: true,
        };
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let mut m = model(1);
        let s = model_status(&m, &[], &[], &Default::default(), Some(&problem), t0);
        assert_eq!(s.phase.as_deref(), Some("Failed"));
        let sched = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Scheduled")
            .unwrap();
        assert_eq!(
            (sched.status.as_str(), sched.reason.as_str()),
            ("False", "Unschedulable")
        );
        // Unchanged condition: its transition time stays; a measured size is remembered.
        m.status = Some(ModelStatus {
            serving_memory_per_gpu: Some("7Gi".into()),
            ..s
        });
        let later = model_status(
            &m,
            &[],
            &[],
            &Default::default(),
            Some(&problem),
            Timestamp::now(),
        );
        let again = later
            .conditions
            .iter()
            .find(|c| c.type_ == "Scheduled")
            .unwrap();
        assert_eq!(again.last_transition_time, Time(t0));
        assert_eq!(later.serving_memory_per_gpu.as_deref(), Some("7Gi"));
    }
}
