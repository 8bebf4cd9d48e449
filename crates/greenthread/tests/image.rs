//! The container image, built for real by `scripts/build-image` (buildah, no daemon; a
//! base made from Debian's packages where no registry can be reached) and checked the
//! way this sandbox allows: its root filesystem mounted (`buildah mount`) and the binary
//! run in it under `chroot` as uid 65532 — `--version`, `crds`, and `local` on its
//! embedded default answering a chat through the API. Also: the image's config runs as
//! non-root with the binary as entrypoint and the OCI labels, it has no shell, and its
//! size is printed. Skipped, saying so, only where buildah cannot work at all.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use greenthread_test_support::{LocalProc, chart::repo_root, run_ok};

/// Commands of the host: buildah, mount, chroot, git, the build script.
fn run(cmd: &mut Command) -> String {
    run_ok(cmd, "scripts/test installs buildah and mmdebstrap")
}

fn buildah(args: &[&str]) -> String {
    run(Command::new("buildah").args(args))
}

/// Why buildah cannot work here at all, if it cannot.
fn buildah_unusable() -> Option<String> {
    match Command::new("buildah").args(["info"]).output() {
        Err(e) => Some(format!("buildah is not installed ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "`buildah info` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// A working container of the image, its root filesystem mounted with /proc inside;
/// unmounted and removed when dropped.
struct Mounted {
    ctr: String,
    root: PathBuf,
}

impl Mounted {
    fn new(image: &str) -> Self {
        let ctr = buildah(&["from", "--pull=never", image]);
        let root = PathBuf::from(buildah(&["mount", &ctr]));
        // The container's own layer: what is written here goes with the container.
        std::fs::create_dir_all(root.join("proc")).unwrap();
        run(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(root.join("proc")));
        Self { ctr, root }
    }

    /// The image's binary under chroot as the image's user.
    fn greenthread(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg("--userspec=65532:65532")
            .arg(&self.root)
            .arg("/usr/local/bin/greenthread")
            .args(args);
        c
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.root.join("proc")).output();
        let _ = Command::new("buildah").args(["umount", &self.ctr]).output();
        let _ = Command::new("buildah").args(["rm", &self.ctr]).output();
    }
}

/// A host-side wrapper that runs the image's binary under chroot as 65532, so that the
/// tests' `local` harness starts it like any binary.
fn wrapper(dir: &Path, root: &Path) -> PathBuf {
    let path = dir.join("greenthread-in-image");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec chroot --userspec=65532:65532 '{}' /usr/local/bin/greenthread \"$@\"\n",
            root.display()
        ),
    )
    .unwrap();
    run(Command::new("chmod").arg("755").arg(&path));
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_builds_and_runs_as_nonroot_without_a_shell() {
    if let Some(why) = buildah_unusable() {
        eprintln!("SKIPPED: the image cannot be built here: {why}");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let tag = format!("localhost/greenthread-test:{}", std::process::id());
    let built = run(Command::new(repo_root().join("scripts/build-image"))
        .env("TAG", &tag)
        .env("OUT", out.path())
        .current_dir(repo_root()));
    assert_eq!(built.lines().last(), Some(tag.as_str()));
    let _remove = RemoveImage(tag.clone());

    // The image's config: the binary as entrypoint, a non-root user, the OCI labels.
    let inspect: serde_json::Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", &tag])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"][0], "/usr/local/bin/greenthread",
        "{config}"
    );
    let labels = &config["Labels"];
    let revision = run(Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo_root()));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        revision.as_str()
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap()
            .starts_with("https://github.com/")
    );

    let m = Mounted::new(&tag);
    // No shell, no package manager: nothing to exec into but the binary.
    for shell in [
        "bin/sh",
        "bin/bash",
        "bin/dash",
        "usr/bin/apt",
        "usr/bin/dpkg",
    ] {
        assert!(!m.root.join(shell).exists(), "the image has /{shell}");
    }
    // The binary is stripped: a fraction of the 140 MB build with line tables.
    let bin_size = std::fs::metadata(m.root.join("usr/local/bin/greenthread"))
        .unwrap()
        .len();
    assert!(
        bin_size < 60 << 20,
        "the image's binary is {bin_size} bytes"
    );

    let v = run(&mut m.greenthread(&["--version"]));
    assert_eq!(v, format!("greenthread {version} ({revision})"));
    let crds = run(&mut m.greenthread(&["crds"]));
    assert!(crds.contains("name: models.greenthread.ai"), "{crds}");
    assert!(crds.contains("name: gpus.greenthread.ai"), "{crds}");

    // `local` on its embedded default, from inside the image, answers a chat.
    let dir = tempfile::tempdir().unwrap();
    let bin = wrapper(dir.path(), &m.root);
    let local = LocalProc::start_default(bin.to_str().unwrap()).await;
    let uid = std::fs::read_to_string(format!("/proc/{}/status", local.proc.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|u| u.split_whitespace().next().unwrap().to_string())
        })
        .unwrap();
    assert_eq!(uid, "65532", "local runs as");
    let r = tokio::time::timeout(Duration::from_secs(60), local.chat("llama-8b", 4).send())
        .await
        .expect("an answer within a minute")
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    drop(local);

    let archive = out.path().join(format!("greenthread-{version}.oci.tar"));
    let compressed = std::fs::metadata(&archive).unwrap().len();
    let debug = std::fs::metadata(out.path().join("greenthread.debug"))
        .unwrap()
        .len();
    eprintln!(
        "image {tag}: {:.1} MB as an OCI archive (compressed layers), binary {:.1} MB stripped, \
         debug info {:.1} MB apart",
        compressed as f64 / 1e6,
        bin_size as f64 / 1e6,
        debug as f64 / 1e6
    );
    assert!(
        compressed < 50_000_000,
        "the image is {compressed} bytes compressed"
    );
}

/// Removes the test's image tag when dropped.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rmi", &self.0]).output();
    }
}
