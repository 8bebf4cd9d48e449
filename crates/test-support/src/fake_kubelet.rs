//! A kubelet for the fake API server: runs the containers of the pods the controller
//! creates as real `greenthread` processes, exactly with the arguments and environment
//! rendered into the pod, and reports them Running and Ready with a pod IP.
//!
//! Each pod gets its own loopback address (`127.0.1.N`), standing for the pod's network
//! namespace: what a container binds on `0.0.0.0` or `127.0.0.1` is bound on that
//! address, so that every pod can use the same ports, as in a cluster. ConfigMap volumes
//! are files in a directory of the pod's, kept up to date as the kubelet does (replaced
//! whole, never half-written), and a container's path under such a mount is that
//! directory's.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{Proc, http};

struct Running {
    ip: String,
    _containers: Vec<Proc>,
    /// The pod's ConfigMap volumes: (volume's directory, ConfigMap name).
    config_maps: Vec<(std::path::PathBuf, String)>,
    namespace: String,
    _dir: tempfile::TempDir,
}

/// Writes ConfigMap `name`'s keys as files in `dir` (each replaced whole); a ConfigMap
/// that does not exist leaves the directory as it is (the volumes are optional).
async fn sync_config_map(client: &Client, namespace: &str, name: &str, dir: &std::path::Path) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let Ok(Some(cm)) = api.get_opt(name).await else {
        return;
    };
    for (key, value) in cm.data.unwrap_or_default() {
        let path = dir.join(&key);
        if std::fs::read_to_string(&path).is_ok_and(|v| v == value) {
            continue;
        }
        let tmp = dir.join(format!(".{key}.tmp"));
        if std::fs::write(&tmp, &value).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

pub struct FakeKubelet {
    pods: Arc<Mutex<BTreeMap<String, Running>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The container's command line in the pod's network namespace, its paths under the
/// ConfigMap mounts in `mounts` (mount path, directory) the directories'.
fn command_line(
    bin: &str,
    c: &Container,
    ip: &str,
    mounts: &[(String, String)],
) -> (String, Vec<String>) {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    // The one image runs every role: `greenthread …`.
    if argv.first().map(String::as_str) == Some("greenthread") {
        argv.remove(0);
    }
    let argv = argv
        .into_iter()
        .map(|a| {
            let mut a = a.replace("0.0.0.0", ip).replace("127.0.0.1", ip);
            for (path, dir) in mounts {
                if a.starts_with(path.as_str()) {
                    a = a.replacen(path.as_str(), dir, 1);
                }
            }
            a
        })
        .collect();
    (bin.to_string(), argv)
}

/// Secret values by (Secret name, key).
type SecretValues = BTreeMap<(String, String), String>;

/// The values of every Secret key the pod's containers take as environment, as the
/// kubelet reads them; `None` while one is missing (the kubelet would not start the pod).
async fn secrets_of(client: &Client, pod: &Pod) -> Option<SecretValues> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let mut out = SecretValues::new();
    let refs = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.env.iter().flatten())
        .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.clone());
    for r in refs {
        let secret = api.get(&r.name).await.ok()?;
        let value = secret.data.as_ref()?.get(&r.key)?;
        out.insert(
            (r.name.clone(), r.key.clone()),
            String::from_utf8_lossy(&value.0).into_owned(),
        );
    }
    Some(out)
}

fn env_of(
    c: &Container,
    pod: &Pod,
    secrets: &SecretValues,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    if let Some(r) = &from.secret_key_ref {
                        secrets.get(&(r.name.clone(), r.key.clone()))?.clone()
                    } else {
                        match from.field_ref.as_ref()?.field_path.as_str() {
                            "metadata.name" => pod.name_any(),
                            "metadata.namespace" => pod.namespace().unwrap_or_default(),
                            _ => return None,
                        }
                    }
                }
                _ => return None,
            };
            Some((e.name.clone(), value))
        })
        .collect();
    env.extend(extra.iter().cloned());
    env
}

