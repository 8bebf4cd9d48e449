//! Who may use which part of the API server: the OpenAI API (API keys, or the admin
//! token), the admin API (the admin token), metrics (an optional token).

use std::net::SocketAddr;

use greenthread_api::keys::ApiKey;
use greenthread_edge::Gate;

use crate::keys::Keys;

#[derive(Clone)]
pub struct Auth {
    /// The OpenAI API's keys (empty: open).
    pub keys: Keys,
    pub admin: Gate,
    pub metrics: Gate,
    /// Whether keys may be issued through the admin API: it has a token, or was
    /// declared open on purpose.
    pub may_issue: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "API keys are set but no admin token: the admin API (sleep, wake, GPU records, events) would be open to anyone who can reach the port. Set an admin token ({admin}), or declare the admin API open on purpose ({open})"
    )]
    AdminOpenByAccident {
        admin: &'static str,
        open: &'static str,
    },
    #[error(
        "listening on {listen}, which is not a loopback address, with no API keys: anyone who can reach it could use every model. Set API keys ({keys}), listen on 127.0.0.1, or pass --allow-unauthenticated"
    )]
    ExposedWithoutKeys {
        listen: SocketAddr,
        keys: &'static str,
    },
}

/// Where each setting comes from, for error messages (a config file's field or a flag).
#[derive(Debug, Clone, Copy)]
pub struct AuthSources {
    pub keys: &'static str,
    pub admin: &'static str,
    pub admin_open: &'static str,
}

impl Auth {
    /// Everything open (tests, and a loopback-only server with no keys).
    pub fn open() -> Self {
        Self {
            keys: Keys::default(),
            admin: Gate::Open,
            metrics: Gate::Open,
            may_issue: false,
        }
    }

    /// These gates, with the keys issued at run time in `issued` beside the
    /// configuration's. Kept keys with no admin token are refused as configured ones are.
    pub fn with_issued(
        self,
        issued: crate::issued::Issued,
        sources: AuthSources,
    ) -> Result<Self, AuthError> {
        if issued.closed() && !self.may_issue {
            return Err(AuthError::AdminOpenByAccident {
                admin: sources.admin,
                open: sources.admin_open,
            });
        }
        let fixed: Vec<ApiKey> = self.keys.fixed().cloned().collect();
        Ok(Self {
            keys: Keys::with_issued(fixed, issued),
            ..self
        })
    }

    /// The gates for these secrets. API keys with no admin token are refused unless
    /// `admin_open` says the admin API is meant to be open.
    pub fn new(
        api_keys: Vec<ApiKey>,
        admin_token: Option<String>,
        metrics_token: Option<String>,
        admin_open: bool,
        sources: AuthSources,
    ) -> Result<Self, AuthError> {
        let admins = admin_token
            .map(|t| ("admin".to_string(), t))
            .into_iter()
            .collect();
        Self::with_admins(api_keys, admins, metrics_token, admin_open, sources)
    }

    /// [`Auth::new`] with several admin tokens, each with a name (who made a change, in
    /// the audit log and the events).
    pub fn with_admins(
        api_keys: Vec<ApiKey>,
        admins: Vec<(String, String)>,
        metrics_token: Option<String>,
        admin_open: bool,
        sources: AuthSources,
    ) -> Result<Self, AuthError> {
        let admins: Vec<(String, String)> =
            admins.into_iter().filter(|(_, t)| !t.is_empty()).collect();
        let mut api_keys: Vec<ApiKey> = api_keys
            .into_iter()
            .filter(|k| !k.secret.is_empty())
            .collect();
        if !api_keys.is_empty() && admins.is_empty() && !admin_open {
            return Err(AuthError::AdminOpenByAccident {
                admin: sources.admin,
                open: sources.admin_open,
            });
        }
        // An admin token is accepted on the OpenAI API too, as a key of its name.
        if !api_keys.is_empty() {
            for (name, t) in &admins {
                api_keys.push(ApiKey::plain(name.clone(), t.clone()));
            }
        }
        Ok(Self {
            keys: Keys::new(api_keys),
            may_issue: !admins.is_empty() || admin_open,
            admin: Gate::named(admins),
            metrics: Gate::tokens(metrics_token),
        })
    }

    /// Refuses a non-loopback listen address when the OpenAI API is open, unless told.
    pub fn check_exposure(
        &self,
        listen: SocketAddr,
        allow_unauthenticated: bool,
        sources: AuthSources,
    ) -> Result<(), AuthError> {
        if self.keys.is_open() && !listen.ip().is_loopback() && !allow_unauthenticated {
            return Err(AuthError::ExposedWithoutKeys {
                listen,
                keys: sources.keys,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCES: AuthSources = AuthSources {
        keys: "apiKeys",
        admin: "adminToken",
        admin_open: "adminOpen: true",
    };

    #[test]
    fn keys_without_an_admin_token_are_refused_unless_declared_open() {
        let e = Auth::new(vec![ApiKey::plain("k", "k")], None, None, false, SOURCES)
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("adminToken") && msg.contains("adminOpen: true"),
            "{msg}"
        );
        let open = Auth::new(vec![ApiKey::plain("k", "k")], None, None, true, SOURCES).unwrap();
        assert!(open.admin.is_open() && !open.keys.is_open());
        let both = Auth::new(
            vec![ApiKey::plain("k", "k")],
            Some("t".into()),
            None,
            false,
            SOURCES,
        )
        .unwrap();
        assert!(!both.admin.is_open() && !both.keys.is_open());
        // No keys at all: open, which only a loopback address allows.
        let none = Auth::new(vec![], None, None, false, SOURCES).unwrap();
        assert!(none.keys.is_open());
        let public: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let e = none.check_exposure(public, false, SOURCES).unwrap_err();
        assert!(e.to_string().contains("--allow-unauthenticated"), "{e}");
        none.check_exposure(public, true, SOURCES).unwrap();
        none.check_exposure("127.0.0.1:8000".parse().unwrap(), false, SOURCES)
            .unwrap();
        none.check_exposure("[::1]:8000".parse().unwrap(), false, SOURCES)
            .unwrap();
        both.check_exposure(public, false, SOURCES).unwrap();
    }
}
