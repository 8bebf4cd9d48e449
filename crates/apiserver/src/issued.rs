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

/// Where issued keys are kept: the one truth that every API server replica reads.
pub trait KeyStore: Send + Sync {
    /// Every record, as kept now; `None` when nothing was ever kept (no file, no Secret).
    fn load(&self) -> BoxFuture<'_, Result<Option<Vec<Record>>, IssueError>>;
    /// Applies `change` to the records as kept (read, changed, written back whole,
    /// again if another writer came between); the records as written.
    fn update<'a>(
        &'a self,
        change: &'a (dyn Fn(Vec<Record>) -> Result<Vec<Record>, IssueError> + Send + Sync),
    ) -> BoxFuture<'a, Result<Vec<Record>, IssueError>>;
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The keys issued at run time, and where they are kept (none: nowhere, and none can be
/// issued).
#[derive(Default)]
pub struct Issued {
    entries: RwLock<Vec<Arc<Entry>>>,
    store: Option<Arc<dyn KeyStore>>,
    /// A key was issued once (the store exists): the OpenAI API stays closed, even once
    /// every key is revoked — revoking the last key must never open it. Deleting the
    /// store (`keys.json`, the Secret) opens it again.
    closed: std::sync::atomic::AtomicBool,
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

/// Records as JSON (what every store keeps).
pub fn encode(records: &[Record]) -> Vec<u8> {
    serde_json::to_vec_pretty(records).expect("records serialize")
}

/// Records from JSON (nothing: none).
pub fn decode(bytes: &[u8], source: &str) -> Result<Vec<Record>, IssueError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(bytes).map_err(|e| IssueError::Store(format!("{source}: {e}")))
}

impl Issued {
    /// The keys kept in `store`, read now.
    pub async fn with_store(store: Arc<dyn KeyStore>) -> Result<Self, IssueError> {
        let issued = Self {
            entries: RwLock::default(),
            store: Some(store.clone()),
            closed: Default::default(),
        };
        issued.kept(store.load().await?)?;
        Ok(issued)
    }

    /// The keys kept in the file `path` (none yet when it does not exist).
    pub async fn load(path: PathBuf) -> anyhow::Result<Self> {
        Ok(Self::with_store(Arc::new(FileStore(path))).await?)
    }

    /// The records as kept now (read by a watch of the store): in use from now on; the
    /// callers of keys that are still there keep their rate limits' state.
    fn set(&self, records: Vec<Record>) -> Result<(), IssueError> {
        let mut entries = self.entries.write().unwrap();
        let mut next = Vec::with_capacity(records.len());
        for r in records {
            match entries.iter().find(|e| e.record == r) {
                Some(e) => next.push(e.clone()),
                None => next.push(Arc::new(entry(r).map_err(IssueError::Store)?)),
            }
        }
        *entries = next;
        Ok(())
    }

    /// The store as read (by a watch): its records, or `None` when it is gone.
    pub fn kept(&self, records: Option<Vec<Record>>) -> Result<(), IssueError> {
        self.closed
            .store(records.is_some(), std::sync::atomic::Ordering::SeqCst);
        self.set(records.unwrap_or_default())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.read().unwrap().is_empty()
    }

    /// Whether keys were issued here once (the OpenAI API is closed for good).
    pub fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The caller whose key is `given`. Every hash is compared, in constant time.
    pub fn identify(&self, given: &str) -> Option<Arc<Caller>> {
        let entries = self.entries.read().unwrap();
        if entries.is_empty() {
            return None;
        }
        let hash = sha256(given);
        greenthread_edge::ct_find(entries.iter(), &hash, |e| &e.hash[..]).map(|e| e.caller.clone())
    }

    /// The caller of the issued key named `name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<Caller>> {
        let entries = self.entries.read().unwrap();
        entries
            .iter()
            .find(|e| e.record.name == name)
            .map(|e| e.caller.clone())
    }

    /// Every issued key, as stored (never the key).
    pub fn list(&self) -> Vec<Record> {
        let entries = self.entries.read().unwrap();
        entries.iter().map(|e| e.record.clone()).collect()
    }

    /// A new key for `new`, unless its name is taken here or by `configured`; the key
    /// itself is returned once and kept nowhere.
    pub async fn issue(
        &self,
        new: NewKey,
        configured: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(String, Record), IssueError> {
        let store = self.store.as_ref().ok_or(IssueError::NoStore)?;
        check_name(&new.name)?;
        if configured(&new.name) {
            return Err(IssueError::Taken(new.name));
        }
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
        let add = |mut records: Vec<Record>| {
            if records.iter().any(|r| r.name == record.name) {
                return Err(IssueError::Taken(record.name.clone()));
            }
            records.push(record.clone());
            Ok(records)
        };
        // Kept before it is usable: a key that a restart would lose is never handed out.
        let records = store.update(&add).await?;
        self.kept(Some(records))?;
        Ok((key, record))
    }

    /// Revokes key `name`: refused from the next request on (here at once; by other
    /// replicas once they see the store change), and gone from the store.
    pub async fn revoke(&self, name: &str) -> Result<Record, IssueError> {
        let store = self.store.as_ref().ok_or(IssueError::NoStore)?;
        // Out of use here at once, whether or not this replica has seen it yet.
        self.entries
            .write()
            .unwrap()
            .retain(|e| e.record.name != name);
        // What the store held under that name (the truth, whatever this replica saw).
        let gone = std::sync::Mutex::new(None);
        let remove = |mut records: Vec<Record>| {
            let at = records
                .iter()
                .position(|r| r.name == name)
                .ok_or_else(|| IssueError::NotFound(name.to_string()))?;
            *gone.lock().unwrap() = Some(records.remove(at));
            Ok(records)
        };
        let records = store.update(&remove).await?;
        self.kept(Some(records))?;
        let gone = gone.lock().unwrap().take();
        gone.ok_or_else(|| IssueError::NotFound(name.to_string()))
    }
}

/// Issued keys in a file (`local`'s data directory), readable by this user alone,
/// replaced whole on every change.
pub struct FileStore(pub PathBuf);

impl FileStore {
    fn read(&self) -> Result<Option<Vec<Record>>, IssueError> {
        match std::fs::read(&self.0) {
            Ok(bytes) => decode(&bytes, &self.0.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(IssueError::Store(format!("{}: {e}", self.0.display()))),
        }
    }

    fn write(&self, records: &[Record]) -> Result<(), IssueError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = &self.0;
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
        f.write_all(&encode(records))
            .and_then(|()| f.sync_all())
            .map_err(store)?;
        std::fs::rename(&tmp, path).map_err(store)
    }
}

impl KeyStore for FileStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<Vec<Record>>, IssueError>> {
        Box::pin(async move { self.read() })
    }

    fn update<'a>(
        &'a self,
        change: &'a (dyn Fn(Vec<Record>) -> Result<Vec<Record>, IssueError> + Send + Sync),
    ) -> BoxFuture<'a, Result<Vec<Record>, IssueError>> {
        Box::pin(async move {
            let records = change(self.read()?.unwrap_or_default())?;
            self.write(&records)?;
            Ok(records)
        })
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

    #[tokio::test]
    async fn a_key_is_shown_once_kept_as_a_hash_and_survives_a_restart_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let issued = Issued::load(path.clone()).await.unwrap();
        assert!(issued.is_empty());
        let none = |_: &str| false;
        let (key, record) = issued.issue(new("ci"), &none).await.unwrap();
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
        let again = Issued::load(path.clone()).await.unwrap();
        let caller = again.identify(&key).unwrap();
        assert_eq!(
            (caller.key.models.clone(), caller.key.priority),
            (vec!["team-a-*".to_string()], Priority::Sheddable)
        );
        // Names are unique, among the configuration's keys too.
        assert!(matches!(
            again.issue(new("ci"), &none).await,
            Err(IssueError::Taken(_))
        ));
        let configured = |n: &str| n == "ops";
        assert!(matches!(
            again.issue(new("ops"), &configured).await,
            Err(IssueError::Taken(_))
        ));
        assert!(matches!(
            again.issue(new("a b"), &none).await,
            Err(IssueError::Invalid(_))
        ));
        again.revoke("ci").await.unwrap();
        assert!(again.identify(&key).is_none());
        assert!(matches!(
            again.revoke("ci").await,
            Err(IssueError::NotFound(_))
        ));
        assert!(Issued::load(path).await.unwrap().is_empty());
        // Nowhere to keep them: none issued.
        assert!(matches!(
            Issued::default().issue(new("x"), &none).await,
            Err(IssueError::NoStore)
        ));
    }
}
