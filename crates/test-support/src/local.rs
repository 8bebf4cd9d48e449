//! `greenthread local` as a real process with a configuration written for the test.

use std::{path::PathBuf, time::Duration};

use crate::{Proc, free_port, http, wait_until};

/// Four small simulated models on two 10 GiB GPUs. Placement puts alpha and delta
/// (popular) on gpu 0, where they fit together, and beta and gamma on gpu 1, where they
/// do not.
pub const TEST_CONFIG: &str = r#"
gpus:
  simulated:
    - {memory: 10Gi}
    - {memory: 10Gi}
models:
  - name: alpha
    spec:
      modelName: org/alpha
      engine: sim
      gpuMemoryUtilization: "0.6"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 200ms}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]
  - name: beta
    spec:
      modelName: org/beta
      engine: sim
      gpuMemoryUtilization: "0.55"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 200ms}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]
  - name: gamma
    spec:
      modelName: org/gamma
      engine: sim
      gpuMemoryUtilization: "0.5"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 200ms}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]
  - name: delta
    spec:
      modelName: org/delta
      engine: sim
      gpuMemoryUtilization: "0.3"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s, maxWaitTime: 200ms, popular: true}
      extraArgs: [--boot-time, 0s, --disk-bandwidth, 64Gi, --h2d-bandwidth, 64Gi, --ttft, 5ms]
"#;

pub struct LocalProc {
    pub url: String,
    pub client: reqwest::Client,
    pub config: PathBuf,
    _dir: tempfile_like::Dir,
    pub proc: Proc,
}

mod tempfile_like {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl LocalProc {
    /// Starts `greenthread local` with `config` and waits until every model has booted.
    pub async fn start(bin: &str, config: &str) -> Self {
        Self::start_with(bin, config, &[]).await
    }

    /// `start` with more command-line flags for `local`.
    pub async fn start_with(bin: &str, config: &str, flags: &[&str]) -> Self {
        Self::start_env(bin, config, flags, &[]).await
    }

    /// `greenthread local` on its embedded default (no `--config`), as the README's
    /// quick start runs it.
    pub async fn start_default(bin: &str) -> Self {
        Self::launch(bin, None, &[], &[]).await
    }

    /// `start_with` and more environment for `local` (and the engines it starts).
    pub async fn start_env(bin: &str, config: &str, flags: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::launch(bin, Some(config), flags, envs).await
    }

    async fn launch(
        bin: &str,
        config: Option<&str>,
        flags: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("gt-local-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("local.yaml");
        let mut args: Vec<String> = vec![
            "local".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        if let Some(config) = config {
            std::fs::write(&path, config).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        args.extend(flags.iter().map(|f| f.to_string()));
        // Its own data directory (issued keys), never the user's, unless told otherwise.
        let data = dir.join("data");
        let mut envs: Vec<(&str, &str)> = envs.to_vec();
        let data_env = data.display().to_string();
        if !envs.iter().any(|(k, _)| *k == "GREENTHREAD_DATA_DIR") {
            envs.push(("GREENTHREAD_DATA_DIR", &data_env));
        }
        let proc = Proc::spawn_env(bin, &args, &envs);
        let me = Self {
            url: format!("http://127.0.0.1:{port}"),
            client: http(),
            config: path,
            _dir: tempfile_like::Dir(dir),
            proc,
        };
        let admin = config.and_then(|c| me.admin_token(c));
        wait_until("every model to boot", Duration::from_secs(60), || async {
            let mut req = me.client.get(format!("{}/api/v1/models", me.url));
            if let Some(t) = &admin {
                req = req.bearer_auth(t);
            }
            let v: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
            let pods: Vec<&serde_json::Value> = v["items"]
                .as_array()?
                .iter()
                .flat_map(|m| m["pods"].as_array().unwrap().iter())
                .collect();
            (!pods.is_empty() && pods.iter().all(|p| p["bootReady"] == true)).then_some(())
        })
        .await;
        me
    }

    fn admin_token(&self, config: &str) -> Option<String> {
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix("adminToken:"))
            .map(|t| t.trim().trim_matches('"').to_string())
    }

    pub fn chat(&self, model: &str, max_tokens: u32) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": max_tokens,
            }))
    }

    /// `/v1/models` as `key` sees it: each entry.
    pub async fn models_as(&self, key: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = self
            .client
            .get(format!("{}/v1/models", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"].as_array().unwrap().clone()
    }

    /// The API server's `/metrics`, parsed.
    pub async fn metrics(&self) -> crate::Exposition {
        crate::scrape(&self.client, &format!("{}/metrics", self.url)).await
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        crate::get_json(&self.client, &format!("{}{path}", self.url)).await
    }

    /// Each model's state as `/v1/models` reports it.
    pub async fn states(&self) -> std::collections::BTreeMap<String, String> {
        let v = self.get_json("/v1/models").await;
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// Runs `scripts/NAME` (a check through the official `openai` SDK, which prints a JSON
/// report last) with `args`; fails the test with its output unless it succeeds, and
/// returns the report.
pub async fn openai_script(name: &str, args: &[&str]) -> serde_json::Value {
    let report = python_script(name, args, "the openai SDK (scripts/test installs it)").await;
    println!("openai SDK report: {report}");
    report
}

/// Runs the Python check `scripts/NAME` with `args`; it prints a JSON report as its last
/// line. Fails the test with both outputs, and `needs` (what the script depends on),
/// unless it succeeds; returns the report.
pub async fn python_script(name: &str, args: &[&str], needs: &str) -> serde_json::Value {
    let script = crate::chart::repo_root().join("scripts").join(name);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(script)
            .args(args)
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/{name} failed (it needs {needs}):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
