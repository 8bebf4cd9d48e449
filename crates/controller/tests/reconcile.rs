//! The controller against the fake API server, through the real `kube::Client`,
//! `Controller`, finalizer helper and Lease code: a Model becomes placed pods, a Service
//! and status; occupants of deleted pods leave the GPU records within one reconcile;
//! deleting a Model leaves nothing behind; of two replicas exactly one leads, and the
//! other takes over when the leader's Lease expires.

use std::{sync::Arc, time::Duration};

use greenthread_api::{GpuResource, GpuSpec, GpuStatus, Model, ModelSpec, Occupant, OccupantState};
use greenthread_controller::{
    ControllerConfig, ControllerMetrics, reconcile,
    render::{GPUS_ANNOTATION, Settings},
};
use greenthread_ledger::{KubeLedger, LedgerError};
use greenthread_test_support::{Exposition, FakeApiServer, wait_until};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Pod, Service},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use prometheus_client::registry::Registry;
use serde_json::json;

const GI: u64 = 1 << 30;
const SYSTEM: &str = "greenthread-system";
const TEAM: &str = "team-a";
const WAIT: Duration = Duration::from_secs(20);

fn config(identity: &str) -> ControllerConfig {
    ControllerConfig {
        namespace: SYSTEM.into(),
        watch_namespace: None,
        identity: Some(identity.into()),
        lease_name: "greenthread-controller".into(),
        lease_duration: Duration::from_secs(2),
        lease_grace: Duration::from_secs(1),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        edge: Default::default(),
        vllm_image: "vllm/vllm-openai:test".into(),
        sidecar_image: "greenthread:test".into(),
        runtime_class: Some("nvidia".into()),
        model_service_account: Some("greenthread-model".into()),
        sidecar_port: 8080,
        sidecar_metrics_port: 9090,
        engine_port: 8001,
        allowed_images: vec![],
        image_pull_secrets: vec![],
        policy: Default::default(),
        preemption: greenthread_sidecar::Preemption::Drain,
        weights: Default::default(),
    }
}

/// Two nodes with two 80 GiB GPUs each, as the agents would have created them.
async fn gpus(client: &Client) {
    let api: Api<GpuResource> = Api::namespaced(client.clone(), SYSTEM);
    for node in ["node-a", "node-b"] {
        for index in 0..2 {
            let spec = GpuSpec {
                node: node.into(),
                index,
                uuid: format!("GPU-{node}-{index}"),
                product: "H100".into(),
                memory_bytes: 80 * GI,
                host_memory_bytes: None,
            };
            api.create(
                &PostParams::default(),
                &GpuResource::new(&format!("{node}-{index}"), spec),
            )
            .await
            .unwrap();
        }
    }
}

/// The fake API server with the agents' GPU records, and one controller leading on it.
async fn one_controller() -> (
    FakeApiServer,
    Client,
    greenthread_controller::leader::Elected,
) {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let mut registry = Registry::default();
    let elected = greenthread_controller::start(client.clone(), &config("only"), &mut registry)
        .await
        .unwrap();
    (server, client, elected)
}

async fn create_model(client: &Client, name: &str, replicas: u32) -> Model {
    let spec: ModelSpec = serde_json::from_value(json!({
        "modelName": format!("org/{name}"),
        "gpuMemoryUtilization": "0.45",
        "replicas": replicas,
    }))
    .unwrap();
    let api: Api<Model> = Api::namespaced(client.clone(), TEAM);
    api.create(&PostParams::default(), &Model::new(name, spec))
        .await
        .unwrap()
}

async fn pods_of(client: &Client, model: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), TEAM);
    api.list(&ListParams::default().labels(&format!("greenthread.ai/model={model}")))
        .await
        .unwrap()
        .items
}

