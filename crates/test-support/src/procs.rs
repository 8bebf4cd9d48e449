//! Real processes on loopback, stopped (with their children) when dropped.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Exposition, wait_until};

/// Runs `cmd` to its end and returns its standard output, trimmed. Panics with both of
/// its outputs when it fails, and names `needs` (what provides the program) when it
/// cannot start.
pub fn run_ok(cmd: &mut Command, needs: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?} ({needs}): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The binary that runs simulated engines: `bin`, unless `GT_SIM_BIN` names another (to
/// run a sidecar or `local` built from another revision against today's simulator).
pub fn sim_bin(bin: &str) -> String {
    std::env::var("GT_SIM_BIN").unwrap_or_else(|_| bin.to_string())
}

/// A loopback port free now. Never the same twice in one test process: tests run in
/// parallel threads, and a port let go by one may come back from the kernel to another
/// before the first has bound it. (Engines that `greenthread` starts itself take ports
/// below the kernel's range, so these never meet theirs.)
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A child process, SIGTERM'd (then SIGKILL'd) when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[String]) -> Self {
        Self::spawn_env(bin, args, &[])
    }

    /// `spawn` with extra environment variables (`RUST_LOG` among them overrides the
    /// tests' default).
    pub fn spawn_env(bin: &str, args: &[String], envs: &[(&str, &str)]) -> Self {
        Self::spawn_with(bin, args, envs, Stdio::inherit())
    }

    /// `spawn_env` with the process's log (stderr) written to `log`.
    pub fn spawn_logged(
        bin: &str,
        args: &[String],
        envs: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Self {
        let file = std::fs::File::create(log).unwrap();
        Self::spawn_with(bin, args, envs, Stdio::from(file))
    }

    fn spawn_with(bin: &str, args: &[String], envs: &[(&str, &str)], stderr: Stdio) -> Self {
        let child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("GT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        Self { child }
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait up to `grace` for a clean exit; true if it exited in time.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        // SAFETY: signals our own child; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate(Duration::from_secs(5));
        }
    }
}

/// `greenthread sidecar` owning a `greenthread sim-engine`, on free loopback ports.
pub struct SidecarProc {
    pub public: String,
    pub private: String,
    pub engine: String,
    pub client: reqwest::Client,
    pub proc: Proc,
}

impl SidecarProc {
    /// Starts the sidecar with `sidecar_args` in front of a simulator with `sim_args`
    /// (the simulator boots fast unless `sim_args` says otherwise), and waits until ready.
    pub async fn start(bin: &str, model: &str, sidecar_args: &[&str], sim_args: &[&str]) -> Self {
        Self::start_env(bin, model, sidecar_args, sim_args, &[]).await
    }

    /// `start` with extra environment variables for the sidecar (e.g. `KUBECONFIG`).
    pub async fn start_env(
        bin: &str,
        model: &str,
        sidecar_args: &[&str],
        sim_args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let (public, private, engine) = (free_port(), free_port(), free_port());
        let sim = format!(
            "{} sim-engine --listen 127.0.0.1:{engine} --model {model} --boot-time 50ms --weights-bytes 1Gi --kv-cache-bytes 512Mi {}",
            sim_bin(bin),
            sim_args.join(" ")
        );
        let mut args: Vec<String> = [
            "sidecar",
            "--model",
            model,
            "--listen",
            &format!("127.0.0.1:{public}"),
            "--metrics-listen",
            &format!("127.0.0.1:{private}"),
            "--engine-url",
            &format!("http://127.0.0.1:{engine}"),
            "--engine-command",
            &sim,
            "--min-runtime",
            "0s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(sidecar_args.iter().map(|s| s.to_string()));
        let proc = Proc::spawn_env(bin, &args, envs);
        let me = Self {
            public: format!("http://127.0.0.1:{public}"),
            private: format!("http://127.0.0.1:{private}"),
            engine: format!("http://127.0.0.1:{engine}"),
            client: http(),
            proc,
        };
        crate::wait_http(&format!("{}/health", me.public)).await;
        me
    }

    pub async fn metrics(&self) -> Exposition {
        scrape(&self.client, &format!("{}/metrics", self.private)).await
    }

    /// Requests waiting in its queue now.
    pub async fn queue_depth(&self) -> f64 {
        self.metrics()
            .await
            .value("gthread_sidecar_queue_depth", &[])
            .expect("the sidecar exports its queue depth")
    }

    pub async fn engine_metrics(&self) -> Exposition {
        scrape(&self.client, &format!("{}/metrics", self.engine)).await
    }

    pub async fn status(&self) -> serde_json::Value {
        get_json(&self.client, &format!("{}/status", self.public)).await
    }

    /// `POST /admin/{action}` on the private port (`sleep`, `wake`).
    pub async fn admin(&self, action: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/admin/{action}", self.private))
            .send()
            .await
            .unwrap()
    }

    pub async fn state(&self) -> String {
        self.status().await["state"].as_str().unwrap().to_string()
    }

    pub async fn wait_state(&self, state: &str, timeout: Duration) {
        wait_until(&format!("state {state}"), timeout, || async {
            (self.state().await == state).then_some(())
        })
        .await;
    }

    pub async fn engine_sleeping(&self) -> bool {
        let v = get_json(&self.client, &format!("{}/is_sleeping", self.engine)).await;
        v["is_sleeping"].as_bool().unwrap()
    }

    pub fn chat(&self, model: &str, max_tokens: u32, stream: bool) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/chat/completions", self.public))
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": max_tokens,
                "stream": stream,
            }))
    }
}

pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

pub async fn scrape_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

pub async fn scrape(client: &reqwest::Client, url: &str) -> Exposition {
    let text = scrape_text(client, url).await;
    Exposition::parse(&text).unwrap_or_else(|e| panic!("parsing {url}: {e}\n{text}"))
}
