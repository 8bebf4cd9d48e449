//! GPU metrics: GreenThread's own names, and the DCGM exporter's names for clusters (and
//! `local` mode) without a DCGM exporter, so that the same dashboards work everywhere.

use greenthread_api::{GpuSpec, GpuStats};
use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

pub struct GpuMetrics {
    total: Family<Labels, Gauge>,
    used: Family<Labels, Gauge>,
    fb_used: Family<Labels, FloatGauge>,
    fb_free: Family<Labels, FloatGauge>,
    util: Family<Labels, FloatGauge>,
    mem_copy_util: Family<Labels, FloatGauge>,
    temp: Family<Labels, FloatGauge>,
    power: Family<Labels, FloatGauge>,
}

impl GpuMetrics {
    /// Our names and the DCGM exporter's.
    pub fn register(registry: &mut Registry) -> Self {
        Self::register_with(registry, true)
    }

    /// Our names, and the DCGM exporter's when `dcgm` (where no DCGM exporter runs).
    pub fn register_with(registry: &mut Registry, dcgm: bool) -> Self {
        let m = Self {
            total: Family::default(),
            used: Family::default(),
            fb_used: Family::default(),
            fb_free: Family::default(),
            util: Family::default(),
            mem_copy_util: Family::default(),
            temp: Family::default(),
            power: Family::default(),
        };
        registry.register(
            "gthread_gpu_memory_total_bytes",
            "GPU memory",
            m.total.clone(),
        );
        registry.register(
            "gthread_gpu_memory_used_bytes",
            "GPU memory in use (measured)",
            m.used.clone(),
        );
        if dcgm {
            registry.register(
                "DCGM_FI_DEV_FB_USED",
                "Framebuffer memory used (MiB)",
                m.fb_used.clone(),
            );
            registry.register(
                "DCGM_FI_DEV_FB_FREE",
                "Framebuffer memory free (MiB)",
                m.fb_free.clone(),
            );
            registry.register(
                "DCGM_FI_DEV_GPU_UTIL",
                "GPU utilization (%)",
                m.util.clone(),
            );
            registry.register(
                "DCGM_FI_DEV_MEM_COPY_UTIL",
                "Memory copy utilization (%)",
                m.mem_copy_util.clone(),
            );
            registry.register(
                "DCGM_FI_DEV_GPU_TEMP",
                "GPU temperature (C)",
                m.temp.clone(),
            );
            registry.register("DCGM_FI_DEV_POWER_USAGE", "Power draw (W)", m.power.clone());
        }
        m
    }

    pub fn set(&self, spec: &GpuSpec, stats: &GpuStats) {
        let ours: Labels = vec![("gpu", spec.index.to_string()), ("node", spec.node.clone())];
        // The DCGM exporter's own label names.
        let dcgm: Labels = vec![
            ("gpu", spec.index.to_string()),
            ("UUID", spec.uuid.clone()),
            ("Hostname", spec.node.clone()),
            ("modelName", spec.product.clone()),
        ];
        const MIB: f64 = (1u64 << 20) as f64;
        self.total
            .get_or_create(&ours)
            .set(spec.memory_bytes as i64);
        self.used
            .get_or_create(&ours)
            .set(stats.used_memory_bytes as i64);
        self.fb_used
            .get_or_create(&dcgm)
            .set(stats.used_memory_bytes as f64 / MIB);
        self.fb_free
            .get_or_create(&dcgm)
            .set(stats.free_memory_bytes as f64 / MIB);
        self.util
            .get_or_create(&dcgm)
            .set(stats.utilization_percent);
        self.mem_copy_util
            .get_or_create(&dcgm)
            .set(stats.utilization_percent / 2.0);
        self.temp
            .get_or_create(&dcgm)
            .set(stats.temperature_celsius);
        self.power.get_or_create(&dcgm).set(stats.power_watts);
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
