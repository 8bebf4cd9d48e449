use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};

/// `key`: the API key's name (`none` when the API is open).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelCode {
    key: String,
    model: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    key: String,
    model: String,
    /// `prompt` or `completion`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    model: String,
    /// `completed`, `failed` or `deferred`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

/// A Model by namespace: `model_namespace`, since Prometheus sets `namespace` to the
/// API server's own on every series it scrapes from it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespacedModel {
    model_namespace: String,
    model: String,
}

fn latency() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

greenthread_api::metric_families! {
    /// The API server's own request counts (by model and status code) and latency.
    pub struct ApiMetrics {
        requests: Family<ModelCode, Counter> = Family::default()
            => ("gthread_apiserver_requests", "API server requests by API key, model and status code"),
        tokens: Family<TokenLabels, Counter> = Family::default()
            => ("gthread_apiserver_tokens", "Prompt and completion tokens by API key and model, as the engines report them"),
        duration: Family<ModelLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(latency)
            => ("gthread_apiserver_request_duration_seconds", "API server request latency to the response headers, by model"),
        batch_requests: Family<BatchLabels, Counter> = Family::default()
            => ("gthread_apiserver_batch_requests", "Batch API requests sent to a Model, by what came of them: completed (2xx, in the output file), failed (in the error file), deferred (refused for now: the capacity was not idle or the queue full; sent again later)"),
        in_flight: Family<NamespacedModel, Gauge> = Family::default()
            => ("gthread_apiserver_requests_in_flight", "Requests sent to a Model's replicas whose answers have not ended: the load an autoscaler (HPA, KEDA) scales replicas on"),
    }
}

impl ApiMetrics {
    pub fn observe(&self, key: &str, model: &str, code: u16, seconds: f64) {
        self.requests
            .get_or_create(&ModelCode {
                key: key.to_string(),
                model: model.to_string(),
                code: code.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&ModelLabel {
                model: model.to_string(),
            })
            .observe(seconds);
    }

    /// One attempt of a batch request, and what came of it.
    pub fn batch_request(&self, model: &str, result: &'static str) {
        self.batch_requests
            .get_or_create(&BatchLabels {
                model: model.to_string(),
                result,
            })
            .inc();
    }

    /// Tokens one answer used.
    pub fn tokens(&self, key: &str, model: &str, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.tokens
                .get_or_create(&TokenLabels {
                    key: key.to_string(),
                    model: model.to_string(),
                    kind,
                })
                .inc_by(n);
        }
    }

    /// Each Model's requests in flight now (set at scrape time; Models gone are dropped).
    pub fn set_in_flight<'a>(&self, models: impl Iterator<Item = (&'a str, &'a str, usize)>) {
        self.in_flight.clear();
        for (namespace, model, n) in models {
            self.in_flight
                .get_or_create(&NamespacedModel {
                    model_namespace: namespace.to_string(),
                    model: model.to_string(),
                })
                .set(n as i64);
        }
    }
}
