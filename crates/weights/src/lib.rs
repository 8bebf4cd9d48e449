//! Model weights from a Hugging Face hub (`HF_ENDPOINT`, huggingface.co by default) into a
//! node's cache, in the hub's own cache layout so that vLLM and SGLang find them there:
//! downloaded once per node whatever the number of Models using them, resumed where an
//! interrupted download stopped, each file checked against the hub's checksum (SHA-256
//! for LFS files, the git blob id for the others) and fetched again when it does not
//! match, and the least recently used repositories evicted past a size budget.

mod cache;
mod hub;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub use cache::{Cache, Repo, content_checksum};
pub use hub::{Hub, HubFile, Snapshot, https_client};

/// Why weights could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{0:?} is not a hub repository id (org/name)")]
    BadRepo(String),
    #[error("the hub at {endpoint} refused {what}: {status} {body}")]
    Refused {
        endpoint: String,
        what: String,
        status: u16,
        body: String,
    },
    #[error("the hub at {endpoint} could not be reached for {what}: {why}")]
    Unreachable {
        endpoint: String,
        what: String,
        why: String,
    },
    #[error("{file}: {why}")]
    Corrupt { file: String, why: String },
    #[error("{path}: {why}")]
    Io { path: String, why: std::io::Error },
}

impl WeightsError {
    /// The `result` label of the download metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            WeightsError::BadRepo(_) => "bad_repo",
            WeightsError::Refused {
                status: 401 | 403, ..
            } => "unauthorized",
            WeightsError::Refused { .. } => "refused",
            WeightsError::Unreachable { .. } => "unreachable",
            WeightsError::Corrupt { .. } => "corrupt",
            WeightsError::Io { .. } => "io",
        }
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |why| WeightsError::Io {
        path: path.display().to_string(),
        why,
    }
}

/// Bytes of a repository's files: downloaded so far of all there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What [`Weights::ensure`] made ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The commit the revision resolved to.
    pub commit: String,
    /// The snapshot directory (what an engine loads).
    pub path: PathBuf,
    /// Bytes downloaded this time (0: all were in the cache).
    pub downloaded: u64,
    /// Bytes of the files kept.
    pub total: u64,
}

/// Times a file is fetched again after its checksum did not match.
const ATTEMPTS: u32 = 3;

/// Where weights come from and go.
pub struct Weights {
    hub: Hub,
    cache: Cache,
}

/// Files an engine loads: every file, except other weight formats when the repository
/// has safetensors (vLLM and SGLang load those; `.bin`, `.pt`, `.gguf`... would only
/// take space and time).
pub fn wanted(files: &[HubFile]) -> Vec<&HubFile> {
    let has_safetensors = files.iter().any(|f| f.name.ends_with(".safetensors"));
    const OTHER_FORMATS: [&str; 8] = [
        ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".gguf",
    ];
    files
        .iter()
        .filter(|f| !(has_safetensors && OTHER_FORMATS.iter().any(|x| f.name.ends_with(x))))
        .collect()
}

