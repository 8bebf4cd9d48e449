//! Who is calling, what they may use, and how fast: the API keys of the OpenAI API with
//! their model globs and rate limits ([`greenthread_api::keys`]), identified in constant
//! time, and a token bucket per limit.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{extract::Request, middleware::Next, response::Response};
use greenthread_api::keys::ApiKey;
use greenthread_edge::{ApiError, credential, ct_find};
use http::StatusCode;
use tokio::time::Instant;

/// A key's limits and what is left of them.
pub struct Caller {
    pub key: ApiKey,
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

/// What the layer puts on every request it lets in: who sent it (`None`: the API is
/// open, no keys configured).
#[derive(Clone)]
pub struct Identity(pub Option<Arc<Caller>>);

impl Identity {
    /// Whether this caller may use `route` (by its name, `namespace/name` or engine id);
    /// anyone may when the API is open.
    pub fn may_use(&self, route: &crate::ModelRoute) -> bool {
        self.0.as_ref().is_none_or(|c| {
            c.key
                .allows(&[&route.name, &route.key(), &route.model_name])
        })
    }

    /// The `key` label of this caller's requests and tokens.
    pub fn label(&self) -> &str {
        self.0.as_ref().map_or("none", |c| c.key.name.as_str())
    }
}

impl Caller {
    pub fn new(key: ApiKey) -> Self {
        let per_minute = |n: u64| Mutex::new(Bucket::new(n as f64, n as f64 / 60.0));
        Self {
            requests: key
                .rate_limit
                .requests_per_minute
                .map(|n| per_minute(u64::from(n))),
            tokens: key.rate_limit.tokens_per_minute.map(per_minute),
            key,
        }
    }

    /// Takes one request from the request budget, if the token budget is not spent
    /// either; else how long until it would be.
    pub fn admit(&self, now: Instant) -> Result<(), Duration> {
        if let Some(t) = &self.tokens {
            t.lock().unwrap().check(now, 1.0)?;
        }
        if let Some(r) = &self.requests {
            r.lock().unwrap().take(now, 1.0)?;
        }
        Ok(())
    }

    /// Whether the token budget is not spent (taking nothing); else how long until it
    /// is not. A batch's lines wait on it.
    pub fn tokens_left(&self, now: Instant) -> Result<(), Duration> {
        match &self.tokens {
            Some(t) => t.lock().unwrap().check(now, 1.0),
            None => Ok(()),
        }
    }

    /// Charges the tokens an answer used (known only once it has been given).
    pub fn spend_tokens(&self, now: Instant, n: u64) {
        if let Some(t) = &self.tokens {
            t.lock().unwrap().spend(now, n as f64);
        }
    }
}

/// A token bucket: `capacity` at most, refilled at `rate` a second. Token budgets go
/// below zero (an answer's size is known after it is given); the caller then waits
/// until the bucket is positive again.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    rate: f64,
    level: f64,
    at: Option<Instant>,
}

impl Bucket {
    pub fn new(capacity: f64, rate: f64) -> Self {
        Self {
            capacity,
            rate,
            level: capacity,
            at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let gained = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.level = (self.level + gained).min(self.capacity);
        }
        self.at = Some(now);
    }

    fn wait_for(&self, need: f64) -> Duration {
        // Whole seconds, at least one: what `Retry-After` can say.
        Duration::from_secs(((need - self.level) / self.rate).ceil().max(1.0) as u64)
    }

    /// Whether `need` is there, taking nothing.
    pub fn check(&mut self, now: Instant, need: f64) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= need.min(self.capacity) {
            Ok(())
        } else {
            Err(self.wait_for(need.min(self.capacity)))
        }
    }

    /// Takes `n`, or says how long until there is that much.
    pub fn take(&mut self, now: Instant, n: f64) -> Result<(), Duration> {
        self.check(now, n)?;
        self.level -= n;
        Ok(())
    }

    /// Takes `n` whatever is left (the level may go below zero).
    pub fn spend(&mut self, now: Instant, n: f64) {
        self.refill(now);
        self.level -= n;
    }
}

