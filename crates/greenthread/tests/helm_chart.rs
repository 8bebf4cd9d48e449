//! The Helm chart with real Helm (lint in strict mode, render, values schema), every
//! rendered manifest validated (`kubernetes-validate --strict`, the Prometheus Operator's
//! schemas), and the monitors checked against what the chart and the controller label.

use std::collections::BTreeSet;

use greenthread_api::{GpuSpec, Model, ModelSpec};
use greenthread_controller::render::{Settings, render_pod};
use greenthread_test_support::chart::{
    chart_dir, find, helm, kubernetes_validate, lint, render, selects, validate_monitors,
};
use serde_json::{Value, json};

const MONITORING: &[&str] = &["--set", "monitoring.enabled=true"];
const ALL_OPTIONS: &[&str] = &["-f", "charts/tests/all-options.yaml"];
const BATCH: &[&str] = &["-f", "charts/tests/batch.yaml"];

const SEED_MONITORS: [(&str, &str); 5] = [
    ("PodMonitor", "greenthread-sidecar"),
    ("ServiceMonitor", "greenthread-controller"),
    ("ServiceMonitor", "greenthread-apiserver"),
    ("PodMonitor", "greenthread-dcgm"),
    ("PodMonitor", "greenthread-vllm"),
];

fn is_monitoring(o: &Value) -> bool {
    o["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

fn monitors(objects: &[Value]) -> BTreeSet<(String, String)> {
    objects
        .iter()
        .filter(|o| o["kind"] == "PodMonitor" || o["kind"] == "ServiceMonitor")
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_string(),
                o["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn args_of(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn lint_is_clean_in_strict_mode_with_default_monitoring_and_every_option() {
    for args in [&[][..], MONITORING, ALL_OPTIONS, BATCH] {
        if let Err(findings) = lint(args) {
            panic!("helm lint --strict {args:?}:\n{findings}");
        }
    }
}

#[test]
fn default_values_install_the_control_plane_into_greenthread_system_without_monitors() {
    let objects = render(&[]);
    for o in objects
        .iter()
        .filter(|o| o["metadata"]["namespace"].is_string())
    {
        assert_eq!(o["metadata"]["namespace"], "greenthread-system", "{o}");
    }
    assert!(
        !objects.iter().any(is_monitoring),
        "monitoring is off by default"
    );
    assert!(!objects.iter().any(|o| o["kind"] == "Ingress"));
    // Secure by default: the private port behind a NetworkPolicy, random keys in a
    // generated Secret that the API server reads, the ledger admission policy.
    let policy = find(&objects, "NetworkPolicy", "greenthread-models");
    assert_eq!(policy["spec"]["ingress"][1]["ports"][0]["port"], "metrics");
    let secret = find(&objects, "Secret", "greenthread-auth");
    for key in ["api-keys", "admin-token"] {
        let value = secret["data"][key].as_str().unwrap();
        assert!(value.len() > 40, "{key} is random and long");
    }
    let apiserver = find(&objects, "Deployment", "greenthread-apiserver");
    let env = apiserver["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(
        env.contains("GREENTHREAD_ADMIN_TOKEN") && env.contains("greenthread-auth"),
        "{env}"
    );
    assert!(
        !args_of(apiserver)
            .iter()
            .any(|a| a == "--allow-unauthenticated")
    );
    find(
        &objects,
        "ValidatingAdmissionPolicy",
        "greenthread-gpu-ledger",
    );
    let controller = find(&objects, "Deployment", "greenthread-controller");
    assert_eq!(controller["spec"]["replicas"], 2);
    let args = args_of(controller);
    assert!(args.contains(&"--lease-name=greenthread-controller".to_string()));
    assert!(args.contains(&"--model-service-account=greenthread-model".to_string()));
    assert!(args.contains(&"--sidecar-image=ghcr.io/greenthread/greenthread:0.1.0".to_string()));
    // The Lease is in the controller's Role, nowhere cluster-wide.
    let role = find(&objects, "Role", "greenthread-controller");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"] == json!(["leases"]))
    );
    let cluster_role = find(&objects, "ClusterRole", "greenthread-controller");
    assert!(!cluster_role.to_string().contains("leases"));
    // Model pods' service account may update GPU status in this namespace.
    find(&objects, "ServiceAccount", "greenthread-model");
    let binding = find(&objects, "RoleBinding", "greenthread-gpu-status");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "greenthread-model", "namespace": "greenthread-system"}])
    );
    let status_role = find(&objects, "Role", "greenthread-gpu-status");
    assert!(status_role.to_string().contains("gpus/status"));
    // The agent runs on GPU nodes only.
    let agent = find(&objects, "DaemonSet", "greenthread-agent");
    assert_eq!(
        agent["spec"]["template"]["spec"]["nodeSelector"],
        json!({"nvidia.com/gpu.present": "true"})
    );
    // Non-root, read-only, no capabilities, RuntimeDefault seccomp.
    for (kind, name) in [
        ("Deployment", "greenthread-controller"),
        ("Deployment", "greenthread-apiserver"),
        ("DaemonSet", "greenthread-agent"),
    ] {
        let spec = &find(&objects, kind, name)["spec"]["template"]["spec"];
        let sc = &spec["containers"][0]["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
    }
}

