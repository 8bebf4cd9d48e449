//! Rendering from Model YAML: exact engine arguments, probes, ports, GPU environment,
//! ownership; the rendered objects pass `kubernetes-validate --strict`.

use greenthread_api::{GpuSpec, Model};
use greenthread_controller::render::{Settings, render_pod, render_service, vllm_args};
use k8s_openapi::api::core::v1::Container;

const MODEL: &str = r#"
apiVersion: greenthread.ai/v1alpha1
kind: Model
metadata:
  name: qwen
  namespace: team-a
  uid: 3f1c2a9e-0000-4000-8000-000000000001
spec:
  modelName: Qwen/Qwen2.5-7B-Instruct
  gpuMemoryUtilization: "0.45"
  tensorParallelSize: 2
  quantization: awq
  extraArgs: ["--max-model-len", "8192"]
  sleep: {idleTimeout: 10m, drainTimeout: 20s, level: 2}
  fairness: {minRuntime: 30s, maxWaitTime: 3s, popular: true}
  nodeSelector: {nvidia.com/gpu.product: H100}
"#;

fn model() -> Model {
    serde_saphyr::from_str(MODEL).unwrap()
}

fn gpus() -> Vec<GpuSpec> {
    (0..2)
        .map(|i| GpuSpec {
            node: "gpu-node-1".into(),
            index: i + 2,
            uuid: format!("GPU-aaaa-{i}"),
            product: "H100".into(),
            memory_bytes: 80 << 30,
            host_memory_bytes: None,
        })
        .collect()
}

fn container<'a>(pod: &'a k8s_openapi::api::core::v1::Pod, name: &str) -> &'a Container {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap()
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .as_deref()
}

#[test]
fn the_engine_gets_exactly_the_vllm_arguments_of_the_spec() {
    assert_eq!(
        vllm_args(&model(), 8001),
        [
            "serve",
            "Qwen/Qwen2.5-7B-Instruct",
            "--host",
            "127.0.0.1",
            "--port",
            "8001",
            "--enable-sleep-mode",
            "--gpu-memory-utilization",
            "0.45",
            "--tensor-parallel-size",
            "2",
            "--dtype",
            "bfloat16",
            "--quantization",
            "awq",
            // The Model's name and the engine id are both accepted.
            "--served-model-name",
            "qwen",
            "Qwen/Qwen2.5-7B-Instruct",
            "--max-model-len",
            "8192",
        ]
    );
    let pod = render_pod(&model(), 0, &gpus(), &Settings::default()).unwrap();
    let engine = container(&pod, "engine");
    assert_eq!(engine.command.as_deref(), Some(&["vllm".to_string()][..]));
    assert_eq!(env(engine, "VLLM_SERVER_DEV_MODE"), Some("1"));
    assert_eq!(
        env(engine, "NVIDIA_VISIBLE_DEVICES"),
        Some("GPU-aaaa-0,GPU-aaaa-1")
    );
    assert!(
        engine.ports.is_none(),
        "the engine is reachable only through the sidecar"
    );
}

