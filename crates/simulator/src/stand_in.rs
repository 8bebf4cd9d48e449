//! Stand-ins for real engines in tests: the simulator behind vLLM's (`vllm serve …`)
//! and SGLang's (`python3 -m sglang.launch_server …`) command lines, so that the exact
//! command line `local` renders is exercised end to end. A stand-in takes the flags the
//! real server takes, behaves as it does where GreenThread depends on it (vLLM's sleep
//! API exists only with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`; only the
//! `--served-model-name`s are answered), and records the arguments and environment it
//! got as JSON in `$GREENTHREAD_STAND_IN_RECORD/<port>.json` when that is set.

use std::net::SocketAddr;

use anyhow::Context;

use crate::SimConfig;

/// The environment variables a stand-in records.
const RECORDED_ENV: [&str; 6] = [
    "HF_HUB_OFFLINE",
    "HF_HUB_CACHE",
    "VLLM_SERVER_DEV_MODE",
    "CUDA_VISIBLE_DEVICES",
    "VLLM_API_KEY",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
];

/// A parsed engine command line: the model, `--flag value` pairs and switches, in order.
struct Flags<'a> {
    model: Option<&'a str>,
    pairs: Vec<(&'a str, Vec<&'a str>)>,
}

impl<'a> Flags<'a> {
    /// Each `--flag` takes the values up to the next `--flag` (none for a switch).
    fn parse(args: &'a [String]) -> Self {
        let mut model = None;
        let mut pairs: Vec<(&str, Vec<&str>)> = Vec::new();
        for a in args {
            // `--flag`, or a short `-m` (not a negative number).
            let short = a.len() > 1
                && a.starts_with('-')
                && !a[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.');
            if a.starts_with("--") || short {
                pairs.push((a.as_str(), Vec::new()));
            } else if let Some((_, values)) = pairs.last_mut() {
                values.push(a.as_str());
            } else if model.is_none() {
                model = Some(a.as_str());
            }
        }
        Self { model, pairs }
    }

    fn values(&self, flag: &str) -> Option<&[&'a str]> {
        self.pairs
            .iter()
            .rev()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of a repeatable flag, in order.
    fn all(&self, flag: &str) -> Vec<&'a str> {
        self.pairs
            .iter()
            .filter(|(f, _)| *f == flag)
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }

    fn one(&self, flag: &str) -> Option<&'a str> {
        self.values(flag).and_then(|v| v.first().copied())
    }

    fn has(&self, flag: &str) -> bool {
        self.values(flag).is_some()
    }
}

fn listen(flags: &Flags) -> anyhow::Result<SocketAddr> {
    let host = flags.one("--host").unwrap_or("127.0.0.1");
    let port = flags.one("--port").context("--port is required")?;
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("--host {host} --port {port}"))
}

fn record(engine: &str, args: &[String], port: u16) -> anyhow::Result<()> {
    let Ok(dir) = std::env::var("GREENTHREAD_STAND_IN_RECORD") else {
        return Ok(());
    };
    let env: serde_json::Map<String, serde_json::Value> = RECORDED_ENV
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?.into())))
        .collect();
    let body = serde_json::json!({"engine": engine, "args": args, "env": env});
    let path = std::path::Path::new(&dir).join(format!("{port}.json"));
    std::fs::write(&path, body.to_string()).with_context(|| path.display().to_string())
}

/// `vllm serve MODEL [flags]` → the simulator's configuration.
pub fn vllm(args: &[String]) -> anyhow::Result<SimConfig> {
    let rest = match args.first().map(String::as_str) {
        Some("serve") => &args[1..],
        _ => anyhow::bail!("usage: vllm serve MODEL [flags] (this stand-in knows only `serve`)"),
    };
    let flags = Flags::parse(rest);
    let model = flags
        .model
        .or_else(|| flags.one("--model"))
        .context("vllm serve: no model given")?;
    let mut cfg = SimConfig::for_model(model);
    cfg.listen = listen(&flags)?;
    cfg.served_model_names = flags
        .values("--served-model-name")
        .unwrap_or_default()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dev_mode = std::env::var("VLLM_SERVER_DEV_MODE").is_ok_and(|v| v == "1");
    cfg.no_sleep_api = !(flags.has("--enable-sleep-mode") && dev_mode);
    // vLLM loads adapters at run time only with `--enable-lora` and
    // VLLM_ALLOW_RUNTIME_LORA_UPDATING.
    let runtime_lora = std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        .is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    cfg.enable_lora = flags.has("--enable-lora") && runtime_lora;
    cfg.boot_time = std::time::Duration::from_millis(200);
    record("vllm", args, cfg.listen.port())?;
    Ok(cfg)
}

