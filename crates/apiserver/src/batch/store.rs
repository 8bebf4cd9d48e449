//! The Batch API's durable state: uploaded files, batches, and each batch's finished
//! requests, as files in one directory (`greenthread local`: the data directory's
//! `batches`; Kubernetes: the API server's volume). A record is written whole (a
//! temporary file renamed over it); a finished request is a line appended and synced
//! before it counts. A restart at any point finds every accepted file and batch and every
//! finished request, and nothing half-written.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a batch stands, with OpenAI's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the runner still has work in it (resumed after a restart).
    pub fn active(self) -> bool {
        matches!(
            self,
            Status::Validating | Status::InProgress | Status::Finalizing | Status::Cancelling
        )
    }
}

fn nobody() -> String {
    "none".into()
}

/// An uploaded file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: String,
    /// The API key that made it (`none`: an open API); only it sees the file.
    #[serde(default = "nobody")]
    pub owner: String,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
}

impl FileMeta {
    /// OpenAI's file object.
    pub fn to_openai(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
            "expires_at": null,
        })
    }
}

/// A problem with one line of a batch's input (OpenAI's `errors.data[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineError {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub line: Option<u64>,
}

/// A batch as kept: OpenAI's fields, and the Model its requests go to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: String,
    /// The API key that made it (`none`: an open API); only it sees the batch.
    #[serde(default = "nobody")]
    pub owner: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: Status,
    /// The Model (as clients name it) every request of the batch names.
    #[serde(default)]
    pub model: String,
    pub created_at: i64,
    pub expires_at: i64,
    #[serde(default)]
    pub in_progress_at: Option<i64>,
    #[serde(default)]
    pub finalizing_at: Option<i64>,
    #[serde(default)]
    pub completed_at: Option<i64>,
    #[serde(default)]
    pub failed_at: Option<i64>,
    #[serde(default)]
    pub expired_at: Option<i64>,
    #[serde(default)]
    pub cancelling_at: Option<i64>,
    #[serde(default)]
    pub cancelled_at: Option<i64>,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub errors: Vec<LineError>,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

impl BatchRecord {
    /// OpenAI's batch object.
    pub fn to_openai(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": (!self.errors.is_empty()).then(|| serde_json::json!({
                "object": "list",
                "data": self.errors,
            })),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        })
    }
}

/// One finished request of a batch: its input line, and the line it gives the output
/// (answered 2xx) or the error file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub line: u64,
    pub ok: bool,
    pub record: Value,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: {1}")]
    Corrupt(String, serde_json::Error),
    /// An upload past its key's share of the store.
    #[error("{0}")]
    Quota(String),
}

/// What one API key may keep in the store: uploads are refused past it (the batches'
/// output files count, but are always written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub bytes: u64,
    pub files: usize,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            bytes: DEFAULT_QUOTA_BYTES,
            files: MAX_FILES_PER_KEY,
        }
    }
}

/// Bytes of files one API key may keep, by default.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// Files one API key may keep.
pub const MAX_FILES_PER_KEY: usize = 1000;

impl StoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Io(..) => "io",
            StoreError::Corrupt(..) => "corrupt",
            StoreError::Quota(..) => "quota",
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(path.display().to_string(), e)
}

