//! API keys issued through the admin API at run time (`POST /api/v1/keys`): the key is
//! shown once, when it is made (`gthread_` and 48 hex digits from the system's secure
//! generator), and kept only as its SHA-256 — in memory and in the data directory's
//! `keys.json` (mode 0600), which a restart reads back. A revoked key is refused from the
//! next request on. The keys of the configuration are not these: they cannot be revoked
//! through the API.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use greenthread_api::{Priority, keys::ApiKey, keys::RateLimitSpec};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::keys::Caller;

/// What every issued key starts with (secret scanners look for it).
pub const PREFIX: &str = "gthread_";

/// A key issued at run time, as stored: never the key itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub name: String,
    /// The key's first characters, to tell keys apart in listings.
    pub prefix: String,
    /// The key's SHA-256, hex.
    pub sha256: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub rate_limit: RateLimitSpec,
}

/// `POST /api/v1/keys`'s body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub rate_limit: RateLimitSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("{0}")]
    Invalid(String),
    #[error("an API key named {0:?} exists already")]
    Taken(String),
    #[error("no API key issued through the API is named {0:?}")]
    NotFound(String),
    #[error("the API key {0:?} comes from the configuration: remove it there")]
    Configured(String),
    #[error("keys cannot be kept: {0}")]
    Store(String),
    #[error(
        "issuing API keys needs an admin token (or the admin API declared open): without one, anyone who can reach the port could mint keys"
    )]
    AdminOpen,
    #[error(
        "this server has nowhere to keep issued keys (`greenthread local` keeps them in its --data-dir); on Kubernetes, API keys live in the API server's Secret"
    )]
    NoStore,
}

impl IssueError {
    pub fn status(&self) -> StatusCode {
        match self {
            IssueError::Invalid(_) => StatusCode::BAD_REQUEST,
            IssueError::Taken(_) | IssueError::AdminOpen => StatusCode::CONFLICT,
            IssueError::NoStore => StatusCode::NOT_IMPLEMENTED,
            IssueError::NotFound(_) => StatusCode::NOT_FOUND,
            IssueError::Configured(_) => StatusCode::FORBIDDEN,
            IssueError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error's `type` in its OpenAI-style answer.
    pub fn kind(&self) -> &'static str {
        match self {
            IssueError::Invalid(_) => "invalid_request_error",
            IssueError::Taken(_) | IssueError::AdminOpen => "conflict",
            IssueError::NoStore => "not_implemented",
            IssueError::NotFound(_) => "not_found",
            IssueError::Configured(_) => "permission_denied",
            IssueError::Store(_) => "internal_error",
        }
    }
}

struct Entry {
    caller: Arc<Caller>,
    hash: [u8; 32],
    record: Record,
}

/// The keys issued at run time, and where they are kept (none: in memory only).
#[derive(Default)]
pub struct Issued {
    entries: RwLock<Vec<Arc<Entry>>>,
    store: Option<PathBuf>,
}

fn sha256(s: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn entry(record: Record) -> Result<Entry, String> {
    let hash: Vec<u8> = (0..record.sha256.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(record.sha256.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("key {:?}: sha256 is not hex", record.name))?;
    let hash: [u8; 32] = hash
        .try_into()
        .map_err(|_| format!("key {:?}: sha256 is not 32 bytes", record.name))?;
    let caller = Arc::new(Caller::new(ApiKey {
        name: record.name.clone(),
        // Never kept: the key is found by its hash.
        secret: String::new(),
        models: record.models.clone(),
        rate_limit: record.rate_limit,
        priority: record.priority,
    }));
    Ok(Entry {
        caller,
        hash,
        record,
    })
}

/// Whether `name` can name a key: letters, digits, `.`, `_`, `-`, at most 64.
fn check_name(name: &str) -> Result<(), IssueError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(IssueError::Invalid(format!(
            "name: {name:?} must be 1 to 64 letters, digits, '.', '_' or '-'"
        )))
    }
}

impl Issued {
    /// The keys kept in `path` (none yet when it does not exist).
    pub fn load(path: PathBuf) -> anyhow::Result<Self> {
        let records: Vec<Record> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        };
        let entries = records
            .into_iter()
            .map(|r| entry(r).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            entries: RwLock::new(entries),
            store: Some(path),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.read().unwrap().is_empty()
    }

    /// The caller whose key is `given`. Every hash is compared, in constant time.
    pub fn identify(&self, given: &str) -> Option<Arc<Caller>> {
        let entries = self.entries.read().unwrap();
        if entries.is_empty() {
            return None;
        }
        let hash = sha256(given);
        entries.iter().fold(None, |found, e| {
            let hit = greenthread_edge::ct_eq(&e.hash, &hash);
            if hit && found.is_none() {
                Some(e.caller.clone())
            } else {
                found
            }
        })
    }

