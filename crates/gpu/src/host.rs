//! The machine's own memory, where level-1 sleepers keep their weights.

/// The machine's memory (`MemTotal` of `/proc/meminfo`).
pub fn host_memory_bytes() -> std::io::Result<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo")?)
}

fn parse_mem_total(meminfo: &str) -> std::io::Result<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other("no MemTotal in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       16314588 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(text).unwrap(), 16314588 * 1024);
        assert!(parse_mem_total("MemFree: 1 kB\n").is_err());
        assert!(host_memory_bytes().unwrap() > 0);
    }
}