/// `llama-server -m FILE --alias NAME --lora FILE … [flags]` → the simulator's
/// configuration: no sleep API (llama.cpp sleeps by being stopped), the alias as the
/// model's name, and the `--lora` files loaded at start — each must exist, as
/// llama-server refuses to start without it.
pub fn llama(args: &[String]) -> anyhow::Result<SimConfig> {
    let flags = Flags::parse(args);
    let file = flags
        .one("-m")
        .or_else(|| flags.one("--model"))
        .context("llama-server: -m FILE is required")?;
    let mut cfg = SimConfig::for_model(flags.one("--alias").unwrap_or(file));
    cfg.listen = listen(&flags)?;
    cfg.no_sleep_api = true;
    cfg.start_loras = flags.all("--lora").into_iter().map(String::from).collect();
    for lora in &cfg.start_loras {
        anyhow::ensure!(
            std::path::Path::new(lora).is_file(),
            "failed to load lora adapter {lora}: no such file"
        );
    }
    cfg.boot_time = std::time::Duration::from_millis(100);
    record("llamacpp", args, cfg.listen.port())?;
    Ok(cfg)
}

/// `python3 -m sglang.launch_server --model-path MODEL [flags]` (from `-m` on, or from
/// `--model-path`) → the simulator's configuration.
pub fn sglang(args: &[String]) -> anyhow::Result<SimConfig> {
    let rest: &[String] = match args {
        [m, module, rest @ ..] if m == "-m" && module == "sglang.launch_server" => rest,
        rest => rest,
    };
    let flags = Flags::parse(rest);
    let model = flags
        .one("--model-path")
        .context("sglang.launch_server: --model-path is required")?;
    let mut cfg = SimConfig::for_model(model);
    cfg.listen = listen(&flags)?;
    if let Some(name) = flags.one("--served-model-name") {
        cfg.served_model_names = vec![name.to_string()];
    }
    // Without `--enable-weights-cpu-backup`, released weights come back uninitialized.
    cfg.no_weights_cpu_backup = !flags.has("--enable-weights-cpu-backup");
    cfg.enable_lora = flags.has("--enable-lora");
    cfg.boot_time = std::time::Duration::from_millis(200);
    record("sglang", args, cfg.listen.port())?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn vllm_takes_its_command_line_and_gates_the_sleep_api() {
        // SAFETY: tests in this module do not read the variable concurrently with others.
        unsafe { std::env::remove_var("VLLM_SERVER_DEV_MODE") };
        let a = args(
            "serve org/m --host 127.0.0.1 --port 9123 --enable-sleep-mode --gpu-memory-utilization 0.5 --served-model-name m org/m --max-model-len 1024",
        );
        let cfg = vllm(&a).unwrap();
        assert_eq!(cfg.model, "org/m");
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9123");
        assert_eq!(cfg.names(), ["m", "org/m"]);
        assert!(cfg.no_sleep_api, "no VLLM_SERVER_DEV_MODE: no sleep API");
        let without_switch = args("serve org/m --port 9123");
        unsafe { std::env::set_var("VLLM_SERVER_DEV_MODE", "1") };
        assert!(!vllm(&a).unwrap().no_sleep_api);
        assert!(vllm(&without_switch).unwrap().no_sleep_api);
        unsafe { std::env::remove_var("VLLM_SERVER_DEV_MODE") };
        assert!(vllm(&args("run org/m")).is_err());
        assert!(vllm(&args("serve org/m")).is_err(), "no port");
    }

    #[test]
    fn llama_server_takes_its_loras_which_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let lora = dir.path().join("sql.gguf");
        std::fs::write(&lora, b"GGUF").unwrap();
        let line = format!(
            "-m /models/base.gguf --host 127.0.0.1 --port 9125 --alias org/base --metrics --lora-init-without-apply --lora {}",
            lora.display()
        );
        let cfg = llama(&args(&line)).unwrap();
        assert_eq!((cfg.model.as_str(), cfg.listen.port()), ("org/base", 9125));
        assert_eq!(cfg.start_loras, [lora.display().to_string()]);
        assert!(cfg.no_sleep_api);
        let missing = line.replace("sql.gguf", "nope.gguf");
        let e = llama(&args(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope.gguf"), "{e}");
    }

    #[test]
    fn sglang_takes_its_launcher_line() {
        let a = args(
            "-m sglang.launch_server --model-path org/s --host 127.0.0.1 --port 9124 --enable-memory-saver --enable-weights-cpu-backup --mem-fraction-static 0.4",
        );
        let cfg = sglang(&a).unwrap();
        assert_eq!((cfg.model.as_str(), cfg.listen.port()), ("org/s", 9124));
        assert!(!cfg.no_weights_cpu_backup);
        let b = args("-m sglang.launch_server --model-path org/s --port 9124");
        assert!(sglang(&b).unwrap().no_weights_cpu_backup);
    }
}
