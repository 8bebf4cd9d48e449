use http::HeaderMap;

/// Bearer keys for the OpenAI API and a separate token for the admin API. With no keys
/// configured, that API is open.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub api_keys: Vec<String>,
    pub admin_token: Option<String>,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl Auth {
    /// The admin token is accepted on the OpenAI API too.
    pub fn api_allowed(&self, headers: &HeaderMap) -> bool {
        if self.api_keys.is_empty() {
            return true;
        }
        bearer(headers).is_some_and(|k| {
            self.api_keys.iter().any(|a| a == k) || self.admin_token.as_deref() == Some(k)
        })
    }

    pub fn admin_allowed(&self, headers: &HeaderMap) -> bool {
        match &self.admin_token {
            None => true,
            Some(t) => bearer(headers) == Some(t.as_str()),
        }
    }
}
