//! `local` with `engine: vllm` and `engine: sglang` on GPUs it takes for real ones: the
//! engines are started with the exact command lines the controller renders, through
//! stand-ins found on the PATH as `vllm` and `python3 -m sglang.launch_server` (the
//! simulator behind each launcher's flags, recording what it was given). The GPUs come
//! from `GREENTHREAD_LOCAL_FAKE_GPUS`, a fake NVML, since no driver runs here.

use std::{collections::BTreeMap, os::unix::fs::PermissionsExt, path::Path, time::Duration};

use greenthread_test_support::{LocalProc, wait_until};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_greenthread");

const CONFIG: &str = r#"
gpus: auto
models:
  - name: qwen
    spec:
      modelName: Qwen/Qwen2.5-0.5B-Instruct
      engine: vllm
      gpuMemoryUtilization: "0.4"
      quantization: awq
      extraArgs: [--max-model-len, "4096"]
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s}
  - name: gemma
    spec:
      modelName: google/gemma-3-1b-it
      engine: sglang
      gpuMemoryUtilization: "0.3"
      sleep: {idleTimeout: 1h}
      fairness: {minRuntime: 0s}
"#;

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// What each stand-in recorded, by engine: (port, args, env).
fn records(dir: &Path) -> BTreeMap<String, (u16, Vec<String>, Value)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let port: u16 = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let args = v["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            (
                v["engine"].as_str().unwrap().to_string(),
                (port, args, v["env"].clone()),
            )
        })
        .collect()
}

