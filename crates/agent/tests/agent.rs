//! The agent against the fake API server with a fake GPU source: GPU objects created
//! once and corrected when the hardware differs, statistics written (and nothing else),
//! metrics under our names and, when asked, the DCGM exporter's.

use std::sync::Arc;

use greenthread_agent::Agent;
use greenthread_api::{GpuResource, GpuStats};
use greenthread_gpu::{FakeSource, GpuSource};
use greenthread_test_support::{Exposition, FakeApiServer};
use kube::{
    Api,
    api::{Patch, PatchParams},
};

const GI: u64 = 1 << 30;

#[tokio::test]
async fn gpu_objects_follow_the_hardware_and_carry_its_statistics() {
    let server = FakeApiServer::start().await;
    let source = Arc::new(FakeSource::new(2, 80 * GI));
    let agent = Agent::new(
        server.client(),
        "gt",
        "node-a",
        source.clone(),
        true,
        greenthread_api::HostBudget::Bytes(64 * GI),
    )
    .await
    .unwrap();
    assert_eq!(
        agent.sync_objects().await.unwrap(),
        ["node-a-0", "node-a-1"]
    );
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let g1 = api.get("node-a-1").await.unwrap();
    assert_eq!(
        (g1.spec.node.as_str(), g1.spec.index, g1.spec.uuid.as_str()),
        ("node-a", 1, "GPU-fake-0001")
    );
    assert_eq!(g1.spec.memory_bytes, 80 * GI);
    // The sleepers' host memory, shared evenly between the node's GPUs.
    assert_eq!(g1.spec.host_memory_bytes, Some(32 * GI));

    // A spec edited away from the hardware is put back; a second sync creates nothing.
    let wrong = serde_json::json!({"spec": {"memoryBytes": 1}});
    api.patch("node-a-1", &PatchParams::default(), &Patch::Merge(&wrong))
        .await
        .unwrap();
    let posts = server.store.requests("POST");
    agent.sync_objects().await.unwrap();
    assert_eq!(
        api.get("node-a-1").await.unwrap().spec.memory_bytes,
        80 * GI
    );
    assert_eq!(
        server.store.requests("POST"),
        posts,
        "nothing created twice"
    );

    // Statistics: into each object's status and the metrics.
    let stats = GpuStats {
        used_memory_bytes: 3 * GI,
        free_memory_bytes: 77 * GI,
        utilization_percent: 40.0,
        temperature_celsius: 61.0,
        power_watts: 250.0,
    };
    source.set_stats(0, stats.clone());
    agent.report_stats().await.unwrap();
    let g0 = api.get("node-a-0").await.unwrap();
    assert_eq!(g0.status.unwrap().stats, Some(stats));
    assert_eq!(
        api.get("node-a-1").await.unwrap().status.unwrap().stats,
        Some(source.stats(1).unwrap())
    );
    let m = Exposition::parse(&agent.encode_metrics()).unwrap();
    assert_eq!(
        m.value(
            "gthread_gpu_memory_used_bytes",
            &[("gpu", "0"), ("node", "node-a")]
        ),
        Some((3 * GI) as f64)
    );
    assert_eq!(
        m.value(
            "DCGM_FI_DEV_FB_USED",
            &[
                ("gpu", "0"),
                ("UUID", "GPU-fake-0000"),
                ("Hostname", "node-a")
            ]
        ),
        Some(3.0 * 1024.0)
    );
    assert_eq!(
        m.value(
            "DCGM_FI_DEV_GPU_TEMP",
            &[("gpu", "0"), ("modelName", "Fake GPU")]
        ),
        Some(61.0)
    );
    // The node's host memory, the sleepers' budget and what they hold (nobody yet).
    let node = [("node", "node-a")];
    assert!(m.value("gthread_host_memory_total_bytes", &node).unwrap() > 0.0);
    assert_eq!(
        m.value("gthread_host_memory_sleepers_budget_bytes", &node),
        Some((64 * GI) as f64)
    );
    assert_eq!(
        m.value("gthread_host_memory_sleepers_bytes", &node),
        Some(0.0)
    );
}

#[tokio::test]
async fn without_dcgm_names_only_ours_are_exposed() {
    let server = FakeApiServer::start().await;
    let agent = Agent::new(
        server.client(),
        "gt",
        "node-b",
        Arc::new(FakeSource::new(1, 80 * GI)),
        false,
        greenthread_api::HostBudget::Off,
    )
    .await
    .unwrap();
    agent.sync_objects().await.unwrap();
    agent.report_stats().await.unwrap();
    let text = agent.encode_metrics();
    assert!(text.contains("gthread_gpu_memory_total_bytes"), "{text}");
    assert!(!text.contains("DCGM_"), "{text}");
}
