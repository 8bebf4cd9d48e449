//! What every GPU node pulls and every Model pod runs: the binary as built (with line
//! tables) against the stripped one the image ships, the image compressed (when
//! `dist/` holds one from scripts/build-image), and a standalone sidecar's resident
//! memory — idle after boot, and idle again after 200 requests. `GT_FOOTPRINT_BEFORE`
//! names another build of the binary (an earlier revision) to measure side by side.
//!
//!   cargo bench -p greenthread --bench footprint

use std::{process::Command, time::Duration};

use greenthread_test_support::{SidecarProc, chart::repo_root, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

/// (resident, of which anonymous) in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn settle(pid: u32) -> (u64, u64) {
    // Idle means the resident size stopped moving: three equal readings 200 ms apart.
    let mut last = (0, 0);
    let mut same = 0;
    wait_until(
        "the sidecar's memory to settle",
        Duration::from_secs(30),
        || {
            let now = rss(pid);
            same = if now.0 == last.0 { same + 1 } else { 0 };
            last = now;
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                (same >= 3).then_some(now)
            }
        },
    )
    .await
}

async fn sidecar(label: &str, bin: &str) {
    let s = SidecarProc::start(bin, "m", &[], &["--ttft", "1ms"]).await;
    let pid = s.proc.pid();
    let booted = settle(pid).await;
    for i in 0..200 {
        let r = s.chat("m", 16, i % 2 == 0).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let after = settle(pid).await;
    println!(
        "| {label} | {} ({} anonymous) | {} ({} anonymous) |",
        mib(booted.0),
        mib(booted.1),
        mib(after.0),
        mib(after.1)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let built = std::fs::metadata(BIN).unwrap().len();
    let stripped_path = std::env::temp_dir().join(format!("gt-stripped-{}", std::process::id()));
    let ok = Command::new("objcopy")
        .args(["--strip-debug", "--strip-unneeded", BIN])
        .arg(&stripped_path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "objcopy (binutils) strips the binary");
    let stripped = std::fs::metadata(&stripped_path).unwrap().len();
    let _ = std::fs::remove_file(&stripped_path);
    println!("## binary and image\n");
    println!("| artifact | size |\n|---|---|");
    println!(
        "| binary as built (release, line tables) | {:.1} MB |",
        built as f64 / 1e6
    );
    println!(
        "| binary stripped (what the image ships) | {:.1} MB |",
        stripped as f64 / 1e6
    );
    let version = env!("CARGO_PKG_VERSION");
    let archive = repo_root().join(format!("dist/greenthread-{version}.oci.tar"));
    match std::fs::metadata(&archive) {
        Ok(m) => println!(
            "| image, OCI archive (gzip-compressed layers) | {:.1} MB |",
            m.len() as f64 / 1e6
        ),
        Err(_) => println!("| image | (run scripts/build-image first) |"),
    }

    println!("\n## a standalone sidecar's resident memory\n");
    println!("| binary | idle after boot | idle after 200 requests |\n|---|---|---|");
    if let Ok(before) = std::env::var("GT_FOOTPRINT_BEFORE") {
        let v = Command::new(&before).arg("--version").output().unwrap();
        let label = format!("before: {}", String::from_utf8_lossy(&v.stdout).trim());
        sidecar(&label, &before).await;
    }
    sidecar("this build", BIN).await;
}