/// `pod` of the team's namespace, as its sidecar writes itself into the ledger.
fn occupant(pod: &str, state: OccupantState, reserved: u64) -> Occupant {
    Occupant {
        pod_name: greenthread_api::ledger_key(TEAM, pod),
        model_name: "org/qwen".into(),
        state,
        reserved_memory_bytes: reserved,
        residual_memory_bytes: 0,
        popular: false,
        priority: Default::default(),
        last_accessed: None,
        became_serving_at: None,
        min_runtime: Duration::from_secs(10),
        heartbeat: jiff::Timestamp::now(),
        in_flight: 0,
        draining: 0,
        recent_requests: 0,
        host_memory_bytes: 0,
        pinned: false,
    }
}

/// Writes an occupant as a sidecar would: compare-and-swap on the GPU's status.
async fn occupy(ledger: &KubeLedger, gpu: &str, o: Occupant) {
    greenthread_ledger::update(ledger, gpu, &|| {}, |g| {
        let mut next: GpuStatus = g.status.clone();
        next.occupants.retain(|x| x.pod_name != o.pod_name);
        next.occupants.push(o.clone());
        Ok::<_, LedgerError>((Some(next), ()))
    })
    .await
    .unwrap();
}

async fn occupants(client: &Client, gpu: &str) -> Vec<String> {
    let api: Api<GpuResource> = Api::namespaced(client.clone(), SYSTEM);
    api.get(gpu)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
        .occupants
        .iter()
        // The team's pods by name; anyone else's keep their namespace.
        .map(|o| {
            o.pod_name
                .strip_prefix(&format!("{TEAM}/"))
                .unwrap_or(&o.pod_name)
                .to_string()
        })
        .collect()
}

