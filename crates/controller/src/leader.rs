//! Leader election on a Lease (kube-lease-manager, server-side apply): of the controller's
//! replicas exactly one runs the reconcile loop; another takes over once the leader's
//! Lease expires or is released.

use std::{future::Future, time::Duration};

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerBuilder};
use tokio::{sync::watch, task::JoinHandle};

use crate::metrics::{ControllerMetrics, LeaderLabels};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
}

/// A replica in the election. Dropping it resigns (the Lease is released).
pub struct Elected {
    /// `true` while this replica leads and its work runs.
    pub leading: watch::Receiver<bool>,
    pub identity: String,
    follower: JoinHandle<()>,
    lease: Option<JoinHandle<Result<LeaseManager, kube_lease_manager::LeaseManagerError>>>,
}

impl Elected {
    /// Stops working and releases the Lease, so that another replica leads at once.
    pub async fn resign(mut self) {
        // Closing the control channel makes the lease task release the Lease and end.
        self.follower.abort();
        if let Some(lease) = self.lease.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), lease).await;
        }
    }

    /// Stops as a crashed process would: no release, the Lease just expires.
    pub fn crash(&self) {
        if let Some(lease) = &self.lease {
            lease.abort();
        }
        self.follower.abort();
    }
}

impl Drop for Elected {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Joins the election on `cfg`'s Lease; runs `work` whenever this replica leads, and
/// stops it when leadership is lost.
pub async fn elect<W, F>(
    client: Client,
    cfg: LeaseConfig,
    metrics: ControllerMetrics,
    work: W,
) -> anyhow::Result<Elected>
where
    W: Fn() -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let manager = LeaseManagerBuilder::new(client, &cfg.name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_duration(cfg.duration.as_secs().max(1))
        .with_grace(cfg.grace.as_secs().max(1))
        .with_create_mode(LeaseCreateMode::AutoCreate)
        .build()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "joining the election on Lease {}/{}: {e}",
                cfg.namespace,
                cfg.name
            )
        })?;
    let (mut lease_rx, lease) = manager.watch().await;
    let (tx, leading) = watch::channel(false);
    let identity = cfg.identity.clone();
    let gauge = metrics
        .leader
        .get_or_create(&LeaderLabels {
            identity: identity.clone(),
        })
        .clone();
    gauge.set(0);
    let who = identity.clone();
    let follower = tokio::spawn(async move {
        let mut running: Option<AbortOnDrop> = None;
        loop {
            let now_leading = *lease_rx.borrow_and_update();
            match (now_leading, running.is_some()) {
                (true, false) => {
                    tracing::info!(identity = %who, lease = %cfg.name, "leading: reconciling");
                    running = Some(AbortOnDrop(tokio::spawn(work())));
                }
                (false, true) => {
                    tracing::warn!(identity = %who, lease = %cfg.name, "lost the Lease: stopped reconciling");
                    running = None;
                    // The new leader reports the Models now; stale phases here would mislead.
                    metrics.model_phase.clear();
                }
                _ => {}
            }
            gauge.set(now_leading as i64);
            tx.send_replace(now_leading);
            if lease_rx.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(Elected {
        leading,
        identity,
        follower,
        lease: Some(lease),
    })
}
