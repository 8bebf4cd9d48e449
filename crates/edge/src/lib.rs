//! The HTTP edge every GreenThread server is built on, so that each one gets the same
//! protections without repeating them: header-read, body-read and keep-alive timeouts, a
//! connection cap, a concurrency cap (503 + `Retry-After` past it), a body size limit,
//! graceful shutdown with a deadline, OpenAI-style errors, bearer-token layers with
//! constant-time comparison, and the allowlist of inference paths.

mod auth;
mod body;
mod config;
mod error;
mod metrics;
pub mod multipart;
pub mod named;
mod paths;
mod redact;
mod secret;
mod server;
mod shutdown;
pub mod sse;
pub mod transport;

pub use auth::{
    Gate, Holder, bearer, bearer_value, credential, ct_eq, ct_find, require, unauthorized,
};
pub use body::{BodyError, read_body};
pub use config::EdgeConfig;
pub use error::{ApiError, api_error, echo};
pub use metrics::{OPENMETRICS, metrics};
pub use paths::{INFERENCE_PATHS, PathCheck, check_inference_path, clean_path};
pub use redact::redact_command;
pub use secret::{SecretError, secret, secrets};
pub use server::{EdgeStats, serve, serve_with_stats};
pub use shutdown::{Shutdown, end_on_shutdown, signal};
pub use transport::{Connector, Listener, Stream};
