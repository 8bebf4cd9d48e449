//! The sidecar's metrics, named exactly as the monitoring page documents them.
//!
//! The families live in [`SidecarFamilies`]; each sidecar writes its series through a
//! [`SidecarMetrics`] handle carrying its own base labels. A standalone sidecar has no
//! base labels (Prometheus adds the pod's); in `local` mode every sidecar's series carry
//! `model` and `pod` and all of them share one exposition.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::state::State;

/// A list rather than an `EncodeLabelSet` struct: a sidecar's base labels depend on the
/// shape it runs in (none standalone, where Prometheus adds the pod's; `model` and `pod`
/// in `local`), and each series adds its own (`state`, `role`, `gpu`, `reason`).
pub type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets from 10 ms to 2 minutes: a warm wake to a cold boot.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Buckets from 100 ms to 10 minutes: a stopped answer waits for another model's turn
/// and its own wake, at worst for its queue deadline.
pub const PAUSE_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

fn pause_histogram() -> Histogram {
    Histogram::new(PAUSE_BUCKETS)
}

greenthread_api::metric_families! {
    /// The metric families of every sidecar in a process.
    pub struct SidecarFamilies {
        /// Held while a one-hot state gauge changes and while encoding, so that a scrape
        /// never sees zero or two states at 1.
        state_lock: Mutex<()> = Mutex::new(()),
        state: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_state", "Current sidecar state; exactly one state is 1"),
        wake_duration: HistogramFamily = Family::new_with_constructor(duration_histogram)
            => ("gthread_sidecar_wake_duration_seconds", "Time to wake a model from sleeping to serving"),
        sleep_duration: HistogramFamily = Family::new_with_constructor(duration_histogram)
            => ("gthread_sidecar_sleep_duration_seconds", "Time to sleep a model (drain + GPU release)"),
        requests: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_requests", "Total requests processed"),
        queue_depth: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_queue_depth", "Current request queue depth"),
        in_flight: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_in_flight_requests", "Number of requests currently being processed"),
        reserved: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_gpu_memory_reserved_bytes", "Reserved GPU memory in bytes per GPU index"),
        serving: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_gpu_memory_serving_bytes", "Measured serving GPU memory in bytes per GPU index"),
        residual: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_gpu_memory_residual_bytes", "Measured GPU memory a sleeping engine still holds, per GPU index"),
        host: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_host_memory_bytes", "Host memory the engine holds for its weights (asleep at level 1, or pinned), per GPU index"),
        demotions: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_sleep_demotions", "Sleeps at level 2 instead of 1 because the node's host memory for sleepers was full"),
        preemptions: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_preemptions", "Preemption events by role"),
        barrier_timeouts: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_preemption_barrier_timeouts", "Drain timeouts during preemption barrier"),
        wake_dedups: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_wake_deduplications", "Times a wake request was coalesced with an in-flight wake"),
        cas_conflicts: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_gpu_cas_conflicts", "Optimistic CAS conflicts on GPU CRD updates"),
        engine_restarts: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_engine_restarts", "Cold restarts of the engine after a failed wake or a crash"),
        wake_failures: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_wake_failures", "Engine wake attempts that failed"),
        resumed: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_generations_resumed", "Streamed answers stopped by a preemption or a lost engine and continued after the next wake"),
        pauses: HistogramFamily = Family::new_with_constructor(pause_histogram)
            => ("gthread_sidecar_generation_pause_seconds", "How long a stopped streamed answer stood still: from its stop to the first event of its continuation"),
        rejections: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_rejections", "Requests refused without reaching the engine, by reason (queue_full, deadline, failed)"),
        adapter_loads: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_adapter_loads", "LoRA adapter loads into the engine that answered their one-token check, per adapter"),
        adapter_failures: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_adapter_load_failures", "LoRA adapter loads that failed (the load call or its one-token check), per adapter"),
        adapter_loaded: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_adapter_loaded", "Whether a LoRA adapter is loaded and checked in the engine now (1) or not (0), per adapter"),
        // On-demand adapters are not labelled by name: callers choose them, without bound.
        adapter_downloads: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_adapter_downloads", "On-demand adapter downloads into the adapter cache, by result (ok, failed)"),
        adapter_download_bytes: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_adapter_download_bytes", "Bytes of on-demand adapters downloaded into the adapter cache"),
        on_demand_loads: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_adapter_on_demand_loads", "On-demand adapter loads into the engine, by result (ok, failed)"),
        on_demand_evictions: Family<Labels, Counter> = Family::default()
            => ("gthread_sidecar_adapter_on_demand_evictions", "On-demand adapters unloaded to make room for another (least recently used first)"),
        on_demand_held: Family<Labels, Gauge> = Family::default()
            => ("gthread_sidecar_adapters_on_demand_held", "On-demand adapters the engine holds now"),
    }
}

