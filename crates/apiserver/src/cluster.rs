//! `greenthread apiserver`: the API server of a Kubernetes installation.

use std::{net::SocketAddr, sync::Arc};

use greenthread_ledger::{KubeLedger, Ledger};
use greenthread_sidecar::metrics::SidecarFamilies;
use kube::Client;
use prometheus_client::registry::Registry;

use crate::{ApiServer, Auth, kube_discovery};

#[derive(Debug, Clone, clap::Args)]
pub struct ApiServerConfig {
    /// Address of the OpenAI API, the admin API and `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// Namespace of the GPU objects.
    #[arg(long, env = "POD_NAMESPACE", default_value = "greenthread-system")]
    pub namespace: String,
    /// Only serve Models of this namespace (default: all namespaces).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// A file of API keys for the OpenAI API (one per line or comma-separated); also
    /// `GREENTHREAD_API_KEYS`. Secrets are never flag values (`ps` shows those).
    #[arg(long)]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// A file holding the admin API's token; also `GREENTHREAD_ADMIN_TOKEN`.
    #[arg(long)]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// A file holding a token `/metrics` demands; also `GREENTHREAD_METRICS_TOKEN`.
    /// None: metrics are open (the network policy keeps them in the cluster).
    #[arg(long)]
    pub metrics_token_file: Option<std::path::PathBuf>,
    /// A file holding the token sidecars demand on `/admin/*`; also
    /// `GREENTHREAD_SIDECAR_ADMIN_TOKEN`.
    #[arg(long)]
    pub sidecar_token_file: Option<std::path::PathBuf>,
    /// With API keys and no admin token, serve the admin API to anyone (refused otherwise).
    #[arg(long)]
    pub admin_open: bool,
    /// Serve without API keys on a non-loopback address (refused otherwise).
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// The Secret (in `--namespace`) that keeps API keys issued through the admin API,
    /// as hashes; every replica watches it.
    #[arg(long, default_value = "greenthread-issued-api-keys")]
    pub issued_keys_secret: String,
    /// Where the Batch API keeps its files and batches (a volume: they must survive a
    /// restart); without it the Batch API is off.
    #[arg(long)]
    pub batch_dir: Option<std::path::PathBuf>,
    /// Requests of one batch in flight at once.
    #[arg(long, default_value_t = crate::batch::DEFAULT_CONCURRENCY)]
    pub batch_concurrency: usize,
    /// Bytes of files one API key may keep in the Batch API's store (inputs it uploaded
    /// and its batches' outputs); uploads past it are refused.
    #[arg(long, default_value = "2Gi", value_parser = greenthread_api::arg::size)]
    pub batch_quota: u64,
    #[command(flatten)]
    pub edge: greenthread_edge::EdgeConfig,
}

const SOURCES: crate::AuthSources = crate::AuthSources {
    keys: "GREENTHREAD_API_KEYS or --api-keys-file",
    admin: "GREENTHREAD_ADMIN_TOKEN or --admin-token-file",
    admin_open: "--admin-open",
};

impl ApiServerConfig {
    /// The gates, from the secrets in files or the environment.
    pub fn auth(&self) -> anyhow::Result<Auth> {
        use greenthread_edge::secret;
        let keys = secret("GREENTHREAD_API_KEYS", self.api_keys_file.as_deref())?;
        let auth = Auth::new(
            crate::keys::parse_keys(keys.as_deref(), SOURCES.keys)?,
            secret("GREENTHREAD_ADMIN_TOKEN", self.admin_token_file.as_deref())?,
            secret(
                "GREENTHREAD_METRICS_TOKEN",
                self.metrics_token_file.as_deref(),
            )?,
            self.admin_open,
            SOURCES,
        )?;
        auth.check_exposure(self.listen, self.allow_unauthenticated, SOURCES)?;
        Ok(auth)
    }
}

/// Builds the API server on `client` and keeps its routes discovered until dropped.
pub async fn start(
    client: Client,
    cfg: &ApiServerConfig,
) -> anyhow::Result<(Arc<ApiServer>, tokio::task::JoinHandle<()>)> {
    let ledger: Arc<dyn Ledger> = Arc::new(KubeLedger::new(client.clone(), &cfg.namespace).await?);
    let registry = Registry::default();
    // Sidecars are scraped where they run: their families are not part of this server's.
    let families = SidecarFamilies::register(&mut Registry::default());
    let store = Arc::new(crate::secret_store::SecretStore::new(
        kube::Api::namespaced(client.clone(), &cfg.namespace),
        &cfg.issued_keys_secret,
    ));
    let issued = crate::issued::Issued::with_store(store.clone())
        .await
        .map_err(|e| anyhow::anyhow!("issued API keys: {e}"))?;
    let api = ApiServer::new(
        Vec::new(),
        ledger.clone(),
        cfg.auth()?.with_issued(issued, SOURCES)?,
        registry,
        families,
        Box::new(|| {}),
    );
    if let Some(dir) = &cfg.batch_dir {
        let batches = crate::batch::Batches::start(
            dir,
            &api,
            cfg.batch_concurrency,
            crate::batch::Quota {
                bytes: cfg.batch_quota,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("--batch-dir {}: {e}", dir.display()))?;
        let _ = api.batches.set(batches);
    }
    let sidecar_token = greenthread_edge::secret(
        "GREENTHREAD_SIDECAR_ADMIN_TOKEN",
        cfg.sidecar_token_file.as_deref(),
    )?;
    let discovery = kube_discovery::run(
        api.clone(),
        client,
        cfg.watch_namespace.clone(),
        ledger,
        sidecar_token,
    );
    // Keys issued or revoked through any replica, within seconds.
    let weak = Arc::downgrade(&api);
    let keys = store.watch(move |records| {
        if let Some(api) = weak.upgrade()
            && let Err(e) = api.auth.keys.issued().kept(records)
        {
            tracing::error!(error = %e, "issued keys not taken");
        }
    });
    let tasks = tokio::spawn(async move {
        tokio::select! {
            () = discovery => {}
            () = keys => {}
        }
    });
    Ok((api, tasks))
}

pub async fn run(cfg: ApiServerConfig) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    let (api, discovery) = start(client, &cfg).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding --listen {}: {e}", cfg.listen))?;
    *api.advertise.write().unwrap() = listener.local_addr()?.to_string();
    tracing::info!(listen = %cfg.listen, "API server running");
    api.shutdown.on_signals();
    greenthread_edge::serve(
        listener,
        crate::router(api.clone()),
        cfg.edge.clone(),
        api.shutdown.clone(),
    )
    .await?;
    if let Some(batches) = api.batches.get() {
        batches.shutdown(cfg.edge.shutdown_timeout).await;
    }
    discovery.abort();
    Ok(())
}