impl Weights {
    pub fn new(hub: Hub, cache: Cache) -> Self {
        Self { hub, cache }
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// `repo` at `revision` complete in the cache: the files already there are kept
    /// (none is downloaded twice), a partial one resumes, the others are downloaded;
    /// each is checked and fetched again when it does not match. When the hub cannot be
    /// reached, a revision the cache already holds whole is used as it is.
    pub async fn ensure(
        &self,
        repo: &str,
        revision: &str,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Ready, WeightsError> {
        let r = Repo::parse(repo)?;
        let snapshot = match self.hub.snapshot(repo, revision).await {
            Ok(s) => s,
            Err(e @ (WeightsError::Unreachable { .. } | WeightsError::Refused { .. })) => {
                // Offline, or the hub down: what the cache has whole serves.
                if let Some(ready) = self.cache.complete(&r, revision)? {
                    tracing::warn!(repo, error = %e, "hub unreachable: using the cached revision");
                    return Ok(ready);
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let files = wanted(&snapshot.files);
        let total: u64 = files.iter().map(|f| f.size).sum();
        // Which files the cache has whole (looked at once: a corrupt one is removed
        // then); bytes of those, and of the partial downloads of the others.
        let present = files
            .iter()
            .map(|f| self.cache.has(&r, f))
            .collect::<Result<Vec<bool>, _>>()?;
        let mut complete: u64 = 0;
        let mut partial: u64 = 0;
        for (f, &has) in files.iter().zip(&present) {
            if has {
                complete += f.size;
            } else {
                partial += self.cache.partial_len(&r, f);
            }
        }
        progress(Progress {
            done: complete + partial,
            total,
        });
        let mut downloaded: u64 = 0;
        for (f, &has) in files.iter().zip(&present) {
            if !has {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let before = self.cache.partial_len(&r, f);
                    let at = complete;
                    let fetched = self
                        .hub
                        .fetch(
                            repo,
                            &snapshot.commit,
                            f,
                            &self.cache.partial(&r, f),
                            &|d| {
                                progress(Progress {
                                    done: at + d,
                                    total,
                                })
                            },
                        )
                        .await?;
                    downloaded += fetched.saturating_sub(before);
                    // Hashing gigabytes: off the async threads.
                    let (cache, rr, ff) = (self.cache.clone(), r.clone(), (*f).clone());
                    let finished = tokio::task::spawn_blocking(move || cache.finish(&rr, &ff))
                        .await
                        .map_err(|e| WeightsError::Io {
                            path: f.name.clone(),
                            why: std::io::Error::other(e),
                        })?;
                    match finished {
                        Ok(()) => break,
                        Err(e @ WeightsError::Corrupt { .. }) if attempt < ATTEMPTS => {
                            tracing::warn!(repo, file = %f.name, error = %e, attempt, "checksum mismatch: fetching the file again");
                        }
                        Err(e) => return Err(e),
                    }
                }
                complete += f.size;
                progress(Progress {
                    done: complete,
                    total,
                });
            }
            self.cache.link(&r, &snapshot.commit, f)?;
        }
        self.cache.set_ref(&r, revision, &snapshot.commit)?;
        self.cache.touch(&r)?;
        Ok(Ready {
            path: self.cache.snapshot_dir(&r, &snapshot.commit),
            commit: snapshot.commit,
            downloaded,
            total,
        })
    }
}

/// A progress line every `every` (and at the end), for a terminal or a log.
pub fn progress_line(repo: &str, p: Progress) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let pct = if p.total == 0 {
        100.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    };
    // The exact bytes close the line: the controller reads them back from the log of
    // a pod's download container into the Model's status.
    format!(
        "downloading {repo}: {:.2} GiB of {:.2} GiB ({pct:.0} %), {}/{} bytes",
        gib(p.done),
        gib(p.total),
        p.done,
        p.total
    )
}

/// The progress of the last [`progress_line`] in `log` (a download's output), if any.
pub fn last_progress(log: &str) -> Option<Progress> {
    log.lines().rev().find_map(|l| {
        let (done, total) = l
            .strip_prefix("downloading ")?
            .rsplit_once(", ")?
            .1
            .strip_suffix(" bytes")?
            .split_once('/')?;
        Some(Progress {
            done: done.parse().ok()?,
            total: total.parse().ok()?,
        })
    })
}

/// Calls `print` with progress at most once per `every`, and always at the end.
pub fn throttled(
    every: Duration,
    print: impl Fn(Progress) + Send + Sync,
) -> impl Fn(Progress) + Send + Sync {
    let last = std::sync::Mutex::new(None::<std::time::Instant>);
    move |p: Progress| {
        let mut last = last.lock().unwrap();
        let due = last.is_none_or(|t| t.elapsed() >= every);
        if due || p.done >= p.total {
            *last = Some(std::time::Instant::now());
            print(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> HubFile {
        HubFile {
            name: name.into(),
            size: 1,
            sha256: None,
            blob_id: "00".into(),
        }
    }

    #[test]
    fn an_engine_gets_safetensors_and_not_the_other_formats_beside_them() {
        let names = |files: &[HubFile]| -> Vec<String> {
            wanted(files).iter().map(|f| f.name.clone()).collect()
        };
        let with = [
            "config.json",
            "model-00001-of-00002.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "model.onnx",
            "tokenizer.model",
            "original/consolidated.pth",
        ]
        .map(file);
        assert_eq!(
            names(&with),
            [
                "config.json",
                "model-00001-of-00002.safetensors",
                "tokenizer.model"
            ]
        );
        // Without safetensors, the weights are whatever there is.
        let without = ["config.json", "pytorch_model.bin"].map(file);
        assert_eq!(names(&without), ["config.json", "pytorch_model.bin"]);
    }

    #[test]
    fn repository_ids_are_org_slash_name_and_nothing_else() {
        for ok in ["Qwen/Qwen2.5-7B-Instruct", "org/tiny", "a.b/c_d-e.f"] {
            assert!(Repo::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tiny",
            "a/b/c",
            "../etc",
            "org/..",
            "org/.hidden",
            "/abs",
            "org/",
            "org/na me",
        ] {
            assert!(Repo::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn progress_reads_in_gib_and_percent() {
        let p = Progress {
            done: 3 << 29,
            total: 3 << 30,
        };
        assert_eq!(
            progress_line("org/m", p),
            "downloading org/m: 1.50 GiB of 3.00 GiB (50 %), 1610612736/3221225472 bytes"
        );
        let empty = Progress { done: 0, total: 0 };
        assert!(progress_line("org/m", empty).contains("(100 %)"));
        // Read back from a log: the last progress line wins; other lines do not count.
        let log = format!(
            "{}\nsome warning, 1/2 bytes\n{}\nready org/m@abc: /cache (3 bytes downloaded of 3)\n",
            progress_line("org/m", Progress { done: 1, total: 9 }),
            progress_line("org/m", p)
        );
        assert_eq!(last_progress(&log), Some(p));
        assert_eq!(last_progress("nothing yet\n"), None);
    }
}