/// What the kubelet would report once the sidecar's readiness probe passes.
async fn mark_ready(client: &Client, pod: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), TEAM);
    let status = json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
    api.patch_status(pod, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

fn gpus_of(pod: &Pod) -> String {
    pod.annotations()[GPUS_ANNOTATION].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_becomes_placed_pods_a_service_and_status_and_leaves_nothing_when_deleted() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let mut registry = Registry::default();
    let elected = greenthread_controller::start(client.clone(), &config("only"), &mut registry)
        .await
        .unwrap();
    create_model(&client, "qwen", 2).await;

    // Two pods, placed on two different GPUs, with the engine pinned to them by UUID.
    let pods = wait_until("two placed pods", WAIT, || async {
        let pods = pods_of(&client, "qwen").await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    let placed: Vec<String> = pods.iter().map(gpus_of).collect();
    assert_ne!(
        placed[0], placed[1],
        "replicas spread over GPUs: {placed:?}"
    );
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let gpu = gpus_of(pod);
        let (node, index) = gpu.rsplit_once('-').unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(node));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
        let engine = &spec.containers[0];
        let visible = engine
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "NVIDIA_VISIBLE_DEVICES")
            .unwrap();
        assert_eq!(
            visible.value.as_deref(),
            Some(format!("GPU-{node}-{index}").as_str())
        );
        let sidecar_args = spec.containers[1].args.clone().unwrap().join(" ");
        assert!(
            sidecar_args.contains(&format!("--gpus {gpu}"))
                && sidecar_args.contains("--namespace greenthread-system"),
            "{sidecar_args}"
        );
        // 0.45 of an 80 GiB GPU counted for placement until memory is measured.
        assert_eq!(
            pod.annotations()["greenthread.ai/memory-per-gpu"],
            "38654705664"
        );
    }
    let services: Api<Service> = Api::namespaced(client.clone(), TEAM);
    wait_until("the Service", WAIT, || async {
        services.get_opt("qwen").await.unwrap()
    })
    .await;
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    let status = wait_until("a Pending status with 2 replicas", WAIT, || async {
        let m = models.get("qwen").await.unwrap();
        m.status
            .filter(|s| s.replicas == 2 && s.phase.as_deref() == Some("Pending"))
    })
    .await;
    assert_eq!(status.url.as_deref(), Some("http://qwen.team-a.svc"));
    assert_eq!(status.gpus.len(), 2);
    assert!(
        models
            .get("qwen")
            .await
            .unwrap()
            .finalizers()
            .contains(&reconcile::FINALIZER.to_string())
    );

    // Ready pods and a serving occupant show in the status.
    for pod in ["qwen-0", "qwen-1"] {
        mark_ready(&client, pod).await;
    }
    let ledger = KubeLedger::new(client.clone(), SYSTEM).await.unwrap();
    let gpu0 = gpus_of(
        &pods
            .iter()
            .find(|p| p.name_any() == "qwen-0")
            .unwrap()
            .clone(),
    );
    let gpu1 = gpus_of(
        &pods
            .iter()
            .find(|p| p.name_any() == "qwen-1")
            .unwrap()
            .clone(),
    );
    occupy(
        &ledger,
        &gpu0,
        occupant("qwen-0", OccupantState::Serving, 30 * GI),
    )
    .await;
    occupy(
        &ledger,
        &gpu1,
        occupant("qwen-1", OccupantState::Sleeping, 0),
    )
    .await;
    let status = wait_until("Ready with one serving, one sleeping", WAIT, || async {
        let s = models.get("qwen").await.unwrap().status?;
        (s.phase.as_deref() == Some("Ready")
            && s.ready_replicas == 2
            && s.serving_replicas == 1
            && s.sleeping_replicas == 1)
            .then_some(s)
    })
    .await;
    assert_eq!(status.serving_memory_per_gpu.as_deref(), Some("30Gi"));
    let scrape = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        Exposition::parse(&text).unwrap()
    };
    let phase = |m: &Exposition, phase: &str| {
        m.value(
            "gthread_controller_model_phase",
            &[("namespace", TEAM), ("model", "qwen"), ("phase", phase)],
        )
    };
    let m = scrape();
    assert_eq!(
        (
            phase(&m, "Ready"),
            phase(&m, "Pending"),
            phase(&m, "Failed")
        ),
        (Some(1.0), Some(0.0), Some(0.0))
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllReplicasReady")
    );

    // A pod deleted under its serving occupant: the occupant goes, the replica comes back.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), TEAM);
    pods_api
        .delete("qwen-0", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the deleted pod's occupant removed", WAIT, || async {
        (!occupants(&client, &gpu0)
            .await
            .contains(&"qwen-0".to_string()))
        .then_some(())
    })
    .await;
    wait_until("qwen-0 recreated", WAIT, || async {
        pods_api.get_opt("qwen-0").await.unwrap()
    })
    .await;

    // `/scale`, as `kubectl scale`, an HPA or KEDA use it: the replicas and the selector
    // of the pods; a new count lands in the spec and the controller follows it.
    let scale = models.get_scale("qwen").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(
        scale.status.unwrap().selector.as_deref(),
        Some("greenthread.ai/model=qwen")
    );
    models
        .patch_scale(
            "qwen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(models.get("qwen").await.unwrap().spec.replicas, 1);
    wait_until("one pod after scaling to 1", WAIT, || async {
        (pods_of(&client, "qwen").await.len() == 1).then_some(())
    })
    .await;

    // Deleting the Model removes its pods, Service, ledger entries, then the Model.
    models
        .delete("qwen", &DeleteParams::default())
        .await
        .unwrap();
    wait_until("the Model gone", WAIT, || async {
        models
            .get_opt("qwen")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(pods_of(&client, "qwen").await.is_empty());
    assert!(services.get_opt("qwen").await.unwrap().is_none());
    for gpu in [&gpu0, &gpu1] {
        assert!(
            occupants(&client, gpu).await.is_empty(),
            "{gpu} still has occupants"
        );
    }

    // The System dashboard's series exist and count; the deleted Model's phase is gone.
    let m = scrape();
    assert_eq!(phase(&m, "Ready"), None);
    let text = format!("{m:?}");
    assert!(
        m.value(
            "gthread_controller_reconciliations_total",
            &[("resource", "model"), ("result", "success")]
        )
        .unwrap()
            >= 3.0,
        "{text}"
    );
    assert!(
        m.value("gthread_controller_ledger_entries_removed_total", &[])
            .unwrap()
            >= 2.0
    );
    assert!(
        m.value(
            "gthread_controller_workqueue_depth",
            &[("resource", "model")]
        )
        .is_some()
    );
    assert!(
        m.value(
            "gthread_controller_reconcile_duration_seconds_count",
            &[("resource", "model")]
        )
        .unwrap()
            >= 3.0
    );
    assert_eq!(
        m.value("gthread_controller_leader", &[("identity", "only")]),
        Some(1.0)
    );
    elected.resign().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reconcile_removes_the_occupants_of_a_deleted_pod() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let mut registry = Registry::default();
    let ledger = Arc::new(KubeLedger::new(client.clone(), SYSTEM).await.unwrap());
    let ctx = Arc::new(reconcile::Context::new(
        client.clone(),
        Settings::default(),
        ControllerMetrics::register(&mut registry),
        ledger.clone(),
    ));
    let model = create_model(&client, "qwen", 1).await;
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    // The first reconcile adds the finalizer, the second places the replica.
    reconcile::reconcile(Arc::new(model), ctx.clone())
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(models.get("qwen").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    let pod = pods_of(&client, "qwen").await.remove(0);
    let gpu = gpus_of(&pod);
    occupy(
        &ledger,
        &gpu,
        occupant("qwen-0", OccupantState::Serving, 30 * GI),
    )
    .await;
    // A wake lock and an intent of the same pod go too.
    greenthread_ledger::update(&*ledger, &gpu, &|| {}, |g| {
        let next = greenthread_ledger::decide::write_intent(
            &g.status,
            "qwen-0",
            "org/qwen",
            GI,
            jiff::Timestamp::now(),
        );
        Ok::<_, LedgerError>((Some(next), ()))
    })
    .await
    .unwrap();
    wait_until("the ledger's watch to see the occupant", WAIT, || async {
        use greenthread_ledger::Ledger;
        let g = ledger.get(&gpu).await.ok()?;
        (!g.status.occupants.is_empty() && !g.status.preemption_intents.is_empty()).then_some(())
    })
    .await;

    Api::<Pod>::namespaced(client.clone(), TEAM)
        .delete("qwen-0", &DeleteParams::default())
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(models.get("qwen").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    let api: Api<GpuResource> = Api::namespaced(client.clone(), SYSTEM);
    let status = api.get(&gpu).await.unwrap().status.unwrap();
    assert!(status.occupants.is_empty(), "{status:?}");
    assert!(status.preemption_intents.is_empty(), "{status:?}");
    // The same reconcile placed the replica again.
    assert_eq!(pods_of(&client, "qwen").await.len(), 1);
}

async fn holder(client: &Client) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), SYSTEM);
    api.get_opt("greenthread-controller")
        .await
        .unwrap()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_exactly_one_leads_and_the_other_takes_over_when_its_lease_expires() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let (mut ra, mut rb) = (Registry::default(), Registry::default());
    let a = greenthread_controller::start(client.clone(), &config("replica-a"), &mut ra)
        .await
        .unwrap();
    let b = greenthread_controller::start(client.clone(), &config("replica-b"), &mut rb)
        .await
        .unwrap();
    let leader = wait_until("a leader", WAIT, || async {
        match (*a.leading.borrow(), *b.leading.borrow()) {
            (true, false) => Some("replica-a"),
            (false, true) => Some("replica-b"),
            (true, true) => panic!("two leaders"),
            _ => None,
        }
    })
    .await;
    assert_eq!(holder(&client).await.as_deref(), Some(leader));
    // Over four renewals of the Lease (two Lease durations, each long enough for the
    // follower to take an expired Lease): never two leaders and never a change. Counted
    // in renewals, not seconds, so a slow machine stretches the window instead of
    // shortening what it observes.
    let renewed = |client: Client| async move {
        let api: Api<Lease> = Api::namespaced(client, SYSTEM);
        api.get("greenthread-controller")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.renew_time)
    };
    let (mut last, mut renewals) = (renewed(client.clone()).await, 0);
    let deadline = tokio::time::Instant::now() + WAIT;
    while renewals < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader renewed its Lease only {renewals} times"
        );
        let both = (*a.leading.borrow(), *b.leading.borrow());
        assert!(
            both == (true, false) || both == (false, true),
            "exactly one leader, got {both:?}"
        );
        assert_eq!(holder(&client).await.as_deref(), Some(leader));
        let now = renewed(client.clone()).await;
        if now != last {
            renewals += 1;
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only the leader reconciles: the follower's counters stay at zero.
    create_model(&client, "llama", 1).await;
    wait_until("the leader to place the Model", WAIT, || async {
        (pods_of(&client, "llama").await.len() == 1).then_some(())
    })
    .await;
    let reconciled = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        Exposition::parse(&text)
            .unwrap()
            .find(
                "gthread_controller_reconciliations_total",
                &[("resource", "model")],
            )
            .map(|s| s.value)
            .sum::<f64>()
    };
    let (leader_registry, follower_registry) = if leader == "replica-a" {
        (&ra, &rb)
    } else {
        (&rb, &ra)
    };
    assert!(
        reconciled(leader_registry) >= 1.0,
        "the leader reconciled the Model"
    );
    assert_eq!(
        reconciled(follower_registry),
        0.0,
        "the follower reconciled nothing"
    );

    let (dead, survivor, survivor_name) = if leader == "replica-a" {
        (&a, &b, "replica-b")
    } else {
        (&b, &a, "replica-a")
    };
    dead.crash();
    wait_until("the survivor to take over", WAIT, || async {
        (*survivor.leading.borrow() && holder(&client).await.as_deref() == Some(survivor_name))
            .then_some(())
    })
    .await;
    // The new leader reconciles: a second Model gets its pod.
    create_model(&client, "mistral", 1).await;
    wait_until("the new leader to place the Model", WAIT, || async {
        (pods_of(&client, "mistral").await.len() == 1).then_some(())
    })
    .await;
    // Resigning releases the Lease at once.
    let survivor_identity = survivor.identity.clone();
    if leader == "replica-a" { b } else { a }.resign().await;
    let released = holder(&client).await;
    assert_ne!(released.as_deref(), Some(survivor_identity.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_model_without_an_image_fails_with_a_reason_and_gets_no_pods() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let ctx = context(&client, Settings::default()).await;
    let spec: ModelSpec = serde_json::from_value(json!({
        "modelName": "tool", "engine": "process", "command": ["serve-it"],
    }))
    .unwrap();
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    let m = models
        .create(&PostParams::default(), &Model::new("tool", spec))
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(models.get("tool").await.unwrap()), ctx)
        .await
        .unwrap();
    let status = models.get("tool").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "ImageRequired");
    assert!(ready.message.contains("spec.image"), "{}", ready.message);
    assert!(pods_of(&client, "tool").await.is_empty());
}

