//! Secrets kept out of logs: values of arguments that name a key, token, password or
//! secret, in `--flag value`, `--flag=value` and `NAME=value` forms.

const SECRET_WORDS: [&str; 9] = [
    "key",
    "apikey",
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "credentials",
    "auth",
];

/// Whether a flag or variable name names a secret: one of its words (split at `-`, `_`,
/// `.`) is a secret word. `--api-key`, `HF_TOKEN` yes; `--tokens-per-second` no.
fn names_secret(name: &str) -> bool {
    name.split(['-', '_', '.'])
        .any(|w| SECRET_WORDS.iter().any(|s| w.eq_ignore_ascii_case(s)))
}

/// `command` split at spaces outside single or double quotes.
fn shell_words(command: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let (mut start, mut quote) = (0, None);
    for (i, c) in command.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ' ') => {
                words.push(&command[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    words.push(&command[start..]);
    words
}

/// `command` (a shell command line) with secret-looking values replaced by `***`.
pub fn redact_command(command: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut hide_next = false;
    for word in shell_words(command) {
        if hide_next && !word.is_empty() {
            out.push("***".into());
            hide_next = false;
            continue;
        }
        if let Some((name, _)) = word.split_once('=')
            && names_secret(name)
        {
            out.push(format!("{name}=***"));
            continue;
        }
        let flag = word.trim_start_matches('-');
        if word.starts_with('-') && names_secret(flag) {
            hide_next = true;
        }
        out.push(word.to_string());
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redact_command("vllm serve m --api-key sk-123 --port 8000"),
            "vllm serve m --api-key *** --port 8000"
        );
        assert_eq!(
            redact_command("x --hf-token=hf_abc HF_TOKEN=hf_def --max-model-len 4096"),
            "x --hf-token=*** HF_TOKEN=*** --max-model-len 4096"
        );
        assert_eq!(
            redact_command("x --db-password 'p w' --n 1"),
            "x --db-password *** --n 1"
        );
        assert_eq!(
            redact_command("llama-server -m /m.gguf --port 8080"),
            "llama-server -m /m.gguf --port 8080"
        );
        // Words that only contain a secret word are not secrets.
        assert_eq!(
            redact_command("sim --tokens-per-second 80 --max-tokens 16 --keyframes 3"),
            "sim --tokens-per-second 80 --max-tokens 16 --keyframes 3"
        );
        assert_eq!(
            redact_command("x OPENAI_API_KEY=sk --auth-token t"),
            "x OPENAI_API_KEY=*** --auth-token ***"
        );
    }
}
