//! The node agent against the fake API server: GPU objects appear with measured stats,
//! a sidecar's occupant write racing with stats writes loses nothing, and the seed's
//! `kubectl get gpu` jsonpath prints every occupant of the objects read back.

use std::{sync::Arc, time::Duration};

use greenthread_agent::Agent;
use greenthread_api::{GpuResource, GpuStats, OccupantState};
use greenthread_gpu::FakeSource;
use greenthread_ledger::{KubeLedger, LedgerError, decide};
use greenthread_test_support::{FakeApiServer, SEED_GPU_JSONPATH, kubectl_jsonpath};
use kube::Api;

const GI: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_objects_appear_with_stats() {
    let server = FakeApiServer::start().await;
    let source = Arc::new(FakeSource::new(2, 80 * GI));
    source.set_stats(
        1,
        GpuStats {
            used_memory_bytes: 10 * GI,
            free_memory_bytes: 70 * GI,
            utilization_percent: 42.0,
            temperature_celsius: 55.0,
            power_watts: 300.0,
        },
    );
    let agent = Agent::new(
        server.client(),
        "gt",
        "node-a",
        source.clone(),
        true,
        greenthread_api::HostBudget::Off,
    )
    .await
    .unwrap();
    assert_eq!(
        agent.sync_objects().await.unwrap(),
        ["node-a-0", "node-a-1"]
    );
    agent.report_stats().await.unwrap();
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let g1 = api.get("node-a-1").await.unwrap();
    assert_eq!(
        (g1.spec.node.as_str(), g1.spec.index, g1.spec.memory_bytes),
        ("node-a", 1, 80 * GI)
    );
    let stats = g1.status.unwrap().stats.unwrap();
    assert_eq!(
        (stats.used_memory_bytes, stats.utilization_percent),
        (10 * GI, 42.0)
    );
    // Syncing again changes nothing; metrics carry the DCGM names.
    agent.sync_objects().await.unwrap();
    let text = agent.encode_metrics();
    assert!(
        text.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"1\"") && text.contains("DCGM_FI_DEV_FB_USED"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_occupant_write_racing_with_stats_writes_loses_nothing() {
    let server = FakeApiServer::start().await;
    let source = Arc::new(FakeSource::new(1, 80 * GI));
    let agent = Arc::new(
        Agent::new(
            server.client(),
            "gt",
            "node-a",
            source.clone(),
            false,
            greenthread_api::HostBudget::Off,
        )
        .await
        .unwrap(),
    );
    agent.sync_objects().await.unwrap();
    let sidecar_ledger = KubeLedger::new(server.client(), "gt").await.unwrap();

    let reporter = {
        let (agent, source) = (agent.clone(), source.clone());
        tokio::spawn(async move {
            for i in 0..60u64 {
                source.set_stats(
                    0,
                    GpuStats {
                        used_memory_bytes: i,
                        ..Default::default()
                    },
                );
                agent.report_stats().await.unwrap();
            }
        })
    };
    // Meanwhile sidecars register, claim and serve, by compare-and-swap on the same record.
    for p in 0..20 {
        let claim = decide::Claim {
            recent_requests: 0,
            pod: format!("pod-{p}"),
            model: format!("m{p}"),
            bytes: GI,
            popular: false,
            priority: Default::default(),
            min_runtime: Duration::ZERO,
        };
        greenthread_ledger::update(&sidecar_ledger, "node-a-0", &|| {}, |g| {
            let now = jiff::Timestamp::now();
            let claimed = decide::claim(&g.spec, &g.status, &claim, now)
                .map_err(|e| LedgerError::Backend(e.to_string()))?;
            Ok::<_, LedgerError>((
                Some(decide::mark_serving(&claimed, &claim.pod, now).unwrap()),
                (),
            ))
        })
        .await
        .unwrap();
    }
    reporter.await.unwrap();
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let status = api.get("node-a-0").await.unwrap().status.unwrap();
    assert_eq!(
        status.occupants.len(),
        20,
        "every occupant survived the stats writes"
    );
    assert!(
        status
            .occupants
            .iter()
            .all(|o| o.state == OccupantState::Serving)
    );
    assert_eq!(
        status.stats.unwrap().used_memory_bytes,
        59,
        "the last stats write survived the occupant writes"
    );
    assert_eq!(status.available_memory_bytes, Some(60 * GI));

    // The seed's query, applied offline by kubectl to the object read back.
    let object = serde_json::to_value(api.get("node-a-0").await.unwrap()).unwrap();
    let printed = kubectl_jsonpath(&object, SEED_GPU_JSONPATH);
    assert!(printed.starts_with("node-a-0: "), "{printed}");
    for p in 0..20 {
        assert!(
            printed.contains(&format!("m{p}(serving)")),
            "m{p} missing from {printed}"
        );
    }
}

/// A real `greenthread sidecar` process with `--ledger kube`: it finds its GPU object,
/// and its wake and sleep show in the object's occupants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_process_keeps_its_occupant_in_the_gpu_object() {
    let server = FakeApiServer::start().await;
    let agent = Agent::new(
        server.client(),
        "gt",
        "node-a",
        Arc::new(FakeSource::new(1, 80 * GI)),
        false,
        greenthread_api::HostBudget::Off,
    )
    .await
    .unwrap();
    agent.sync_objects().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, "gt");
    let sc = greenthread_test_support::SidecarProc::start_env(
        env!("CARGO_BIN_EXE_greenthread"),
        "kube-model",
        &[
            "--ledger",
            "kube",
            "--namespace",
            "gt",
            "--gpus",
            "node-a-0",
            "--memory-bytes",
            "2Gi",
        ],
        &[],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    let api: Api<GpuResource> = Api::namespaced(server.client(), "gt");
    let occupant_state = || async {
        let g = api.get("node-a-0").await.unwrap();
        g.status
            .unwrap_or_default()
            .occupant("kube-model-0")
            .map(|o| (o.state, o.reserved_memory_bytes))
    };
    assert_eq!(occupant_state().await, Some((OccupantState::Sleeping, 0)));
    assert_eq!(
        sc.chat("kube-model", 2, false)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        occupant_state().await,
        Some((OccupantState::Serving, 2 * GI))
    );
    assert_eq!(sc.admin("sleep").await.status(), 200);
    assert_eq!(occupant_state().await, Some((OccupantState::Sleeping, 0)));
    assert!(
        server
            .store
            .requests("PUT apis/greenthread.ai/v1alpha1/gpus/status")
            >= 3
    );
}

/// `greenthread gpus`: NVML's view as JSON where a driver is, a clean error naming what is
/// missing where none is (this CI machine), never a crash.
#[test]
fn the_gpus_command_reports_nvml_or_says_clearly_that_there_is_no_driver() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_greenthread"))
        .arg("gpus")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    // The outcome this machine must give, decided without NVML.
    if greenthread_gpu::nvml_library_present() {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gpus: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let gpus = gpus.as_array().unwrap();
        assert!(!gpus.is_empty(), "a driver and no GPU to test on");
        for g in gpus {
            assert!(g["memoryBytes"].as_u64().unwrap() > 0);
            assert!(g["stats"]["usedMemoryBytes"].is_u64());
        }
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr.contains("NVML is not available"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
