use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// One process's allocation on a simulated GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessMemory {
    pub pid: u32,
    /// Where the process serves (host:port), so a sidecar can find its engine.
    pub listen: String,
    pub model: String,
    pub bytes: u64,
    /// Host memory the process holds for this GPU (weights offloaded by a level-1 sleep).
    #[serde(default)]
    pub host_bytes: u64,
}

/// A simulated node's GPUs, shared between processes through a directory:
/// `<root>/<gpu index>/<pid>.json`. Records of processes that have exited are ignored,
/// as the driver frees a dead process's memory.
#[derive(Debug, Clone)]
pub struct SimGpu {
    root: PathBuf,
}

impl SimGpu {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn gpu_dir(&self, gpu: u32) -> PathBuf {
        self.root.join(gpu.to_string())
    }

    /// Records what `entry.pid` holds on `gpu`, atomically replacing its last record.
    pub fn record(&self, gpu: u32, entry: &ProcessMemory) -> io::Result<()> {
        let dir = self.gpu_dir(gpu);
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.json.tmp", entry.pid));
        fs::write(&tmp, serde_json::to_vec(entry)?)?;
        fs::rename(tmp, dir.join(format!("{}.json", entry.pid)))
    }

    pub fn remove(&self, gpu: u32, pid: u32) -> io::Result<()> {
        match fs::remove_file(self.gpu_dir(gpu).join(format!("{pid}.json"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Live processes holding memory on `gpu`.
    pub fn processes(&self, gpu: u32) -> io::Result<Vec<ProcessMemory>> {
        let dir = match fs::read_dir(self.gpu_dir(gpu)) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in dir {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            // A record may vanish between listing and reading when its process exits.
            let Ok(bytes) = fs::read(&path) else { continue };
            let Ok(record) = serde_json::from_slice::<ProcessMemory>(&bytes) else {
                continue;
            };
            if process_alive(record.pid) {
                out.push(record);
            }
        }
        out.sort_by_key(|p| p.pid);
        Ok(out)
    }

    pub fn used_bytes(&self, gpu: u32) -> io::Result<u64> {
        Ok(self.processes(gpu)?.iter().map(|p| p.bytes).sum())
    }

    /// Host memory that live processes hold for `gpus` (what their level-1 sleeps
    /// offloaded): the node's host memory in use by sleepers, measured.
    pub fn host_bytes(&self, gpus: impl IntoIterator<Item = u32>) -> io::Result<u64> {
        let mut total = 0;
        for g in gpus {
            total += self.processes(g)?.iter().map(|p| p.host_bytes).sum::<u64>();
        }
        Ok(total)
    }
}

/// Running, not exited: a zombie (exited, not yet reaped) holds no GPU memory either.
fn process_alive(pid: u32) -> bool {
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        return stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X");
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sum_per_gpu_and_dead_processes_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = SimGpu::new(dir.path());
        let me = std::process::id();
        let rec = |pid, bytes| ProcessMemory {
            pid,
            listen: "127.0.0.1:1".into(),
            model: "m".into(),
            bytes,
            host_bytes: bytes / 2,
        };
        gpu.record(0, &rec(me, 100)).unwrap();
        gpu.record(0, &rec(me, 300)).unwrap(); // replaces
        gpu.record(1, &rec(me, 7)).unwrap();
        // pid_max is far below this, so no such process exists.
        gpu.record(0, &rec(i32::MAX as u32 - 1, 1000)).unwrap();
        assert_eq!(gpu.used_bytes(0).unwrap(), 300);
        assert_eq!(gpu.used_bytes(1).unwrap(), 7);
        assert_eq!(gpu.used_bytes(2).unwrap(), 0);
        assert_eq!(gpu.host_bytes([0, 1, 2]).unwrap(), 150 + 3);
        gpu.remove(0, me).unwrap();
        gpu.remove(0, me).unwrap();
        assert_eq!(gpu.used_bytes(0).unwrap(), 0);
    }
}