/// A Model pod as the controller renders it in `namespace`.
fn model_pod(namespace: &str) -> Value {
    let spec: ModelSpec = serde_json::from_value(json!({"modelName": "org/m"})).unwrap();
    let mut model = Model::new("m", spec);
    model.metadata.namespace = Some(namespace.into());
    model.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    let gpu = GpuSpec {
        node: "n".into(),
        index: 0,
        uuid: "GPU-0".into(),
        product: "H100".into(),
        memory_bytes: 80 << 30,
        host_memory_bytes: None,
    };
    serde_json::to_value(render_pod(&model, 0, &[gpu], &Settings::default()).unwrap()).unwrap()
}

fn container_ports(pod_spec: &Value) -> BTreeSet<String> {
    pod_spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect()
}

/// A ServiceMonitor selects a rendered Service in its namespaces, by labels, whose named
/// port exists and leads to a container port of the pods the Service selects.
fn assert_service_monitor_targets(objects: &[Value], monitor: &str, workload: &str) {
    let m = find(objects, "ServiceMonitor", monitor);
    let namespaces = &m["spec"]["namespaceSelector"]["matchNames"];
    let port = m["spec"]["endpoints"][0]["port"].as_str().unwrap();
    let service = objects
        .iter()
        .find(|o| {
            o["kind"] == "Service"
                && selects(
                    &m["spec"]["selector"]["matchLabels"],
                    &o["metadata"]["labels"],
                )
                && namespaces
                    .as_array()
                    .unwrap()
                    .contains(&o["metadata"]["namespace"])
        })
        .unwrap_or_else(|| panic!("{monitor} selects no rendered Service"));
    let service_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("{monitor}: Service has no port {port}"));
    let deployment = find(objects, "Deployment", workload);
    let pod = &deployment["spec"]["template"];
    assert!(
        selects(&service["spec"]["selector"], &pod["metadata"]["labels"]),
        "{monitor}: the Service does not select {workload}'s pods"
    );
    let target = service_port["targetPort"].as_str().unwrap();
    assert!(
        container_ports(&pod["spec"]).contains(target),
        "{monitor}: no port {target}"
    );
}

