//! API keys as a configuration declares them: a plain string (a key for every model), or
//! an object with a name (what metrics and errors show, never the key), where the secret
//! comes from, the models it may use (globs) and its rate limits.
//!
//! ```yaml
//! apiKeys:
//!   - sk-legacy                      # every model, no limits
//!   - name: team-a
//!     keyFile: /run/secrets/team-a   # or key: sk-…
//!     models: ["team-a-*", "shared/*"]
//!     rateLimit: {requestsPerMinute: 600, tokensPerMinute: 200000}
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::FieldError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ApiKeySpec {
    Plain(String),
    Entry(ApiKeyEntry),
}

/// A string or an object, each with its own errors (an untagged enum would only say
/// that neither matched).
impl<'de> Deserialize<'de> for ApiKeySpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ApiKeySpec;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key (a string) or {name, key | keyFile, models, rateLimit}")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ApiKeySpec, E> {
                Ok(ApiKeySpec::Plain(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ApiKeySpec, A::Error> {
                ApiKeyEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ApiKeySpec::Entry)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// Shown in metrics (`key`) and errors instead of the key.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A file holding the key (a mounted Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Globs (`*` matches any run of characters) over a Model's name, `namespace/name`
    /// or engine model id; none: every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Its requests' priority (default standard); a request may lower it with the
    /// `x-greenthread-priority` header, never raise it.
    #[serde(default, skip_serializing_if = "crate::Priority::is_standard")]
    pub priority: crate::Priority,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Prompt and completion tokens together, as the engines report them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

/// A key ready to check requests against.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub secret: String,
    pub models: Vec<String>,
    pub rate_limit: RateLimitSpec,
    pub priority: crate::Priority,
}

impl std::fmt::Debug for ApiKey {
    // Never the secret, in any log or panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("models", &self.models)
            .field("rate_limit", &self.rate_limit)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// A key for every model, without limits.
    pub fn plain(name: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            secret: secret.into(),
            models: vec![],
            rate_limit: RateLimitSpec::default(),
            priority: crate::Priority::Standard,
        }
    }

    /// Whether this key may use a Model known by any of `names` (its name,
    /// `namespace/name`, its engine model id).
    pub fn allows(&self, names: &[&str]) -> bool {
        self.models.is_empty()
            || self
                .models
                .iter()
                .any(|g| names.iter().any(|n| glob_match(g, n)))
    }
}

