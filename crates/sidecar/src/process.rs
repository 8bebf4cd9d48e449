//! An engine process the sidecar owns: started, watched, and stopped with its whole
//! process group so that no engine outlives its sidecar.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use greenthread_gpu::{MemoryProbe, ProbeError};

use tokio::{
    io::{AsyncRead, AsyncReadExt},
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
    /// The running engine's pid, 0 when none runs (read without the lock, by probes).
    pid: Arc<AtomicU32>,
    /// Arguments appended to the command at every start from now on, and what they
    /// stand for (llama.cpp's `--lora` flags, and the adapters they load).
    extra: std::sync::Mutex<Extra>,
    /// What the running engine was started with.
    started: std::sync::Mutex<Extra>,
    /// The port the engine listens on, held for as long as the engine may restart.
    port: Option<crate::ports::PortLease>,
}

/// Arguments appended to an engine's command, and the labels they stand for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extra {
    pub args: Vec<String>,
    pub labels: Vec<String>,
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
            pid: Arc::new(AtomicU32::new(0)),
            extra: Default::default(),
            started: Default::default(),
            port: None,
        }
    }

    /// Holds `lease` (the engine's port) for as long as this process handle lives.
    pub fn holding(mut self, lease: crate::ports::PortLease) -> Self {
        self.port = Some(lease);
        self
    }

    /// Arguments for the next starts (the running engine keeps its own).
    pub fn set_extra(&self, extra: Extra) {
        *self.extra.lock().unwrap() = extra;
    }

    /// The extra arguments the running engine (or the last one) started with.
    pub fn started_with(&self) -> Extra {
        self.started.lock().unwrap().clone()
    }

    /// The engine's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|p| *p != 0)
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    pub async fn start(&self) -> anyhow::Result<()> {
        let mut slot = self.running.lock().await;
        if slot.as_ref().is_some_and(|r| !*r.exited.borrow()) {
            return Ok(());
        }
        let extra = self.extra.lock().unwrap().clone();
        let command = if extra.args.is_empty() {
            self.command.clone()
        } else {
            let quoted: Vec<String> = extra
                .args
                .iter()
                .map(|a| greenthread_api::shell_quote(a))
                .collect();
            format!("{} {}", self.command, quoted.join(" "))
        };
        // A line of plain words is exec'd directly (the image has no shell); others go
        // through /bin/sh, with `exec` so that the engine itself is the process we
        // watch and signal.
        let mut cmd = match greenthread_api::split_simple(&command) {
            Some(greenthread_api::engine_command::Exec { env, argv }) => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]).envs(env);
                cmd
            }
            None => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(format!("exec {command}"));
                cmd
            }
        };
        cmd.envs(self.env.iter().cloned())
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
        let mut child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!(
                "starting engine `{}`: {e}",
                greenthread_edge::redact_command(&command)
            )
        })?;
        *self.started.lock().unwrap() = extra;
        let pid = child.id().unwrap_or_default();
        tracing::info!(pid, command = %greenthread_edge::redact_command(&command), "engine process started");
        forward_lines(child.stdout.take(), "stdout");
        forward_lines(child.stderr.take(), "stderr");

        let (tx, exited) = watch::channel(false);
        let generation = self.generation.clone();
        let started_in = generation.load(Ordering::SeqCst);
        let exits = self.exits.clone();
        self.pid.store(pid, Ordering::SeqCst);
        let running_pid = self.pid.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = running_pid.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
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
        let mut limit = LogLimit::new(LINES_PER_SECOND);
        drain_lines(stream, |line| {
            if let Some(suppressed) = limit.admit() {
                if suppressed > 0 {
                    tracing::debug!(target: "engine", stream = name, suppressed, "engine output lines not logged (rate limit)");
                }
                tracing::debug!(target: "engine", stream = name, "{line}");
            }
        })
        .await;
    });
}

/// Longest engine output line logged; the rest of a longer one is dropped.
pub const MAX_LINE: usize = 4096;
/// Engine output lines logged per second at most.
const LINES_PER_SECOND: u32 = 200;

/// Reads `stream` to its end whatever it holds (invalid UTF-8, endless lines), handing
/// `line` each line decoded lossily and cut at [`MAX_LINE`] bytes. The pipe is always
/// drained: an engine whose output we stopped reading would block or fail on its next
/// write (EPIPE) and wedge. Returns the number of lines.
pub async fn drain_lines(mut stream: impl AsyncRead + Unpin, mut line: impl FnMut(&str)) -> u64 {
    let mut buf = vec![0u8; 16 << 10];
    let mut current: Vec<u8> = Vec::with_capacity(256);
    let mut cut = false;
    let mut lines = 0;
    let mut emit = |current: &mut Vec<u8>, cut: &mut bool| {
        let mut text = String::from_utf8_lossy(current).into_owned();
        if *cut {
            text.push_str(" …");
        }
        line(&text);
        current.clear();
        *cut = false;
    };
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for piece in buf[..n].split_inclusive(|b| *b == b'\n') {
            let (body, ends) = match piece.strip_suffix(b"\n") {
                Some(b) => (b, true),
                None => (piece, false),
            };
            let room = MAX_LINE.saturating_sub(current.len());
            current.extend_from_slice(&body[..body.len().min(room)]);
            cut |= body.len() > room;
            if ends {
                emit(&mut current, &mut cut);
                lines += 1;
            }
        }
    }
    if !current.is_empty() {
        emit(&mut current, &mut cut);
        lines += 1;
    }
    lines
}