async fn context(client: &Client, settings: Settings) -> Arc<reconcile::Context> {
    let mut registry = Registry::default();
    Arc::new(reconcile::Context::new(
        client.clone(),
        settings,
        ControllerMetrics::register(&mut registry),
        Arc::new(KubeLedger::new(client.clone(), SYSTEM).await.unwrap()),
    ))
}

/// Security review finding 8: creating a Model meant running any image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_an_image_outside_the_allowlist_fails_and_gets_no_pods() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let ctx = context(
        &client,
        Settings {
            allowed_images: vec!["vllm/vllm-openai:*".into()],
            ..Settings::default()
        },
    )
    .await;
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    for (name, image) in [("rogue", Some("evil.example/miner:1")), ("fine", None)] {
        let mut spec: ModelSpec =
            serde_json::from_value(json!({"modelName": format!("org/{name}")})).unwrap();
        spec.image = image.map(str::to_string);
        let m = models
            .create(&PostParams::default(), &Model::new(name, spec))
            .await
            .unwrap();
        reconcile::reconcile(Arc::new(m), ctx.clone())
            .await
            .unwrap();
        reconcile::reconcile(Arc::new(models.get(name).await.unwrap()), ctx.clone())
            .await
            .unwrap();
    }
    let status = models.get("rogue").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "ImageNotAllowed");
    assert!(
        ready.message.contains("evil.example/miner:1"),
        "{}",
        ready.message
    );
    assert!(pods_of(&client, "rogue").await.is_empty());
    assert_eq!(
        pods_of(&client, "fine").await.len(),
        1,
        "the default vLLM image is allowed"
    );
}

