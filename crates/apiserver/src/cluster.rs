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
    /// API keys accepted on the OpenAI API (comma-separated; none: open).
    #[arg(
        long,
        env = "GREENTHREAD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Token for the admin API (none: open).
    #[arg(long, env = "GREENTHREAD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
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
    let api = ApiServer::new(
        Vec::new(),
        ledger.clone(),
        Auth {
            api_keys: cfg
                .api_keys
                .iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect(),
            admin_token: cfg.admin_token.clone().filter(|t| !t.is_empty()),
        },
        registry,
        families,
        Box::new(|| {}),
    );
    let discovery = tokio::spawn(kube_discovery::run(
        api.clone(),
        client,
        cfg.watch_namespace.clone(),
        ledger,
    ));
    Ok((api, discovery))
}

pub async fn run(cfg: ApiServerConfig) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    let (api, discovery) = start(client, &cfg).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding --listen {}: {e}", cfg.listen))?;
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tracing::info!(listen = %cfg.listen, "API server running");
    axum::serve(listener, crate::router(api))
        .with_graceful_shutdown(greenthread_sidecar::shutdown_signal())
        .await?;
    discovery.abort();
    Ok(())
}
