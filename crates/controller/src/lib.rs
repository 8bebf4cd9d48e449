//! The controller: Model → pods (engine + sidecar, placed on GPUs), a Service and status;
//! GPU records kept free of pods that are gone; one active replica, elected on a Lease.
//! Pure decisions live in [`plan`] (with [`placement`], [`render`] and [`status`]);
//! [`reconcile`] and [`leader`] do the I/O.

pub mod leader;
pub mod metrics;
pub mod placement;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod status;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use greenthread_api::arg;
use greenthread_ledger::KubeLedger;
use kube::Client;
use prometheus_client::registry::Registry;

pub use metrics::ControllerMetrics;
pub use reconcile::Context;

#[derive(Debug, Clone, clap::Args)]
pub struct ControllerConfig {
    /// Namespace of the controller's Lease and of the GPU objects.
    #[arg(long, env = "POD_NAMESPACE", default_value = "greenthread-system")]
    pub namespace: String,
    /// Only reconcile Models in this namespace (default: all namespaces).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// This replica's identity in the leader election (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Name of the Lease the replicas compete for.
    #[arg(long, default_value = "greenthread-controller")]
    pub lease_name: String,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = arg::duration)]
    pub lease_duration: Duration,
    /// How long before expiry the leader renews.
    #[arg(long, default_value = "5s", value_parser = arg::duration)]
    pub lease_grace: Duration,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Timeouts, caps and limits of the metrics server.
    #[command(flatten)]
    pub edge: greenthread_edge::EdgeConfig,
    /// Engine image for `vllm` Models without an `image`.
    #[arg(
        long,
        env = "GREENTHREAD_VLLM_IMAGE",
        default_value = "vllm/vllm-openai:v0.11.0"
    )]
    pub vllm_image: String,
    /// Image of the sidecar container (this binary).
    #[arg(
        long,
        env = "GREENTHREAD_IMAGE",
        default_value = "ghcr.io/greenthread/greenthread:0.1.0"
    )]
    pub sidecar_image: String,
    /// Runtime class of Model pods (e.g. `nvidia`).
    #[arg(long)]
    pub runtime_class: Option<String>,
    /// Service account of Model pods (allowed to update GPU status).
    #[arg(long)]
    pub model_service_account: Option<String>,
    /// The sidecar's public port in Model pods.
    #[arg(long, default_value_t = render::HTTP_PORT)]
    pub sidecar_port: i32,
    /// The sidecar's private port (metrics, admin) in Model pods.
    #[arg(long, default_value_t = render::METRICS_PORT)]
    pub sidecar_metrics_port: i32,
    /// The engine's port on the pod's loopback.
    #[arg(long, default_value_t = render::ENGINE_PORT)]
    pub engine_port: u16,
    /// Engine images Models may run (globs, comma-separated; `*` any characters). A
    /// Model with another image is Failed with reason `ImageNotAllowed`. Empty: any.
    #[arg(long, value_delimiter = ',')]
    pub allowed_images: Vec<String>,
    /// Secrets (names, repeatable) every Model pod pulls its images with; each must
    /// exist in the Model's namespace.
    #[arg(long = "image-pull-secret")]
    pub image_pull_secrets: Vec<String>,
    /// The scheduling policy of every Model's sidecar: whom a wake short of memory
    /// preempts, and when (`cost-aware`, the default, or `lru`).
    #[arg(long, default_value = "cost-aware", value_parser = |s: &str| s.parse::<greenthread_ledger::Policy>())]
    pub policy: greenthread_ledger::Policy,
    /// What a preempted Model's running answers do: `drain` (finish first, the default)
    /// or `resume` (stopped at once, continued after the next wake).
    #[arg(long, value_enum, default_value = "drain")]
    pub preemption: greenthread_sidecar::Preemption,
    #[command(flatten)]
    pub weights: WeightsArgs,
}