/// Security review finding 7: deletion matched pods by label, so a pod anyone labelled
/// with a Model's name went with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_model_deletes_only_the_pods_it_owns() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let ctx = context(&client, Settings::default()).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), TEAM);
    let foreign: Pod = serde_json::from_value(json!({
        "metadata": {"name": "qwen-lookalike", "labels": {
            "greenthread.ai/model": "qwen", "app.kubernetes.io/component": "model"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &foreign).await.unwrap();
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    let spec: ModelSpec = serde_json::from_value(json!({"modelName": "org/qwen"})).unwrap();
    let m = models
        .create(&PostParams::default(), &Model::new("qwen", spec))
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    let m = models.get("qwen").await.unwrap();
    reconcile::reconcile(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        pods_of(&client, "qwen").await.len(),
        2,
        "its replica and the look-alike"
    );
    models.delete("qwen", &Default::default()).await.unwrap();
    wait_until("the Model gone", WAIT, || async {
        match models.get_opt("qwen").await.unwrap() {
            None => Some(()),
            Some(m) => {
                let _ = reconcile::reconcile(Arc::new(m), ctx.clone()).await;
                None
            }
        }
    })
    .await;
    let left: Vec<String> = pods_of(&client, "qwen")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(left, ["qwen-lookalike"]);
}

/// Issue 12, LoRA adapters on Kubernetes: a Model's adapters reach its pods through a
/// ConfigMap the Model owns, which follows the spec without the pods being re-created
/// (their sidecars read it again); an adapter named like a neighbor's is a condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_follow_the_spec_through_a_config_map_and_clashes_are_conditions() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (_server, client, _elected) = one_controller().await;
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), TEAM);
    let adapters = |json: serde_json::Value| -> Vec<String> {
        let list: Vec<greenthread_api::AdapterSpec> =
            serde_json::from_str(json.as_str().unwrap()).unwrap();
        list.into_iter().map(|a| a.name).collect()
    };
    let spec: ModelSpec = serde_json::from_value(json!({
        "modelName": "org/qwen", "gpuMemoryUtilization": "0.45",
        "adapters": [{"name": "sql", "source": "/lora/sql"}],
    }))
    .unwrap();
    models
        .create(&PostParams::default(), &Model::new("qwen", spec))
        .await
        .unwrap();
    let listed = |wanted: Vec<&'static str>| {
        let configs = configs.clone();
        async move {
            let cm = configs.get_opt("qwen-adapters").await.unwrap()?;
            let data = serde_json::to_value(cm.data?).unwrap();
            (adapters(data["adapters.json"].clone()) == wanted).then_some(())
        }
    };
    wait_until("the adapters ConfigMap", WAIT, || listed(vec!["sql"])).await;
    let pod = wait_until("a placed pod", WAIT, || async {
        pods_of(&client, "qwen").await.into_iter().next()
    })
    .await;
    let args = pod.spec.as_ref().unwrap().containers[1]
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(args.contains("--adapters-file"), "{args}");

    // A second adapter: the ConfigMap follows, the pod stays the same pod.
    models
        .patch(
            "qwen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"adapters": [
                {"name": "sql", "source": "/lora/sql"},
                {"name": "chat", "source": "org/chat-lora"},
            ]}})),
        )
        .await
        .unwrap();
    wait_until("the ConfigMap with both", WAIT, || {
        listed(vec!["sql", "chat"])
    })
    .await;
    let pods = pods_of(&client, "qwen").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].uid(), pod.uid(), "the pod was not re-created");
    let unique = wait_until("AdapterNames Unique", WAIT, || async {
        let s = models.get("qwen").await.unwrap().status?;
        s.conditions
            .into_iter()
            .find(|c| c.type_ == "AdapterNames" && c.reason == "Unique")
    })
    .await;
    assert_eq!(unique.status, "True");

    // A neighbor named like an adapter: the adapter's Model says so, at once.
    create_model(&client, "chat", 1).await;
    let clash = wait_until("AdapterNames Clash", WAIT, || async {
        let s = models.get("qwen").await.unwrap().status?;
        s.conditions
            .into_iter()
            .find(|c| c.type_ == "AdapterNames" && c.reason == "Clash")
    })
    .await;
    assert_eq!(clash.status, "False");
    assert!(
        clash
            .message
            .contains("\"chat\" is also the Model \"chat\""),
        "{}",
        clash.message
    );
}

