//! The hub's cache layout (`HF_HOME/hub`), which vLLM, SGLang and `huggingface_hub` read:
//! `models--org--name/blobs/<etag>` holds each file's content once, `snapshots/<commit>/`
//! links each name to its blob, `refs/<revision>` names the commit. A download in
//! progress is `blobs/<etag>.incomplete`, as the hub's tools leave it, and resumes from
//! there. `.greenthread-used` is touched on every use: the order eviction goes by.

use std::{
    io::Read,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{HubFile, Ready, WeightsError, io};

/// A repository id, checked: `org/name` of letters, digits, `.`, `_` and `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    pub id: String,
    dir: String,
}

impl Repo {
    pub fn parse(id: &str) -> Result<Self, WeightsError> {
        let ok_part = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        match id.split_once('/') {
            Some((org, name)) if ok_part(org) && ok_part(name) => Ok(Self {
                id: id.to_string(),
                dir: format!("models--{org}--{name}"),
            }),
            _ => Err(WeightsError::BadRepo(id.to_string())),
        }
    }
}

/// Whether `s` can name a file under a snapshot (no absolute path, no `..`).
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && s.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

const USED: &str = ".greenthread-used";

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// The cache at `root` (the hub's `HF_HOME/hub`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where the hub's tools keep it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub fn default_root() -> PathBuf {
        if let Ok(d) = std::env::var("HF_HUB_CACHE") {
            return d.into();
        }
        if let Ok(d) = std::env::var("HF_HOME") {
            return PathBuf::from(d).join("hub");
        }
        let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
        PathBuf::from(home).join(".cache/huggingface/hub")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn repo_dir(&self, r: &Repo) -> PathBuf {
        self.root.join(&r.dir)
    }

    fn checked<'a>(&self, f: &'a HubFile) -> Result<&'a str, WeightsError> {
        let etag = f.etag();
        if etag.is_empty() || !etag.chars().all(|c| c.is_ascii_hexdigit()) || !safe_name(&f.name) {
            return Err(WeightsError::Corrupt {
                file: f.name.clone(),
                why: "the hub lists it without a checksum or with a name that is no path".into(),
            });
        }
        Ok(etag)
    }

    fn blob(&self, r: &Repo, f: &HubFile) -> Result<PathBuf, WeightsError> {
        Ok(self.repo_dir(r).join("blobs").join(self.checked(f)?))
    }

    /// Where `f` is downloaded to until it is complete.
    pub fn partial(&self, r: &Repo, f: &HubFile) -> PathBuf {
        self.repo_dir(r)
            .join("blobs")
            .join(format!("{}.incomplete", f.etag()))
    }

    /// Whether `f` is complete in the cache. A blob of the wrong size is corrupt: it is
    /// removed (and so fetched again).
    pub fn has(&self, r: &Repo, f: &HubFile) -> Result<bool, WeightsError> {
        let blob = self.blob(r, f)?;
        match std::fs::metadata(&blob) {
            Ok(m) if m.len() == f.size => Ok(true),
            Ok(m) => {
                tracing::warn!(file = %f.name, have = m.len(), want = f.size, "cached file of the wrong size: fetching it again");
                std::fs::remove_file(&blob).map_err(io(&blob))?;
                Ok(false)
            }
            Err(_) => Ok(false),
        }
    }

    /// Bytes a partial download of `f` holds (0: none under way).
    pub fn partial_len(&self, r: &Repo, f: &HubFile) -> u64 {
        std::fs::metadata(self.partial(r, f)).map_or(0, |m| m.len())
    }

    /// Checks a finished download against the hub's size and checksum and makes it the
    /// file's blob; one that does not match is removed (the next try starts over).
    pub fn finish(&self, r: &Repo, f: &HubFile) -> Result<(), WeightsError> {
        let partial = self.partial(r, f);
        let corrupt = |why: String| {
            let _ = std::fs::remove_file(&partial);
            WeightsError::Corrupt {
                file: format!("{}/{}", r.id, f.name),
                why,
            }
        };
        let len = std::fs::metadata(&partial).map_err(io(&partial))?.len();
        if len != f.size {
            return Err(corrupt(format!(
                "{len} bytes arrived, the hub lists {}",
                f.size
            )));
        }
        let got = checksum(&partial, f).map_err(io(&partial))?;
        if got != f.etag() {
            return Err(corrupt(format!(
                "checksum {got}, the hub lists {}",
                f.etag()
            )));
        }
        let blob = self.blob(r, f)?;
        std::fs::rename(&partial, &blob).map_err(io(&blob))
    }

    pub fn snapshot_dir(&self, r: &Repo, commit: &str) -> PathBuf {
        self.repo_dir(r).join("snapshots").join(commit)
    }

    /// Links `snapshots/<commit>/<name>` to its blob, relative as the hub's tools do.
    pub fn link(&self, r: &Repo, commit: &str, f: &HubFile) -> Result<(), WeightsError> {
        let etag = self.checked(f)?;
        let at = self.snapshot_dir(r, commit).join(&f.name);
        if let Some(dir) = at.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let up = "../".repeat(2 + f.name.matches('/').count());
        let target = PathBuf::from(format!("{up}blobs/{etag}"));
        if std::fs::read_link(&at).ok().as_deref() == Some(target.as_path()) {
            return Ok(());
        }
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(&target, &at).map_err(io(&at))
    }

    /// `refs/<revision>` names `commit` (a revision that is itself a commit needs none).
    pub fn set_ref(&self, r: &Repo, revision: &str, commit: &str) -> Result<(), WeightsError> {
        if revision == commit || !safe_name(revision) {
            return Ok(());
        }
        let path = self.repo_dir(r).join("refs").join(revision);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        std::fs::write(&path, commit).map_err(io(&path))
    }

    /// Marks the repository used now.
    pub fn touch(&self, r: &Repo) -> Result<(), WeightsError> {
        let path = self.repo_dir(r).join(USED);
        std::fs::write(&path, b"").map_err(io(&path))
    }

    /// `revision` as the cache holds it whole (every link to a blob present), if it does:
    /// what serves when the hub cannot be reached.
    pub fn complete(&self, r: &Repo, revision: &str) -> Result<Option<Ready>, WeightsError> {
        let commit = match std::fs::read_to_string(self.repo_dir(r).join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) if revision.len() == 40 => revision.to_string(),
            Err(_) => return Ok(None),
        };
        let dir = self.snapshot_dir(r, &commit);
        let mut total = 0;
        let mut stack = vec![dir.clone()];
        let mut any = false;
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                return Ok(None);
            };
            for e in entries.flatten() {
                let path = e.path();
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_dir() => stack.push(path),
                    Ok(m) => {
                        total += m.len();
                        any = true;
                    }
                    // A link whose blob is gone.
                    Err(_) => return Ok(None),
                }
            }
        }
        Ok(any.then_some(Ready {
            commit,
            path: dir,
            downloaded: 0,
            total,
        }))
    }

    /// Each repository in the cache: its id (`org/name`), bytes and last use.
    pub fn repos(&self) -> Result<Vec<(String, u64, SystemTime)>, WeightsError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&self.root)(e)),
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("models--") else {
                continue;
            };
            let Some((org, repo)) = rest.split_once("--") else {
                continue;
            };
            let blobs = e.path().join("blobs");
            let bytes: u64 = std::fs::read_dir(&blobs)
                .map(|d| {
                    d.flatten()
                        .filter_map(|b| b.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            let used = std::fs::metadata(e.path().join(USED))
                .and_then(|m| m.modified())
                .or_else(|_| e.metadata().and_then(|m| m.modified()))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((format!("{org}/{repo}"), bytes, used));
        }
        Ok(out)
    }

    /// Removes the least recently used repositories, except `keep` (those in use),
    /// until the cache holds at most `budget` bytes; the ids removed.
    pub fn evict(&self, budget: u64, keep: &[&str]) -> Result<Vec<String>, WeightsError> {
        let mut repos = self.repos()?;
        let mut total: u64 = repos.iter().map(|r| r.1).sum();
        repos.sort_by_key(|r| r.2);
        let mut removed = Vec::new();
        for (id, bytes, _) in repos {
            if total <= budget {
                break;
            }
            if keep.contains(&id.as_str()) {
                continue;
            }
            let r = Repo::parse(&id)?;
            let dir = self.repo_dir(&r);
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            tracing::info!(repo = %id, bytes, "evicted from the weights cache");
            total -= bytes;
            removed.push(id);
        }
        Ok(removed)
    }
}

/// The hub's checksum of a file's content: SHA-256 for an LFS file, else the git blob id.
fn checksum(path: &Path, f: &HubFile) -> std::io::Result<String> {
    let mut ctx = if f.sha256.is_some() {
        ring::digest::Context::new(&ring::digest::SHA256)
    } else {
        let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        c.update(format!("blob {}\0", f.size).as_bytes());
        c
    };
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The hub's checksum of `content`, for tests and fake hubs: SHA-256, or the git blob id.
pub fn content_checksum(content: &[u8], lfs: bool) -> String {
    let digest = if lfs {
        ring::digest::digest(&ring::digest::SHA256, content)
    } else {
        let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        c.update(format!("blob {}\0", content.len()).as_bytes());
        c.update(content);
        c.finish()
    };
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
