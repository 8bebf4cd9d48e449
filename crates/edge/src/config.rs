use std::time::Duration;

use greenthread_api::arg;

/// The limits of one HTTP server. Every GreenThread server takes these flags.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EdgeConfig {
    /// A client must send a request's headers within this long of starting it (or of
    /// connecting): stalled or trickled headers are cut off. Checked at least every
    /// min(this, keep-alive timeout).
    #[arg(long, default_value = "10s", value_parser = arg::duration)]
    pub header_read_timeout: Duration,
    /// A client must send a request's whole body within this long of its headers.
    #[arg(long, default_value = "60s", value_parser = arg::duration)]
    pub body_read_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this long.
    #[arg(long, default_value = "60s", value_parser = arg::duration)]
    pub keep_alive_timeout: Duration,
    /// Open connections at once; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Requests in progress at once (streams count until they end); more get 503 with
    /// `Retry-After`.
    #[arg(long, default_value_t = 2048)]
    pub max_concurrency: usize,
    /// Largest request body (`32Mi`: long prompts and images fit); larger gets 413.
    #[arg(long, default_value = "32Mi", value_parser = arg::size)]
    pub max_body: u64,
    /// On SIGTERM: stop accepting, let requests in progress finish for at most this
    /// long, end event streams, then exit.
    #[arg(long, default_value = "30s", value_parser = arg::duration)]
    pub shutdown_timeout: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_concurrency: 2048,
            max_body: 32 << 20,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_default_to_the_documented_limits() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            edge: EdgeConfig,
        }
        let parsed = W::try_parse_from(["x"]).unwrap().edge;
        let d = EdgeConfig::default();
        assert_eq!(parsed.header_read_timeout, d.header_read_timeout);
        assert_eq!(parsed.body_read_timeout, d.body_read_timeout);
        assert_eq!(parsed.keep_alive_timeout, d.keep_alive_timeout);
        assert_eq!(parsed.max_connections, d.max_connections);
        assert_eq!(parsed.max_concurrency, d.max_concurrency);
        assert_eq!(parsed.max_body, d.max_body);
        assert_eq!(parsed.shutdown_timeout, d.shutdown_timeout);
        let e = W::try_parse_from(["x", "--max-body", "lots"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--max-body"), "{e}");
    }
}
