//! The command line of an engine that has no sleep API and is therefore started and
//! stopped by its sidecar (`llamacpp`, `process`): the same in `local` and in the pods
//! the controller renders.

use crate::{EngineKind, ModelSpec};

/// Quotes `s` for `/bin/sh` when it needs it.
pub fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl ModelSpec {
    /// `env PORT=<port> <command> <extraArgs>…`, for `/bin/sh` (`env`, not a bare
    /// assignment, so that the line can follow `exec`). llama.cpp's server (the spec's
    /// `command`, or `llama_server`) also gets its address, the model id as its alias and
    /// its metrics; a `process` engine finds its port in `$PORT` or where `{port}` stands.
    pub fn owned_engine_command(&self, port: u16, llama_server: &str) -> String {
        let mut argv: Vec<String> = match self.engine {
            EngineKind::Llamacpp if self.command.is_empty() => vec![llama_server.to_string()],
            _ => self.command.clone(),
        };
        argv.extend(self.extra_args.iter().cloned());
        if self.engine == EngineKind::Llamacpp {
            argv.extend(
                [
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--alias",
                    &self.model_name,
                    "--metrics",
                ]
                .map(String::from),
            );
        }
        let line = argv
            .iter()
            .map(|a| shell_quote(&a.replace("{port}", &port.to_string())))
            .collect::<Vec<_>>()
            .join(" ");
        format!("env PORT={port} {line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(engine: &str, command: &[&str], extra: &[&str]) -> ModelSpec {
        serde_json::from_value(serde_json::json!({
            "modelName": "m", "engine": engine, "command": command, "extraArgs": extra,
        }))
        .unwrap()
    }

    #[test]
    fn llama_cpp_gets_its_address_alias_and_metrics() {
        let s = spec("llamacpp", &[], &["-m", "/m/a b.gguf"]);
        assert_eq!(
            s.owned_engine_command(8001, "llama-server"),
            "env PORT=8001 llama-server -m '/m/a b.gguf' --host 127.0.0.1 --port 8001 --alias m --metrics"
        );
    }

    #[test]
    fn a_process_engine_finds_its_port() {
        let s = spec(
            "process",
            &["python3", "serve.py"],
            &["--listen=127.0.0.1:{port}"],
        );
        assert_eq!(
            s.owned_engine_command(9000, "unused"),
            "env PORT=9000 python3 serve.py --listen=127.0.0.1:9000"
        );
    }
}