#[test]
fn the_sidecar_gets_its_ports_probes_and_gpus() {
    let pod = render_pod(
        &model(),
        1,
        &gpus(),
        &Settings {
            runtime_class: Some("nvidia".into()),
            ..Settings::default()
        },
    )
    .unwrap();
    assert_eq!(pod.metadata.name.as_deref(), Some("qwen-1"));
    assert_eq!(
        pod.metadata.labels.as_ref().unwrap()["greenthread.ai/model"],
        "qwen"
    );
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Model", "qwen", Some(true))
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("gpu-node-1"));
    assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["nvidia.com/gpu.product"],
        "H100"
    );

    let sidecar = container(&pod, "sidecar");
    // What the sidecar will run with: its own parser reads the arguments.
    let args = sidecar.args.clone().unwrap();
    assert_eq!(args[0], "sidecar");
    let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let cfg = greenthread_sidecar::SidecarConfig::from_args("unset", &rest).unwrap();
    use std::time::Duration;
    assert_eq!(cfg.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(cfg.metrics_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(cfg.engine_url.as_deref(), Some("http://127.0.0.1:8001"));
    assert_eq!(cfg.engine, greenthread_sidecar::EngineKind::Vllm);
    assert_eq!(cfg.model, "Qwen/Qwen2.5-7B-Instruct");
    assert_eq!(
        (cfg.idle_timeout, cfg.drain_timeout, cfg.sleep_level),
        (Duration::from_secs(600), Duration::from_secs(20), 2)
    );
    assert_eq!(
        (cfg.min_runtime, cfg.max_wait_time, cfg.popular),
        (Duration::from_secs(30), Duration::from_secs(3), true)
    );
    assert_eq!(cfg.ledger, greenthread_sidecar::LedgerKind::Kube);
    assert_eq!(cfg.gpus, ["gpu-node-1-2", "gpu-node-1-3"]);
    assert_eq!(cfg.namespace, "greenthread-system");
    // 0.45 × 80 GiB: the engine's share, reserved when waking.
    assert_eq!(cfg.memory_bytes, Some(38_654_705_664));
    let ports: Vec<(String, i32)> = sidecar
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [("http".to_string(), 8080), ("metrics".to_string(), 9090)]
    );
    let live = sidecar
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    let ready = sidecar
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        (live.path.as_deref(), ready.path.as_deref()),
        (Some("/health"), Some("/ready"))
    );
}

#[test]
fn rendered_objects_pass_kubernetes_validate() {
    let pod = render_pod(&model(), 0, &gpus(), &Settings::default()).unwrap();
    let service = render_service(&model());
    let svc = service.spec.as_ref().unwrap();
    assert_eq!(
        svc.selector.as_ref().unwrap()["greenthread.ai/model"],
        "qwen"
    );
    assert_eq!(svc.ports.as_ref().unwrap()[0].port, 80);
    kubernetes_validate("pod", "Pod", &pod);
    kubernetes_validate("service", "Service", &service);
}

/// Writes `obj` (with its `apiVersion` and `kind`) and checks it with
/// `kubernetes-validate --strict`.
fn kubernetes_validate(name: &str, kind: &str, obj: &impl serde::Serialize) {
    let dir = std::env::temp_dir().join(format!("gt-render-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut json = serde_json::to_value(obj).unwrap();
    json["apiVersion"] = "v1".into();
    json["kind"] = kind.into();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&path)
        .output()
        .expect("kubernetes-validate (PyPI; scripts/test installs it)");
    assert!(
        out.status.success(),
        "{name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Model with adapters: LoRA on in the engine within the spec's bounds, its runtime
/// API enabled, and the sidecar reading the adapters from the Model's ConfigMap (mounted
/// read-only, optional), never from its own flags: changing them never re-creates a pod.
#[test]
fn adapters_turn_lora_on_and_reach_the_sidecar_through_a_config_map() {
    use greenthread_controller::render::render_adapters_config_map;
    let m = with_engine(serde_json::json!({
        "adapters": [{"name": "sql", "source": "/models/lora/sql"}, {"name": "chat", "source": "org/chat-lora"}],
        "maxLoraRank": 64,
    }));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let engine = container(&pod, "engine");
    let args = engine.args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--enable-sleep-mode --enable-lora --max-loras 4 --max-lora-rank 64 --gpu-memory-utilization"),
        "{args}"
    );
    assert_eq!(
        env(engine, "VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
        Some("True")
    );
    let sidecar = container(&pod, "sidecar");
    let sargs = sidecar.args.as_ref().unwrap().join(" ");
    assert!(
        sargs.contains("--adapters-file /etc/greenthread/adapters/adapters.json"),
        "{sargs}"
    );
    assert!(!sargs.contains("--adapter "), "{sargs}");
    let mount = sidecar
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "adapters")
        .unwrap();
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/etc/greenthread/adapters", Some(true))
    );
    // The engine sees no adapters volume: only the sidecar reads it.
    assert!(engine.volume_mounts.is_none(), "{:?}", engine.volume_mounts);
    let volume = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "adapters")
        .unwrap();
    let cm = volume.config_map.as_ref().unwrap();
    assert_eq!(
        (cm.name.as_str(), cm.optional),
        ("qwen-adapters", Some(true))
    );
    let config = render_adapters_config_map(&m).unwrap();
    let listed: Vec<greenthread_api::AdapterSpec> =
        serde_json::from_str(&config.data.as_ref().unwrap()["adapters.json"]).unwrap();
    assert_eq!(listed, m.spec.adapters);
    assert_eq!(
        config.metadata.owner_references.as_ref().unwrap()[0].kind,
        "Model"
    );
    kubernetes_validate("lora-pod", "Pod", &pod);
    kubernetes_validate("adapters", "ConfigMap", &config);

    // SGLang starts with no adapters, so it is told which layers they may touch.
    let m = with_engine(serde_json::json!({"engine": "sglang", "maxLoras": 3}));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let args = container(&pod, "engine").args.as_ref().unwrap().join(" ");
    assert!(
        args.contains(
            "--enable-lora --max-loras-per-batch 3 --max-lora-rank 16 --lora-target-modules all"
        ),
        "{args}"
    );
    // Without adapters or maxLoras, LoRA stays off and nothing is mounted.
    let pod = render_pod(&model(), 0, &gpus(), &Settings::default()).unwrap();
    let args = container(&pod, "engine").args.as_ref().unwrap().join(" ");
    assert!(!args.contains("lora"), "{args}");
    assert!(render_adapters_config_map(&model()).is_none());
}

