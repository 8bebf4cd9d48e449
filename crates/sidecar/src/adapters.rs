//! LoRA adapters: the ones the Model asks for (`--adapter` flags, or a file read again
//! whenever it changes) and the ones the engine holds. Adapters are loaded into the
//! engine once it serves and again after every wake — vLLM is known to lose them, or
//! silently stop applying them, across a sleep (vLLM #53888, #39934) — each load checked
//! with one token through the adapter. An adapter that fails is reported (metrics, log,
//! `/status`) and tried again at the next wake; the base model serves regardless.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex, time::Duration};

use bytes::Bytes;
use greenthread_api::AdapterSpec;
use greenthread_edge::named::named;

use crate::{
    engine::{AdapterCall, EngineAdapter},
    metrics::SidecarMetrics,
};

/// The adapters a sidecar serves.
pub struct Adapters {
    wanted: Mutex<Wanted>,
    /// Each adapter the engine was asked to load since it last came up, and how that went.
    held: Mutex<BTreeMap<String, Held>>,
    /// One round of loads and unloads at a time.
    busy: tokio::sync::Mutex<()>,
    file: Option<PathBuf>,
    /// Woken when the wanted set changes.
    pub changed: tokio::sync::Notify,
    /// Whether the engine names adapters otherwise than by their own names (requests for
    /// them are rewritten); decided once, as every request asks.
    renames: bool,
    /// Adapters that requests name themselves (`--lora-on-demand`).
    on_demand: Option<crate::ondemand::OnDemand>,
}

#[derive(Default)]
struct Wanted {
    list: Vec<AdapterSpec>,
    /// The list the last round of loads worked from (`None`: none since the last sleep).
    applied: Option<Vec<AdapterSpec>>,
    /// The file's content when last read.
    file_bytes: Option<Vec<u8>>,
    /// Why that content was not taken, if it was not.
    file_error: Option<String>,
}

/// An adapter as the engine holds it.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    source: String,
    /// Why its load or its check failed; `None`: loaded and checked.
    error: Option<String>,
}

/// Why an adapters file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AdaptersFileError {
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Invalid(String, String),
}

