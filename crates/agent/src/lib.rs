//! `greenthread agent`: one per GPU node. Discovers the node's GPUs (NVML, behind
//! [`GpuSource`]), creates their `GPU` objects (`<node>-<index>`), and keeps
//! `status.stats` measured. Stats are written by compare-and-swap on the same record the
//! sidecars write, changing only `stats`, so no occupant update is ever lost.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use greenthread_api::{GpuResource, GpuSpec};
use greenthread_gpu::{FakeSource, GpuMetrics, GpuSource, NvmlSource};
use greenthread_ledger::{KubeLedger, LedgerError};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentConfig {
    /// This node's name (the GPU objects are `<node>-<index>`).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Namespace of the GPU objects.
    #[arg(long, env = "POD_NAMESPACE", default_value = "greenthread-system")]
    pub namespace: String,
    /// How often device statistics are sampled.
    #[arg(long, default_value = "5s", value_parser = greenthread_api::arg::duration)]
    pub interval: Duration,
    /// Address of `/metrics`.
    #[arg(long, default_value = "0.0.0.0:9400")]
    pub metrics_listen: SocketAddr,
    /// Timeouts, caps and limits of the metrics server.
    #[command(flatten)]
    pub edge: greenthread_edge::EdgeConfig,
    /// Simulate this many GPUs instead of using NVML (for clusters without GPUs).
    #[arg(long)]
    pub fake_gpus: Option<u32>,
    /// Memory of each simulated GPU.
    #[arg(long, default_value = "80Gi", value_parser = greenthread_api::arg::size)]
    pub fake_gpu_memory: u64,
    /// Also export the DCGM exporter's metric names (for clusters without one).
    #[arg(long)]
    pub dcgm_metrics: bool,
    /// Host memory kept for sleeping models' weights (level-1 sleep): a size
    /// (`512Gi`), a share of the node's memory (`50%`) or `off`. Each GPU's record gets
    /// an even share; a sleep that does not fit in its GPU's share goes to level 2.
    #[arg(long, default_value = "50%", value_parser = greenthread_api::arg::host_budget)]
    pub host_memory_for_sleepers: greenthread_api::HostBudget,
}

pub struct Agent {
    pub node: String,
    api: Api<GpuResource>,
    ledger: KubeLedger,
    source: Arc<dyn GpuSource>,
    metrics: GpuMetrics,
    registry: Registry,
    /// The node's memory, and the part of it kept for sleepers (`None`: not accounted).
    host: (u64, Option<u64>),
}

impl Agent {
    pub async fn new(
        client: Client,
        namespace: &str,
        node: &str,
        source: Arc<dyn GpuSource>,
        dcgm: bool,
        host_budget: greenthread_api::HostBudget,
    ) -> anyhow::Result<Self> {
        let machine = greenthread_gpu::host_memory_bytes()?;
        let mut registry = Registry::default();
        let metrics = GpuMetrics::register_with(&mut registry, dcgm);
        Ok(Self {
            node: node.to_string(),
            api: Api::namespaced(client.clone(), namespace),
            ledger: KubeLedger::new(client, namespace).await?,
            source,
            metrics,
            registry,
            host: (machine, host_budget.bytes(machine)),
        })
    }

    /// `d`'s spec, with its even share of the sleepers' host memory among `gpus`.
    fn spec_of(&self, d: &greenthread_gpu::DeviceInfo, gpus: usize) -> GpuSpec {
        GpuSpec {
            node: self.node.clone(),
            index: d.index,
            uuid: d.uuid.clone(),
            product: d.product.clone(),
            memory_bytes: d.memory_bytes,
            host_memory_bytes: GpuSpec::host_share(self.host.1, gpus),
        }
    }

    /// Creates missing GPU objects and corrects specs that differ from the hardware.
    pub async fn sync_objects(&self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        let devices = self.source.devices()?;
        for d in &devices {
            let name = format!("{}-{}", self.node, d.index);
            let spec = self.spec_of(d, devices.len());
            match self.api.get_opt(&name).await? {
                None => {
                    self.api
                        .create(&PostParams::default(), &GpuResource::new(&name, spec))
                        .await?;
                    tracing::info!(gpu = %name, "GPU object created");
                }
                Some(existing) if existing.spec != spec => {
                    let patch = serde_json::json!({ "spec": spec });
                    self.api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
                Some(_) => {}
            }
            names.push(name);
        }
        Ok(names)
    }

    /// Samples every GPU once and writes its stats (only its stats); the node's host
    /// memory and what sleepers hold of it go to the metrics.
    pub async fn report_stats(&self) -> anyhow::Result<()> {
        let devices = self.source.devices()?;
        let mut held = 0;
        for d in &devices {
            let name = format!("{}-{}", self.node, d.index);
            let stats = self.source.stats(d.index)?;
            self.metrics.set(&self.spec_of(d, devices.len()), &stats);
            held += greenthread_ledger::update(&self.ledger, &name, &|| {}, |g| {
                let mut next = g.status.clone();
                next.stats = Some(stats.clone());
                let held = greenthread_ledger::decide::host_held_bytes(&g.status);
                Ok::<_, LedgerError>((Some(next), held))
            })
            .await?;
        }
        self.metrics
            .set_host(&self.node, self.host.0, self.host.1, held);
        Ok(())
    }

    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let source: Arc<dyn GpuSource> = match cfg.fake_gpus {
        Some(n) => Arc::new(FakeSource::new(n, cfg.fake_gpu_memory)),
        None => Arc::new(NvmlSource::new()?),
    };
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    let agent = Arc::new(
        Agent::new(
            client,
            &cfg.namespace,
            &cfg.node,
            source,
            cfg.dcgm_metrics,
            cfg.host_memory_for_sleepers,
        )
        .await?,
    );
    let gpus = agent.sync_objects().await?;
    tracing::info!(node = %cfg.node, gpus = gpus.len(), "agent running");
    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen).await?;
    let metrics_agent = agent.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let agent = metrics_agent.clone();
            async move { greenthread_edge::metrics(agent.encode_metrics()) }
        }),
    );
    let shutdown = greenthread_edge::Shutdown::new();
    shutdown.on_signals();
    let server = tokio::spawn(greenthread_edge::serve(
        listener,
        app,
        cfg.edge.clone(),
        shutdown.clone(),
    ));
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        if let Err(e) = agent.report_stats().await {
            tracing::warn!(error = %e, "reporting GPU stats failed");
        }
        // Device statistics are sampled; nothing notifies of a temperature change.
        tokio::select! {
            () = tokio::time::sleep(cfg.interval) => {}
            () = &mut stop => break,
        }
    }
    let _ = server.await;
    Ok(())
}
