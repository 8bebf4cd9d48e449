//! Issued API keys on Kubernetes: kept (as hashes) in a Secret of the API server's
//! namespace that every replica watches, so that a key issued or revoked through one
//! replica is known to all of them within seconds. Changes are compare-and-swap on the
//! Secret's resource version, so two replicas never lose each other's change.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
    runtime::watcher,
};

use crate::issued::{IssueError, KeyStore, Record, decode, encode};

/// The Secret's key holding the records.
const KEY: &str = "keys.json";

/// Tries of one change against concurrent writers.
const ATTEMPTS: usize = 16;

pub struct SecretStore {
    api: Api<Secret>,
    name: String,
}

impl SecretStore {
    pub fn new(api: Api<Secret>, name: impl Into<String>) -> Self {
        Self {
            api,
            name: name.into(),
        }
    }

    fn records_of(&self, secret: &Secret) -> Result<Vec<Record>, IssueError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY))
            .map(|b| b.0.clone())
            .unwrap_or_default();
        decode(&bytes, &format!("Secret {}", self.name))
    }

    fn secret(&self, records: &[Record], resource_version: Option<String>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version,
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_string(),
                        "greenthread".to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some([(KEY.to_string(), ByteString(encode(records)))].into()),
            type_: Some("Opaque".into()),
            ..Default::default()
        }
    }

    /// Keeps `issued` in step with the Secret (every replica's changes; `None` once it is
    /// deleted) until dropped.
    pub async fn watch(self: Arc<Self>, issued: impl Fn(Option<Vec<Record>>) + Send + 'static) {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = std::pin::pin!(watcher(self.api.clone(), config));
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    match self.records_of(&s) {
                        Ok(records) => issued(Some(records)),
                        Err(e) => tracing::error!(error = %e, "issued keys not taken"),
                    }
                }
                Ok(watcher::Event::Delete(_)) => issued(None),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "watching the issued keys' Secret");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }
}

fn store_error(e: kube::Error) -> IssueError {
    IssueError::Store(format!("the Kubernetes API: {e}"))
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl KeyStore for SecretStore {
    fn load(
        &self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<Vec<Record>>, IssueError>> + Send + '_>,
    > {
        Box::pin(async move {
            match self.api.get_opt(&self.name).await.map_err(store_error)? {
                Some(s) => self.records_of(&s).map(Some),
                None => Ok(None),
            }
        })
    }

    fn update<'a>(
        &'a self,
        change: &'a (dyn Fn(Vec<Record>) -> Result<Vec<Record>, IssueError> + Send + Sync),
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<Record>, IssueError>> + Send + 'a>,
    > {
        Box::pin(async move {
            for _ in 0..ATTEMPTS {
                let current = self.api.get_opt(&self.name).await.map_err(store_error)?;
                let written = match &current {
                    None => {
                        let records = change(Vec::new())?;
                        self.api
                            .create(&PostParams::default(), &self.secret(&records, None))
                            .await
                            .map(|_| records)
                    }
                    Some(s) => {
                        let records = change(self.records_of(s)?)?;
                        let rv = s.metadata.resource_version.clone();
                        self.api
                            .replace(
                                &self.name,
                                &PostParams::default(),
                                &self.secret(&records, rv),
                            )
                            .await
                            .map(|_| records)
                    }
                };
                match written {
                    Ok(records) => return Ok(records),
                    // Another replica wrote first: read again and apply the change to that.
                    Err(e) if conflict(&e) => continue,
                    Err(e) => return Err(store_error(e)),
                }
            }
            Err(IssueError::Store(format!(
                "Secret {}: still contended after {ATTEMPTS} tries",
                self.name
            )))
        })
    }
}
