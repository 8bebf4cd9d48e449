//! GPU metrics: GreenThread's own names, and the DCGM exporter's names for clusters (and
//! `local` mode) without a DCGM exporter, so that the same dashboards work everywhere.

use greenthread_api::{GpuSpec, GpuStats};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Our own labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    node: String,
}

/// The DCGM exporter's own label names, so that its dashboards work unchanged.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
struct DcgmLabels {
    gpu: String,
    UUID: String,
    Hostname: String,
    modelName: String,
}

greenthread_api::metric_families! {
    struct Ours {
        total: Family<GpuLabels, Gauge> = Family::default()
            => ("gthread_gpu_memory_total_bytes", "GPU memory"),
        used: Family<GpuLabels, Gauge> = Family::default()
            => ("gthread_gpu_memory_used_bytes", "GPU memory in use (measured)"),
        host_total: Family<NodeLabels, Gauge> = Family::default()
            => ("gthread_host_memory_total_bytes", "The node's host memory"),
        host_budget: Family<NodeLabels, Gauge> = Family::default()
            => ("gthread_host_memory_sleepers_budget_bytes", "Host memory kept for sleeping models' weights (level-1 sleep), all GPUs' shares together"),
        host_held: Family<NodeLabels, Gauge> = Family::default()
            => ("gthread_host_memory_sleepers_bytes", "Host memory sleeping (and pinned) models' weights hold now, from the GPU records"),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

greenthread_api::metric_families! {
    struct Dcgm {
        fb_used: Family<DcgmLabels, FloatGauge> = Family::default()
            => ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (MiB)"),
        fb_free: Family<DcgmLabels, FloatGauge> = Family::default()
            => ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (MiB)"),
        util: Family<DcgmLabels, FloatGauge> = Family::default()
            => ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (%)"),
        mem_copy_util: Family<DcgmLabels, FloatGauge> = Family::default()
            => ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory copy utilization (%)"),
        temp: Family<DcgmLabels, FloatGauge> = Family::default()
            => ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (C)"),
        power: Family<DcgmLabels, FloatGauge> = Family::default()
            => ("DCGM_FI_DEV_POWER_USAGE", "Power draw (W)"),
    }
}

pub struct GpuMetrics {
    ours: Ours,
    /// Under the DCGM exporter's names, where no DCGM exporter runs.
    dcgm: Option<Dcgm>,
}

impl GpuMetrics {
    /// Our names and the DCGM exporter's.
    pub fn register(registry: &mut Registry) -> Self {
        Self::register_with(registry, true)
    }

    /// Our names, and the DCGM exporter's when `dcgm` (where no DCGM exporter runs).
    pub fn register_with(registry: &mut Registry, dcgm: bool) -> Self {
        Self {
            ours: Ours::registered(registry),
            dcgm: dcgm.then(|| Dcgm::registered(registry)),
        }
    }

    /// The node's host memory, its budget for sleepers (`None`: not accounted) and
    /// what sleepers hold now.
    pub fn set_host(&self, node: &str, total: u64, budget: Option<u64>, held: u64) {
        let l = NodeLabels {
            node: node.to_string(),
        };
        self.ours.host_total.get_or_create(&l).set(total as i64);
        if let Some(b) = budget {
            self.ours.host_budget.get_or_create(&l).set(b as i64);
        }
        self.ours.host_held.get_or_create(&l).set(held as i64);
    }

    pub fn set(&self, spec: &GpuSpec, stats: &GpuStats) {
        let ours = GpuLabels {
            gpu: spec.index.to_string(),
            node: spec.node.clone(),
        };
        self.ours
            .total
            .get_or_create(&ours)
            .set(spec.memory_bytes as i64);
        self.ours
            .used
            .get_or_create(&ours)
            .set(stats.used_memory_bytes as i64);
        let Some(d) = &self.dcgm else { return };
        let dcgm = DcgmLabels {
            gpu: spec.index.to_string(),
            UUID: spec.uuid.clone(),
            Hostname: spec.node.clone(),
            modelName: spec.product.clone(),
        };
        const MIB: f64 = (1u64 << 20) as f64;
        d.fb_used
            .get_or_create(&dcgm)
            .set(stats.used_memory_bytes as f64 / MIB);
        d.fb_free
            .get_or_create(&dcgm)
            .set(stats.free_memory_bytes as f64 / MIB);
        d.util.get_or_create(&dcgm).set(stats.utilization_percent);
        d.mem_copy_util
            .get_or_create(&dcgm)
            .set(stats.utilization_percent / 2.0);
        d.temp.get_or_create(&dcgm).set(stats.temperature_celsius);
        d.power.get_or_create(&dcgm).set(stats.power_watts);
    }
}

impl crate::SimGpu {
    /// Device statistics of a simulated GPU: memory measured from its processes; the
    /// rest modelled from how full it is (a simulated device has no thermals).
    pub fn stats(&self, spec: &GpuSpec) -> std::io::Result<GpuStats> {
        let used = self.used_bytes(spec.index)?;
        let load = if spec.memory_bytes == 0 {
            0.0
        } else {
            (used as f64 / spec.memory_bytes as f64).min(1.0)
        };
        Ok(GpuStats {
            used_memory_bytes: used,
            free_memory_bytes: spec.memory_bytes.saturating_sub(used),
            utilization_percent: (load * 100.0).round(),
            temperature_celsius: (30.0 + 45.0 * load).round(),
            power_watts: (70.0 + 630.0 * load).round(),
        })
    }
}
