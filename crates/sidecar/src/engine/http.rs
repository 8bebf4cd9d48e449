//! What every engine adapter does over HTTP: calls that turn transport failures and
//! non-2xx answers into [`EngineError`]s, and the calls every OpenAI-style engine answers
//! alike (model list, metrics, the one-token warm-up).

use std::time::Duration;

use bytes::Bytes;

use super::EngineError;

fn client(api_key: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(v) = api_key.and_then(greenthread_edge::bearer_value) {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .default_headers(headers)
        .no_proxy()
        .build()
        .expect("a plain http client builds")
}

pub struct EngineHttp {
    base: String,
    client: reqwest::Client,
}

impl EngineHttp {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            client: client(None),
        }
    }

    /// Sends the engine's own API key (vLLM/SGLang `--api-key`) on every call.
    pub fn with_api_key(mut self, key: Option<&str>) -> Self {
        if key.is_some() {
            self.client = client(key);
        }
        self
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{path}", self.base))
    }

    /// Sends `req`; a 2xx answer or the error naming `call`.
    pub async fn call(
        &self,
        call: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, EngineError> {
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                EngineError::Timeout(call)
            } else {
                EngineError::Unreachable(format!("{call}: {e}"))
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        Err(EngineError::Status {
            call,
            status,
            body: resp.text().await.unwrap_or_default(),
        })
    }

    pub async fn models(&self) -> Result<Bytes, EngineError> {
        self.call(
            "models",
            self.get("/v1/models").timeout(Duration::from_secs(10)),
        )
        .await?
        .bytes()
        .await
        .map_err(|e| EngineError::Protocol(format!("models: {e}")))
    }

    /// The engine's exposition and its content type.
    pub async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        let resp = self
            .call(
                "metrics",
                self.get("/metrics").timeout(Duration::from_secs(10)),
            )
            .await?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/plain; version=0.0.4")
            .to_string();
        let body = resp
            .bytes()
            .await
            .map_err(|e| EngineError::Protocol(format!("metrics: {e}")))?;
        Ok((content_type, body))
    }

    /// One greedy token of `model`: the proof that the engine serves, not just listens.
    pub async fn warm_up(&self, model: &str) -> Result<(), EngineError> {
        let body = serde_json::json!({"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0});
        self.call(
            "warm-up completion",
            self.post("/v1/completions").json(&body),
        )
        .await
        .map(drop)
    }
}