/// `*` matches any run of characters (`/` included); everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // The classic two-pointer match with backtracking to the last star: linear space,
    // and no recursion for a hostile pattern to blow up.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A name a metric label and an error message can carry as it is.
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Checks every key and reads the key files (`read`, so that tests need no files);
/// every problem is reported, each naming its field under `path` (e.g. `apiKeys`).
/// Plain keys are named `key-1`, `key-2`, … by position.
pub fn resolve_keys(
    specs: &[ApiKeySpec],
    path: &str,
    read: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<Vec<ApiKey>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut keys: Vec<ApiKey> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let mut err = |field: &str, message: String| {
            errors.push(FieldError {
                field: if field.is_empty() {
                    at.clone()
                } else {
                    format!("{at}.{field}")
                },
                message,
            })
        };
        let key = match spec {
            ApiKeySpec::Plain(secret) => {
                if secret.trim().is_empty() {
                    err("", "is empty".into());
                    continue;
                }
                ApiKey {
                    name: format!("key-{}", i + 1),
                    secret: secret.trim().to_string(),
                    models: vec![],
                    rate_limit: RateLimitSpec::default(),
                    priority: crate::Priority::Standard,
                }
            }
            ApiKeySpec::Entry(e) => {
                if !valid_name(&e.name) {
                    err(
                        "name",
                        format!(
                            "{:?} must be 1 to 63 letters, digits, '-', '_' or '.'",
                            e.name
                        ),
                    );
                }
                let secret = match (&e.key, &e.key_file) {
                    (Some(k), None) => Some(k.trim().to_string()),
                    (None, Some(file)) => match read(file) {
                        Ok(k) => Some(k.trim().to_string()),
                        Err(why) => {
                            err("keyFile", format!("{}: {why}", file.display()));
                            None
                        }
                    },
                    (None, None) => {
                        err("", "needs key or keyFile".into());
                        None
                    }
                    (Some(_), Some(_)) => {
                        err("", "takes key or keyFile, not both".into());
                        None
                    }
                };
                if secret.as_deref() == Some("") {
                    err(
                        if e.key.is_some() { "key" } else { "keyFile" },
                        "is empty".into(),
                    );
                }
                for (j, g) in e.models.iter().enumerate() {
                    if g.trim().is_empty() {
                        err(&format!("models[{j}]"), "is empty".into());
                    }
                }
                let limit = e.rate_limit.unwrap_or_default();
                if limit.requests_per_minute == Some(0) {
                    err(
                        "rateLimit.requestsPerMinute",
                        "must be at least 1 (leave it out for no limit)".into(),
                    );
                }
                if limit.tokens_per_minute == Some(0) {
                    err(
                        "rateLimit.tokensPerMinute",
                        "must be at least 1 (leave it out for no limit)".into(),
                    );
                }
                let Some(secret) = secret.filter(|s| !s.is_empty()) else {
                    continue;
                };
                ApiKey {
                    name: e.name.clone(),
                    secret,
                    models: e.models.clone(),
                    rate_limit: limit,
                    priority: e.priority,
                }
            }
        };
        if keys.iter().any(|k| k.name == key.name) {
            err("name", format!("{:?} is used by another key", key.name));
        } else if keys.iter().any(|k| k.secret == key.secret) {
            // One secret, two names: which one's limits would apply?
            err(
                "",
                format!(
                    "has the same key as {:?}",
                    keys.iter()
                        .find(|k| k.secret == key.secret)
                        .map(|k| k.name.as_str())
                        .unwrap_or_default()
                ),
            );
        }
        keys.push(key);
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(yaml: &str) -> Vec<ApiKeySpec> {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn no_files(_: &Path) -> std::io::Result<String> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ))
    }

    #[test]
    fn globs() {
        for (p, t, ok) in [
            ("*", "anything/at all", true),
            ("team-a-*", "team-a-llama", true),
            ("team-a-*", "team-b-llama", false),
            ("*/qwen", "team-a/qwen", true),
            ("*/qwen", "qwen", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("**", "", true),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob_match(p, t), ok, "{p:?} vs {t:?}");
        }
        // A pathological pattern finishes (no exponential backtracking).
        let long = "a".repeat(5000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(50)), &long));
    }

    #[test]
    fn strings_and_objects_resolve_with_their_names_and_limits() {
        let keys = resolve_keys(
            &specs(
                "- sk-plain\n- name: team-a\n  key: sk-a\n  models: [\"team-a-*\"]\n  rateLimit: {requestsPerMinute: 60}\n- name: team-b\n  keyFile: /run/b\n",
            ),
            "apiKeys",
            |p| {
                assert_eq!(p, Path::new("/run/b"));
                Ok("sk-b\n".into())
            },
        )
        .unwrap();
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["key-1", "team-a", "team-b"]);
        assert_eq!(keys[2].secret, "sk-b");
        assert_eq!(keys[1].rate_limit.requests_per_minute, Some(60));
        assert!(keys[0].allows(&["anything"]));
        assert!(keys[1].allows(&["x", "team-a-llama"]));
        assert!(!keys[1].allows(&["team-b-llama", "org/llama"]));
        assert!(
            !format!("{:?}", keys[1]).contains("sk-a"),
            "Debug hides the secret"
        );
    }

    #[test]
    fn every_bad_key_is_named() {
        let errors = resolve_keys(
            &specs(
                "- \"\"\n- name: \"bad name\"\n  key: k1\n- name: x\n- name: y\n  key: k2\n  keyFile: /f\n- name: z\n  keyFile: /missing\n- name: w\n  key: k3\n  models: [\"\"]\n  rateLimit: {requestsPerMinute: 0, tokensPerMinute: 0}\n- name: w\n  key: k4\n- name: v\n  key: k3\n",
            ),
            "apiKeys",
            no_files,
        )
        .unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "apiKeys[0]",
                "apiKeys[1].name",
                "apiKeys[2]",
                "apiKeys[3]",
                "apiKeys[4].keyFile",
                "apiKeys[5].models[0]",
                "apiKeys[5].rateLimit.requestsPerMinute",
                "apiKeys[5].rateLimit.tokensPerMinute",
                "apiKeys[6].name",
                "apiKeys[7]",
            ],
            "{errors:?}"
        );
        assert!(errors[4].message.contains("/missing"), "{}", errors[4]);
        assert!(errors[9].message.contains("\"w\""), "{}", errors[9]);
        // No error message carries a secret.
        for e in &errors {
            for secret in ["k1", "k2", "k3", "k4"] {
                assert!(!e.message.contains(secret), "{e}");
            }
        }
    }

    #[test]
    fn an_unknown_field_is_named() {
        let e = serde_saphyr::from_str::<Vec<ApiKeySpec>>("- name: a\n  key: k\n  model: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model"), "{e}");
    }
}