/// The OpenAI API's keys: those of the configuration (the admin token among them, as
/// `admin`, with every model and no limits), and those issued through the admin API at
/// run time ([`crate::issued`]), kept only as hashes. None at all: the API is open.
#[derive(Clone, Default)]
pub struct Keys(Arc<KeySet>);

#[derive(Default)]
struct KeySet {
    fixed: Vec<Arc<Caller>>,
    issued: crate::issued::Issued,
}

impl Keys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        Self::with_issued(keys, crate::issued::Issued::default())
    }

    /// The configuration's `keys`, and the keys issued at run time in `issued`.
    pub fn with_issued(keys: Vec<ApiKey>, issued: crate::issued::Issued) -> Self {
        Self(Arc::new(KeySet {
            fixed: keys.into_iter().map(|k| Arc::new(Caller::new(k))).collect(),
            issued,
        }))
    }

    /// Open: no key configured, none issued ever (revoking the last issued key keeps
    /// the API closed).
    pub fn is_open(&self) -> bool {
        self.0.fixed.is_empty() && !self.0.issued.closed()
    }

    /// The keys issued at run time.
    pub fn issued(&self) -> &crate::issued::Issued {
        &self.0.issued
    }

    /// The configuration's keys (never deleted through the API).
    pub fn fixed(&self) -> impl Iterator<Item = &ApiKey> {
        self.0.fixed.iter().map(|c| &c.key)
    }

    /// The caller whose key is named `name` (configured or issued): whose limits and
    /// token count a batch's requests spend, long after the request that made it.
    pub fn by_name(&self, name: &str) -> Option<Arc<Caller>> {
        self.0
            .fixed
            .iter()
            .find(|c| c.key.name == name)
            .cloned()
            .or_else(|| self.0.issued.by_name(name))
    }

    /// The caller `headers` name. Every key is compared, so the time taken does not say
    /// which one came close.
    pub fn identify(&self, headers: &http::HeaderMap) -> Option<Arc<Caller>> {
        let given = credential(headers)?;
        let fixed = ct_find(&self.0.fixed, given.as_bytes(), |c| c.key.secret.as_bytes());
        // Both sets are always searched, whichever holds the key.
        let issued = self.0.issued.identify(given);
        fixed.cloned().or(issued)
    }

    /// The layer in front of the OpenAI API: 401 without a known key; otherwise the
    /// request goes on with its [`Identity`].
    pub async fn layer(self, mut req: Request, next: Next) -> Response {
        if self.is_open() {
            req.extensions_mut().insert(Identity(None));
            return next.run(req).await;
        }
        match self.identify(req.headers()) {
            Some(caller) => {
                req.extensions_mut().insert(Identity(Some(caller)));
                next.run(req).await
            }
            None => greenthread_edge::unauthorized("a valid API key"),
        }
    }
}

/// The API server's keys from its Secret: a YAML list as `apiKeys` takes (strings and
/// objects), or keys one per line or comma-separated. Errors name `source` and the
/// entry, never a key.
pub fn parse_keys(text: Option<&str>, source: &str) -> anyhow::Result<Vec<ApiKey>> {
    use greenthread_api::keys::{ApiKeySpec, resolve_keys};
    let text = text.unwrap_or_default().trim();
    let specs: Vec<ApiKeySpec> = if text.starts_with('-') || text.starts_with('[') {
        serde_saphyr::from_str(text).map_err(|e| {
            // The parser's message may quote the text it stopped at: a key.
            let at = e
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            anyhow::anyhow!("{source}: not a list of keys ({at})")
        })?
    } else {
        text.split([',', '\n'])
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| ApiKeySpec::Plain(k.to_string()))
            .collect()
    };
    resolve_keys(&specs, source, |p| std::fs::read_to_string(p)).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", lines.join("; "))
    })
}

