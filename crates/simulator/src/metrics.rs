//! The engine's own metrics, under vLLM's names so that dashboards and the sidecar's
//! `/metrics/engine` re-export work the same against the simulator and real vLLM.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

pub const SLEEP_STATES: [&str; 3] = ["awake", "weights_offloaded", "discard_all"];

pub struct Metrics {
    registry: Registry,
    model: String,
    pub request_success: Family<Labels, Counter>,
    pub request_duration: Histogram,
    pub e2e_latency: Histogram,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub running: Gauge,
    pub waiting: Gauge,
    pub cache_usage: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub sleep_state: Family<Labels, Gauge>,
    /// The simulator's own counters (not vLLM's), for tests and benchmarks.
    pub wake_calls: Counter,
    /// `/reset_prefix_cache` calls (after a level-2 wake the old cache is invalid).
    pub prefix_cache_resets: Counter,
    pub sleep_calls: Counter,
    /// SGLang's memory-saver calls (`/release_memory_occupation`, `/resume_…`).
    pub release_calls: Counter,
    pub resume_calls: Counter,
    pub inference_requests: Counter,
    /// LoRA adapters loaded now.
    pub adapters: Gauge,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
        20.0, 40.0, 80.0, 160.0,
    ]
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        let mut registry = Registry::default();
        let labels: Labels = vec![("model_name", model.to_string())];
        let m = Self {
            registry: Registry::default(),
            model: model.to_string(),
            request_success: Family::default(),
            request_duration: Histogram::new(latency_buckets()),
            e2e_latency: Histogram::new(latency_buckets()),
            ttft: Histogram::new(latency_buckets()),
            tpot: Histogram::new(latency_buckets()),
            running: Gauge::default(),
            waiting: Gauge::default(),
            cache_usage: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            sleep_state: Family::default(),
            wake_calls: Counter::default(),
            prefix_cache_resets: Counter::default(),
            sleep_calls: Counter::default(),
            release_calls: Counter::default(),
            resume_calls: Counter::default(),
            inference_requests: Counter::default(),
            adapters: Gauge::default(),
        };
        registry.register(
            "vllm:request_success",
            "Successful inference requests",
            m.request_success.clone(),
        );
        let sub = registry
            .sub_registry_with_labels(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        sub.register(
            "vllm:request_duration_seconds",
            "End-to-end request duration",
            m.request_duration.clone(),
        );
        sub.register(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency",
            m.e2e_latency.clone(),
        );
        sub.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            m.ttft.clone(),
        );
        sub.register(
            "vllm:time_per_output_token_seconds",
            "Inter-token latency",
            m.tpot.clone(),
        );
        sub.register(
            "vllm:num_requests_running",
            "Requests running",
            m.running.clone(),
        );
        sub.register(
            "vllm:num_requests_waiting",
            "Requests waiting",
            m.waiting.clone(),
        );
        sub.register(
            "vllm:gpu_cache_usage_perc",
            "KV cache usage (1 = 100%)",
            m.cache_usage.clone(),
        );
        sub.register(
            "vllm:prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        sub.register(
            "vllm:generation_tokens",
            "Generation tokens produced",
            m.generation_tokens.clone(),
        );
        registry.register(
            "vllm:engine_sleep_state",
            "Engine sleep state (one-hot)",
            m.sleep_state.clone(),
        );
        registry.register(
            "greenthread_sim_release_memory_calls",
            "SGLang release_memory_occupation calls received",
            m.release_calls.clone(),
        );
        registry.register(
            "greenthread_sim_resume_memory_calls",
            "SGLang resume_memory_occupation calls received",
            m.resume_calls.clone(),
        );
        registry.register(
            "greenthread_sim_wake_calls",
            "wake_up calls received",
            m.wake_calls.clone(),
        );
        registry.register(
            "greenthread_sim_prefix_cache_resets",
            "Prefix cache resets asked of the simulator",
            m.prefix_cache_resets.clone(),
        );
        registry.register(
            "greenthread_sim_sleep_calls",
            "sleep calls received",
            m.sleep_calls.clone(),
        );
        registry.register(
            "greenthread_sim_lora_adapters",
            "LoRA adapters loaded now",
            m.adapters.clone(),
        );
        registry.register(
            "greenthread_sim_inference_requests",
            "Inference requests received",
            m.inference_requests.clone(),
        );
        for s in SLEEP_STATES {
            m.sleep_state
                .get_or_create(&m.sleep_labels(s))
                .set(i64::from(s == "awake"));
        }
        for reason in ["length", "stop"] {
            let _ = m.request_success.get_or_create(&vec![
                ("finished_reason", reason.into()),
                ("model_name", m.model.clone()),
            ]);
        }
        Self { registry, ..m }
    }

    fn sleep_labels(&self, state: &'static str) -> Labels {
        vec![
            ("engine", "0".into()),
            ("model_name", self.model.clone()),
            ("sleep_state", state.into()),
        ]
    }

    pub fn set_sleep_state(&self, state: &'static str) {
        for s in SLEEP_STATES {
            self.sleep_state
                .get_or_create(&self.sleep_labels(s))
                .set(i64::from(s == state));
        }
    }

    pub fn success(&self, finished_reason: &'static str) {
        self.request_success
            .get_or_create(&vec![
                ("finished_reason", finished_reason.into()),
                ("model_name", self.model.clone()),
            ])
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
