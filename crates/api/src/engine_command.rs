//! The command line of an engine that has no sleep API and is therefore started and
//! stopped by its sidecar (`llamacpp`, `process`): the same in `local` and in the pods
//! the controller renders.

use crate::{EngineKind, ModelSpec};

/// Characters `/bin/sh` takes literally besides letters and digits, as [`shell_quote`]
/// leaves them unquoted.
const PLAIN: &str = "-_./:=@,";

fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || PLAIN.contains(c)
}

/// Quotes `s` for `/bin/sh` when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A command line as a program, its arguments and leading `NAME=value` assignments (with
/// or without `env` before them), when it is only words, plain or quoted as
/// [`shell_quote`] quotes them; `None` when it needs a shell (expansions, pipes,
/// redirections, double quotes, globs...). The sidecar execs such a line itself: the
/// image has no `/bin/sh` (and no `env`), and the engine is then its own child.
pub fn split_simple(line: &str) -> Option<Exec> {
    let mut words: Vec<String> = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            // `'\''` (close, an escaped quote, reopen) is how shell_quote writes a quote.
            '\\' => match chars.next()? {
                '\'' => word.get_or_insert_with(String::new).push('\''),
                _ => return None,
            },
            // What shell_quote leaves plain, and `+` and `%`, also literal to the shell.
            c if plain(c) || "+%".contains(c) => word.get_or_insert_with(String::new).push(c),
            _ => return None,
        }
    }
    words.extend(word);
    let mut rest = words.as_slice();
    if rest.first().is_some_and(|w| w == "env") {
        rest = &rest[1..];
    }
    let mut env = Vec::new();
    while let Some((name, value)) = rest.first().and_then(|w| w.split_once('=')) {
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            break;
        }
        env.push((name.to_string(), value.to_string()));
        rest = &rest[1..];
    }
    (!rest.is_empty()).then(|| Exec {
        env,
        argv: rest.to_vec(),
    })
}

/// A command line split for exec: assignments, then the program and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
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
            // llama.cpp serves embeddings and reranking only when told to.
            match self.model_type {
                Some(crate::ModelType::Embedding) => argv.push("--embedding".into()),
                Some(crate::ModelType::Reranker) => argv.push("--reranking".into()),
                _ => {}
            }
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

    #[test]
    fn simple_lines_split_as_the_shell_would_and_others_need_it() {
        let tricky = [
            "plain",
            "a b",
            "it's",
            "{\"json\": [1, 2]}",
            "",
            "--x=$HOME",
            "*",
        ];
        let line = format!(
            "env PORT=8080 /bin/engine {}",
            tricky
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let Exec { env, argv } = split_simple(&line).unwrap();
        assert_eq!(env, vec![("PORT".to_string(), "8080".to_string())]);
        assert_eq!(argv[0], "/bin/engine");
        assert_eq!(&argv[1..], tricky.map(String::from));
        // Bare assignments, and no env at all.
        let Exec { env, argv } = split_simple("A=1 B_2=x y --flag=v").unwrap();
        assert_eq!(env.len(), 2);
        assert_eq!(argv, ["y", "--flag=v"]);
        assert_eq!(split_simple("vllm serve m").unwrap().env, vec![]);
        // What only a shell can run.
        for line in [
            "engine $PORT",
            "a | b",
            "a > log",
            "a && b",
            "a; b",
            "engine \"quoted\"",
            "ls *.gguf",
            "echo `id`",
            "a 'unterminated",
            "env",
            "A=1",
        ] {
            assert_eq!(split_simple(line), None, "{line}");
        }
    }

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