/// On-demand adapters: LoRA on in the engine, the sidecar told to serve them, and one
/// cache volume at the same path in both containers (the sidecar writes, the engine
/// reads).
#[test]
fn on_demand_adapters_share_a_cache_between_sidecar_and_engine() {
    let m = with_engine(serde_json::json!({
        "lora": {"enabled": true, "maxRank": 64, "cacheDir": "/cache/lora", "downloadTimeout": "2m"}
    }));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let args = container(&pod, "engine").args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--enable-lora --max-loras 4 --max-lora-rank 64"),
        "{args}"
    );
    let sargs = container(&pod, "sidecar").args.as_ref().unwrap().join(" ");
    assert!(
        sargs.contains(
            "--lora-on-demand --lora-cache-dir /cache/lora --lora-download-timeout 2m --max-loras 4"
        ),
        "{sargs}"
    );
    for c in ["engine", "sidecar"] {
        let mount = container(&pod, c)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "lora-cache")
            .unwrap_or_else(|| panic!("{c} has no lora-cache mount"));
        assert_eq!(mount.mount_path, "/cache/lora", "{c}");
    }
    let volume = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    let cache = volume.iter().find(|v| v.name == "lora-cache").unwrap();
    assert!(cache.empty_dir.is_some());
    kubernetes_validate("lora-on-demand-pod", "Pod", &pod);
    // The default path, when the Model names none.
    let m = with_engine(serde_json::json!({"lora": {"enabled": true}}));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let sargs = container(&pod, "sidecar").args.as_ref().unwrap().join(" ");
    assert!(
        sargs.contains("--lora-cache-dir /var/cache/greenthread/adapters"),
        "{sargs}"
    );
}

fn with_engine(engine: serde_json::Value) -> Model {
    let mut m = model();
    let mut spec = serde_json::to_value(&m.spec).unwrap();
    for (k, v) in engine.as_object().unwrap() {
        spec[k] = v.clone();
    }
    m.spec = serde_json::from_value(spec).unwrap();
    m
}

#[test]
fn sglang_runs_beside_the_sidecar_with_its_memory_saver_on() {
    let m = with_engine(serde_json::json!({"engine": "sglang"}));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let engine = container(&pod, "engine");
    assert_eq!(engine.command.as_ref().unwrap(), &["python3"]);
    let args = engine.args.as_ref().unwrap().join(" ");
    assert!(
        args.starts_with("-m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct --host 127.0.0.1 --port 8001 --enable-memory-saver --enable-weights-cpu-backup --enable-metrics --mem-fraction-static 0.45 --tp 2 --dtype bfloat16 --quantization awq --max-model-len 8192"),
        "{args}"
    );
    let sidecar = container(&pod, "sidecar").args.as_ref().unwrap().join(" ");
    assert!(sidecar.ends_with("--engine sglang"), "{sidecar}");
}

