//! The controller's metrics, as the System dashboard queries them.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub resource: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub model: String,
    pub phase: String,
}

/// The phases of a Model's status.
pub const PHASES: [&str; 4] = ["Pending", "Downloading", "Ready", "Failed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub namespace: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaderLabels {
    pub identity: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

greenthread_api::metric_families! {
    #[derive(Clone)]
    pub struct ControllerMetrics {
        pub reconciliations: Family<ResultLabels, Counter> = Family::default()
            => ("gthread_controller_reconciliations", "Reconciliations by resource and result (success, error)"),
        pub duration: Family<ResourceLabels, Histogram> = Family::new_with_constructor(duration_histogram)
            => ("gthread_controller_reconcile_duration_seconds", "Time one reconciliation took"),
        pub queue_depth: Family<ResourceLabels, Gauge> = Family::default()
            => ("gthread_controller_workqueue_depth", "Objects with changes not yet reconciled, or waiting for a retry"),
        pub errors: Family<ReasonLabels, Counter> = Family::default()
            => ("gthread_controller_errors", "Reconcile errors by reason"),
        pub leader: Family<LeaderLabels, Gauge> = Family::default()
            => ("gthread_controller_leader", "1 while this replica holds the leader Lease"),
        pub ledger_entries_removed: Counter = Counter::default()
            => ("gthread_controller_ledger_entries_removed", "Occupants, intents and wake locks removed from GPU records because their pod is gone"),
        pub model_phase: Family<PhaseLabels, Gauge> = Family::default()
            => ("gthread_controller_model_phase", "1 for each Model's current phase (Pending, Downloading, Ready, Failed), 0 for the others"),
        pub weights_downloaded: Family<ModelLabels, Gauge> = Family::default()
            => ("gthread_weights_downloaded_bytes", "Bytes of a Model's weights in its nodes' caches, as their downloads go (the replicas still downloading)"),
        pub weights_size: Family<ModelLabels, Gauge> = Family::default()
            => ("gthread_weights_size_bytes", "Bytes of a Model's weights in all, for the replicas still downloading"),
    }
}

/// The resources the controller reconciles, pre-created so that every series exists
/// from the first scrape.
pub const RESOURCES: [&str; 2] = ["model", "gpu"];

impl ControllerMetrics {
    /// The families, registered, with every per-resource series created at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::registered(registry);
        for resource in RESOURCES {
            for result in ["success", "error"] {
                m.reconciliations
                    .get_or_create(&ResultLabels {
                        resource: resource.into(),
                        result: result.into(),
                    })
                    .inc_by(0);
            }
            let labels = ResourceLabels {
                resource: resource.into(),
            };
            m.queue_depth.get_or_create(&labels).set(0);
            let _ = m.duration.get_or_create(&labels);
        }
        m
    }

    pub fn record(&self, resource: &str, ok: bool, seconds: f64) {
        self.reconciliations
            .get_or_create(&ResultLabels {
                resource: resource.into(),
                result: if ok { "success" } else { "error" }.into(),
            })
            .inc();
        self.duration
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .observe(seconds);
    }

    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// One-hot over the phases; `None` removes the Model's series (it was deleted).
    pub fn set_phase(&self, namespace: &str, model: &str, phase: Option<&str>) {
        for p in PHASES {
            let labels = PhaseLabels {
                namespace: namespace.into(),
                model: model.into(),
                phase: p.into(),
            };
            match phase {
                Some(current) => {
                    self.model_phase
                        .get_or_create(&labels)
                        .set((p == current) as i64);
                }
                None => {
                    self.model_phase.remove(&labels);
                }
            }
        }
    }

    /// A Model's download progress; `None` removes its series (nothing downloads).
    pub fn set_download(
        &self,
        namespace: &str,
        model: &str,
        progress: Option<greenthread_api::DownloadStatus>,
    ) {
        let labels = ModelLabels {
            namespace: namespace.into(),
            model: model.into(),
        };
        match progress {
            Some(p) => {
                self.weights_downloaded
                    .get_or_create(&labels)
                    .set(p.downloaded_bytes as i64);
                self.weights_size
                    .get_or_create(&labels)
                    .set(p.total_bytes as i64);
            }
            None => {
                self.weights_downloaded.remove(&labels);
                self.weights_size.remove(&labels);
            }
        }
    }

    pub fn set_depth(&self, resource: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&ResourceLabels {
                resource: resource.into(),
            })
            .set(depth as i64);
    }
}
