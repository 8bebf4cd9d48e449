//! Models added, replaced and removed while `local` runs, through the admin API
//! (`POST /api/v1/models`, `PUT` and `DELETE /api/v1/models/{name}`): checked exactly as
//! the config file's models are, placed beside the running ones as the controller
//! places, started as those of the file are; the others keep serving throughout. What
//! changes is kept in the data directory's `models.json` (the spec of each model added
//! or replaced, `null` for each removed), applied over the config file at the next start.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Weak},
};

use axum::http::StatusCode;
use greenthread_api::{ModelSpec, ValidModel};
use greenthread_apiserver::{ApiServer, Managed, ModelManager};
use greenthread_sidecar::{Sidecar, state::State};
use serde_json::{Value, json};

use super::{
    Starter,
    config::{LocalModel, check_model},
};

/// A model running now.
pub(crate) struct Running {
    pub model: ValidModel,
    /// Each replica's positions in the GPU records.
    pub positions: Vec<Vec<u32>>,
    pub sidecars: Vec<Arc<Sidecar>>,
}

pub(crate) struct Manager {
    starter: Arc<Starter>,
    api: Weak<ApiServer>,
    /// One change at a time.
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    /// `models.json` in the data directory.
    store: PathBuf,
}

/// The changes kept in `store`: a spec per model added or replaced, `None` per removed.
pub(crate) fn load_changes(
    store: &std::path::Path,
) -> anyhow::Result<BTreeMap<String, Option<ModelSpec>>> {
    match std::fs::read(store) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", store.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => anyhow::bail!("{}: {e}", store.display()),
    }
}

/// Why a change was refused: its status and a message naming the field.
type Refused = (StatusCode, String);

fn bad(message: impl Into<String>) -> Refused {
    (StatusCode::BAD_REQUEST, message.into())
}

impl Manager {
    pub(crate) fn new(
        starter: Arc<Starter>,
        api: &Arc<ApiServer>,
        running: BTreeMap<String, Running>,
        store: PathBuf,
    ) -> Self {
        Self {
            starter,
            api: Arc::downgrade(api),
            running: tokio::sync::Mutex::new(running),
            store,
        }
    }

    /// Every sidecar running now (for the shutdown).
    pub(crate) async fn running_sidecars(&self) -> Vec<Arc<Sidecar>> {
        let running = self.running.lock().await;
        running
            .values()
            .flat_map(|r| r.sidecars.iter().cloned())
            .collect()
    }

    fn api(&self) -> Result<Arc<ApiServer>, Refused> {
        self.api
            .upgrade()
            .ok_or((StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()))
    }

    /// `body` checked as a model of the config file named `name` would be, against the
    /// models running now (`but`: one about to be replaced), and placed beside them.
    fn plan(
        &self,
        running: &BTreeMap<String, Running>,
        m: &LocalModel,
        but: Option<&str>,
    ) -> Result<(ValidModel, Vec<Vec<u32>>), Refused> {
        let records = &self.starter.records;
        let products: Vec<&str> = records.iter().map(|g| g.spec.product.as_str()).collect();
        let valid = check_model("", m, &self.starter.backend, &products)
            .map_err(|es| bad(es.join("; ")))?;
        let others: Vec<(&str, &ModelSpec)> = running
            .iter()
            .filter(|(name, _)| Some(name.as_str()) != but)
            .map(|(name, r)| (name.as_str(), &r.model.spec))
            .collect();
        let mut all = others.clone();
        all.push((m.name.as_str(), &m.spec));
        let before = greenthread_api::adapter_clashes(&others).len();
        let clashes = greenthread_api::adapter_clashes(&all);
        if clashes.len() > before {
            let named: Vec<String> = clashes
                .iter()
                .map(|(i, j, c)| format!("models {:?} adapters[{j}]: {c}", all[*i].0))
                .collect();
            return Err(bad(format!(
                "spec.adapters: {}: requests could not tell them apart",
                named.join("; ")
            )));
        }
        let mut placed: BTreeMap<String, u64> = BTreeMap::new();
        for (name, r) in running {
            if Some(name.as_str()) == but {
                continue;
            }
            for p in r.positions.iter().flatten() {
                let g = &records[*p as usize];
                *placed.entry(g.name.clone()).or_default() += r.model.share_of(g.spec.memory_bytes);
            }
        }
        let positions = greenthread_controller::placement::place_models_beside(
            &[(m.name.clone(), valid.clone())],
            records,
            placed,
        )
        .map_err(|(_, e)| (StatusCode::CONFLICT, format!("model {}: {e}", m.name)))?
        .remove(0);
        Ok((valid, positions))
    }

