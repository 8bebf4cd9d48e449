//! What every engine adapter does over HTTP: calls that turn transport failures and
//! non-2xx answers into [`EngineError`]s, and the calls every OpenAI-style engine answers
//! alike (model list, metrics, the one-token warm-up). Calls go through a [`Connector`]:
//! TCP to the engine's loopback port, or an in-memory pipe in a simulated fleet; a few
//! connections are kept open between calls, as the wake path makes several in a row.

use std::time::Duration;

use super::EngineError;
use crate::proxy::{ConnectError, Pool};
use bytes::Bytes;
use greenthread_edge::Connector;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};

/// Longest wait for a connection to the engine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One call to the engine, built like a request: method, path, optional JSON body and
/// deadline (none: the caller bounds it, as the wake does).
#[derive(Debug, Clone)]
pub struct Call {
    method: Method,
    path: String,
    body: Option<Bytes>,
    timeout: Option<Duration>,
}

impl Call {
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    pub fn json(mut self, v: &serde_json::Value) -> Self {
        self.body = Some(Bytes::from(v.to_string()));
        self
    }
}

/// A 2xx answer, read to its end.
#[derive(Debug)]
pub struct Answer {
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self, call: &str) -> Result<serde_json::Value, EngineError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| EngineError::Protocol(format!("{call}: {e}")))
    }
}

/// Idle control connections kept: probes, sleep and wake come one or two at a time.
const MAX_IDLE: usize = 4;

pub struct EngineHttp {
    /// `host:port`, sent as `Host`.
    authority: String,
    pool: Pool,
    authorization: Option<HeaderValue>,
}

impl EngineHttp {
    /// The engine at `base` (`http://host:port`), over TCP.
    pub fn new(base: &str) -> Self {
        let authority = base
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Self {
            pool: Pool::new(Connector::Tcp(authority.clone()), MAX_IDLE),
            authority,
            authorization: None,
        }
    }

    /// Reaches the engine through `connector` instead.
    pub fn with_connector(mut self, connector: Connector) -> Self {
        self.pool = Pool::new(connector, MAX_IDLE);
        self
    }

    /// Sends the engine's own API key (vLLM/SGLang `--api-key`) on every call.
    pub fn with_api_key(mut self, key: Option<&str>) -> Self {
        self.authorization = key.and_then(greenthread_edge::bearer_value);
        self
    }

    pub fn get(&self, path: &str) -> Call {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> Call {
        self.request(Method::POST, path)
    }

    fn request(&self, method: Method, path: &str) -> Call {
        Call {
            method,
            path: path.to_string(),
            body: None,
            timeout: None,
        }
    }

    /// Sends `req`; a 2xx answer or the error naming `call`.
    pub async fn call(&self, call: &'static str, req: Call) -> Result<Answer, EngineError> {
        let exchange = self.exchange(call, &req);
        let (status, answer) = match req.timeout {
            Some(d) => tokio::time::timeout(d, exchange)
                .await
                .map_err(|_| EngineError::Timeout(call))??,
            None => exchange.await?,
        };
        if status.is_success() {
            return Ok(answer);
        }
        Err(EngineError::Status {
            call,
            status: status.as_u16(),
            body: String::from_utf8_lossy(&answer.body).into_owned(),
        })
    }

    async fn exchange(
        &self,
        call: &'static str,
        req: &Call,
    ) -> Result<(StatusCode, Answer), EngineError> {
        let unreachable =
            |e: &dyn std::fmt::Display| EngineError::Unreachable(format!("{call}: {e}"));
        let mut sender = self.pool.take(CONNECT_TIMEOUT).await.map_err(|e| match e {
            ConnectError::Timeout { .. } => EngineError::Timeout(call),
            ConnectError::Failed { .. } => unreachable(&e),
        })?;
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(&req.path)
            .header(header::HOST, &self.authority);
        if let Some(auth) = &self.authorization {
            builder = builder.header(header::AUTHORIZATION, auth.clone());
        }
        if req.body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(req.body.clone().unwrap_or_default()))
            .map_err(|e| EngineError::Protocol(format!("{call}: {e}")))?;
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(&e))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| EngineError::Protocol(format!("{call}: {e}")))?
            .to_bytes();
        // Answered to the end: the connection serves the next call. (A call cut short by
        // its deadline drops it instead, and the engine sees the connection close.)
        self.pool.give_back(sender);
        Ok((
            parts.status,
            Answer {
                headers: parts.headers,
                body,
            },
        ))
    }

    pub async fn models(&self) -> Result<Bytes, EngineError> {
        Ok(self
            .call(
                "models",
                self.get("/v1/models").timeout(Duration::from_secs(10)),
            )
            .await?
            .body)
    }

    /// The engine's exposition and its content type.
    pub async fn metrics(&self) -> Result<(String, Bytes), EngineError> {
        let answer = self
            .call(
                "metrics",
                self.get("/metrics").timeout(Duration::from_secs(10)),
            )
            .await?;
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/plain; version=0.0.4")
            .to_string();
        Ok((content_type, answer.body))
    }

    /// One greedy token of `model`: the proof that the engine serves, not just listens.
    pub async fn warm_up(&self, model: &str) -> Result<(), EngineError> {
        self.complete(&super::AdapterCall::Model(model.to_string()).warm_up_body())
            .await
    }

    /// The completion `body` (a one-token warm-up), answered with a 2xx.
    pub async fn complete(&self, body: &serde_json::Value) -> Result<(), EngineError> {
        self.call(
            "warm-up completion",
            self.post("/v1/completions").json(body),
        )
        .await
        .map(drop)
    }
}
