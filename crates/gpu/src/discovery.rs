//! Discovering GPUs and sampling their statistics, behind one trait: NVML on a node with
//! an NVIDIA driver, a fake source in tests. A missing driver is a clean error.

use std::sync::Mutex;

use greenthread_api::GpuStats;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub index: u32,
    pub uuid: String,
    pub product: String,
    pub memory_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "NVML is not available (is the NVIDIA driver installed and libnvidia-ml.so.1 visible?): {0}"
    )]
    NoDriver(String),
    #[error("NVML: {0}")]
    Nvml(String),
    #[error("no GPU with index {0}")]
    NoSuchGpu(u32),
}

pub trait GpuSource: Send + Sync + 'static {
    fn devices(&self) -> Result<Vec<DeviceInfo>, DiscoveryError>;
    fn stats(&self, index: u32) -> Result<GpuStats, DiscoveryError>;
    /// GPU memory held by each compute process on device `index` (pid → bytes), as the
    /// driver accounts it. Processes whose usage the driver cannot report count 0.
    fn process_memory(&self, index: u32) -> Result<Vec<(u32, u64)>, DiscoveryError>;
}

/// The NVIDIA driver's management library.
pub struct NvmlSource {
    nvml: nvml_wrapper::Nvml,
}

impl NvmlSource {
    pub fn new() -> Result<Self, DiscoveryError> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| Self { nvml })
            .map_err(|e| DiscoveryError::NoDriver(e.to_string()))
    }
}

impl NvmlSource {
    fn compute_processes(&self, index: u32) -> Result<Vec<(u32, u64)>, DiscoveryError> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let d = self.nvml.device_by_index(index).map_err(nvml_err)?;
        Ok(d.running_compute_processes()
            .map_err(nvml_err)?
            .into_iter()
            .map(|p| {
                let bytes = match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                };
                (p.pid, bytes)
            })
            .collect())
    }
}

fn nvml_err(e: nvml_wrapper::error::NvmlError) -> DiscoveryError {
    DiscoveryError::Nvml(e.to_string())
}

impl GpuSource for NvmlSource {
    fn process_memory(&self, index: u32) -> Result<Vec<(u32, u64)>, DiscoveryError> {
        self.compute_processes(index)
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>, DiscoveryError> {
        let count = self.nvml.device_count().map_err(nvml_err)?;
        (0..count)
            .map(|i| {
                let d = self.nvml.device_by_index(i).map_err(nvml_err)?;
                Ok(DeviceInfo {
                    index: i,
                    uuid: d.uuid().map_err(nvml_err)?,
                    product: d.name().map_err(nvml_err)?,
                    memory_bytes: d.memory_info().map_err(nvml_err)?.total,
                })
            })
            .collect()
    }

    fn stats(&self, index: u32) -> Result<GpuStats, DiscoveryError> {
        let d = self.nvml.device_by_index(index).map_err(nvml_err)?;
        let mem = d.memory_info().map_err(nvml_err)?;
        let util = d.utilization_rates().map_err(nvml_err)?;
        let temp = d
            .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
            .map_err(nvml_err)?;
        let power_mw = d.power_usage().map_err(nvml_err)?;
        Ok(GpuStats {
            used_memory_bytes: mem.used,
            free_memory_bytes: mem.free,
            utilization_percent: f64::from(util.gpu),
            temperature_celsius: f64::from(temp),
            power_watts: f64::from(power_mw) / 1000.0,
        })
    }
}

/// Whether the NVIDIA driver's management library can be loaded here: what a test
/// expects discovery to do on this machine, found without NVML's own initialization.
pub fn nvml_library_present() -> bool {
    let name = c"libnvidia-ml.so.1";
    // SAFETY: dlopen with a valid C string; the handle is closed at once.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// Devices, statistics and per-process memory set by a test.
pub struct FakeSource {
    devices: Vec<DeviceInfo>,
    stats: Mutex<Vec<GpuStats>>,
    processes: Mutex<Vec<Vec<(u32, u64)>>>,
}

impl FakeSource {
    pub fn new(count: u32, memory_bytes: u64) -> Self {
        let devices: Vec<DeviceInfo> = (0..count)
            .map(|i| DeviceInfo {
                index: i,
                uuid: format!("GPU-fake-{i:04}"),
                product: "Fake GPU".into(),
                memory_bytes,
            })
            .collect();
        let stats = devices
            .iter()
            .map(|d| GpuStats {
                free_memory_bytes: d.memory_bytes,
                temperature_celsius: 30.0,
                power_watts: 70.0,
                ..Default::default()
            })
            .collect();
        Self {
            processes: Mutex::new(vec![Vec::new(); devices.len()]),
            devices,
            stats: Mutex::new(stats),
        }
    }

    /// The compute processes device `index` reports (pid, bytes).
    pub fn set_processes(&self, index: u32, processes: Vec<(u32, u64)>) {
        self.processes.lock().unwrap()[index as usize] = processes;
    }

    pub fn set_stats(&self, index: u32, stats: GpuStats) {
        self.stats.lock().unwrap()[index as usize] = stats;
    }
}

impl GpuSource for FakeSource {
    fn devices(&self) -> Result<Vec<DeviceInfo>, DiscoveryError> {
        Ok(self.devices.clone())
    }

    fn stats(&self, index: u32) -> Result<GpuStats, DiscoveryError> {
        self.stats
            .lock()
            .unwrap()
            .get(index as usize)
            .cloned()
            .ok_or(DiscoveryError::NoSuchGpu(index))
    }

    fn process_memory(&self, index: u32) -> Result<Vec<(u32, u64)>, DiscoveryError> {
        self.processes
            .lock()
            .unwrap()
            .get(index as usize)
            .cloned()
            .ok_or(DiscoveryError::NoSuchGpu(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_driver_is_a_clean_error_and_a_present_one_finds_its_gpus() {
        // The outcome this machine must give, decided without NVML: CI machines have no
        // driver; a GPU machine must discover its GPUs and sample each.
        if nvml_library_present() {
            let nvml = NvmlSource::new().expect("the driver library loads, so NVML starts");
            let devices = nvml.devices().unwrap();
            assert!(!devices.is_empty(), "a driver and no GPU to test on");
            for d in &devices {
                assert!(d.uuid.starts_with("GPU-"), "{d:?}");
                assert!(d.memory_bytes > 0, "{d:?}");
                let stats = nvml.stats(d.index).unwrap();
                assert!(stats.used_memory_bytes + stats.free_memory_bytes <= d.memory_bytes);
            }
        } else {
            let e = NvmlSource::new()
                .err()
                .expect("no driver library: NVML cannot start");
            assert!(e.to_string().contains("NVIDIA driver"), "{e}");
        }
    }

    #[test]
    fn the_fake_source_reports_what_it_is_told() {
        let f = FakeSource::new(2, 80 << 30);
        assert_eq!(f.devices().unwrap().len(), 2);
        f.set_stats(
            1,
            GpuStats {
                used_memory_bytes: 5,
                ..Default::default()
            },
        );
        assert_eq!(f.stats(1).unwrap().used_memory_bytes, 5);
        assert!(matches!(f.stats(7), Err(DiscoveryError::NoSuchGpu(7))));
    }
}