/// `kubectl apply` of a changed spec: the Model's pod is deleted (its sidecar drains it)
/// and created anew from the new spec; nothing else of the Model changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_spec_rolls_the_models_pod() {
    let (_server, client, _elected) = one_controller().await;
    create_model(&client, "qwen", 1).await;
    let first = wait_until("a placed pod", WAIT, || async {
        pods_of(&client, "qwen").await.into_iter().next()
    })
    .await;
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    models
        .patch(
            "qwen",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sleep": {"idleTimeout": "1m"}}})),
        )
        .await
        .unwrap();
    let second = wait_until("the pod made anew", WAIT, || async {
        pods_of(&client, "qwen")
            .await
            .into_iter()
            .find(|p| p.uid() != first.uid() && p.metadata.deletion_timestamp.is_none())
    })
    .await;
    let args = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[1]
            .args
            .clone()
            .unwrap()
            .join(" ")
    };
    assert!(
        args(&first).contains("--idle-timeout 5m"),
        "{}",
        args(&first)
    );
    assert!(
        args(&second).contains("--idle-timeout 1m"),
        "{}",
        args(&second)
    );
    assert_eq!(second.name_any(), "qwen-0");
}

/// A Model in the original's newer shape (`modelType`, `product`, `parallelism`,
/// `loadFormat`): `product` selects the nodes whose GPU product label says it, and the
/// pod carries it as a node selector; the pipeline stages take their GPUs of that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_the_newer_shape_lands_on_its_gpu_product_with_its_pipeline() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for (node, product) in [
        ("node-a", "NVIDIA-H100-80GB-HBM3"),
        ("node-b", "NVIDIA-L40S"),
    ] {
        let n = serde_json::from_value(json!({
            "metadata": {"name": node, "labels": {"nvidia.com/gpu.product": product}},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
    }
    let ctx = context(&client, Settings::default()).await;
    let model: Model = serde_saphyr::from_str(
        r#"
apiVersion: greenthread.ai/v1alpha1
kind: Model
metadata: {name: embed, namespace: team-a}
spec:
  modelName: BAAI/bge-m3
  modelType: embedding
  product: NVIDIA-L40S
  parallelism: {tensor: 1, pipeline: 2}
  loadFormat: safetensors
  gpuMemoryUtilization: "0.4"
"#,
    )
    .unwrap();
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    let m = models.create(&PostParams::default(), &model).await.unwrap();
    // The first reconcile adds the finalizer, the second places.
    reconcile::reconcile(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(models.get("embed").await.unwrap()), ctx)
        .await
        .unwrap();
    let pods = pods_of(&client, "embed").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(gpus_of(&pods[0]), "node-b-0,node-b-1");
    let spec = pods[0].spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-b"));
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
        "NVIDIA-L40S"
    );
    let engine = spec.containers.iter().find(|c| c.name == "engine").unwrap();
    let args = engine.args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--tensor-parallel-size 1 --pipeline-parallel-size 2 --dtype bfloat16 --load-format safetensors"),
        "{args}"
    );
}