/// `list` checked as `spec.adapters` is: valid, distinct names and a source each.
pub fn check(list: &[AdapterSpec]) -> Result<(), String> {
    let errors: Vec<String> = greenthread_api::model::adapter_errors(list, None)
        .into_iter()
        .map(|(field, message)| format!("{field}: {message}"))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

impl Adapters {
    /// The adapters `list`, or those of `file`, for an engine that names them by their
    /// own names unless `renames`.
    pub fn new(list: Vec<AdapterSpec>, file: Option<PathBuf>, renames: bool) -> Self {
        Self {
            wanted: Mutex::new(Wanted {
                list,
                ..Wanted::default()
            }),
            held: Mutex::default(),
            busy: tokio::sync::Mutex::new(()),
            file,
            changed: tokio::sync::Notify::new(),
            renames,
            on_demand: None,
        }
    }

    /// Also serves adapters that requests name themselves.
    pub fn with_on_demand(mut self, on_demand: crate::ondemand::OnDemand) -> Self {
        self.on_demand = Some(on_demand);
        self
    }

    pub fn on_demand(&self) -> Option<&crate::ondemand::OnDemand> {
        self.on_demand.as_ref()
    }

    /// The file the wanted set is read from, if any.
    pub fn file(&self) -> Option<&PathBuf> {
        self.file.as_ref()
    }

    pub fn wanted(&self) -> Vec<AdapterSpec> {
        self.wanted.lock().unwrap().list.clone()
    }

    /// Whether `name` is an adapter this sidecar serves.
    pub fn serves(&self, name: &str) -> bool {
        self.wanted
            .lock()
            .unwrap()
            .list
            .iter()
            .any(|a| a.name == name)
    }

    /// Replaces the wanted set; whether it changed.
    pub fn set(&self, list: Vec<AdapterSpec>) -> bool {
        let mut w = self.wanted.lock().unwrap();
        if w.list == list {
            return false;
        }
        w.list = list;
        drop(w);
        self.changed.notify_one();
        true
    }

    /// Reads the adapters file again; whether the wanted set changed. A file that cannot
    /// be read or is not a valid list changes nothing (and is reported once per content).
    pub fn reread(&self) -> Result<bool, AdaptersFileError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let shown = path.display().to_string();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            // Not there (yet): no adapters, as an empty ConfigMap key would say.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AdaptersFileError::Read(shown, e)),
        };
        {
            let mut w = self.wanted.lock().unwrap();
            if w.file_bytes.as_deref() == Some(&bytes) {
                return Ok(false);
            }
            w.file_bytes = Some(bytes.clone());
        }
        let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
            Ok(Vec::new())
        } else {
            serde_json::from_slice::<Vec<AdapterSpec>>(&bytes).map_err(|e| e.to_string())
        }
        .and_then(|list| check(&list).map(|()| list));
        self.wanted.lock().unwrap().file_error = parsed.as_ref().err().cloned();
        let list = parsed.map_err(|e| AdaptersFileError::Invalid(shown, e))?;
        Ok(self.set(list))
    }

    /// Why the adapters file's current content was not taken, if it was not.
    pub fn file_error(&self) -> Option<String> {
        self.wanted.lock().unwrap().file_error.clone()
    }

    /// Whether the wanted set differs from what the last round loaded.
    pub fn dirty(&self) -> bool {
        let w = self.wanted.lock().unwrap();
        w.applied.as_ref() != Some(&w.list)
    }

    /// The engine went to sleep or away: it holds nothing we can count on.
    pub fn forget(&self, metrics: &SidecarMetrics) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for name in held.keys() {
            metrics.set_adapter_loaded(name, false);
        }
        self.wanted.lock().unwrap().applied = None;
        if let Some(od) = &self.on_demand {
            od.forget(metrics);
        }
    }

    /// After a wake (or a start): every wanted adapter loaded afresh — unloaded first, in
    /// case the engine kept a broken copy — and checked.
    pub async fn load_all(&self, engine: &dyn EngineAdapter, base: &str, check: Check<'_>) {
        let _busy = self.busy.lock().await;
        let list = self.wanted();
        self.held.lock().unwrap().clear();
        for a in &list {
            let _ = engine.unload_adapter(&a.name).await;
            self.load(engine, base, a, &check).await;
        }
        self.wanted.lock().unwrap().applied = Some(list);
    }

    /// While the engine serves: unloads what is no longer wanted (or changed source) and
    /// loads what is new. Failed adapters wait for the next wake, and so does every
    /// change for an engine that loads adapters only when it starts (llama.cpp, whose
    /// sleep stops it).
    pub async fn sync(&self, engine: &dyn EngineAdapter, base: &str, check: Check<'_>) {
        let _busy = self.busy.lock().await;
        let list = self.wanted();
        if !engine.loads_at_run_time() {
            self.wanted.lock().unwrap().applied = Some(list);
            return;
        }
        let stale: Vec<String> = {
            let held = self.held.lock().unwrap();
            held.iter()
                .filter(|(name, h)| {
                    !list
                        .iter()
                        .any(|a| &a.name == *name && a.source == h.source)
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in stale {
            match engine.unload_adapter(&name).await {
                Ok(()) => tracing::info!(model = base, adapter = %name, "adapter unloaded"),
                Err(e) => {
                    tracing::warn!(model = base, adapter = %name, error = %e, "adapter unload failed")
                }
            }
            self.held.lock().unwrap().remove(&name);
            check.metrics.set_adapter_loaded(&name, false);
        }
        for a in &list {
            if self.held.lock().unwrap().contains_key(&a.name) {
                continue;
            }
            self.load(engine, base, a, &check).await;
        }
        self.wanted.lock().unwrap().applied = Some(list);
    }

    async fn load(
        &self,
        engine: &dyn EngineAdapter,
        base: &str,
        a: &AdapterSpec,
        check: &Check<'_>,
    ) {
        let loaded = async {
            engine.load_adapter(a).await.map_err(|e| e.to_string())?;
            let call = engine
                .adapter_call(base, &a.name)
                .ok_or("loaded, but the engine does not list it")?;
            match tokio::time::timeout(check.timeout, engine.warm_up_adapter(&call)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("loaded, but its one-token check failed: {e}")),
                Err(_) => Err(format!(
                    "loaded, but its one-token check took over {:?}",
                    check.timeout
                )),
            }
        }
        .await;
        check.metrics.adapter_load(&a.name, loaded.is_ok());
        match &loaded {
            Ok(()) => {
                tracing::info!(model = base, adapter = %a.name, source = %a.source, "adapter loaded")
            }
            Err(e) => {
                tracing::warn!(model = base, adapter = %a.name, source = %a.source, error = %e, "adapter failed to load")
            }
        }
        self.held.lock().unwrap().insert(
            a.name.clone(),
            Held {
                source: a.source.clone(),
                error: loaded.err(),
            },
        );
    }

    /// `/status`'s view: each wanted adapter, whether the engine holds it checked, and
    /// why not when its load failed.
    pub fn status_json(&self) -> serde_json::Value {
        let held = self.held.lock().unwrap();
        let list: Vec<serde_json::Value> = self
            .wanted()
            .iter()
            .map(|a| {
                let h = held.get(&a.name);
                serde_json::json!({
                    "name": a.name,
                    "source": a.source,
                    "loaded": h.is_some_and(|h| h.error.is_none() && h.source == a.source),
                    "error": h.and_then(|h| h.error.clone()),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// The request as the engine must see it when it names an adapter by another name
    /// than the adapter's own (SGLang's `<base>:<adapter>`); `body` unchanged otherwise.
    pub fn engine_request(
        &self,
        engine: &dyn EngineAdapter,
        base: &str,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> Bytes {
        if !self.renames || self.wanted.lock().unwrap().list.is_empty() {
            return body;
        }
        // A body that names no model is the engine's to refuse.
        let Ok(name) = named(headers, &body) else {
            return body;
        };
        if !self.serves(name.model()) {
            return body;
        }
        match engine.adapter_call(base, name.model()) {
            None => body,
            Some(AdapterCall::Model(model)) if model == name.model() => body,
            Some(AdapterCall::Model(model)) => name.rename(&body, &model),
            Some(AdapterCall::Lora { base, id }) => {
                let renamed = name.rename(&body, &base);
                with_lora(&renamed, id).unwrap_or(renamed)
            }
        }
    }
}

/// A JSON object `body` with `"lora": [{"id": id, "scale": 1.0}]` first among its
/// members (llama.cpp applies the listed adapters); `None` when it is not an object.
fn with_lora(body: &Bytes, id: usize) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let member = format!("\"lora\":[{{\"id\":{id},\"scale\":1.0}}]");
    let rest = &body[open + 1..];
    let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
    let sep = if empty { "" } else { "," };
    Some(greenthread_edge::named::splice(
        body,
        open + 1..open + 1,
        format!("{member}{sep}").as_bytes(),
    ))
}

/// How an adapter load is checked: the one-token deadline, and where it is counted.
pub struct Check<'a> {
    pub timeout: Duration,
    pub metrics: &'a SidecarMetrics,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, source: &str) -> AdapterSpec {
        AdapterSpec {
            name: name.into(),
            source: source.into(),
        }
    }

    #[test]
    fn the_file_is_taken_when_valid_and_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapters.json");
        let adapters = Adapters::new(vec![], Some(path.clone()), false);
        // Missing: none wanted, nothing changed.
        assert!(!adapters.reread().unwrap());
        std::fs::write(&path, r#"[{"name": "sql", "source": "/a/sql"}]"#).unwrap();
        assert!(adapters.reread().unwrap());
        assert_eq!(adapters.wanted(), vec![a("sql", "/a/sql")]);
        assert!(!adapters.reread().unwrap(), "same content, no change");
        // A broken file changes nothing and names itself.
        std::fs::write(&path, r#"[{"name": "a/b", "source": "x"}]"#).unwrap();
        let e = adapters.reread().unwrap_err().to_string();
        assert!(
            e.contains("adapters.json") && e.contains("adapters[0].name"),
            "{e}"
        );
        assert_eq!(adapters.wanted(), vec![a("sql", "/a/sql")]);
        std::fs::write(&path, "[{\"name\": \"sql\"}]").unwrap();
        let e = adapters.reread().unwrap_err().to_string();
        assert!(e.contains("source"), "{e}");
        std::fs::write(&path, "").unwrap();
        assert!(adapters.reread().unwrap());
        assert!(adapters.wanted().is_empty());
    }

    #[test]
    fn a_lora_list_goes_first_in_the_body() {
        let body = Bytes::from_static(br#" {"model": "base", "prompt": "x"}"#);
        let out = with_lora(&body, 2).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["lora"], serde_json::json!([{"id": 2, "scale": 1.0}]));
        assert_eq!(
            (v["model"].as_str(), v["prompt"].as_str()),
            (Some("base"), Some("x"))
        );
        let v: serde_json::Value =
            serde_json::from_slice(&with_lora(&Bytes::from_static(b"{}"), 0).unwrap()).unwrap();
        assert_eq!(v["lora"][0]["id"], 0);
        assert!(with_lora(&Bytes::from_static(b"[1]"), 0).is_none());
    }

    #[test]
    fn dirty_until_a_round_applies_the_wanted_set() {
        let adapters = Adapters::new(vec![a("x", "y")], None, false);
        assert!(adapters.dirty());
        adapters.wanted.lock().unwrap().applied = Some(vec![a("x", "y")]);
        assert!(!adapters.dirty());
        assert!(adapters.set(vec![a("x", "z")]));
        assert!(adapters.dirty());
        assert!(!adapters.set(vec![a("x", "z")]));
    }
}