#[test]
fn llama_cpp_runs_under_the_sidecar_so_that_sleeping_stops_it() {
    let m = with_engine(serde_json::json!({
        "engine": "llamacpp",
        "extraArgs": ["-m", "/models/gemma.gguf", "--no-jinja", "--chat-template", "gemma"],
    }));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    // One container: the engine's image, running the sidecar, which runs the engine.
    assert_eq!(spec.containers.len(), 1);
    let c = &spec.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/ggml-org/llama.cpp:server")
    );
    assert_eq!(c.command.as_ref().unwrap(), &["/greenthread/greenthread"]);
    let args = c.args.as_ref().unwrap();
    assert_eq!(args[0], "sidecar");
    let at = args.iter().position(|a| a == "--engine-command").unwrap();
    assert_eq!(args[at - 1], "llamacpp");
    assert_eq!(
        args[at + 1],
        "env PORT=8001 /app/llama-server -m /models/gemma.gguf --no-jinja --chat-template gemma --host 127.0.0.1 --port 8001 --alias Qwen/Qwen2.5-7B-Instruct --metrics"
    );
    // The binary comes from greenthread's image through an init container.
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        init.args.as_ref().unwrap(),
        &["install-binary", "/greenthread"]
    );
    assert!(spec.volumes.as_ref().unwrap()[0].empty_dir.is_some());
    // The sidecar's ports and probes are on it, and the GPUs by UUID.
    let ports: Vec<_> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.name.clone().unwrap())
        .collect();
    assert_eq!(ports, ["http", "metrics"]);
    assert!(c.readiness_probe.is_some());
    assert_eq!(
        env(c, "NVIDIA_VISIBLE_DEVICES"),
        Some("GPU-aaaa-0,GPU-aaaa-1")
    );
    let mut json = serde_json::to_value(&pod).unwrap();
    json["apiVersion"] = "v1".into();
    json["kind"] = "Pod".into();
    greenthread_test_support::chart::kubernetes_validate(&[json]).unwrap();
}

/// Security review finding 8: the token reaches only the sidecar; every container runs
/// restricted; the engine's context is the Model's to widen.
#[test]
fn model_pods_carry_least_privilege() {
    use greenthread_controller::render::TOKEN_DIR;
    let pod = render_pod(&model(), 0, &gpus(), &Settings::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        spec.security_context
            .as_ref()
            .unwrap()
            .seccomp_profile
            .as_ref()
            .unwrap()
            .type_,
        "RuntimeDefault"
    );
    let mounts_token = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == TOKEN_DIR)
    };
    let engine = container(&pod, "engine");
    let sidecar = container(&pod, "sidecar");
    assert!(
        !mounts_token(engine),
        "the engine (a user-chosen image) holds no token"
    );
    assert!(mounts_token(sidecar));
    for c in [engine, sidecar] {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{}",
            c.name
        );
    }
    let ours = sidecar.security_context.as_ref().unwrap();
    assert_eq!(
        (
            ours.run_as_non_root,
            ours.run_as_user,
            ours.read_only_root_filesystem
        ),
        (Some(true), Some(65532), Some(true))
    );
    // vLLM's image runs as root: the engine is not forced non-root unless asked.
    assert_eq!(
        engine.security_context.as_ref().unwrap().run_as_non_root,
        None
    );
    let widened = with_engine(serde_json::json!({
        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "capabilities": {"add": ["IPC_LOCK"]}},
    }));
    let pod = render_pod(&widened, 0, &gpus(), &Settings::default()).unwrap();
    let sc = container(&pod, "engine").security_context.clone().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.run_as_user),
        (Some(true), Some(1000))
    );
    assert_eq!(
        sc.capabilities.unwrap().add.as_deref(),
        Some(&["IPC_LOCK".to_string()][..])
    );
    // Process engines: the sidecar runs in the engine's container; its installer is ours.
    let m = with_engine(serde_json::json!({"engine": "llamacpp"}));
    let pod = render_pod(&m, 0, &gpus(), &Settings::default()).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        init.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    assert_eq!(
        spec.containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .allow_privilege_escalation,
        Some(false)
    );
    let mut json = serde_json::to_value(&pod).unwrap();
    json["apiVersion"] = "v1".into();
    json["kind"] = "Pod".into();
    greenthread_test_support::chart::kubernetes_validate(&[json]).unwrap();
}

