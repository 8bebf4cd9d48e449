//! Model weights through `greenthread download` (the real binary) against a fake hub on
//! loopback (`HF_ENDPOINT`): progress, a download killed in the middle resumes where it
//! stopped, a corrupt file is fetched again, nothing is downloaded twice, gated models
//! need the token (which never shows), and the cache keeps to its budget.

use std::{path::Path, process::Output, time::Duration};

use greenthread_test_support::{FakeHub, HUB_COMMIT, HubFaults, HubFileSpec, Proc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");
const WEIGHTS: usize = 3 << 20;

/// A tiny model: a config, safetensors weights (LFS), a tokenizer, and a `.bin` copy of
/// the weights that no engine here needs.
fn tiny() -> Vec<HubFileSpec> {
    let weights: Vec<u8> = (0..WEIGHTS).map(|i| (i * 31 % 251) as u8).collect();
    vec![
        HubFileSpec {
            name: "config.json".into(),
            content: br#"{"architectures": ["LlamaForCausalLM"]}"#.to_vec(),
            lfs: false,
        },
        HubFileSpec {
            name: "model.safetensors".into(),
            content: weights.clone(),
            lfs: true,
        },
        HubFileSpec {
            name: "tokenizer/tokenizer.json".into(),
            content: br#"{"model": {"type": "BPE"}}"#.to_vec(),
            lfs: false,
        },
        HubFileSpec {
            name: "pytorch_model.bin".into(),
            content: weights,
            lfs: true,
        },
    ]
}

async fn download(hub: &FakeHub, cache: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["download", "org/tiny", "--cache-dir"])
        .arg(cache)
        .args(extra)
        .env("HF_ENDPOINT", &hub.url)
        .env_remove("HF_TOKEN");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn snapshot(cache: &Path) -> std::path::PathBuf {
    cache.join("models--org--tiny/snapshots").join(HUB_COMMIT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_shows_progress_resumes_after_a_kill_and_never_happens_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let hub = FakeHub::start(
        vec![("org/tiny", tiny())],
        HubFaults {
            stall_after: Some(("model.safetensors".into(), 1 << 20)),
            ..Default::default()
        },
    )
    .await;
    // The first download stops in the middle of the weights: killed there.
    let args: Vec<String> = [
        "download",
        "org/tiny",
        "--cache-dir",
        &cache.display().to_string(),
        "--endpoint",
        &hub.url,
    ]
    .map(String::from)
    .into();
    let mut first = Proc::spawn(BIN, &args);
    let partial = cache.join("models--org--tiny/blobs");
    wait_until(
        "half the weights on disk",
        Duration::from_secs(30),
        || async {
            let held: u64 = std::fs::read_dir(&partial)
                .ok()?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            (held >= 1 << 20).then_some(())
        },
    )
    .await;
    first.terminate(Duration::from_secs(5));

    let out = download(&hub, &cache, &[], &[]).await;
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    // It resumed: the weights' second transfer started where the first stopped, and no
    // byte of them was sent twice.
    assert_eq!(hub.starts("model.safetensors"), [0, 1 << 20], "{log}");
    assert_eq!(hub.served("model.safetensors"), WEIGHTS as u64);
    assert!(
        log.contains("downloading org/tiny:") && log.contains("(100 %)"),
        "{log}"
    );
    // Only what an engine loads: the `.bin` copy stays on the hub.
    assert_eq!(hub.served("pytorch_model.bin"), 0);
    let snap = snapshot(&cache);
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        tiny()[1].content
    );
    assert_eq!(
        std::fs::read(snap.join("tokenizer/tokenizer.json")).unwrap(),
        tiny()[2].content
    );
    assert_eq!(
        std::fs::read_to_string(cache.join("models--org--tiny/refs/main")).unwrap(),
        HUB_COMMIT
    );
    // Again: nothing downloaded.
    let out = download(&hub, &cache, &[], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("(0 bytes downloaded of"),
        "{}",
        text(&out)
    );
    assert_eq!(hub.served("model.safetensors"), WEIGHTS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_file_is_fetched_again_and_a_hub_that_keeps_corrupting_it_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let once = FakeHub::start(
        vec![("org/tiny", tiny())],
        HubFaults {
            corrupt: [("model.safetensors".to_string(), 1)].into(),
            ..Default::default()
        },
    )
    .await;
    let out = download(&once, &cache, &[], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(once.served("model.safetensors"), 2 * WEIGHTS as u64);
    assert_eq!(
        std::fs::read(snapshot(&cache).join("model.safetensors")).unwrap(),
        tiny()[1].content
    );
    // A cached file cut short (a full disk, a hand) is found and fetched again.
    let blob = std::fs::canonicalize(snapshot(&cache).join("model.safetensors")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    let out = download(&once, &cache, &[], &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(once.served("model.safetensors"), 3 * WEIGHTS as u64);
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), WEIGHTS as u64);

    let always = FakeHub::start(
        vec![("org/tiny", tiny())],
        HubFaults {
            corrupt: [("model.safetensors".to_string(), 100)].into(),
            ..Default::default()
        },
    )
    .await;
    let fresh = dir.path().join("fresh");
    let out = download(&always, &fresh, &[], &[]).await;
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("org/tiny/model.safetensors: checksum"),
        "{log}"
    );
    // Three tries, then the error.
    assert_eq!(always.served("model.safetensors"), 3 * WEIGHTS as u64);
    assert!(!snapshot(&fresh).join("model.safetensors").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_model_needs_the_token_and_the_token_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let token = "hf_gatedSecret123";
    let hub = FakeHub::start(
        vec![("org/tiny", tiny())],
        HubFaults {
            token: Some(token.into()),
            ..Default::default()
        },
    )
    .await;
    let out = download(&hub, &cache, &[], &[]).await;
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("401"), "{log}");
    let out = download(&hub, &cache, &[], &[("HF_TOKEN", token)]).await;
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains(token), "the token shows: {log}");
    // From a file too (a mounted Secret).
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let other = dir.path().join("other");
    let out = download(
        &hub,
        &other,
        &["--token-file", &file.display().to_string()],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_to_its_budget_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let small = |tag: &str| {
        vec![HubFileSpec {
            name: "model.safetensors".into(),
            content: tag.repeat(100_000).into_bytes(),
            lfs: true,
        }]
    };
    let hub = FakeHub::start(
        vec![
            ("org/a", small("a")),
            ("org/b", small("b")),
            ("org/tiny", tiny()),
        ],
        HubFaults::default(),
    )
    .await;
    for repo in ["org/a", "org/b"] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["download", repo, "--cache-dir"])
            .arg(&cache)
            .env("HF_ENDPOINT", &hub.url);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    // `a` last used two hours ago, `b` one hour ago (the marks' modification times).
    for (repo, hours) in [("a", 2), ("b", 1)] {
        let mark = std::fs::File::options()
            .write(true)
            .open(cache.join(format!("models--org--{repo}/.greenthread-used")))
            .unwrap();
        mark.set_modified(std::time::SystemTime::now() - Duration::from_secs(hours * 3600))
            .unwrap();
    }
    // Room for tiny and one more: `a`, used least recently, goes; tiny, just downloaded, stays.
    let budget = (WEIGHTS + 150_000).to_string();
    let out = download(&hub, &cache, &["--cache-budget", &budget], &[]).await;
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("evicted org/a"), "{log}");
    assert!(!cache.join("models--org--a").exists());
    assert!(cache.join("models--org--b").exists());
    assert!(snapshot(&cache).join("model.safetensors").exists());
}

