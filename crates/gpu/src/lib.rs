//! GPU memory as GreenThread sees it. [`SimGpu`] is a simulated device that separate
//! engine processes allocate on (a directory with one record per process, the analogue
//! of NVML's per-process accounting), so a leak shows in its stats as on hardware.
//! [`MemoryProbe`] measures what one engine holds; NVML joins it behind the same trait.

mod discovery;
mod host;
mod metrics;
mod probe;
mod sim;

pub use discovery::{
    DeviceInfo, DiscoveryError, FakeSource, GpuSource, NvmlSource, nvml_library_present,
};
pub use host::host_memory_bytes;
pub use metrics::GpuMetrics;
pub use probe::{MemoryProbe, ProbeError, SimGpuProbe};
pub use sim::{ProcessMemory, SimGpu};
