//! Weights before a model's first boot under `local`: a vLLM or SGLang model whose
//! `modelName` is a hub id is downloaded into the Hugging Face cache (where those
//! engines look) before its engine starts, with progress in the terminal and in
//! `/metrics`; the engine then runs offline on what is there. `HF_HUB_OFFLINE=1` skips
//! the step (the engine uses the cache as it is), as it does for the hub's own tools.

use std::{sync::Arc, time::Duration};

use greenthread_api::ValidModel;
use greenthread_sidecar::Sidecar;
use greenthread_weights::{Cache, Hub, Weights, progress_line, throttled};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

pub struct Prefetch {
    weights: Weights,
    offline: bool,
    downloaded: Family<ModelLabel, Gauge>,
    size: Family<ModelLabel, Gauge>,
}

impl Prefetch {
    /// The hub and cache as the hub's tools find them (`HF_ENDPOINT`, `HF_TOKEN`,
    /// `HF_HUB_CACHE` or `HF_HOME`, `HF_HUB_OFFLINE`), its metrics in `registry`.
    pub fn from_env(registry: &mut Registry) -> Self {
        let downloaded = Family::<ModelLabel, Gauge>::default();
        let size = Family::<ModelLabel, Gauge>::default();
        registry.register(
            "gthread_weights_downloaded_bytes",
            "Bytes of a model's weights in the node's cache, as its download goes",
            downloaded.clone(),
        );
        registry.register(
            "gthread_weights_size_bytes",
            "Bytes of a model's weights in all (what its download comes to)",
            size.clone(),
        );
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
        Self {
            weights: Weights::new(Hub::from_env(), Cache::new(Cache::default_root())),
            offline,
            downloaded,
            size,
        }
    }

    /// The hub repository `model` loads, when its weights come from the hub here (a
    /// directory of that name on this machine is loaded as it is).
    fn repo(model: &ValidModel) -> Option<&str> {
        greenthread_controller::render::hub_weights(&model.spec)
            .filter(|name| !std::path::Path::new(name).exists())
    }

    /// What the engine of `model` is started with: the cache the download filled, and
    /// offline (everything it loads is there; it downloads nothing on its own).
    pub fn engine_env(&self, model: &ValidModel) -> Vec<(String, String)> {
        if Self::repo(model).is_none() {
            return Vec::new();
        }
        vec![
            (
                "HF_HUB_CACHE".to_string(),
                self.weights.cache().root().display().to_string(),
            ),
            ("HF_HUB_OFFLINE".to_string(), "1".to_string()),
        ]
    }

    /// Boots `sidecars` (the replicas of `name`) once the weights are in the cache. A
    /// download that fails is reported; the engines start anyway and say for themselves
    /// what they lack.
    pub fn boot(self: &Arc<Self>, name: &str, model: &ValidModel, sidecars: Vec<Arc<Sidecar>>) {
        let repo = if self.offline {
            None
        } else {
            Self::repo(model).map(str::to_string)
        };
        let (me, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            if let Some(repo) = repo {
                me.download(&name, &repo).await;
            }
            for sc in &sidecars {
                // Boots in the background (a failure is logged).
                drop(sc.start());
            }
        });
    }

    async fn download(&self, name: &str, repo: &str) {
        let label = ModelLabel {
            model: name.to_string(),
        };
        let (downloaded, size) = (
            self.downloaded.get_or_create(&label).clone(),
            self.size.get_or_create(&label).clone(),
        );
        let (who, what) = (name.to_string(), repo.to_string());
        let print = throttled(Duration::from_secs(2), move |p| {
            println!("  {who}: {}", progress_line(&what, p));
        });
        let progress = move |p: greenthread_weights::Progress| {
            downloaded.set(p.done as i64);
            size.set(p.total as i64);
            print(p);
        };
        match self.weights.ensure(repo, "main", &progress).await {
            Ok(ready) => {
                tracing::info!(model = name, repo, commit = %ready.commit, downloaded = ready.downloaded, bytes = ready.total, "weights ready");
            }
            Err(e) => {
                tracing::error!(model = name, repo, error = %e, reason = e.metric_label(), "weights could not be downloaded; the engine starts without them");
            }
        }
    }
}