/// While a replica's weights download into its node's cache, the Model says how far they
/// are: phase `Downloading`, the bytes in `status.download` and in the metrics, read
/// from the log of the pod's `download` init container (the fake kubelet plays it), and
/// read again soon; once the download is done, none of it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloading_model_reports_its_bytes_from_the_download_log() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    gpus(&client).await;
    let mut registry = Registry::default();
    let ctx = Arc::new(reconcile::Context::new(
        client.clone(),
        Settings {
            weights: greenthread_controller::WeightsArgs {
                host_path: Some("/var/cache/greenthread".into()),
                ..Default::default()
            },
            ..Settings::default()
        },
        ControllerMetrics::register(&mut registry),
        Arc::new(KubeLedger::new(client.clone(), SYSTEM).await.unwrap()),
    ));
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    let spec: ModelSpec = serde_json::from_value(json!({"modelName": "org/llama"})).unwrap();
    let m = models
        .create(&PostParams::default(), &Model::new("llama", spec))
        .await
        .unwrap();
    // The first reconcile adds the finalizer, the second places the replica.
    reconcile::reconcile(Arc::new(m), ctx.clone())
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(models.get("llama").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    let pod = pods_of(&client, "llama").await.remove(0).name_any();

    // The kubelet runs the init container; it has written two progress lines.
    let pods: Api<Pod> = Api::namespaced(client.clone(), TEAM);
    let running = json!({"status": {"phase": "Pending", "initContainerStatuses": [{
        "name": "download", "image": "greenthread:test", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"running": {}},
    }]}});
    pods.patch_status(&pod, &PatchParams::default(), &Patch::Merge(running))
        .await
        .unwrap();
    let line = |done: u64, total: u64| {
        greenthread_weights::progress_line(
            "org/llama",
            greenthread_weights::Progress { done, total },
        ) + "\n"
    };
    server.store.append_log(
        TEAM,
        &pod,
        "download",
        &(line(GI, 16 * GI) + &line(6 * GI, 16 * GI)),
    );
    let action = reconcile::reconcile(Arc::new(models.get("llama").await.unwrap()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(5)),
        "progress is read again soon"
    );
    let status = models.get("llama").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Downloading"));
    assert_eq!(
        status.download,
        Some(greenthread_api::DownloadStatus {
            downloaded_bytes: 6 * GI,
            total_bytes: 16 * GI,
        })
    );
    assert!(
        status.conditions[0].message.contains("6.00 of 16.00 GiB"),
        "{:?}",
        status.conditions[0]
    );
    assert!(server.store.requests("GET api/v1/pods/log") >= 1);
    let metrics = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        greenthread_test_support::Exposition::parse(&text).unwrap()
    };
    let labels = [("namespace", TEAM), ("model", "llama")];
    let m = metrics(&registry);
    assert_eq!(
        m.value("gthread_weights_downloaded_bytes", &labels),
        Some((6 * GI) as f64)
    );
    assert_eq!(
        m.value("gthread_weights_size_bytes", &labels),
        Some((16 * GI) as f64)
    );
    assert_eq!(
        m.value(
            "gthread_controller_model_phase",
            &[("model", "llama"), ("phase", "Downloading")]
        ),
        Some(1.0)
    );

    // Done: the init container ended; the Model waits for its engine like any other.
    server
        .store
        .append_log(TEAM, &pod, "download", "ready org/llama@abc\n");
    let done = json!({"status": {"initContainerStatuses": [{
        "name": "download", "image": "greenthread:test", "imageID": "", "ready": true,
        "restartCount": 0, "state": {"terminated": {"exitCode": 0}},
    }]}});
    pods.patch_status(&pod, &PatchParams::default(), &Patch::Merge(done))
        .await
        .unwrap();
    reconcile::reconcile(Arc::new(models.get("llama").await.unwrap()), ctx)
        .await
        .unwrap();
    let status = models.get("llama").await.unwrap().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.download, None);
    assert_eq!(
        metrics(&registry).value("gthread_weights_size_bytes", &labels),
        None
    );
}