impl SidecarFamilies {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        Arc::new(Self::registered(registry))
    }

    /// Encodes `registry` while no state gauge is mid-change.
    pub fn encode(&self, registry: &Registry) -> String {
        let mut out = String::new();
        let _g = self.state_lock.lock().unwrap();
        encode(&mut out, registry).expect("writing to a String cannot fail");
        out
    }
}

/// One sidecar's view of the families, with its series resolved once so that the hot
/// path takes no lock.
pub struct SidecarMetrics {
    families: Arc<SidecarFamilies>,
    /// What happened worth telling beside the numbers (the API server's event stream).
    notices: tokio::sync::broadcast::Sender<Notice>,
    /// The registry this sidecar encodes on `/metrics` when it owns one (standalone).
    registry: Option<Registry>,
    base: Labels,
    pub wake_duration: Histogram,
    pub sleep_duration: Histogram,
    requests_success: Counter,
    requests_error: Counter,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub barrier_timeouts: Counter,
    pub wake_dedups: Counter,
    pub cas_conflicts: Counter,
    pub engine_restarts: Counter,
    pub wake_failures: Counter,
    pub resumed: Counter,
    /// How long stopped answers stood still (the client's pause in the stream).
    pub pauses: Histogram,
    /// Sleeps at level 2 for lack of host memory.
    pub demotions: Counter,
}