#[test]
fn monitoring_renders_exactly_the_five_seed_monitors_each_selecting_what_is_labeled_so() {
    let objects = render(MONITORING);
    let expected: BTreeSet<(String, String)> = SEED_MONITORS
        .iter()
        .map(|(k, n)| (k.to_string(), n.to_string()))
        .collect();
    assert_eq!(monitors(&objects), expected);

    // Sidecar and vLLM: the controller's Model pods, their private port, the paths the
    // sidecar serves there.
    let pod = model_pod("greenthread-system");
    for (name, path) in [
        ("greenthread-sidecar", "/metrics"),
        ("greenthread-vllm", "/metrics/engine"),
    ] {
        let m = find(&objects, "PodMonitor", name);
        assert!(
            selects(
                &m["spec"]["selector"]["matchLabels"],
                &pod["metadata"]["labels"]
            ),
            "{name} does not select the controller's pods: {} vs {}",
            m["spec"]["selector"],
            pod["metadata"]["labels"]
        );
        assert_eq!(
            m["spec"]["namespaceSelector"]["matchNames"],
            json!(["greenthread-system"])
        );
        let endpoint = &m["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["path"], path);
        let port = endpoint["port"].as_str().unwrap();
        assert!(
            container_ports(&pod["spec"]).contains(port),
            "{name}: pod has no port {port}"
        );
        // The model label comes from the label the controller sets.
        assert_eq!(
            endpoint["relabelings"][0]["sourceLabels"],
            json!(["__meta_kubernetes_pod_label_greenthread_ai_model"])
        );
        assert!(pod["metadata"]["labels"]["greenthread.ai/model"].is_string());
    }
    assert_service_monitor_targets(&objects, "greenthread-controller", "greenthread-controller");
    assert_service_monitor_targets(&objects, "greenthread-apiserver", "greenthread-apiserver");

    // DCGM by default: NVIDIA's exporter pods, as configured.
    let dcgm = find(&objects, "PodMonitor", "greenthread-dcgm");
    assert_eq!(
        dcgm["spec"]["selector"]["matchLabels"],
        json!({"app": "nvidia-dcgm-exporter"})
    );
    assert_eq!(
        dcgm["spec"]["namespaceSelector"]["matchNames"],
        json!(["gpu-operator"])
    );
    // With source: agent, the agent's pods, which then export the DCGM names.
    let with_agent = render(&[
        "--set",
        "monitoring.enabled=true",
        "--set",
        "monitoring.dcgm.source=agent",
    ]);
    let dcgm = find(&with_agent, "PodMonitor", "greenthread-dcgm");
    let agent = find(&with_agent, "DaemonSet", "greenthread-agent");
    assert!(selects(
        &dcgm["spec"]["selector"]["matchLabels"],
        &agent["spec"]["template"]["metadata"]["labels"]
    ));
    let port = dcgm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .unwrap();
    assert!(container_ports(&agent["spec"]["template"]["spec"]).contains(port));
    assert!(args_of(agent).contains(&"--dcgm-metrics".to_string()));

    // The alerts are the rule file promtool tests, unchanged.
    let rule = find(&objects, "PrometheusRule", "greenthread");
    let file: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart_dir().join("alerts/greenthread.rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for a in [
        "GreenThreadWakeLatencyHigh",
        "GreenThreadModelStuckWaking",
        "GreenThreadPreemptionRateHigh",
    ] {
        assert!(alerts.contains(&a), "{a} missing: {alerts:?}");
    }

    // The four dashboards, byte for byte, for Grafana's sidecar in folder GreenThread.
    let dashboards: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap")
        .collect();
    assert_eq!(dashboards.len(), 4);
    for cm in dashboards {
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(
            cm["metadata"]["annotations"]["grafana_folder"],
            "GreenThread"
        );
        let (file, json) = cm["data"].as_object().unwrap().iter().next().unwrap();
        let on_disk = std::fs::read_to_string(chart_dir().join("dashboards").join(file)).unwrap();
        assert_eq!(
            json.as_str().unwrap().trim_end(),
            on_disk.trim_end(),
            "{file}"
        );
    }
}

#[test]
fn every_option_renders_where_it_should() {
    let objects = render(ALL_OPTIONS);
    let controller = find(&objects, "Deployment", "greenthread-controller");
    assert_eq!(controller["spec"]["replicas"], 3);
    assert_eq!(controller["metadata"]["labels"]["team"], "platform");
    let args = args_of(controller);
    for a in [
        "--watch-namespace=team-a",
        "--runtime-class=nvidia",
        "--model-service-account=llm-runner",
        "--lease-duration=20s",
        "--sidecar-image=registry.example.com/greenthread:0.1.0-rc1",
        "--vllm-image=vllm/vllm-openai:v0.11.1",
        "--allowed-images=vllm/vllm-openai:*,registry.example.com/llm/*",
    ] {
        assert!(args.contains(&a.to_string()), "{a} not in {args:?}");
    }
    let agent = find(&objects, "DaemonSet", "greenthread-agent");
    let agent_args = args_of(agent);
    for a in [
        "--fake-gpus=4",
        "--dcgm-metrics",
        "--interval=2s",
        "--host-memory-for-sleepers=384Gi",
    ] {
        assert!(
            agent_args.contains(&a.to_string()),
            "{a} not in {agent_args:?}"
        );
    }
    assert_eq!(
        agent["spec"]["template"]["spec"]["runtimeClassName"],
        "nvidia"
    );
    let ingress = find(&objects, "Ingress", "greenthread-apiserver");
    assert_eq!(ingress["spec"]["rules"][0]["host"], "llm.example.com");
    assert_eq!(
        ingress["spec"]["tls"][0]["secretName"],
        "llm-example-com-tls"
    );
    let apiserver = find(&objects, "Deployment", "greenthread-apiserver");
    assert!(apiserver.to_string().contains("greenthread-auth"));
    // The user's Secret: none generated.
    assert!(!objects.iter().any(|o| o["kind"] == "Secret"));
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "ValidatingAdmissionPolicy")
    );
    // One service account and NetworkPolicy per Model namespace; the binding names both.
    for ns in ["team-a", "team-b"] {
        assert!(objects.iter().any(|o| o["kind"] == "ServiceAccount"
            && o["metadata"]["name"] == "llm-runner"
            && o["metadata"]["namespace"] == ns));
        let policy = objects
            .iter()
            .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["namespace"] == ns)
            .unwrap();
        // The private port admits Prometheus's namespace and the control plane only.
        let private = &policy["spec"]["ingress"][1];
        assert_eq!(private["ports"][0]["port"], "metrics");
        assert!(private.to_string().contains("observability"));
        // …and selects the controller's pods.
        assert!(selects(
            &policy["spec"]["podSelector"]["matchLabels"],
            &model_pod(ns)["metadata"]["labels"]
        ));
    }
    let binding = find(&objects, "RoleBinding", "greenthread-gpu-status");
    assert_eq!(binding["subjects"].as_array().unwrap().len(), 2);
    // With Model namespaces listed, the controller reads cluster-wide and writes only there.
    let cluster_role = find(&objects, "ClusterRole", "greenthread-controller").to_string();
    for verb in ["\"create\"", "\"delete\"", "\"patch\"", "secrets"] {
        assert!(
            !cluster_role.contains(verb),
            "{verb} cluster-wide: {cluster_role}"
        );
    }
    for ns in ["team-a", "team-b"] {
        let role = objects
            .iter()
            .find(|o| {
                o["kind"] == "Role"
                    && o["metadata"]["name"] == "greenthread-controller-models"
                    && o["metadata"]["namespace"] == ns
            })
            .unwrap()
            .to_string();
        assert!(
            role.contains("secrets") && role.contains("\"delete\""),
            "{role}"
        );
    }
    for m in SEED_MONITORS {
        let o = find(&objects, m.0, m.1);
        assert_eq!(o["metadata"]["labels"]["release"], "kube-prometheus-stack");
    }
    let cm = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "true");
    assert_eq!(
        cm["metadata"]["annotations"]["k8s-sidecar-target-directory"],
        "GreenThread"
    );
}

