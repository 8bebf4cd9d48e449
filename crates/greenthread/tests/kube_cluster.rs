//! GreenThread in Kubernetes mode, end to end against the fake API server: the agent
//! creates the GPU objects, the controller renders and places the Models' pods, a fake
//! kubelet runs their containers as real processes (the rendered engine and sidecar
//! command lines), the sidecars keep their occupants on the GPU objects through
//! `KubeLedger`, and the API server discovers the Models by watch and routes to them
//! exactly as in `local` mode.

use std::{sync::Arc, time::Duration};

use greenthread_agent::Agent;
use greenthread_api::ledger_key;
use greenthread_api::{GpuResource, Model, ModelSpec};
use greenthread_apiserver::cluster::ApiServerConfig;
use greenthread_controller::ControllerConfig;
use greenthread_gpu::FakeSource;
use greenthread_test_support::{FakeApiServer, FakeKubelet, free_port, get_json, http, wait_until};
use kube::{Api, api::PostParams};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

const GI: u64 = 1 << 30;
const SYSTEM: &str = "greenthread-system";
const TEAM: &str = "team-a";
const WAIT: Duration = Duration::from_secs(30);

fn controller_config() -> ControllerConfig {
    ControllerConfig {
        namespace: SYSTEM.into(),
        watch_namespace: None,
        identity: Some("controller-0".into()),
        lease_name: "greenthread-controller".into(),
        lease_duration: Duration::from_secs(5),
        lease_grace: Duration::from_secs(2),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        edge: Default::default(),
        vllm_image: "vllm/vllm-openai:test".into(),
        sidecar_image: "greenthread:test".into(),
        runtime_class: None,
        model_service_account: None,
        // Free ports, so that the pods' addresses (127.0.1.N) cannot collide with
        // anything listening on all addresses of this machine.
        sidecar_port: free_port() as i32,
        sidecar_metrics_port: free_port() as i32,
        engine_port: free_port(),
        allowed_images: vec![],
        image_pull_secrets: vec![],
        policy: Default::default(),
        preemption: greenthread_sidecar::Preemption::Drain,
        weights: Default::default(),
    }
}

/// The API server's configuration in these tests: the system namespace, every
/// namespace's Models, the admin token in `admin_token_file` if any.
fn api_server_config(admin_token_file: Option<std::path::PathBuf>) -> ApiServerConfig {
    ApiServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        namespace: SYSTEM.into(),
        watch_namespace: None,
        api_keys_file: None,
        admin_token_file,
        metrics_token_file: None,
        sidecar_token_file: None,
        admin_open: false,
        allow_unauthenticated: false,
        issued_keys_secret: "greenthread-issued-api-keys".into(),
        batch_dir: None,
        batch_concurrency: 4,
        batch_quota: 2 << 30,
        edge: Default::default(),
    }
}

async fn model(client: &kube::Client, name: &str) {
    let spec: ModelSpec = serde_json::from_value(json!({
        "modelName": format!("org/{name}"),
        "engine": "sim",
        "gpuMemoryUtilization": "0.3",
        "sleep": {"idleTimeout": "10m"},
        "fairness": {"minRuntime": "0s"},
    }))
    .unwrap();
    Api::<Model>::namespaced(client.clone(), TEAM)
        .create(&PostParams::default(), &Model::new(name, spec))
        .await
        .unwrap();
}

