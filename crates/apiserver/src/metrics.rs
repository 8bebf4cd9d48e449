use prometheus_client::{
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

fn latency() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

/// The API server's own request counts (by model and status code) and latency.
pub struct ApiMetrics {
    requests: Family<Labels, Counter>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
        };
        registry.register(
            "gthread_apiserver_requests",
            "API server requests by model and status code",
            m.requests.clone(),
        );
        registry.register(
            "gthread_apiserver_request_duration_seconds",
            "API server request latency to the response headers, by model",
            m.duration.clone(),
        );
        m
    }

    pub fn observe(&self, model: &str, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&vec![
                ("model", model.to_string()),
                ("code", code.to_string()),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("model", model.to_string())])
            .observe(seconds);
    }
}