/// The nodes' weights cache: Model pods of vLLM and SGLang keep their weights there,
/// downloaded once per node by an init container (`greenthread download`) before the
/// engine first boots. Off (engines download for themselves) without a host path or claim.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WeightsArgs {
    /// A directory on every GPU node holding the cache (the hub's layout), shared by all
    /// Model pods there; it must be writable by uid 65532.
    #[arg(long = "weights-host-path")]
    pub host_path: Option<String>,
    /// A PersistentVolumeClaim of that name in each Model namespace holding the cache,
    /// instead of a host path.
    #[arg(long = "weights-claim")]
    pub claim: Option<String>,
    /// Past this much, a download evicts the least recently used other repositories
    /// (e.g. `500Gi`).
    #[arg(long = "weights-budget")]
    pub budget: Option<String>,
    /// The hub, or a mirror (`HF_ENDPOINT` of the downloads).
    #[arg(long = "hf-endpoint")]
    pub endpoint: Option<String>,
    /// A Secret in each Model namespace whose key `token` is the hub token, for gated
    /// models (optional: a namespace without it downloads public models only).
    #[arg(long = "hf-token-secret")]
    pub token_secret: Option<String>,
}

impl ControllerConfig {
    pub fn settings(&self) -> render::Settings {
        render::Settings {
            vllm_image: self.vllm_image.clone(),
            sidecar_image: self.sidecar_image.clone(),
            runtime_class: self.runtime_class.clone(),
            gpu_namespace: self.namespace.clone(),
            service_account: self.model_service_account.clone(),
            ports: render::Ports {
                http: self.sidecar_port,
                metrics: self.sidecar_metrics_port,
                engine: self.engine_port,
            },
            allowed_images: self.allowed_images.clone(),
            image_pull_secrets: self.image_pull_secrets.clone(),
            policy: self.policy,
            preemption: self.preemption,
            weights: self.weights.clone(),
        }
    }

    pub fn lease(&self) -> leader::LeaseConfig {
        leader::LeaseConfig {
            namespace: self.namespace.clone(),
            name: self.lease_name.clone(),
            identity: self
                .identity
                .clone()
                .unwrap_or_else(|| format!("greenthread-controller-{}", std::process::id())),
            duration: self.lease_duration,
            grace: self.lease_grace,
        }
    }
}

/// Builds the context (the ledger's watch starts here) and runs the controller while
/// this replica leads.
pub async fn start(
    client: Client,
    cfg: &ControllerConfig,
    registry: &mut Registry,
) -> anyhow::Result<leader::Elected> {
    let metrics = ControllerMetrics::register(registry);
    let ledger = Arc::new(KubeLedger::new(client.clone(), &cfg.namespace).await?);
    let ctx = Arc::new(Context::new(
        client.clone(),
        cfg.settings(),
        metrics.clone(),
        ledger,
    ));
    let watch_namespace = cfg.watch_namespace.clone();
    leader::elect(client, cfg.lease(), metrics, move || {
        reconcile::run(ctx.clone(), watch_namespace.clone())
    })
    .await
}

pub async fn run(cfg: ControllerConfig) -> anyhow::Result<()> {
    cfg.preemption
        .check(cfg.policy)
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    let mut registry = Registry::default();
    let elected = start(client, &cfg, &mut registry).await?;
    let registry = Arc::new(registry);
    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.metrics_listen))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    prometheus_client::encoding::text::encode(&mut out, &registry)
                        .expect("writing to a String cannot fail");
                    greenthread_edge::metrics(out)
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let shutdown = greenthread_edge::Shutdown::new();
    shutdown.on_signals();
    let server = tokio::spawn(greenthread_edge::serve(
        listener,
        app,
        cfg.edge.clone(),
        shutdown.clone(),
    ));
    tracing::info!(listen = %cfg.metrics_listen, "controller running; waiting for the Lease");
    shutdown.wait().await;
    elected.resign().await;
    let _ = server.await;
    Ok(())
}