#[test]
fn every_rendered_manifest_validates() {
    for args in [&[][..], MONITORING, ALL_OPTIONS] {
        let objects = render(args);
        let (monitoring, core): (Vec<Value>, Vec<Value>) =
            objects.into_iter().partition(is_monitoring);
        if let Err(e) = kubernetes_validate(&core) {
            panic!("kubernetes-validate --strict {args:?}:\n{e}");
        }
        if !monitoring.is_empty() {
            let report = validate_monitors(&monitoring)
                .unwrap_or_else(|e| panic!("prometheus-operator schemas {args:?}:\n{e}"));
            assert!(report.contains("checked 6"), "{report}");
        }
    }
    // The validators do reject what is wrong.
    let mut objects = render(MONITORING);
    let deployment = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    deployment["spec"]["replicas"] = json!("two");
    assert!(kubernetes_validate(std::slice::from_ref(deployment)).is_err());
    let monitor = objects
        .iter_mut()
        .find(|o| o["kind"] == "PodMonitor")
        .unwrap();
    monitor["spec"]["podMetricsEndpoints"] = json!("metrics");
    assert!(validate_monitors(std::slice::from_ref(monitor)).is_err());
    // And the CRDs the chart installs.
    let crds: Vec<Value> = serde_saphyr::from_multiple(
        &std::fs::read_to_string(chart_dir().join("crds/greenthread.ai.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(crds.len(), 2);
    kubernetes_validate(&crds).unwrap();
}

#[test]
fn bad_values_are_rejected_with_a_message_naming_the_field() {
    for (set, field) in [
        ("controller.replicas=two", "/controller/replicas"),
        ("controller.leaseDuration=soon", "/controller/leaseDuration"),
        ("monitoring.dcgm.source=dcgm", "/monitoring/dcgm/source"),
        ("monitoring.enabeld=true", "enabeld"),
        ("apiserver.service.port=70000", "/apiserver/service/port"),
        ("models.namespaces[0]=Team_A", "/models/namespaces/0"),
        ("controller.preemption=pause", "/controller/preemption"),
        (
            "controller.schedulingPolicy=lru,controller.preemption=resume",
            "/controller/preemption",
        ),
    ] {
        let out = helm("schema", &["--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(stderr.contains(field), "{set}: {stderr}");
    }
    assert!(helm("schema", &[]).status.success());
    // No keys at all must be asked for by name.
    let out = helm("render", &["--set", "apiserver.auth.generate=false"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("allowUnauthenticated"), "{stderr}");
    let open = render(&[
        "--set",
        "apiserver.auth.generate=false",
        "--set",
        "apiserver.auth.allowUnauthenticated=true",
    ]);
    let args = args_of(find(&open, "Deployment", "greenthread-apiserver"));
    assert!(
        args.contains(&"--allow-unauthenticated".to_string()),
        "{args:?}"
    );
}

#[test]
fn the_batch_api_gets_a_volume_that_outlives_its_pod() {
    let objects = render(BATCH);
    let apiserver = find(&objects, "Deployment", "greenthread-apiserver");
    let args = args_of(apiserver);
    for a in [
        "--batch-dir=/var/lib/greenthread/batches",
        "--batch-concurrency=8",
        "--batch-quota=5Gi",
    ] {
        assert!(args.contains(&a.to_string()), "{a} not in {args:?}");
    }
    let pod = &apiserver["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "greenthread-apiserver-batches"
    );
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0]["mountPath"],
        "/var/lib/greenthread/batches"
    );
    // Writable by the API server's user; one pod at a time on the volume.
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    assert_eq!(apiserver["spec"]["strategy"]["type"], "Recreate");
    let claim = find(
        &objects,
        "PersistentVolumeClaim",
        "greenthread-apiserver-batches",
    );
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "50Gi");
    assert_eq!(claim["spec"]["storageClassName"], "fast-ssd");
    assert_eq!(
        claim["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let core: Vec<Value> = objects.into_iter().filter(|o| !is_monitoring(o)).collect();
    kubernetes_validate(&core).unwrap();
    // Off by default: no claim, no flag.
    let objects = render(&[]);
    assert!(!objects.iter().any(|o| o["kind"] == "PersistentVolumeClaim"));
    let args = args_of(find(&objects, "Deployment", "greenthread-apiserver"));
    assert!(!args.iter().any(|a| a.starts_with("--batch")), "{args:?}");
    // An existing claim is used as it is.
    let objects = render(&[
        "-f",
        "charts/tests/batch.yaml",
        "--set",
        "apiserver.batch.existingClaim=my-batches",
    ]);
    assert!(!objects.iter().any(|o| o["kind"] == "PersistentVolumeClaim"));
    let apiserver = find(&objects, "Deployment", "greenthread-apiserver");
    assert_eq!(
        apiserver["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "my-batches"
    );
    // Two API servers would both run the batches.
    let out = helm(
        "render",
        &[
            "-f",
            "charts/tests/batch.yaml",
            "--set",
            "apiserver.replicas=2",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apiserver.batch.enabled"), "{stderr}");
}

#[test]
fn the_weights_cache_reaches_the_controller_only_when_set() {
    let args = |sets: &[&str]| {
        let mut a = Vec::new();
        for s in sets {
            a.extend(["--set", *s]);
        }
        args_of(find(&render(&a), "Deployment", "greenthread-controller"))
    };
    let off = args(&["models.weights.budget=500Gi"]);
    assert!(
        !off.iter()
            .any(|a| a.contains("weights") || a.contains("hf-")),
        "{off:?}"
    );
    let on = args(&[
        "models.weights.hostPath=/var/lib/greenthread/weights",
        "models.weights.budget=500Gi",
        "models.weights.endpoint=https://hf-mirror.example.com",
        "models.weights.tokenSecret=hf-token",
    ]);
    for a in [
        "--weights-host-path=/var/lib/greenthread/weights",
        "--weights-budget=500Gi",
        "--hf-endpoint=https://hf-mirror.example.com",
        "--hf-token-secret=hf-token",
    ] {
        assert!(on.contains(&a.to_string()), "{a} not in {on:?}");
    }
    let claim = args(&["models.weights.existingClaim=weights"]);
    assert!(
        claim.contains(&"--weights-claim=weights".to_string()),
        "{claim:?}"
    );
    let out = helm("schema", &["--set", "models.weights.hostPath=relative/dir"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/models/weights/hostPath"));
}
