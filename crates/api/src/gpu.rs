//! The per-GPU record the sidecars share: who occupies the GPU, who wants it, and who
//! is waking on it. The same shape is the `GPU` custom resource's spec and status.

use std::time::Duration;

use jiff::Timestamp;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Identity and capacity of one physical (or simulated) GPU: the `GPU` resource's spec,
/// one object per GPU named `<node>-<index>`, created and reported by the agent.
#[derive(
    CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema,
)]
#[kube(
    group = "greenthread.ai",
    version = "v1alpha1",
    kind = "GPU",
    root = "GpuResource",
    plural = "gpus",
    namespaced,
    status = "GpuStatus",
    printcolumn = r#"{"name":"NODE","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"INDEX","type":"integer","jsonPath":".spec.index"}"#,
    printcolumn = r#"{"name":"PRODUCT","type":"string","jsonPath":".spec.product"}"#,
    printcolumn = r#"{"name":"AVAILABLE","type":"integer","format":"int64","jsonPath":".status.availableMemoryBytes"}"#,
    printcolumn = r#"{"name":"OCCUPANTS","type":"string","jsonPath":".status.occupants[*].modelName"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    pub node: String,
    pub index: u32,
    #[serde(default)]
    pub uuid: String,
    #[serde(default)]
    pub product: String,
    pub memory_bytes: u64,
    /// This GPU's share of its node's host memory for level-1 sleepers (the node's
    /// budget divided evenly among its GPUs, so that each record decides alone, by
    /// compare-and-swap); absent: host memory is not accounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_memory_bytes: Option<u64>,
}

impl GpuSpec {
    /// One GPU's even share of its node's host memory for sleepers (`node`, `None`: not
    /// accounted) among the node's `gpus`.
    pub fn host_share(node: Option<u64>, gpus: usize) -> Option<u64> {
        node.map(|b| b / gpus.max(1) as u64)
    }
}

/// Measured device statistics, as NVML (or the simulator) reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuStats {
    pub used_memory_bytes: u64,
    pub free_memory_bytes: u64,
    pub utilization_percent: f64,
    pub temperature_celsius: f64,
    pub power_watts: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OccupantState {
    Serving,
    Sleeping,
    Waking,
}

impl OccupantState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Sleeping => "sleeping",
            Self::Waking => "waking",
        }
    }
}

/// One model pod's presence on a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Occupant {
    pub pod_name: String,
    pub model_name: String,
    pub state: OccupantState,
    /// Memory claimed while serving or waking.
    pub reserved_memory_bytes: u64,
    /// Memory a sleeping engine still holds, as measured after it went to sleep.
    #[serde(default)]
    pub residual_memory_bytes: u64,
    /// Host memory the engine holds for this GPU: its weights while asleep at level 1,
    /// and at all times once a `pinned` model has them there.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub host_memory_bytes: u64,
    /// `staging.pinned`: the host memory it holds is kept across wakes, so that it
    /// always sleeps at level 1 (never sent to level 2 for lack of host memory).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    #[serde(default)]
    pub popular: bool,
    /// The Model's priority class (absent: standard).
    #[serde(default, skip_serializing_if = "crate::Priority::is_standard")]
    pub priority: crate::Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub last_accessed: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub became_serving_at: Option<Timestamp>,
    #[serde(with = "humantime_serde", default)]
    #[schemars(with = "String")]
    pub min_runtime: Duration,
    #[schemars(with = "String")]
    pub heartbeat: Timestamp,
    /// Requests in flight at its last report (0: idle, nothing to drain).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub in_flight: u32,
    /// Of those, the ones a preemption cannot stop (answers already stopped once, and
    /// requests that cannot be continued): they must finish before it sleeps.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub draining: u32,
    /// Requests that arrived in the ten minutes before its last report: how much it
    /// would be missed asleep.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recent_requests: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// A waker's declaration that it needs memory on this GPU and may preempt for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreemptionIntent {
    pub pod_name: String,
    pub model_name: String,
    pub needed_bytes: u64,
    #[schemars(with = "String")]
    pub since: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub victim_pod_name: Option<String>,
}

/// One waker per GPU at a time; the lock lapses if its holder stops heartbeating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WakeLock {
    pub pod_name: String,
    #[schemars(with = "String")]
    pub since: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<GpuStats>,
    #[serde(default)]
    pub occupants: Vec<Occupant>,
    #[serde(default)]
    pub preemption_intents: Vec<PreemptionIntent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_lock: Option<WakeLock>,
    /// `memoryBytes` − Σ reserved (serving, waking) − Σ residual (sleeping), kept up to
    /// date on every ledger write for `kubectl get gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory_bytes: Option<u64>,
}

impl GpuStatus {
    pub fn occupant(&self, pod: &str) -> Option<&Occupant> {
        self.occupants.iter().find(|o| o.pod_name == pod)
    }

    pub fn occupant_mut(&mut self, pod: &str) -> Option<&mut Occupant> {
        self.occupants.iter_mut().find(|o| o.pod_name == pod)
    }
}

/// A GPU record as a ledger stores it: name, spec, status and the version that a
/// compare-and-swap must present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    pub name: String,
    pub spec: GpuSpec,
    pub status: GpuStatus,
    pub resource_version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_serializes_with_the_resource_field_names() {
        let status = GpuStatus {
            stats: None,
            occupants: vec![Occupant {
                pod_name: "llama-0".into(),
                model_name: "llama".into(),
                state: OccupantState::Serving,
                reserved_memory_bytes: 10,
                residual_memory_bytes: 0,
                popular: false,
                priority: Default::default(),
                last_accessed: None,
                became_serving_at: None,
                min_runtime: Duration::from_secs(10),
                heartbeat: "2026-01-01T00:00:00Z".parse().unwrap(),
                in_flight: 0,
                draining: 0,
                recent_requests: 0,
                host_memory_bytes: 0,
                pinned: false,
            }],
            preemption_intents: vec![],
            wake_lock: None,
            available_memory_bytes: None,
        };
        let json = serde_json::to_value(&status).unwrap();
        let occ = &json["occupants"][0];
        assert_eq!(occ["podName"], "llama-0");
        assert_eq!(occ["state"], "serving");
        assert_eq!(occ["reservedMemoryBytes"], 10);
        assert_eq!(occ["minRuntime"], "10s");
        let back: GpuStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
