//! The sidecar's metrics, named exactly as the monitoring page documents them.

use std::sync::Mutex;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::state::State;

type Labels = Vec<(&'static str, String)>;

/// Buckets from 10 ms to 2 minutes: a warm wake to a cold boot.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0,
];

pub struct SidecarMetrics {
    registry: Registry,
    /// Held while the one-hot state gauge changes and while encoding, so that a scrape
    /// never sees zero or two states at 1.
    state_lock: Mutex<()>,
    state: Family<Labels, Gauge>,
    pub wake_duration: Histogram,
    pub sleep_duration: Histogram,
    requests: Family<Labels, Counter>,
    /// The two `requests` series, resolved once: the hot path takes no lock.
    requests_success: Counter,
    requests_error: Counter,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    reserved: Family<Labels, Gauge>,
    serving: Family<Labels, Gauge>,
    residual: Family<Labels, Gauge>,
    preemptions: Family<Labels, Counter>,
    pub barrier_timeouts: Counter,
    pub wake_dedups: Counter,
    pub cas_conflicts: Counter,
    pub engine_restarts: Counter,
    pub wake_failures: Counter,
}

fn one(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

impl SidecarMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            state_lock: Mutex::new(()),
            state: Family::default(),
            wake_duration: Histogram::new(DURATION_BUCKETS),
            sleep_duration: Histogram::new(DURATION_BUCKETS),
            requests: Family::default(),
            requests_success: Counter::default(),
            requests_error: Counter::default(),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            reserved: Family::default(),
            serving: Family::default(),
            residual: Family::default(),
            preemptions: Family::default(),
            barrier_timeouts: Counter::default(),
            wake_dedups: Counter::default(),
            cas_conflicts: Counter::default(),
            engine_restarts: Counter::default(),
            wake_failures: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "gthread_sidecar_state",
            "Current sidecar state; exactly one state is 1",
            m.state.clone(),
        );
        r.register(
            "gthread_sidecar_wake_duration_seconds",
            "Time to wake a model from sleeping to serving",
            m.wake_duration.clone(),
        );
        r.register(
            "gthread_sidecar_sleep_duration_seconds",
            "Time to sleep a model (drain + GPU release)",
            m.sleep_duration.clone(),
        );
        r.register(
            "gthread_sidecar_requests",
            "Total requests processed",
            m.requests.clone(),
        );
        r.register(
            "gthread_sidecar_queue_depth",
            "Current request queue depth",
            m.queue_depth.clone(),
        );
        r.register(
            "gthread_sidecar_in_flight_requests",
            "Number of requests currently being processed",
            m.in_flight.clone(),
        );
        r.register(
            "gthread_sidecar_gpu_memory_reserved_bytes",
            "Reserved GPU memory in bytes per GPU index",
            m.reserved.clone(),
        );
        r.register(
            "gthread_sidecar_gpu_memory_serving_bytes",
            "Measured serving GPU memory in bytes per GPU index",
            m.serving.clone(),
        );
        r.register(
            "gthread_sidecar_gpu_memory_residual_bytes",
            "Measured GPU memory a sleeping engine still holds, per GPU index",
            m.residual.clone(),
        );
        r.register(
            "gthread_sidecar_preemptions",
            "Preemption events by role",
            m.preemptions.clone(),
        );
        r.register(
            "gthread_sidecar_preemption_barrier_timeouts",
            "Drain timeouts during preemption barrier",
            m.barrier_timeouts.clone(),
        );
        r.register(
            "gthread_sidecar_wake_deduplications",
            "Times a wake request was coalesced with an in-flight wake",
            m.wake_dedups.clone(),
        );
        r.register(
            "gthread_sidecar_gpu_cas_conflicts",
            "Optimistic CAS conflicts on GPU CRD updates",
            m.cas_conflicts.clone(),
        );
        r.register(
            "gthread_sidecar_engine_restarts",
            "Cold restarts of the engine after a failed wake or a crash",
            m.engine_restarts.clone(),
        );
        r.register(
            "gthread_sidecar_wake_failures",
            "Engine wake attempts that failed",
            m.wake_failures.clone(),
        );
        let requests_success = m.requests.get_or_create(&one("status", "success")).clone();
        let requests_error = m.requests.get_or_create(&one("status", "error")).clone();
        for role in ["preempted", "preemptor"] {
            let _ = m.preemptions.get_or_create(&one("role", role));
        }
        for s in State::ALL {
            m.state
                .get_or_create(&one("state", s.as_str()))
                .set(i64::from(s == State::Sleeping));
        }
        Self {
            registry,
            requests_success,
            requests_error,
            ..m
        }
    }

    pub fn set_state(&self, to: State) {
        let _g = self.state_lock.lock().unwrap();
        for s in State::ALL {
            self.state
                .get_or_create(&one("state", s.as_str()))
                .set(i64::from(s == to));
        }
    }

    pub fn request(&self, success: bool) {
        if success {
            self.requests_success.inc();
        } else {
            self.requests_error.inc();
        }
    }

    pub fn preemptions(&self, role: &'static str) -> u64 {
        self.preemptions.get_or_create(&one("role", role)).get()
    }

    pub fn preemption(&self, role: &'static str) {
        self.preemptions.get_or_create(&one("role", role)).inc();
    }

    pub fn set_reserved(&self, gpu: u32, bytes: u64) {
        self.reserved
            .get_or_create(&one("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    pub fn set_serving(&self, gpu: u32, bytes: u64) {
        self.serving
            .get_or_create(&one("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    pub fn set_residual(&self, gpu: u32, bytes: u64) {
        self.residual
            .get_or_create(&one("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _g = self.state_lock.lock().unwrap();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}