    /// Every issued key, as stored (never the key).
    pub fn list(&self) -> Vec<Record> {
        let entries = self.entries.read().unwrap();
        entries.iter().map(|e| e.record.clone()).collect()
    }

    /// A new key for `new`, unless its name is taken here or by `configured`; the key
    /// itself is returned once and kept nowhere.
    pub fn issue(
        &self,
        new: NewKey,
        configured: &dyn Fn(&str) -> bool,
    ) -> Result<(String, Record), IssueError> {
        if self.store.is_none() {
            return Err(IssueError::NoStore);
        }
        check_name(&new.name)?;
        let mut random = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| IssueError::Store("the system's random generator failed".into()))?;
        let key = format!("{PREFIX}{}", hex(&random));
        let record = Record {
            name: new.name.clone(),
            prefix: key[..PREFIX.len() + 4].to_string(),
            sha256: hex(&sha256(&key)),
            created: jiff::Timestamp::now().to_string(),
            models: new.models,
            priority: new.priority,
            rate_limit: new.rate_limit,
        };
        let mut entries = self.entries.write().unwrap();
        if configured(&new.name) || entries.iter().any(|e| e.record.name == new.name) {
            return Err(IssueError::Taken(new.name));
        }
        let entry = Arc::new(entry(record.clone()).map_err(IssueError::Store)?);
        let mut next = entries.clone();
        next.push(entry);
        // Kept before it is usable: a key that a restart would lose is never handed out.
        self.save(&next)?;
        *entries = next;
        Ok((key, record))
    }

    /// Revokes key `name`: refused from the next request on, and gone from the store.
    pub fn revoke(&self, name: &str) -> Result<Record, IssueError> {
        let mut entries = self.entries.write().unwrap();
        let Some(at) = entries.iter().position(|e| e.record.name == name) else {
            return Err(IssueError::NotFound(name.to_string()));
        };
        // Out of use at once, whether or not the store can be written.
        let gone = entries.remove(at);
        self.save(&entries)?;
        Ok(gone.record.clone())
    }

    /// Writes `entries` to the store whole (a temporary file renamed over it), readable
    /// by this user alone.
    fn save(&self, entries: &[Arc<Entry>]) -> Result<(), IssueError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = &self.store else {
            return Ok(());
        };
        let records: Vec<&Record> = entries.iter().map(|e| &e.record).collect();
        let body = serde_json::to_vec_pretty(&records).expect("records serialize");
        let tmp = path.with_extension("json.tmp");
        let store = |e: std::io::Error| IssueError::Store(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(store)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(store)?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .map_err(store)?;
        std::fs::rename(&tmp, path).map_err(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str) -> NewKey {
        NewKey {
            name: name.into(),
            models: vec!["team-a-*".into()],
            priority: Priority::Sheddable,
            rate_limit: RateLimitSpec::default(),
        }
    }

    #[test]
    fn a_key_is_shown_once_kept_as_a_hash_and_survives_a_restart_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let issued = Issued::load(path.clone()).unwrap();
        assert!(issued.is_empty());
        let none = |_: &str| false;
        let (key, record) = issued.issue(new("ci"), &none).unwrap();
        assert!(key.starts_with("gthread_") && key.len() == 8 + 48, "{key}");
        assert_eq!(record.prefix, key[..12]);
        assert_eq!(issued.identify(&key).unwrap().key.name, "ci");
        assert!(issued.identify("gthread_wrong").is_none());
        // On disk: the hash, never the key, readable by this user alone.
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(
            !stored.contains(&key) && stored.contains(&record.sha256),
            "{stored}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart reads it back, limits and all.
        let again = Issued::load(path.clone()).unwrap();
        let caller = again.identify(&key).unwrap();
        assert_eq!(
            (caller.key.models.clone(), caller.key.priority),
            (vec!["team-a-*".to_string()], Priority::Sheddable)
        );
        // Names are unique, among the configuration's keys too.
        assert!(matches!(
            again.issue(new("ci"), &none),
            Err(IssueError::Taken(_))
        ));
        let configured = |n: &str| n == "ops";
        assert!(matches!(
            again.issue(new("ops"), &configured),
            Err(IssueError::Taken(_))
        ));
        assert!(matches!(
            again.issue(new("a b"), &none),
            Err(IssueError::Invalid(_))
        ));
        again.revoke("ci").unwrap();
        assert!(again.identify(&key).is_none());
        assert!(matches!(again.revoke("ci"), Err(IssueError::NotFound(_))));
        assert!(Issued::load(path).unwrap().is_empty());
    }
}