async fn is_sleeping(port: u16) -> bool {
    let v: Value = reqwest::get(format!("http://127.0.0.1:{port}/is_sleeping"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["is_sleeping"].as_bool().unwrap()
}

/// `local` on `config` with the stand-ins on its PATH; the directory they record in.
async fn start(config: &str) -> (LocalProc, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let shims = dir.path().join("bin");
    let rec = dir.path().join("records");
    std::fs::create_dir_all(&shims).unwrap();
    std::fs::create_dir_all(&rec).unwrap();
    // The real python3 for anything but SGLang's launcher.
    let python = which("python3");
    script(
        &shims,
        "vllm",
        &format!("exec '{BIN}' vllm-stand-in \"$@\""),
    );
    script(
        &shims,
        "python3",
        &format!(
            "if [ \"$1\" = -m ] && [ \"$2\" = sglang.launch_server ]; then exec '{BIN}' sglang-stand-in \"$@\"; fi\nexec '{python}' \"$@\""
        ),
    );
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let local = LocalProc::start_env(
        BIN,
        config,
        &[],
        &[
            ("PATH", &path),
            ("GREENTHREAD_LOCAL_FAKE_GPUS", "2x80Gi"),
            ("GREENTHREAD_STAND_IN_RECORD", rec.to_str().unwrap()),
            // The hub ids above are not downloaded here (tests/weights.rs does that).
            ("HF_HUB_OFFLINE", "1"),
        ],
    )
    .await;
    (local, dir, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_and_sglang_start_with_the_rendered_command_lines_and_sleep_through_their_apis() {
    let (local, _dir, rec) = start(CONFIG).await;

    // Exactly the controller's command lines, with the GPU and sleep-API environment.
    let got = records(&rec);
    let (vllm_port, vllm_args, vllm_env) = &got["vllm"];
    let p = vllm_port.to_string();
    assert_eq!(
        vllm_args,
        &[
            "serve",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "--host",
            "127.0.0.1",
            "--port",
            &p,
            "--enable-sleep-mode",
            "--gpu-memory-utilization",
            "0.4",
            "--tensor-parallel-size",
            "1",
            "--dtype",
            "bfloat16",
            "--quantization",
            "awq",
            "--served-model-name",
            "qwen",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "--max-model-len",
            "4096",
        ]
    );
    // Both fit on the first GPU (best fit), which each sees by its UUID.
    assert_eq!(vllm_env["VLLM_SERVER_DEV_MODE"], "1");
    assert_eq!(vllm_env["CUDA_VISIBLE_DEVICES"], "GPU-fake-0000");
    let (sglang_port, sglang_args, sglang_env) = &got["sglang"];
    let p = sglang_port.to_string();
    assert_eq!(
        sglang_args,
        &[
            "-m",
            "sglang.launch_server",
            "--model-path",
            "google/gemma-3-1b-it",
            "--host",
            "127.0.0.1",
            "--port",
            &p,
            "--enable-memory-saver",
            "--enable-weights-cpu-backup",
            "--enable-metrics",
            "--mem-fraction-static",
            "0.3",
            "--tp",
            "1",
            "--dtype",
            "bfloat16",
        ]
    );
    assert_eq!(sglang_env["CUDA_VISIBLE_DEVICES"], "GPU-fake-0000");
    assert!(sglang_env.get("VLLM_SERVER_DEV_MODE").is_none());

    // Booted, then put to sleep through their own APIs.
    assert!(is_sleeping(*vllm_port).await, "vLLM sleeps after its boot");
    let states = local.states().await;
    assert_eq!(states["qwen"], "sleeping", "{states:?}");
    assert_eq!(states["gemma"], "sleeping", "{states:?}");

    // A request wakes vLLM, under either name.
    for name in ["qwen", "Qwen/Qwen2.5-0.5B-Instruct"] {
        let r = local.chat(name, 2).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", r.text().await.unwrap());
    }
    assert!(!is_sleeping(*vllm_port).await);
    assert_eq!(local.states().await["qwen"], "serving");
    // The stand-in, like vLLM, answers only its served names.
    let direct = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{vllm_port}/v1/completions"))
        .json(&serde_json::json!({"model": "other", "prompt": "hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 404);
    let r = local
        .client
        .post(format!("{}/api/v1/models/qwen/sleep", local.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(is_sleeping(*vllm_port).await);

    // SGLang wakes by resuming its memory occupation; the warm-up proves the weights.
    for name in ["gemma", "google/gemma-3-1b-it"] {
        let r = local.chat(name, 2).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}: {}", r.text().await.unwrap());
    }
    wait_until("gemma to serve", Duration::from_secs(10), || async {
        (local.states().await["gemma"] == "serving").then_some(())
    })
    .await;
}

/// Adapters on real engines' command lines: vLLM with LoRA on and its runtime adapter
/// API enabled, SGLang with LoRA on for adapters loaded later; each adapter's name,
/// through the API server, wakes its base and reaches the adapter (SGLang asked for
/// `<base>:<adapter>`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_turn_lora_on_in_vllm_and_sglang_and_answer_by_name() {
    let config = CONFIG
        .replace(
            "      extraArgs: [--max-model-len, \"4096\"]",
            "      extraArgs: [--max-model-len, \"4096\"]\n      adapters: [{name: sql, source: /srv/lora/sql}]\n      maxLoraRank: 32",
        )
        .replace(
            "      gpuMemoryUtilization: \"0.3\"",
            "      gpuMemoryUtilization: \"0.3\"\n      adapters: [{name: poet, source: org/poet-lora}]",
        );
    let (local, _dir, rec) = start(&config).await;
    let got = records(&rec);
    let (_, vllm_args, vllm_env) = &got["vllm"];
    let joined = vllm_args.join(" ");
    assert!(
        joined.contains("--enable-sleep-mode --enable-lora --max-loras 4 --max-lora-rank 32 --gpu-memory-utilization"),
        "{joined}"
    );
    assert_eq!(vllm_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"], "True");
    let (_, sglang_args, _) = &got["sglang"];
    let joined = sglang_args.join(" ");
    assert!(
        joined.contains(
            "--enable-lora --max-loras-per-batch 4 --max-lora-rank 16 --lora-target-modules all"
        ),
        "{joined}"
    );
    // The stand-in, like vLLM, finds no adapter at a path that does not exist: the
    // sql adapter fails to load and says so; the base still serves.
    let r = local.chat("qwen", 2).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = local.metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_adapter_load_failures_total",
            &[("model", "qwen"), ("pod", "qwen-0"), ("adapter", "sql")]
        ),
        Some(1.0)
    );
    let r = local.chat("poet", 2).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["x-sim-lora-adapter"], "poet");
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["model"], "google/gemma-3-1b-it:poet");
    let m = local.metrics().await;
    assert_eq!(
        m.value(
            "gthread_sidecar_adapter_loads_total",
            &[("model", "gemma"), ("pod", "gemma-0"), ("adapter", "poet")]
        ),
        Some(1.0)
    );
}

fn which(program: &str) -> String {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| panic!("{program} is not on the PATH"))
}
