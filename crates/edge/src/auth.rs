//! Bearer tokens as layers on sub-routers, compared in constant time.

use std::sync::Arc;

use axum::{
    Router,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};

use crate::ApiError;

/// `a == b` in time that depends only on the lengths, not on where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    // Keep the loop from being cut short by the optimizer.
    std::hint::black_box(diff) == 0
}

/// The first of `candidates` whose secret (as `secret` gives it) is `given`. Every
/// candidate is compared, in constant time, so the time taken does not say which one
/// came close.
pub fn ct_find<'a, T>(
    candidates: impl IntoIterator<Item = &'a T>,
    given: &[u8],
    secret: impl Fn(&T) -> &[u8],
) -> Option<&'a T> {
    candidates.into_iter().fold(None, |found, c| {
        let hit = ct_eq(secret(c), given);
        if hit && found.is_none() {
            Some(c)
        } else {
            found
        }
    })
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The credential a request presents: `Authorization: Bearer <token>`, or, as Anthropic's
/// SDKs send it, `x-api-key: <token>`.
pub fn credential(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).or_else(|| {
        headers
            .get("x-api-key")?
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

/// `Bearer <token>` as a header value marked sensitive (kept out of debug output);
/// `None` when the token has characters a header cannot hold.
pub fn bearer_value(token: &str) -> Option<http::HeaderValue> {
    let mut v = http::HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Who may pass: anyone, or a holder of one of these tokens (each with a name, for the
/// audit log).
#[derive(Clone)]
pub enum Gate {
    Open,
    Tokens(Arc<Vec<(String, String)>>),
}

/// Who passed a gate: the name of the token they held (`None`: the gate is open). Put on
/// the requests a [`require`]d router lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder(pub Option<String>);

impl Gate {
    /// Open when `tokens` is empty; each token named `token`.
    pub fn tokens(tokens: impl IntoIterator<Item = String>) -> Self {
        Self::named(tokens.into_iter().map(|t| ("token".to_string(), t)))
    }

    /// Open when `tokens` (name, token) is empty.
    pub fn named(tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        let t: Vec<(String, String)> = tokens.into_iter().filter(|(_, t)| !t.is_empty()).collect();
        if t.is_empty() {
            Self::Open
        } else {
            Self::Tokens(Arc::new(t))
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }

    /// Whether `headers` carry a token this gate accepts.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        self.holder(headers).is_some()
    }

    /// Who `headers` show to be, if this gate lets them through. Every token is
    /// compared, so the time taken does not say which one came close.
    pub fn holder(&self, headers: &HeaderMap) -> Option<Holder> {
        match self {
            Self::Open => Some(Holder(None)),
            Self::Tokens(tokens) => {
                let given = credential(headers)?;
                ct_find(tokens.iter(), given.as_bytes(), |(_, t)| t.as_bytes())
                    .map(|(name, _)| Holder(Some(name.clone())))
            }
        }
    }
}

/// `router` behind `gate`: a request without an accepted bearer token gets 401, saying
/// it needs `what` (e.g. "a valid API key"). Applied as a route layer, so unknown paths
/// still answer 404.
pub fn require<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    gate: Gate,
    what: &'static str,
) -> Router<S> {
    if gate.is_open() {
        return router;
    }
    router.route_layer(middleware::from_fn(move |mut req: Request, next: Next| {
        let gate = gate.clone();
        async move {
            match gate.holder(req.headers()) {
                Some(holder) => {
                    req.extensions_mut().insert(holder);
                    next.run(req).await
                }
                None => unauthorized(what),
            }
        }
    }))
}

/// 401 saying the request needs `what`, with `WWW-Authenticate: Bearer`.
pub fn unauthorized(what: &str) -> Response {
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        format!("this endpoint needs {what} as `Authorization: Bearer …` (or `x-api-key: …`)"),
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality_is_equality() {
        for (a, b, eq) in [
            ("", "", true),
            ("k1", "k1", true),
            ("k1", "k2", false),
            ("k1", "k1x", false),
            ("k1x", "k1", false),
            ("", "k", false),
            ("k\u{0}", "k", false),
        ] {
            assert_eq!(ct_eq(a.as_bytes(), b.as_bytes()), eq, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_never_empty() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer k1")), Some("k1"));
        assert_eq!(bearer(&h("bearer  k1 ")), Some("k1"));
        assert_eq!(bearer(&h("Basic k1")), None);
        assert_eq!(bearer(&h("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
        let gate = Gate::tokens(["a".to_string(), "bb".to_string()]);
        assert!(gate.allows(&h("Bearer bb")));
        assert!(!gate.allows(&h("Bearer b")));
        assert!(!gate.allows(&HeaderMap::new()));
        assert!(Gate::tokens([String::new()]).is_open());
        let v = bearer_value("k1").unwrap();
        assert_eq!(v, "Bearer k1");
        assert!(v.is_sensitive());
        assert!(bearer_value("k\n1").is_none());
        // Anthropic's header is a credential too, Bearer first when both are given.
        let mut m = HeaderMap::new();
        m.insert("x-api-key", " bb ".parse().unwrap());
        assert_eq!(credential(&m), Some("bb"));
        assert!(gate.allows(&m));
        m.insert(header::AUTHORIZATION, "Bearer a".parse().unwrap());
        assert_eq!(credential(&m), Some("a"));
        m.insert("x-api-key", " ".parse().unwrap());
        m.remove(header::AUTHORIZATION);
        assert_eq!(credential(&m), None);
    }
}