#[test]
fn only_allowed_images_run() {
    use greenthread_controller::render::{engine_image, image_allowed};
    let allowed = vec![
        "vllm/vllm-openai:*".to_string(),
        "registry.corp/*".to_string(),
    ];
    for (image, ok) in [
        ("vllm/vllm-openai:v0.11.0", true),
        ("registry.corp/team-a/engine:1", true),
        ("evil.example/vllm/vllm-openai:v0.11.0", false),
        ("vllm/vllm-openai", false),
        ("docker.io/library/alpine", false),
    ] {
        assert_eq!(image_allowed(image, &allowed), ok, "{image}");
    }
    assert!(image_allowed("anything", &[]), "no list: any image");
    let s = Settings::default();
    assert_eq!(engine_image(&model(), &s), s.vllm_image);
    let custom = with_engine(serde_json::json!({"image": "evil.example/x:1"}));
    assert_eq!(engine_image(&custom, &s), "evil.example/x:1");
}

/// Security review: the engine answers only its sidecar, which holds the same key from
/// the Model's own Secret; users' keys never reach the engine.
#[test]
fn the_engine_and_its_sidecar_share_a_key_from_the_models_secret() {
    use greenthread_controller::render::{ENGINE_KEY, render_engine_key_secret, takes_engine_key};
    let secret_of = |c: &Container, var: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|r| (r.name.clone(), r.key.clone()))
    };
    let pod = render_pod(&model(), 0, &gpus(), &Settings::default()).unwrap();
    let want = Some(("qwen-engine-key".to_string(), ENGINE_KEY.to_string()));
    assert_eq!(secret_of(container(&pod, "engine"), "VLLM_API_KEY"), want);
    assert_eq!(
        secret_of(container(&pod, "sidecar"), "GREENTHREAD_ENGINE_API_KEY"),
        want
    );
    // SGLang takes the key as a flag, expanded by the kubelet from its environment.
    let sglang = render_pod(
        &with_engine(serde_json::json!({"engine": "sglang"})),
        0,
        &gpus(),
        &Settings::default(),
    )
    .unwrap();
    let args = container(&sglang, "engine").args.clone().unwrap();
    assert!(
        args.ends_with(&["--api-key".into(), "$(VLLM_API_KEY)".into()]),
        "{args:?}"
    );
    // Process engines have no key to take.
    assert!(!takes_engine_key(&with_engine(
        serde_json::json!({"engine": "llamacpp"})
    )));
    let secret = render_engine_key_secret(&model(), "k3y");
    assert_eq!(secret.metadata.owner_references.unwrap()[0].name, "qwen");
    assert_eq!(secret.data.unwrap()[ENGINE_KEY].0, b"k3y");
}