    /// Starts `name` at `positions` and routes to it.
    fn start(
        &self,
        api: &ApiServer,
        running: &mut BTreeMap<String, Running>,
        name: &str,
        model: ValidModel,
        positions: Vec<Vec<u32>>,
    ) -> Result<Value, Refused> {
        let (route, sidecars) = self
            .starter
            .start_model(name, &model, &positions)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        // Boots in the background once its weights are there, as at start.
        self.starter.prefetch.boot(name, &model, sidecars.clone());
        api.add_model(route);
        let gpus: Vec<Vec<&str>> = positions
            .iter()
            .map(|r| {
                r.iter()
                    .map(|p| self.starter.records[*p as usize].name.as_str())
                    .collect()
            })
            .collect();
        let view = json!({"name": name, "spec": model.spec, "replicas": gpus});
        running.insert(
            name.to_string(),
            Running {
                model,
                positions,
                sidecars,
            },
        );
        Ok(view)
    }

    /// Stops routing to `name`, drains and sleeps its serving replicas, stops their
    /// engines and releases their memory.
    async fn stop(&self, api: &ApiServer, running: &mut BTreeMap<String, Running>, name: &str) {
        api.remove_model(&format!("local/{name}"));
        let Some(r) = running.remove(name) else {
            return;
        };
        for sc in &r.sidecars {
            if sc.state() == State::Serving {
                // Requests under way finish (within the model's drain timeout).
                let _ = sc.deactivate("removed").await;
            }
            sc.shutdown().await;
        }
    }

    /// The models as the config file says now (with the data directory's changes over
    /// it): each model that is gone stops, each new one starts, each changed one
    /// restarts; the others serve on. Whether anything changed.
    pub(crate) async fn reload(&self, desired: Vec<(String, ValidModel)>) -> Result<bool, String> {
        let api = self.api().map_err(|(_, e)| e)?;
        let mut running = self.running.lock().await;
        let mut changed = false;
        let gone: Vec<String> = running
            .keys()
            .filter(|n| !desired.iter().any(|(d, _)| d == *n))
            .cloned()
            .collect();
        for name in gone {
            self.stop(&api, &mut running, &name).await;
            self.emit(&api, "model_removed", &name);
            changed = true;
        }
        for (name, valid) in desired {
            let kind = match running.get(&name) {
                Some(r) if r.model.spec == valid.spec => continue,
                Some(_) => "model_replaced",
                None => "model_added",
            };
            let m = LocalModel {
                name: name.clone(),
                spec: valid.spec.clone(),
            };
            let (model, positions) = self
                .plan(&running, &m, Some(&name))
                .map_err(|(_, e)| format!("model {name}: {e}"))?;
            self.stop(&api, &mut running, &name).await;
            self.start(&api, &mut running, &name, model, positions)
                .map_err(|(_, e)| format!("model {name}: {e}"))?;
            self.emit(&api, kind, &name);
            changed = true;
        }
        Ok(changed)
    }

    fn emit(&self, api: &ApiServer, kind: &'static str, name: &str) {
        api.events.emit(kind, json!({"model": name}));
    }