fn state_of(models: &Value, id: &str) -> Option<String> {
    models["data"].as_array()?.iter().find(|m| m["id"] == id)?["state"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_declared_on_kubernetes_are_placed_run_and_served_through_the_api_server() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, SYSTEM);

    // One node with two GPUs, as its agent reports them.
    let agent = Agent::new(
        client.clone(),
        SYSTEM,
        "node-a",
        Arc::new(FakeSource::new(2, 80 * GI)),
        false,
        greenthread_api::HostBudget::Off,
    )
    .await
    .unwrap();
    agent.sync_objects().await.unwrap();

    let mut registry = Registry::default();
    let controller =
        greenthread_controller::start(client.clone(), &controller_config(), &mut registry)
            .await
            .unwrap();
    let _kubelet = FakeKubelet::start(
        client.clone(),
        env!("CARGO_BIN_EXE_greenthread"),
        "app.kubernetes.io/component=model",
        vec![(
            "KUBECONFIG".into(),
            kubeconfig.to_string_lossy().into_owned(),
        )],
    );
    let (api, _discovery) =
        greenthread_apiserver::cluster::start(client.clone(), &api_server_config(None))
            .await
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, greenthread_apiserver::router(api)).await;
    });

    model(&client, "alpha").await;
    model(&client, "beta").await;

    // Both models boot (claim, start, measure, sleep) and the API server lists them
    // sleeping, from the GPU records, without waking either.
    let web = http();
    wait_until("both models listed as sleeping", WAIT, || async {
        let models = get_json(&web, &format!("{base}/v1/models")).await;
        (state_of(&models, "alpha").as_deref() == Some("sleeping")
            && state_of(&models, "beta").as_deref() == Some("sleeping"))
        .then_some(())
    })
    .await;

    // A request by engine model id wakes alpha through its sidecar; its occupant serves.
    let resp = web
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "org/alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["model"], "org/alpha");
    // The engine answered only because its sidecar sent the key the engine was started
    // with (the simulator, like vLLM, demands VLLM_API_KEY): one random key per Model,
    // in a Secret the Model owns.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), TEAM);
    let key = secrets.get("alpha-engine-key").await.unwrap();
    assert_eq!(key.metadata.owner_references.unwrap()[0].name, "alpha");
    assert_eq!(key.data.unwrap()["api-key"].0.len(), 64);
    let gpus: Api<GpuResource> = Api::namespaced(client.clone(), SYSTEM);
    let serving_on = wait_until("alpha-0 serving on its GPU object", WAIT, || async {
        gpus.list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|g| {
                g.status.as_ref().is_some_and(|s| {
                    s.occupant(&ledger_key(TEAM, "alpha-0"))
                        .is_some_and(|o| o.state.as_str() == "serving")
                })
            })
    })
    .await;
    let reserved = serving_on
        .status
        .unwrap()
        .occupant(&ledger_key(TEAM, "alpha-0"))
        .unwrap()
        .reserved_memory_bytes;
    assert_eq!(
        reserved,
        25_769_803_776, // 0.3 × 80 GiB
        "what the controller passed as --memory-bytes"
    );
    wait_until("alpha listed as serving", WAIT, || async {
        let models = get_json(&web, &format!("{base}/v1/models")).await;
        (state_of(&models, "alpha").as_deref() == Some("serving")).then_some(())
    })
    .await;
    // The controller's status counts it too.
    let models: Api<Model> = Api::namespaced(client.clone(), TEAM);
    wait_until("alpha's status: Ready, one serving", WAIT, || async {
        let s = models.get("alpha").await.unwrap().status?;
        (s.phase.as_deref() == Some("Ready") && s.serving_replicas == 1).then_some(())
    })
    .await;

    // Admin sleep goes to the remote sidecar; the state follows from the GPU record.
    let resp = web
        .post(format!("{base}/api/v1/models/alpha/sleep"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    wait_until("alpha sleeping again", WAIT, || async {
        let models = get_json(&web, &format!("{base}/v1/models")).await;
        (state_of(&models, "alpha").as_deref() == Some("sleeping")).then_some(())
    })
    .await;
    // Engine metrics of a remote replica come through the sidecar's private port.
    let engine = web
        .get(format!("{base}/metrics/engine/{TEAM}/alpha-0"))
        .send()
        .await
        .unwrap();
    assert_eq!(engine.status(), 200);
    assert!(engine.text().await.unwrap().contains("vllm:"));
    // An unknown model is an OpenAI-style 404 naming the known ones.
    let resp = web
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("alpha, beta")
    );

    // LoRA adapters: the controller writes them to the Model's ConfigMap, the kubelet to
    // the sidecar's volume; the API server routes an adapter's name to its Model, and an
    // adapter added to the spec is served by the running pod, never re-created.
    let spec: ModelSpec = serde_json::from_value(json!({
        "modelName": "org/gamma", "engine": "sim", "gpuMemoryUtilization": "0.3",
        "sleep": {"idleTimeout": "10m"}, "fairness": {"minRuntime": "0s"},
        "adapters": [{"name": "sql", "source": "org/sql-lora"}],
    }))
    .unwrap();
    models
        .create(&PostParams::default(), &Model::new("gamma", spec))
        .await
        .unwrap();
    let listed = wait_until("sql listed with its parent", WAIT, || async {
        let models = get_json(&web, &format!("{base}/v1/models")).await;
        models["data"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == "sql" && m["state"] == "sleeping")
            .cloned()
    })
    .await;
    assert_eq!(listed["parent"], "gamma");
    let ask = |model: &'static str| {
        let (web, base) = (&web, &base);
        async move {
            let resp = web
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
                .send()
                .await
                .unwrap();
            let adapter = resp
                .headers()
                .get("x-sim-lora-adapter")
                .map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), adapter)
        }
    };
    assert_eq!(ask("sql").await, (200, Some("sql".to_string())));
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), TEAM);
    let uid = pods.get("gamma-0").await.unwrap().metadata.uid;
    models
        .patch(
            "gamma",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"adapters": [
                {"name": "sql", "source": "org/sql-lora"},
                {"name": "code", "source": "org/code-lora"},
            ]}})),
        )
        .await
        .unwrap();
    wait_until("code served by the running pod", WAIT, || async {
        (ask("code").await == (200, Some("code".to_string()))).then_some(())
    })
    .await;
    assert_eq!(pods.get("gamma-0").await.unwrap().metadata.uid, uid);
    controller.resign().await;
}