/// The one assembly of a sidecar's configuration, written into the pod and read back by
/// the sidecar's own command-line parser, is the same configuration: for every engine,
/// odd durations, popular or not.
#[test]
fn the_sidecar_args_parse_back_into_the_configuration_they_were_rendered_from() {
    use greenthread_sidecar::SidecarConfig;
    let variants = [
        serde_json::json!({}),
        serde_json::json!({"engine": "sglang", "fairness": {"popular": false}}),
        serde_json::json!({"engine": "sim", "sleep": {"idleTimeout": "1m30s", "drainTimeout": "1500ms", "level": 1}}),
        serde_json::json!({"engine": "llamacpp", "extraArgs": ["-m", "/models/a b.gguf"]}),
        serde_json::json!({"engine": "process", "command": ["my-server", "--port", "{port}"], "image": "x"}),
        serde_json::json!({"fairness": {"minRuntime": "0s", "maxWaitTime": "2h"}}),
    ];
    for v in variants {
        let m = with_engine(v.clone());
        let valid = m.spec.validate("spec").unwrap();
        // Every variant also with the installation's non-default choices.
        for settings in [
            Settings::default(),
            Settings {
                policy: greenthread_ledger::Policy::Lru,
                preemption: greenthread_sidecar::Preemption::Resume,
                ..Settings::default()
            },
        ] {
            let want = greenthread_controller::render::sidecar_config(&valid, &gpus(), &settings);
            let pod = render_pod(&m, 0, &gpus(), &settings).unwrap();
            let c = &pod.spec.as_ref().unwrap().containers;
            let c = c.iter().find(|c| c.name == "sidecar").unwrap_or(&c[0]);
            let args = c.args.as_ref().unwrap();
            assert_eq!(args[0], "sidecar", "{v}");
            let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            let parsed = SidecarConfig::from_args(&valid.spec.model_name, &rest).unwrap();
            assert_eq!(parsed, want, "{v}: {}", args.join(" "));
            // And the assembly carries the spec's values, not the defaults.
            assert_eq!(parsed.idle_timeout, valid.idle_timeout, "{v}");
            assert_eq!(parsed.max_wait_time, valid.max_wait_time, "{v}");
            assert_eq!(parsed.popular, valid.spec.fairness.popular, "{v}");
            assert_eq!(
                (parsed.policy, parsed.preemption),
                (settings.policy, settings.preemption),
                "{v}"
            );
        }
    }
}

#[test]
fn model_pods_pull_with_the_installations_secrets() {
    let plain = render_pod(&model(), 0, &gpus(), &Settings::default()).unwrap();
    assert_eq!(plain.spec.as_ref().unwrap().image_pull_secrets, None);
    let settings = Settings {
        image_pull_secrets: vec!["regcred".into(), "mirror".into()],
        ..Settings::default()
    };
    let pod = render_pod(&model(), 0, &gpus(), &settings).unwrap();
    let names: Vec<&str> = pod
        .spec
        .as_ref()
        .unwrap()
        .image_pull_secrets
        .as_ref()
        .unwrap()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["regcred", "mirror"]);
}

/// [`MODEL`] in the original's newer shape: `parallelism` for `tensorParallelSize`,
/// `product` for the node selector's GPU product.
fn newer_shape() -> Model {
    let yaml = MODEL
        .replace(
            "tensorParallelSize: 2",
            "parallelism: {tensor: 2, pipeline: 1}",
        )
        .replace(
            "nodeSelector: {nvidia.com/gpu.product: H100}",
            "product: H100",
        );
    assert_ne!(yaml, MODEL);
    serde_saphyr::from_str(&yaml).unwrap()
}

#[test]
fn a_model_in_the_newer_shape_renders_the_pod_of_the_older() {
    let newer = newer_shape();
    assert_ne!(newer.spec, model().spec);
    let settings = Settings::default();
    let (older_pod, newer_pod) = (
        render_pod(&model(), 0, &gpus(), &settings).unwrap(),
        render_pod(&newer, 0, &gpus(), &settings).unwrap(),
    );
    // The same pod, to its spec hash: rewriting a manifest in the other shape rolls nothing.
    assert_eq!(older_pod, newer_pod);
    assert_eq!(vllm_args(&model(), 8001), vllm_args(&newer, 8001));
}