impl FakeKubelet {
    /// Runs every pod labeled `selector`, with `bin` as the image's binary and `env` added
    /// to every container (e.g. `KUBECONFIG` for the fake API server).
    pub fn start(client: Client, bin: &str, selector: &str, env: Vec<(String, String)>) -> Self {
        let pods: Arc<Mutex<BTreeMap<String, Running>>> = Arc::default();
        let (bin, selector) = (bin.to_string(), selector.to_string());
        let running = pods.clone();
        let task = tokio::spawn(async move {
            let api: Api<Pod> = Api::all(client.clone());
            let mut next_ip = 1u8;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // ConfigMap volumes follow their ConfigMaps.
                let volumes: Vec<(std::path::PathBuf, String, String)> = running
                    .lock()
                    .unwrap()
                    .values()
                    .flat_map(|r| {
                        r.config_maps
                            .iter()
                            .map(|(dir, name)| (dir.clone(), r.namespace.clone(), name.clone()))
                    })
                    .collect();
                for (dir, namespace, name) in volumes {
                    sync_config_map(&client, &namespace, &name, &dir).await;
                }
                let Ok(list) = api.list(&ListParams::default().labels(&selector)).await else {
                    continue;
                };
                let key =
                    |p: &Pod| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                let alive: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .map(key)
                    .collect();
                // Pods that are gone stop (their processes are dropped).
                running.lock().unwrap().retain(|k, _| alive.contains(k));
                for pod in list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                {
                    if running.lock().unwrap().contains_key(&key(pod)) {
                        continue;
                    }
                    let Some(secrets) = secrets_of(&client, pod).await else {
                        continue;
                    };
                    next_ip = next_ip.wrapping_add(1).max(2);
                    let ip = format!("127.0.1.{next_ip}");
                    let namespace = pod.namespace().unwrap_or_default();
                    let pod_dir = tempfile::Builder::new()
                        .prefix("gt-kubelet-")
                        .tempdir()
                        .unwrap();
                    let mut config_maps = Vec::new();
                    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
                        if let Some(cm) = &v.config_map {
                            let dir = pod_dir.path().join(&v.name);
                            std::fs::create_dir_all(&dir).unwrap();
                            sync_config_map(&client, &namespace, &cm.name, &dir).await;
                            config_maps.push((dir, cm.name.clone()));
                        }
                    }
                    let containers = pod
                        .spec
                        .iter()
                        .flat_map(|s| s.containers.iter())
                        .map(|c| {
                            let mounts: Vec<(String, String)> = c
                                .volume_mounts
                                .iter()
                                .flatten()
                                .filter(|m| config_maps.iter().any(|(d, _)| d.ends_with(&m.name)))
                                .map(|m| {
                                    let dir = pod_dir.path().join(&m.name);
                                    (m.mount_path.clone(), dir.display().to_string())
                                })
                                .collect();
                            let (bin, argv) = command_line(&bin, c, &ip, &mounts);
                            let env = env_of(c, pod, &secrets, &env);
                            let env: Vec<(&str, &str)> =
                                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                            Proc::spawn_env(&bin, &argv, &env)
                        })
                        .collect();
                    running.lock().unwrap().insert(
                        key(pod),
                        Running {
                            ip: ip.clone(),
                            _containers: containers,
                            config_maps,
                            namespace,
                            _dir: pod_dir,
                        },
                    );
                    let ns_api: Api<Pod> =
                        Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
                    let ready_port = pod
                        .spec
                        .iter()
                        .flat_map(|s| s.containers.iter())
                        .flat_map(|c| c.ports.iter().flatten())
                        .find(|p| p.name.as_deref() == Some("http"))
                        .map(|p| p.container_port);
                    let name = pod.name_any();
                    tokio::spawn(async move {
                        // Running at once; Ready when the readiness probe passes.
                        let status = json!({"status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "False"}]}});
                        let _ = ns_api
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                            .await;
                        let Some(port) = ready_port else { return };
                        let client = http();
                        for _ in 0..600 {
                            let ok = client
                                .get(format!("http://{ip}:{port}/ready"))
                                .send()
                                .await
                                .is_ok_and(|r| r.status().is_success());
                            if ok {
                                let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
                                let _ = ns_api
                                    .patch_status(
                                        &name,
                                        &PatchParams::default(),
                                        &Patch::Merge(status),
                                    )
                                    .await;
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                }
            }
        });
        Self { pods, task }
    }

    /// The pod IP of `namespace/name`, once running.
    pub fn ip(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .get(&format!("{namespace}/{name}"))
            .map(|r| r.ip.clone())
    }
}