/// Keys issued at run time on Kubernetes: kept as hashes in a Secret every API server
/// replica watches, so that a key issued through one replica works at the other, and a
/// key revoked through the other is refused by the first, within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_issued_through_one_api_server_replica_hold_at_every_replica() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "root-token").unwrap();
    let replica = || {
        let client = client.clone();
        let token = token.clone();
        async move {
            let (api, tasks) =
                greenthread_apiserver::cluster::start(client, &api_server_config(Some(token)))
                    .await
                    .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move {
                let _ = axum::serve(listener, greenthread_apiserver::router(api)).await;
            });
            (base, tasks)
        }
    };
    let ((a, _ta), (b, _tb)) = (replica().await, replica().await);
    let web = http();
    let models =
        |base: &str, key: &str| web.get(format!("{base}/v1/models")).bearer_auth(key).send();
    let r = web
        .post(format!("{a}/api/v1/keys"))
        .bearer_auth("root-token")
        .json(&json!({"name": "ci"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let key = r.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(models(&a, &key).await.unwrap().status(), 200);
    // The other replica learns that keys exist (its API closes) and this one works there.
    wait_until("the key known at the other replica", WAIT, || async {
        (models(&b, "no-such-key").await.ok()?.status() == 401).then_some(())
    })
    .await;
    assert_eq!(models(&b, &key).await.unwrap().status(), 200);
    // Kept as a hash, in the API server's namespace.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), SYSTEM);
    let kept = secrets.get("greenthread-issued-api-keys").await.unwrap();
    let stored = String::from_utf8(kept.data.unwrap()["keys.json"].0.clone()).unwrap();
    assert!(
        stored.contains("\"ci\"") && !stored.contains(&key),
        "{stored}"
    );
    // Revoked through the other replica: refused there at once, here within seconds.
    let r = web
        .delete(format!("{b}/api/v1/keys/ci"))
        .bearer_auth("root-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    assert_eq!(models(&b, &key).await.unwrap().status(), 401);
    wait_until(
        "the revocation known at the first replica",
        WAIT,
        || async { (models(&a, &key).await.ok()?.status() == 401).then_some(()) },
    )
    .await;
}