#[test]
fn pipeline_stages_load_format_and_model_type_reach_each_engine() {
    let vllm = with_engine(serde_json::json!({
        "parallelism": {"pipeline": 2}, "loadFormat": "runai_streamer",
    }));
    let args = vllm_args(&vllm, 8001).join(" ");
    assert!(
        args.contains("--tensor-parallel-size 2 --pipeline-parallel-size 2 --dtype bfloat16 --quantization awq --load-format runai_streamer --served-model-name"),
        "{args}"
    );
    let sglang = with_engine(serde_json::json!({
        "engine": "sglang", "modelType": "embedding", "parallelism": {"pipeline": 2},
    }));
    let pod = render_pod(&sglang, 0, &gpus(), &Settings::default()).unwrap();
    let args = container(&pod, "engine").args.as_ref().unwrap().join(" ");
    assert!(
        args.contains(
            "--enable-metrics --is-embedding --mem-fraction-static 0.45 --tp 2 --pp-size 2 --dtype"
        ),
        "{args}"
    );
    let llama = with_engine(serde_json::json!({
        "engine": "llamacpp", "modelType": "reranker", "extraArgs": ["-m", "/m/rerank.gguf"],
    }));
    let pod = render_pod(&llama, 0, &gpus(), &Settings::default()).unwrap();
    let args = pod.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    let at = args.iter().position(|a| a == "--engine-command").unwrap();
    assert!(
        args[at + 1].ends_with("--metrics --reranking"),
        "{}",
        args[at + 1]
    );
    // One pipeline stage says nothing: pods rendered before the field existed stay as they are.
    let plain = vllm_args(&model(), 8001).join(" ");
    assert!(
        !plain.contains("pipeline") && !plain.contains("load-format"),
        "{plain}"
    );
}

fn weights_volume(pod: &k8s_openapi::api::core::v1::Pod) -> &k8s_openapi::api::core::v1::Volume {
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    volumes.iter().find(|v| v.name == "weights").unwrap()
}

#[test]
fn weights_come_through_an_init_container_into_the_nodes_cache() {
    use greenthread_controller::{WeightsArgs, render::WEIGHTS_DIR};
    let settings = Settings {
        weights: WeightsArgs {
            host_path: Some("/var/lib/greenthread/weights".into()),
            budget: Some("500Gi".into()),
            endpoint: Some("https://hf-mirror.example.com".into()),
            token_secret: Some("hf-token".into()),
            claim: None,
        },
        ..Settings::default()
    };
    let pod = render_pod(&model(), 0, &gpus(), &settings).unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.name, "download");
    assert_eq!(
        init.args.as_deref().unwrap(),
        [
            "download",
            "Qwen/Qwen2.5-7B-Instruct",
            "--cache-dir",
            WEIGHTS_DIR,
            "--cache-budget",
            "500Gi"
        ]
    );
    assert_eq!(
        env(init, "HF_ENDPOINT"),
        Some("https://hf-mirror.example.com")
    );
    // The token from the Model namespace's Secret, never a value in the pod.
    let token = init
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "HF_TOKEN")
        .unwrap();
    assert_eq!(token.value, None);
    let key = token
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (key.name.as_str(), key.key.as_str(), key.optional),
        ("hf-token", "token", Some(true))
    );
    assert_eq!(
        weights_volume(&pod).host_path.as_ref().unwrap().path,
        "/var/lib/greenthread/weights"
    );
    // The engine reads that cache, offline.
    let engine = container(&pod, "engine");
    assert!(
        engine
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "weights" && m.mount_path == WEIGHTS_DIR)
    );
    assert_eq!(env(engine, "HF_HUB_OFFLINE"), Some("1"));
    assert_eq!(env(engine, "HF_HUB_CACHE"), Some(WEIGHTS_DIR));
    let mut json = serde_json::to_value(&pod).unwrap();
    json["apiVersion"] = "v1".into();
    json["kind"] = "Pod".into();
    greenthread_test_support::chart::kubernetes_validate(&[json]).unwrap();

    // A claim instead of a host path.
    let claim = Settings {
        weights: WeightsArgs {
            claim: Some("weights".into()),
            ..WeightsArgs::default()
        },
        ..Settings::default()
    };
    let pod = render_pod(&model(), 0, &gpus(), &claim).unwrap();
    assert_eq!(
        weights_volume(&pod)
            .persistent_volume_claim
            .as_ref()
            .unwrap()
            .claim_name,
        "weights"
    );
    // None for a model from a path, for the simulator, or without a cache.
    let path = with_engine(serde_json::json!({"modelName": "/models/qwen"}));
    let sim = with_engine(serde_json::json!({"engine": "sim"}));
    for (m, s) in [
        (&path, &settings),
        (&sim, &settings),
        (&model(), &Settings::default()),
    ] {
        let pod = render_pod(m, 0, &gpus(), s).unwrap();
        assert!(pod.spec.as_ref().unwrap().init_containers.is_none());
    }
}