/// An id we made (`file-` or `batch_` and 24 hex digits): anything else from a URL
/// names nothing, and never a path.
pub fn valid_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 24 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A fresh id: `prefix` and 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random generator works");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    /// Held from an upload's quota check to its write, so that two uploads of one key
    /// never both pass on the same room.
    uploads: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Store {
    /// The store in `dir` (created, readable by this user only).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        for sub in ["files", "batches"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            uploads: Default::default(),
        })
    }

    /// Writes `bytes` to `path` whole: a temporary file, synced, renamed over it.
    fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        // The rename itself survives a crash once the directory is synced.
        if let Some(parent) = path.parent()
            && let Ok(d) = std::fs::File::open(parent)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(path.display().to_string(), e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(path)(e)),
        }
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(id)
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.json"))
    }

    /// Keeps an uploaded (or produced) file: its content first, then its record, so a
    /// record never names content that is not there.
    pub fn put_file(
        &self,
        filename: &str,
        purpose: &str,
        content: &[u8],
        now: i64,
        owner: &str,
    ) -> Result<FileMeta, StoreError> {
        let meta = FileMeta {
            id: new_id("file-"),
            owner: owner.to_string(),
            bytes: content.len() as u64,
            created_at: now,
            filename: filename.to_string(),
            purpose: purpose.to_string(),
        };
        Self::write_whole(&self.file_path(&meta.id), content)?;
        let json = serde_json::to_vec(&meta).expect("a file record serializes");
        Self::write_whole(&self.meta_path(&meta.id), &json)?;
        Ok(meta)
    }

    /// An upload: kept as [`Store::put_file`] does if its owner's files, with it, stay
    /// within `quota`.
    pub fn put_upload(
        &self,
        filename: &str,
        purpose: &str,
        content: &[u8],
        now: i64,
        owner: &str,
        quota: Quota,
    ) -> Result<FileMeta, StoreError> {
        let _one_at_a_time = self.uploads.lock().unwrap();
        let (files, bytes) = self
            .files()?
            .iter()
            .filter(|f| f.owner == owner)
            .fold((0usize, 0u64), |(n, b), f| (n + 1, b + f.bytes));
        if files >= quota.files {
            return Err(StoreError::Quota(format!(
                "this API key keeps {files} files, the most it may: delete some first"
            )));
        }
        if bytes + content.len() as u64 > quota.bytes {
            return Err(StoreError::Quota(format!(
                "this API key keeps {bytes} bytes of files; with these {} it would pass its quota of {}: delete some first",
                content.len(),
                quota.bytes
            )));
        }
        self.put_file(filename, purpose, content, now, owner)
    }

    pub fn file(&self, id: &str) -> Result<Option<FileMeta>, StoreError> {
        if !valid_id(id, "file-") {
            return Ok(None);
        }
        Self::read_json(&self.meta_path(id))
    }

    pub fn content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if self.file(id)?.is_none() {
            return Ok(None);
        }
        let path = self.file_path(id);
        std::fs::read(&path).map(Some).map_err(io(&path))
    }

    /// Deletes a file: its record first (then nothing names the content), then the
    /// content. Whether there was one.
    pub fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        if self.file(id)?.is_none() {
            return Ok(false);
        }
        let meta = self.meta_path(id);
        std::fs::remove_file(&meta).map_err(io(&meta))?;
        let content = self.file_path(id);
        match std::fs::remove_file(&content) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&content)(e)),
            _ => {}
        }
        Ok(true)
    }

    /// Every file, newest first.
    pub fn files(&self) -> Result<Vec<FileMeta>, StoreError> {
        let mut out: Vec<FileMeta> = self.records("files", "file-")?;
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(out)
    }

    fn records<T: serde::de::DeserializeOwned>(
        &self,
        sub: &str,
        prefix: &str,
    ) -> Result<Vec<T>, StoreError> {
        let dir = self.dir.join(sub);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = entry.map_err(io(&dir))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(id) = name.strip_suffix(".json")
                && valid_id(id, prefix)
                && let Some(record) = Self::read_json(&path)?
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn batch_path(&self, id: &str) -> PathBuf {
        self.dir.join("batches").join(format!("{id}.json"))
    }

    fn done_path(&self, id: &str) -> PathBuf {
        self.dir.join("batches").join(format!("{id}.done"))
    }

    pub fn put_batch(&self, b: &BatchRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(b).expect("a batch record serializes");
        Self::write_whole(&self.batch_path(&b.id), &json)
    }

    /// Every batch, newest first.
    pub fn batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out: Vec<BatchRecord> = self.records("batches", "batch_")?;
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(out)
    }

    /// Records a finished request: appended and synced before it counts, so that after
    /// a restart it is not sent again.
    pub fn append_done(&self, batch: &str, done: &Done) -> Result<(), StoreError> {
        let path = self.done_path(batch);
        let mut line = serde_json::to_vec(done).expect("a finished request serializes");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        f.write_all(&line).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))
    }

    /// A batch's finished requests, by input line. A last line cut short by a crash is
    /// not one (its request had not counted yet) and is cut off the file, so that the
    /// next append starts a line of its own.
    pub fn done(&self, batch: &str) -> Result<Vec<Done>, StoreError> {
        let path = self.done_path(batch);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut out = Vec::new();
        let mut good = 0;
        for line in bytes.split_inclusive(|b| *b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            match serde_json::from_slice::<Done>(line) {
                Ok(d) => out.push(d),
                Err(e) => return Err(StoreError::Corrupt(path.display().to_string(), e)),
            }
            good += line.len();
        }
        if good < bytes.len() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            f.set_len(good as u64).map_err(io(&path))?;
            f.sync_data().map_err(io(&path))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, created_at: i64) -> BatchRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "endpoint": "/v1/chat/completions", "input_file_id": "file-x",
            "completion_window": "24h", "status": "in_progress", "created_at": created_at,
            "expires_at": created_at + 86_400,
        }))
        .unwrap()
    }

    #[test]
    fn files_and_batches_survive_a_reopen_and_ids_never_name_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let f = store
            .put_file("in.jsonl", "batch", b"{}\n", 7, "k1")
            .unwrap();
        assert!(valid_id(&f.id, "file-"), "{}", f.id);
        let b1 = record(&new_id("batch_"), 1);
        let b2 = record(&new_id("batch_"), 2);
        store.put_batch(&b1).unwrap();
        store.put_batch(&b2).unwrap();

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.file(&f.id).unwrap(), Some(f.clone()));
        assert_eq!(store.content(&f.id).unwrap().as_deref(), Some(&b"{}\n"[..]));
        assert_eq!(store.files().unwrap(), std::slice::from_ref(&f));
        // Newest first.
        assert_eq!(store.batches().unwrap(), [b2, b1]);
        for bad in [
            "../keys.json",
            "file-",
            "file-zz",
            "batch_0",
            "file-0000000000000000000000000",
        ] {
            assert_eq!(store.file(bad).unwrap(), None, "{bad}");
            assert!(!store.delete_file(bad).unwrap(), "{bad}");
        }
        assert!(store.delete_file(&f.id).unwrap());
        assert_eq!(store.file(&f.id).unwrap(), None);
        assert_eq!(store.content(&f.id).unwrap(), None);
        assert!(!store.delete_file(&f.id).unwrap());
    }

    #[test]
    fn a_finished_request_cut_short_by_a_crash_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = new_id("batch_");
        let done = |line| Done {
            line,
            ok: true,
            record: serde_json::json!({"custom_id": format!("c{line}")}),
        };
        store.append_done(&id, &done(0)).unwrap();
        store.append_done(&id, &done(3)).unwrap();
        // A crash in the middle of the next append.
        let path = dir.path().join("batches").join(format!("{id}.done"));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"line": 5, "ok": tr"#).unwrap();
        drop(f);
        let lines: Vec<u64> = store.done(&id).unwrap().iter().map(|d| d.line).collect();
        assert_eq!(lines, [0, 3]);
        // The torn line is gone, so the next one starts a line of its own.
        store.append_done(&id, &done(5)).unwrap();
        let lines: Vec<u64> = store.done(&id).unwrap().iter().map(|d| d.line).collect();
        assert_eq!(lines, [0, 3, 5]);
        assert_eq!(store.done(&new_id("batch_")).unwrap(), []);
    }
}