/// At most `per_second` admitted a second; says how many were refused since the last
/// admitted one.
struct LogLimit {
    per_second: u32,
    window: tokio::time::Instant,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: tokio::time::Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    fn admit(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used >= self.per_second {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: signals the process group we created; no memory is touched.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

/// Resident memory of an engine process and its process group, for engines on CPU
/// (the "GPU" a CPU engine occupies is the memory budget `local` gives it). A stopped
/// engine holds nothing, which is measured too: its pid is gone.
pub struct RssProbe {
    pub process: Arc<EngineProcess>,
    pub indices: Vec<u32>,
}

/// Pids and resident pages of the processes in group `pgid` (the engine and any
/// children it started: vLLM's workers, for one).
fn group_members(pgid: u32) -> std::io::Result<Vec<(u32, u64)>> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid pgrp … (rss is the 24th field).
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) != Some(pgid) {
            continue;
        }
        let pages: u64 = fields.get(21).and_then(|r| r.parse().ok()).unwrap_or(0);
        members.push((pid, pages));
    }
    Ok(members)
}

/// Bytes resident in the processes of group `pgid`.
pub fn group_rss(pgid: u32) -> std::io::Result<u64> {
    // SAFETY: sysconf reads a constant of the running kernel.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    Ok(group_members(pgid)?
        .iter()
        .map(|(_, pages)| pages * page)
        .sum())
}

/// GPU memory of an engine process group, per GPU, as NVML accounts it per process: what
/// a real engine (vLLM, SGLang, llama.cpp with CUDA) holds, awake or asleep.
pub struct NvmlProbe {
    pub nvml: Arc<dyn greenthread_gpu::GpuSource>,
    pub process: Arc<EngineProcess>,
    pub indices: Vec<u32>,
}

#[async_trait]
impl MemoryProbe for NvmlProbe {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        let pids: Vec<u32> = match self.process.pid() {
            Some(pgid) => group_members(pgid)?.into_iter().map(|(p, _)| p).collect(),
            None => Vec::new(),
        };
        let mut out = Vec::with_capacity(self.indices.len());
        for &index in &self.indices {
            let held = self
                .nvml
                .process_memory(index)
                .map_err(|e| ProbeError::Io(std::io::Error::other(e.to_string())))?
                .into_iter()
                .filter(|(pid, _)| pids.contains(pid))
                .map(|(_, bytes)| bytes)
                .sum();
            out.push((index, held));
        }
        Ok(out)
    }
}

#[async_trait]
impl MemoryProbe for RssProbe {
    async fn engine_memory(&self) -> Result<Vec<(u32, u64)>, ProbeError> {
        let bytes = match self.process.pid() {
            Some(pid) => group_rss(pid)?,
            None => 0,
        };
        Ok(self.indices.iter().map(|i| (*i, bytes)).collect())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Finding: an engine's output with invalid UTF-8 stopped the reader, which dropped the
    /// pipe; the engine's next write failed (EPIPE) and the engine wedged.
    #[tokio::test]
    async fn output_that_is_not_utf8_or_too_long_is_drained_to_the_end() {
        let (mut engine, sidecar) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            let n = drain_lines(sidecar, |l| seen.push(l.to_string())).await;
            (n, seen)
        });
        engine.write_all(b"ok\n\xff\xfe bad bytes\n").await.unwrap();
        engine.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
        engine.write_all(b"\n").await.unwrap();
        // Far more than the pipe holds: every write must still succeed.
        for i in 0..2000 {
            engine
                .write_all(format!("line {i}\n").as_bytes())
                .await
                .expect("the engine's writes never fail while the sidecar runs");
        }
        drop(engine);
        let (n, seen) = reader.await.unwrap();
        assert_eq!(n, 2003);
        assert_eq!(seen[0], "ok");
        assert_eq!(seen[1], "\u{fffd}\u{fffd} bad bytes");
        assert_eq!(seen[2].len(), MAX_LINE + " …".len());
        assert_eq!(seen[2002], "line 1999");
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_is_rate_limited_and_says_how_much_it_dropped() {
        let mut limit = LogLimit::new(3);
        let admitted: Vec<Option<u64>> = (0..5).map(|_| limit.admit()).collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limit.admit(), Some(2));
    }
}