impl SidecarMetrics {
    /// A standalone sidecar: its own registry, no base labels.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let families = SidecarFamilies::register(&mut registry);
        Self {
            registry: Some(registry),
            ..Self::with_labels(families, vec![])
        }
    }

    /// A sidecar among others sharing `families`, its series labeled with `base`.
    pub fn with_labels(families: Arc<SidecarFamilies>, base: Labels) -> Self {
        let with = |k: &'static str, v: &str| {
            let mut l = base.clone();
            l.push((k, v.to_string()));
            l
        };
        // One statement per series: `get_or_create` hands out a read guard that lives to
        // the end of its statement, and a second insert into the same family would wait
        // for it forever.
        let f = &families;
        let counter =
            |fam: &Family<Labels, Counter>, l: &Labels| -> Counter { fam.get_or_create(l).clone() };
        let gauge =
            |fam: &Family<Labels, Gauge>, l: &Labels| -> Gauge { fam.get_or_create(l).clone() };
        let hist =
            |fam: &HistogramFamily, l: &Labels| -> Histogram { fam.get_or_create(l).clone() };
        let requests_success = counter(&f.requests, &with("status", "success"));
        let requests_error = counter(&f.requests, &with("status", "error"));
        let m = Self {
            wake_duration: hist(&f.wake_duration, &base),
            sleep_duration: hist(&f.sleep_duration, &base),
            requests_success,
            requests_error,
            queue_depth: gauge(&f.queue_depth, &base),
            in_flight: gauge(&f.in_flight, &base),
            barrier_timeouts: counter(&f.barrier_timeouts, &base),
            wake_dedups: counter(&f.wake_dedups, &base),
            cas_conflicts: counter(&f.cas_conflicts, &base),
            engine_restarts: counter(&f.engine_restarts, &base),
            wake_failures: counter(&f.wake_failures, &base),
            resumed: counter(&f.resumed, &base),
            pauses: hist(&f.pauses, &base),
            demotions: counter(&f.demotions, &base),
            families: families.clone(),
            registry: None,
            base: base.clone(),
            notices: tokio::sync::broadcast::Sender::new(64),
        };
        for role in ["preempted", "preemptor"] {
            let _ = m
                .families
                .preemptions
                .get_or_create(&m.labels("role", role));
        }
        for reason in ["queue_full", "deadline", "failed"] {
            let _ = m
                .families
                .rejections
                .get_or_create(&m.labels("reason", reason));
        }
        m.set_state(State::Sleeping);
        m
    }

    /// Tells subscribers of [`SidecarMetrics::notices`] (none is fine).
    pub fn notice(&self, notice: Notice) {
        let _ = self.notices.send(notice);
    }

    /// What happens from now on, beside the numbers.
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    fn labels(&self, key: &'static str, value: impl Into<String>) -> Labels {
        let mut l = self.base.clone();
        l.push((key, value.into()));
        l
    }

    pub fn set_state(&self, to: State) {
        let _g = self.families.state_lock.lock().unwrap();
        for s in State::ALL {
            self.families
                .state
                .get_or_create(&self.labels("state", s.as_str()))
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

    pub fn rejection(&self, reason: &'static str) {
        self.families
            .rejections
            .get_or_create(&self.labels("reason", reason))
            .inc();
    }

    pub fn preemptions(&self, role: &'static str) -> u64 {
        self.families
            .preemptions
            .get_or_create(&self.labels("role", role))
            .get()
    }

    pub fn preemption(&self, role: &'static str) {
        self.families
            .preemptions
            .get_or_create(&self.labels("role", role))
            .inc();
    }

    /// Adapter `name` loaded and checked (`Ok`), or failed to.
    pub fn adapter_load(&self, name: &str, ok: bool) {
        let l = self.labels("adapter", name);
        // Both series exist from an adapter's first load, so that rates start at 0.
        let (done, other) = if ok {
            (
                &self.families.adapter_loads,
                &self.families.adapter_failures,
            )
        } else {
            (
                &self.families.adapter_failures,
                &self.families.adapter_loads,
            )
        };
        done.get_or_create(&l).inc();
        let _ = other.get_or_create(&l);
        self.set_adapter_loaded(name, ok);
    }

    /// Every on-demand series at 0, from the start, so that rates start there.
    pub fn on_demand_init(&self) {
        for r in ["ok", "failed"] {
            let l = self.labels("result", r);
            let _ = self.families.adapter_downloads.get_or_create(&l);
            let _ = self.families.on_demand_loads.get_or_create(&l);
        }
        let _ = self
            .families
            .adapter_download_bytes
            .get_or_create(&self.base);
        let _ = self.families.on_demand_evictions.get_or_create(&self.base);
        self.on_demand_held(0);
    }

    /// An on-demand adapter's download ended: `Some(bytes)` when it succeeded.
    pub fn adapter_download(&self, bytes: Option<u64>) {
        self.count_result(&self.families.adapter_downloads, bytes.is_some());
        self.families
            .adapter_download_bytes
            .get_or_create(&self.base)
            .inc_by(bytes.unwrap_or(0));
    }

    /// An on-demand adapter's load into the engine ended; `held` adapters now.
    pub fn on_demand_load(&self, ok: bool, held: usize) {
        self.count_result(&self.families.on_demand_loads, ok);
        self.on_demand_held(held);
    }

    /// One more in `family`'s `result="ok"` or `"failed"` series (both exist from
    /// [`SidecarMetrics::on_demand_init`]).
    fn count_result(&self, family: &Family<Labels, Counter>, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        family.get_or_create(&self.labels("result", result)).inc();
    }

    /// An on-demand adapter was unloaded to make room; `held` adapters now.
    pub fn on_demand_eviction(&self, held: usize) {
        self.families
            .on_demand_evictions
            .get_or_create(&self.base)
            .inc();
        self.on_demand_held(held);
    }

    pub fn on_demand_held(&self, held: usize) {
        self.families
            .on_demand_held
            .get_or_create(&self.base)
            .set(held as i64);
    }

    /// Whether adapter `name` is loaded in the engine now.
    pub fn set_adapter_loaded(&self, name: &str, loaded: bool) {
        self.families
            .adapter_loaded
            .get_or_create(&self.labels("adapter", name))
            .set(i64::from(loaded));
    }

    pub fn set_reserved(&self, gpu: u32, bytes: u64) {
        self.families
            .reserved
            .get_or_create(&self.labels("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    pub fn set_serving(&self, gpu: u32, bytes: u64) {
        self.families
            .serving
            .get_or_create(&self.labels("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    pub fn set_residual(&self, gpu: u32, bytes: u64) {
        self.families
            .residual
            .get_or_create(&self.labels("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    pub fn set_host(&self, gpu: u32, bytes: u64) {
        self.families
            .host
            .get_or_create(&self.labels("gpu", gpu.to_string()))
            .set(bytes as i64);
    }

    /// This sidecar's own exposition (standalone); empty when it shares a registry.
    pub fn encode(&self) -> String {
        match &self.registry {
            Some(r) => self.families.encode(r),
            None => String::new(),
        }
    }
}

/// What a sidecar tells beside its numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// This model named `victim` (a pod) on `gpu` to make room for its wake.
    Preempting { victim: String, gpu: String },
    /// The engine was started again (after a failed wake, a crash, a wedge).
    EngineRestarted { reason: String },
    /// The model slept at level 2: its weights did not fit in host memory.
    Demoted { reason: String },
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}