/// `local` with a vLLM model (the stand-in found on the PATH as `vllm`) whose weights are
/// on the fake hub: downloaded into the Hugging Face cache before the engine first
/// boots, the engine then offline on that cache; a restart downloads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_downloads_a_models_weights_before_its_first_boot_and_never_again() {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(vec![("org/tiny", tiny())], HubFaults::default()).await;
    let shims = dir.path().join("bin");
    let rec = dir.path().join("records");
    std::fs::create_dir_all(&shims).unwrap();
    std::fs::create_dir_all(&rec).unwrap();
    let vllm = shims.join("vllm");
    std::fs::write(
        &vllm,
        format!("#!/bin/sh\nexec '{BIN}' vllm-stand-in \"$@\"\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vllm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let hf_home = dir.path().join("hf");
    let config = r#"
gpus: auto
models:
  - name: tiny
    spec:
      modelName: org/tiny
      engine: vllm
      gpuMemoryUtilization: "0.4"
      sleep: {idleTimeout: 1h}
"#;
    let hf = hf_home.display().to_string();
    let envs = [
        ("PATH", path.as_str()),
        ("GREENTHREAD_LOCAL_FAKE_GPUS", "1x80Gi"),
        ("GREENTHREAD_STAND_IN_RECORD", rec.to_str().unwrap()),
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HOME", hf.as_str()),
    ];
    let local = greenthread_test_support::LocalProc::start_env(BIN, config, &[], &envs).await;
    let snap = hf_home
        .join("hub/models--org--tiny/snapshots")
        .join(HUB_COMMIT);
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        tiny()[1].content
    );
    assert_eq!(hub.served("model.safetensors"), WEIGHTS as u64);
    let m = local.metrics().await;
    let size = m
        .value("gthread_weights_size_bytes", &[("model", "tiny")])
        .unwrap();
    assert!(size >= WEIGHTS as f64, "{size}");
    assert_eq!(
        m.value("gthread_weights_downloaded_bytes", &[("model", "tiny")]),
        Some(size)
    );
    // The engine runs offline on the cache the download filled.
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::fs::read_dir(&rec)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["env"]["HF_HUB_OFFLINE"], "1", "{record}");
    assert_eq!(
        record["env"]["HF_HUB_CACHE"],
        format!("{hf}/hub"),
        "{record}"
    );
    assert_eq!(local.chat("tiny", 2).send().await.unwrap().status(), 200);
    drop(local);

    let local = greenthread_test_support::LocalProc::start_env(BIN, config, &[], &envs).await;
    assert_eq!(local.chat("tiny", 2).send().await.unwrap().status(), 200);
    assert_eq!(
        hub.served("model.safetensors"),
        WEIGHTS as u64,
        "downloaded again"
    );
}
