use std::sync::Arc;

use tokio::sync::watch;

/// A shutdown that many parts wait on: servers stop accepting, event streams end,
/// background loops return.
#[derive(Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once triggered (at once if it already was).
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Triggers on SIGTERM or SIGINT.
    pub fn on_signals(&self) -> &Self {
        let me = self.clone();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("shutdown signal received");
            me.trigger();
        });
        self
    }
}

/// SIGTERM or SIGINT.
pub async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        // In order: a fleet simulation replays the same run from the same seed.
        biased;
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `stream`, ended when `shutdown` triggers: event streams must not hold a server open.
pub fn end_on_shutdown<S: futures_util::Stream>(
    stream: S,
    shutdown: &Shutdown,
) -> impl futures_util::Stream<Item = S::Item> + use<S> {
    use futures_util::StreamExt;
    stream.take_until(Box::pin(shutdown.wait()))
}
