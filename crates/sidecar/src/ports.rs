//! Loopback ports for the engines a sidecar (or `greenthread local`) starts itself.
//!
//! The usual trick, binding port 0 and letting go, hands out a port from the kernel's
//! ephemeral range, where every other `bind(0)` and every outgoing connection on the
//! machine draws too: between the choice and the engine's own bind (seconds, for an
//! engine that loads a model first) someone else may take it, and the sidecar then
//! talks to a stranger. So engines get ports just below that range, which the kernel
//! never hands out by itself, and a lock on one byte per port in a per-user file keeps
//! two GreenThread processes from choosing the same one. The lock lives as long as the
//! [`PortLease`]; the kernel drops it when the process dies, so nothing goes stale.

use std::{
    fs::{File, OpenOptions},
    hash::{BuildHasher, RandomState},
    net::TcpListener,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::PathBuf,
};

/// How many ports below the ephemeral range engines choose from.
const SPAN: u16 = 10_000;

/// A port held for one engine: no other GreenThread process chooses it while this lives.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    /// Holds the byte-range lock (`None` where no lock file could be used).
    _lock: Option<File>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A port for an engine to listen on at 127.0.0.1: free now, outside the kernel's
/// ephemeral range, and held against other GreenThread processes while the lease lives.
pub fn engine_port() -> anyhow::Result<PortLease> {
    let (low, _) = ephemeral_range().unwrap_or((32768, 60999));
    let span = SPAN.min(low.saturating_sub(1024));
    let lock_file = lock_path();
    if span == 0 {
        return Ok(PortLease {
            port: crate::free_port()?,
            _lock: None,
        });
    }
    let first = low - span;
    let start = (RandomState::new().hash_one(std::process::id()) % u64::from(span)) as u16;
    for i in 0..span {
        let port = first + (start + i) % span;
        let lock = match open_lock(&lock_file) {
            Ok(f) => match lock_byte(&f, port) {
                Ok(true) => Some(f),
                // Another GreenThread process holds it.
                Ok(false) => continue,
                Err(_) => None,
            },
            // No lock file (a read-only temp dir): the bind check alone.
            Err(_) => None,
        };
        // Someone outside GreenThread may listen there already.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(PortLease { port, _lock: lock });
        }
    }
    anyhow::bail!("no free port for an engine in {first}..{}", first + span)
}

/// The kernel's ephemeral port range, which `bind(0)` and `connect` draw from.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

fn lock_path() -> PathBuf {
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("greenthread-ports-{uid}.lock"))
}

fn open_lock(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Takes an open-file-description lock on byte `port` of `f`: held until `f` closes,
/// exclusive between processes and between leases in one process alike.
fn lock_byte(f: &File, port: u16) -> std::io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value; the fields are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as _;
    lock.l_whence = libc::SEEK_SET as _;
    lock.l_start = libc::off_t::from(port);
    lock.l_len = 1;
    // SAFETY: the descriptor is open for as long as `f` lives; `lock` outlives the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range().unwrap_or((32768, 60999));
        let leases: Vec<PortLease> = (0..50).map(|_| engine_port().unwrap()).collect();
        let mut ports: Vec<u16> = leases.iter().map(PortLease::port).collect();
        for p in &ports {
            assert!(!(low..=high).contains(p), "{p} in {low}..={high}");
            assert!(*p >= 1024, "{p}");
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), leases.len(), "a port leased twice");
    }

    #[test]
    fn a_held_port_is_not_locked_again_until_released() {
        let lease = engine_port().unwrap();
        let port = lease.port();
        let f = open_lock(&lock_path()).unwrap();
        assert!(!lock_byte(&f, port).unwrap(), "{port} locked twice");
        drop(lease);
        assert!(
            lock_byte(&f, port).unwrap(),
            "{port} still locked after release"
        );
    }
}
