//! The hub's HTTP API, as `huggingface_hub` speaks it: a revision's file list with sizes
//! and checksums (`/api/models/{repo}/revision/{rev}?blobs=true`), and each file
//! (`/{repo}/resolve/{commit}/{file}`), resumed with a `Range` from where a partial file
//! stopped. `HF_ENDPOINT` (a mirror) and `HF_TOKEN` (gated models) as the hub's tools
//! read them.

use std::{path::Path, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::{WeightsError, io};

/// One file of a revision, as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub name: String,
    pub size: u64,
    /// The SHA-256 of an LFS file's content (the weights); `None` for a plain git file.
    pub sha256: Option<String>,
    /// The git blob id (SHA-1 of `blob <size>\0` and the content).
    pub blob_id: String,
}

impl HubFile {
    /// The name its content has in the cache (`blobs/<etag>`), as the hub's ETag: the
    /// SHA-256 for LFS files, the blob id for the others.
    pub fn etag(&self) -> &str {
        self.sha256.as_deref().unwrap_or(&self.blob_id)
    }
}

/// A revision's commit and files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub commit: String,
    pub files: Vec<HubFile>,
}

#[derive(Deserialize)]
struct Info {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// An HTTP(S) client with the system's roots (ring, as kube's), plain HTTP allowed for
/// mirrors inside a cluster or on loopback.
pub fn https_client() -> Client<HttpsConnector<HttpConnector>, Empty<Bytes>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let https = match hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider.clone())
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no system CA certificates: downloads over HTTPS will fail");
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        }
    }
    .https_or_http()
    .enable_http1()
    .build();
    Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// A hub: where, and with which token.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// A file's bytes must keep coming: a transfer silent this long is cut (and resumed
    /// on the next try).
    stall: Duration,
}

/// Redirects followed at most (the hub sends LFS files to its CDN).
const REDIRECTS: u32 = 5;

impl Hub {
    /// `endpoint` (no trailing `/`), and a token sent as `Authorization: Bearer` to it
    /// alone (never to a host it redirects to).
    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            client: https_client(),
            stall: Duration::from_secs(60),
        }
    }

    /// The hub as the hub's own tools find it: `HF_ENDPOINT` (default
    /// `https://huggingface.co`) and `HF_TOKEN`.
    pub fn from_env() -> Self {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        Self::new(&endpoint, std::env::var("HF_TOKEN").ok())
    }

    async fn get(
        &self,
        url: &str,
        range_from: u64,
        what: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, WeightsError> {
        let unreachable = |why: String| WeightsError::Unreachable {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            why,
        };
        let mut url = url.to_string();
        for _ in 0..=REDIRECTS {
            let mut req = http::Request::get(&url);
            if let Some(t) = &self.token
                && url.starts_with(&self.endpoint)
            {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            if range_from > 0 {
                req = req.header(http::header::RANGE, format!("bytes={range_from}-"));
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| unreachable(e.to_string()))?;
            let resp = tokio::time::timeout(self.stall, self.client.request(req))
                .await
                .map_err(|_| unreachable(format!("no answer within {:?}", self.stall)))?
                .map_err(|e| unreachable(e.to_string()))?;
            if resp.status().is_redirection() {
                let Some(to) = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                else {
                    return Err(unreachable("a redirect without a location".into()));
                };
                url = if to.starts_with('/') {
                    format!("{}{to}", self.endpoint)
                } else {
                    to.to_string()
                };
                continue;
            }
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| {
                        String::from_utf8_lossy(&b.to_bytes())
                            .chars()
                            .take(300)
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(WeightsError::Refused {
                    endpoint: self.endpoint.clone(),
                    what: what.to_string(),
                    status,
                    body,
                });
            }
            return Ok(resp);
        }
        Err(unreachable(format!("more than {REDIRECTS} redirects")))
    }

    /// The commit `revision` names and its files, with sizes and checksums.
    pub async fn snapshot(&self, repo: &str, revision: &str) -> Result<Snapshot, WeightsError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{revision}?blobs=true",
            self.endpoint
        );
        let what = format!("{repo}@{revision}");
        let resp = self.get(&url, 0, &what).await?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| WeightsError::Unreachable {
                endpoint: self.endpoint.clone(),
                what: what.clone(),
                why: e.to_string(),
            })?;
        let info: Info =
            serde_json::from_slice(&body.to_bytes()).map_err(|e| WeightsError::Corrupt {
                file: format!("{what} (the hub's file list)"),
                why: e.to_string(),
            })?;
        let files = info
            .siblings
            .into_iter()
            .map(|s| HubFile {
                size: s.lfs.as_ref().map(|l| l.size).or(s.size).unwrap_or(0),
                sha256: s.lfs.map(|l| l.sha256),
                blob_id: s.blob_id.unwrap_or_default(),
                name: s.rfilename,
            })
            .collect();
        Ok(Snapshot {
            commit: info.sha,
            files,
        })
    }

    /// Appends `file` to `partial` from where it stops (a `Range` request), reporting the
    /// bytes it holds as they arrive; the bytes it holds at the end.
    pub async fn fetch(
        &self,
        repo: &str,
        commit: &str,
        file: &HubFile,
        partial: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, WeightsError> {
        if let Some(dir) = partial.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        }
        let mut have = match tokio::fs::metadata(partial).await {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        if have >= file.size && file.size > 0 {
            return Ok(have);
        }
        let url = format!("{}/{repo}/resolve/{commit}/{}", self.endpoint, file.name);
        let what = format!("{repo}/{}", file.name);
        let resp = self.get(&url, have, &what).await?;
        // A server that ignores the range sends it all again: start over.
        let resumed = resp.status() == http::StatusCode::PARTIAL_CONTENT;
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(partial)
            .await
            .map_err(io(partial))?;
        if !resumed {
            have = 0;
        }
        let mut body = resp.into_body();
        loop {
            let frame = tokio::time::timeout(self.stall, body.frame())
                .await
                .map_err(|_| WeightsError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    what: what.clone(),
                    why: format!("no data for {:?}", self.stall),
                })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| WeightsError::Unreachable {
                endpoint: self.endpoint.clone(),
                what: what.clone(),
                why: e.to_string(),
            })?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await.map_err(io(partial))?;
                have += data.len() as u64;
                progress(have);
            }
        }
        out.flush().await.map_err(io(partial))?;
        out.sync_data().await.map_err(io(partial))?;
        Ok(have)
    }
}