/// 403 for a model the key may not use: names the key, never shows it.
pub fn forbidden(key: &str, model: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "permission_denied",
        format!(
            "the API key {key:?} may not use model {}",
            greenthread_edge::echo(model)
        ),
    )
}

/// 429 with `Retry-After` for a key past one of its limits.
pub fn limited(key: &str, after: Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
        format!(
            "the API key {key:?} is over its rate limit; retry in {} s",
            after.as_secs()
        ),
    )
    .with_retry_after(u32::try_from(after.as_secs()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use greenthread_api::keys::RateLimitSpec;

    fn key(name: &str, secret: &str, rpm: Option<u32>, tpm: Option<u64>) -> ApiKey {
        ApiKey {
            name: name.into(),
            secret: secret.into(),
            models: vec![],
            rate_limit: RateLimitSpec {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            },
            priority: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_refill_evenly() {
        let c = Caller::new(key("a", "s", Some(2), None));
        let t0 = Instant::now();
        assert_eq!(c.admit(t0), Ok(()));
        assert_eq!(c.admit(t0), Ok(()));
        // Two a minute: the next in 30 s.
        assert_eq!(c.admit(t0), Err(Duration::from_secs(30)));
        assert_eq!(
            c.admit(t0 + Duration::from_secs(29)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(c.admit(t0 + Duration::from_secs(30)), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_charged_after_the_answer_and_block_until_repaid() {
        let c = Caller::new(key("a", "s", None, Some(600)));
        let t0 = Instant::now();
        assert_eq!(c.admit(t0), Ok(()));
        // An answer of 900 tokens: 300 in debt, at 10 a second.
        c.spend_tokens(t0, 900);
        assert_eq!(c.admit(t0), Err(Duration::from_secs(31)));
        assert_eq!(c.admit(t0 + Duration::from_secs(31)), Ok(()));
    }

    #[test]
    fn the_secret_holds_plain_keys_or_the_yaml_list() {
        let names = |text: &str| -> Vec<String> {
            parse_keys(Some(text), "GREENTHREAD_API_KEYS")
                .unwrap()
                .into_iter()
                .map(|k| k.name)
                .collect()
        };
        assert_eq!(names("k1, k2\nk3\n"), ["key-1", "key-2", "key-3"]);
        assert_eq!(
            names("- name: team-a\n  key: sk-a\n  models: [\"team-a/*\"]\n- sk-plain\n"),
            ["team-a", "key-2"]
        );
        assert!(parse_keys(None, "x").unwrap().is_empty());
        // Errors name the source and the entry, never a key.
        for bad in [
            "- name: a\n  key: sk-secret\n  modls: []\n",
            "- {name: a, key: sk-secret",
        ] {
            let e = parse_keys(Some(bad), "GREENTHREAD_API_KEYS")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("GREENTHREAD_API_KEYS"), "{e}");
            assert!(!e.contains("sk-secret"), "{e}");
        }
        let e = parse_keys(
            Some("- name: a\n  key: sk-secret\n- name: a\n  key: sk-other\n"),
            "S",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("S[1].name") && !e.contains("sk-"), "{e}");
    }

    #[test]
    fn the_caller_is_found_by_bearer_or_x_api_key() {
        let keys = Keys::new(vec![key("a", "sa", None, None), key("b", "sb", None, None)]);
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "sb".parse().unwrap());
        assert_eq!(keys.identify(&h).unwrap().key.name, "b");
        h.insert(http::header::AUTHORIZATION, "Bearer sa".parse().unwrap());
        assert_eq!(keys.identify(&h).unwrap().key.name, "a");
        h.insert(http::header::AUTHORIZATION, "Bearer sc".parse().unwrap());
        assert!(keys.identify(&h).is_none());
        assert!(Keys::default().is_open());
    }
}
