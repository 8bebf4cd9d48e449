//! The GPU ledger on Kubernetes: one `GPU` object per GPU, its `status` subresource the
//! record. Compare-and-swap is a status replace carrying `metadata.resourceVersion`; the
//! API server answers 409 to a stale one. Reads come from a watch, not from polling.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use greenthread_api::{Gpu, GpuResource, GpuStatus};
use kube::{
    Api, Client,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};

use crate::{Ledger, LedgerError};

pub struct KubeLedger {
    api: Api<GpuResource>,
    namespace: String,
    cache: Arc<Mutex<BTreeMap<String, crate::Feed<Gpu>>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for KubeLedger {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn to_gpu(r: &GpuResource) -> Gpu {
    Gpu {
        name: r.metadata.name.clone().unwrap_or_default(),
        spec: r.spec.clone(),
        status: r.status.clone().unwrap_or_default(),
        resource_version: r.metadata.resource_version.clone().unwrap_or_default(),
    }
}

fn api_error(e: kube::Error, gpu: &str, version: &str) -> LedgerError {
    match e {
        kube::Error::Api(s) if s.code == 409 => LedgerError::Conflict {
            gpu: gpu.to_string(),
            version: version.to_string(),
        },
        kube::Error::Api(s) if s.code == 404 => LedgerError::NotFound(gpu.to_string()),
        other => LedgerError::Backend(other.to_string()),
    }
}

/// Resource versions are opaque strings in general, but this comparison only needs to
/// know whether an update is newer than what the cache holds.
fn newer(candidate: &str, held: &str) -> bool {
    match (candidate.parse::<u64>(), held.parse::<u64>()) {
        (Ok(c), Ok(h)) => c > h,
        _ => candidate != held,
    }
}

fn store(cache: &Mutex<BTreeMap<String, crate::Feed<Gpu>>>, gpu: Gpu) {
    let mut cache = cache.lock().unwrap();
    match cache.get(&gpu.name) {
        Some(tx) => {
            tx.send_if_modified(|held| {
                if newer(&gpu.resource_version, &held.resource_version) {
                    *held = gpu;
                    true
                } else {
                    false
                }
            });
        }
        None => {
            cache.insert(gpu.name.clone(), crate::Feed::new(gpu));
        }
    }
}

impl KubeLedger {
    /// Lists this namespace's GPU objects, then keeps them current through a watch.
    pub async fn new(client: Client, namespace: &str) -> Result<Self, LedgerError> {
        let api: Api<GpuResource> = Api::namespaced(client, namespace);
        let cache = Arc::new(Mutex::new(BTreeMap::new()));
        let version = Self::relist(&api, &cache).await?;
        let watcher = tokio::spawn(Self::watch_loop(api.clone(), cache.clone(), version));
        Ok(Self {
            api,
            namespace: namespace.to_string(),
            cache,
            watcher,
        })
    }

    async fn relist(
        api: &Api<GpuResource>,
        cache: &Mutex<BTreeMap<String, crate::Feed<Gpu>>>,
    ) -> Result<String, LedgerError> {
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| LedgerError::Backend(format!("listing GPUs: {e}")))?;
        for item in &list.items {
            store(cache, to_gpu(item));
        }
        Ok(list.metadata.resource_version.unwrap_or_default())
    }

    async fn watch_loop(
        api: Api<GpuResource>,
        cache: Arc<Mutex<BTreeMap<String, crate::Feed<Gpu>>>>,
        mut version: String,
    ) {
        let params = WatchParams {
            bookmarks: true,
            ..WatchParams::default()
        }
        .timeout(290);
        loop {
            let stream = match api.watch(&params, &version).await {
                Ok(s) => s.boxed(),
                Err(e) => {
                    tracing::warn!(error = %e, "GPU watch failed; re-listing");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if let Ok(v) = Self::relist(&api, &cache).await {
                        version = v;
                    }
                    continue;
                }
            };
            let mut stream = stream;
            loop {
                match stream.try_next().await {
                    Ok(Some(WatchEvent::Added(r) | WatchEvent::Modified(r))) => {
                        version = r.metadata.resource_version.clone().unwrap_or(version);
                        store(&cache, to_gpu(&r));
                    }
                    Ok(Some(WatchEvent::Deleted(r))) => {
                        version = r.metadata.resource_version.clone().unwrap_or(version);
                    }
                    Ok(Some(WatchEvent::Bookmark(b))) => version = b.metadata.resource_version,
                    Ok(Some(WatchEvent::Error(e))) => {
                        // 410 Gone: the version is too old; start over from a list.
                        tracing::debug!(code = e.code, "GPU watch ended; re-listing");
                        if let Ok(v) = Self::relist(&api, &cache).await {
                            version = v;
                        }
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "GPU watch broke; re-listing");
                        if let Ok(v) = Self::relist(&api, &cache).await {
                            version = v;
                        }
                        break;
                    }
                }
            }
        }
    }

    fn cached(&self, gpu: &str) -> Option<Gpu> {
        self.cache
            .lock()
            .unwrap()
            .get(gpu)
            .map(|tx| (*tx.borrow()).clone())
    }
}

#[async_trait]
impl Ledger for KubeLedger {
    async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError> {
        if let Some(g) = self.cached(gpu) {
            return Ok(g);
        }
        // Not seen by the watch yet (created a moment ago): read it once.
        let r = self.api.get(gpu).await.map_err(|e| api_error(e, gpu, ""))?;
        let g = to_gpu(&r);
        store(&self.cache, g.clone());
        Ok(g)
    }

    async fn list(&self) -> Result<Vec<Gpu>, LedgerError> {
        Ok(self
            .cache
            .lock()
            .unwrap()
            .values()
            .map(|tx| (*tx.borrow()).clone())
            .collect())
    }

    async fn replace_status(
        &self,
        gpu: &str,
        resource_version: &str,
        status: GpuStatus,
    ) -> Result<Gpu, LedgerError> {
        let current = self.get(gpu).await?;
        let mut object = GpuResource::new(gpu, current.spec);
        object.metadata.namespace = Some(self.namespace.clone());
        object.metadata.resource_version = Some(resource_version.to_string());
        object.status = Some(status);
        match self
            .api
            .replace_status(gpu, &PostParams::default(), &object)
            .await
        {
            Ok(written) => {
                let g = to_gpu(&written);
                // Our own write is visible to our next read without waiting for the watch.
                store(&self.cache, g.clone());
                Ok(g)
            }
            Err(e) => {
                let err = api_error(e, gpu, resource_version);
                if matches!(err, LedgerError::Conflict { .. }) {
                    // Someone else wrote first; read the winner so the retry decides on it.
                    if let Ok(fresh) = self.api.get(gpu).await {
                        store(&self.cache, to_gpu(&fresh));
                    }
                }
                Err(err)
            }
        }
    }

    fn watch(&self, gpu: &str) -> Result<crate::Subscriber<Gpu>, LedgerError> {
        self.cache
            .lock()
            .unwrap()
            .get(gpu)
            .map(|tx| tx.subscribe())
            .ok_or_else(|| LedgerError::NotFound(gpu.to_string()))
    }
}
