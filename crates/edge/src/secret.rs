use std::path::Path;

/// A secret from `file` when given, else from the environment variable `env`; `None`
/// when neither holds one. Secrets never come from flag values, which `ps` shows.
pub fn secret(env: &str, file: Option<&Path>) -> Result<Option<String>, SecretError> {
    let value = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| SecretError {
            source: format!("{}", path.display()),
            why: e.to_string(),
        })?,
        None => std::env::var(env).unwrap_or_default(),
    };
    let value = value.trim();
    Ok((!value.is_empty()).then(|| value.to_string()))
}

/// Several secrets (API keys), one per line or comma-separated, from `file` or `env`.
pub fn secrets(env: &str, file: Option<&Path>) -> Result<Vec<String>, SecretError> {
    Ok(secret(env, file)?
        .map(|s| {
            s.split([',', '\n'])
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

#[derive(Debug, Clone)]
pub struct SecretError {
    source: String,
    why: String,
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading secret file {}: {}", self.source, self.why)
    }
}

impl std::error::Error for SecretError {}