    /// Records `spec` (or `None`: removed) for `name` in the data directory.
    fn keep(&self, name: &str, spec: Option<&ModelSpec>) -> Result<(), Refused> {
        let fail = |e: String| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", self.store.display()),
            )
        };
        let mut changes = load_changes(&self.store).map_err(|e| fail(e.to_string()))?;
        changes.insert(name.to_string(), spec.cloned());
        if let Some(dir) = self.store.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let tmp = self.store.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(&changes).expect("specs serialize");
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &self.store))
            .map_err(|e| fail(e.to_string()))
    }

    fn parse(body: Value) -> Result<LocalModel, Refused> {
        serde_json::from_value(body).map_err(|e| bad(format!("the model is not valid: {e}")))
    }
}

impl ModelManager for Manager {
    fn add(&self, body: Value) -> futures_util::future::BoxFuture<'_, Managed> {
        Box::pin(async move {
            let api = self.api()?;
            let m = Self::parse(body)?;
            let mut running = self.running.lock().await;
            if running.contains_key(&m.name) {
                return Err((
                    StatusCode::CONFLICT,
                    format!(
                        "name: a model named {:?} runs already (PUT /api/v1/models/{} changes it)",
                        m.name, m.name
                    ),
                ));
            }
            let (model, positions) = self.plan(&running, &m, None)?;
            self.keep(&m.name, Some(&m.spec))?;
            let view = self.start(&api, &mut running, &m.name, model, positions)?;
            self.emit(&api, "model_added", &m.name);
            Ok(view)
        })
    }

    fn replace(&self, name: String, body: Value) -> futures_util::future::BoxFuture<'_, Managed> {
        Box::pin(async move {
            let api = self.api()?;
            let mut body = body;
            // The name is the path's; a body may repeat it, never differ.
            match body.get("name").and_then(Value::as_str) {
                Some(n) if n != name => {
                    return Err(bad(format!(
                        "name: {n:?} is not the model {name:?} of the path"
                    )));
                }
                _ => body["name"] = name.clone().into(),
            }
            let m = Self::parse(body)?;
            let mut running = self.running.lock().await;
            if !running.contains_key(&name) {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("no model named {name:?} runs"),
                ));
            }
            // Checked and placed before anything stops: a bad spec changes nothing.
            let (model, positions) = self.plan(&running, &m, Some(&name))?;
            self.keep(&name, Some(&m.spec))?;
            self.stop(&api, &mut running, &name).await;
            let view = self.start(&api, &mut running, &name, model, positions)?;
            self.emit(&api, "model_replaced", &name);
            Ok(view)
        })
    }

    fn patch(&self, name: String, body: Value) -> futures_util::future::BoxFuture<'_, Managed> {
        Box::pin(async move {
            let api = self.api()?;
            // `fairness.popular` is all that changes without a restart; anything else
            // is a PUT.
            let popular = match &body {
                Value::Object(top) if top.len() == 1 => match &top.get("spec") {
                    Some(Value::Object(spec)) if spec.len() == 1 => match spec.get("fairness") {
                        Some(Value::Object(f)) if f.len() == 1 => {
                            f.get("popular").and_then(Value::as_bool)
                        }
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            };
            let Some(popular) = popular else {
                return Err(bad(
                    "spec: a PATCH changes spec.fairness.popular alone ({\"spec\": {\"fairness\": {\"popular\": true}}}); PUT the whole spec to change anything else",
                ));
            };
            let mut running = self.running.lock().await;
            let Some(r) = running.get_mut(&name) else {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("no model named {name:?} runs"),
                ));
            };
            r.model.spec.fairness.popular = popular;
            let spec = r.model.spec.clone();
            for sc in &r.sidecars {
                sc.set_popular(popular).await;
            }
            self.keep(&name, Some(&spec))?;
            self.emit(&api, "model_patched", &name);
            Ok(json!({"name": name, "spec": spec}))
        })
    }

    fn remove(&self, name: String) -> futures_util::future::BoxFuture<'_, Managed> {
        Box::pin(async move {
            let api = self.api()?;
            let mut running = self.running.lock().await;
            if !running.contains_key(&name) {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("no model named {name:?} runs"),
                ));
            }
            self.keep(&name, None)?;
            self.stop(&api, &mut running, &name).await;
            self.emit(&api, "model_removed", &name);
            Ok(json!({"name": name, "removed": true}))
        })
    }
}
