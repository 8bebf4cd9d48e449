//! An engine process the sidecar owns: started, watched, and stopped with its whole
//! process group so that no engine outlives its sidecar.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::Command,
    sync::{mpsc, watch},
};

struct Running {
    pid: u32,
    exited: watch::Receiver<bool>,
}

pub struct EngineProcess {
    command: String,
    env: Vec<(String, String)>,
    running: tokio::sync::Mutex<Option<Running>>,
    /// Bumped on every intentional stop, so an exit we caused is not reported as a crash.
    generation: Arc<AtomicU64>,
    exits: mpsc::UnboundedSender<String>,
}

impl EngineProcess {
    /// `exits` receives a description each time the engine dies without being asked to.
    pub fn new(
        command: String,
        env: Vec<(String, String)>,
        exits: mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            command,
            env,
            running: tokio::sync::Mutex::new(None),
            generation: Arc::new(AtomicU64::new(0)),
            exits,
        }
    }

    pub async fn start(&self) -> anyhow::Result<()> {
        let mut slot = self.running.lock().await;
        if slot.as_ref().is_some_and(|r| !*r.exited.borrow()) {
            return Ok(());
        }
        let mut cmd = Command::new("/bin/sh");
        // `exec` so that the engine itself is the process we watch and signal.
        cmd.arg("-c")
            .arg(format!("exec {}", self.command))
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to signal the
        // engine if the sidecar dies, so a killed sidecar leaves no orphan engine.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting engine `{}`: {e}", self.command))?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(pid, command = %self.command, "engine process started");
        forward_lines(child.stdout.take(), "stdout");
        forward_lines(child.stderr.take(), "stderr");

        let (tx, exited) = watch::channel(false);
        let generation = self.generation.clone();
        let started_in = generation.load(Ordering::SeqCst);
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(true);
            if generation.load(Ordering::SeqCst) == started_in {
                let how = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(pid, %how, "engine process died");
                let _ = exits.send(format!("engine process {pid} died ({how})"));
            }
        });
        *slot = Some(Running { pid, exited });
        Ok(())
    }

    /// SIGTERM to the group, SIGKILL after `grace`; returns once the engine is reaped.
    pub async fn stop(&self, grace: Duration) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let Some(mut running) = self.running.lock().await.take() else {
            return;
        };
        if *running.exited.borrow() {
            return;
        }
        signal_group(running.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, running.exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            tracing::warn!(pid = running.pid, "engine ignored SIGTERM; killing it");
            signal_group(running.pid, libc::SIGKILL);
            let _ = running.exited.wait_for(|e| *e).await;
        }
    }

    pub async fn restart(&self, grace: Duration) -> anyhow::Result<()> {
        self.stop(grace).await;
        self.start().await
    }
}

fn forward_lines(stream: Option<impl AsyncRead + Unpin + Send + 'static>, name: &'static str) {
    let Some(stream) = stream else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(target: "engine", stream = name, "{line}");
        }
    });
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: signals the process group we created; no memory is touched.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}
