//! State changes of every sidecar, fanned out to `/api/v1/events` subscribers.

use greenthread_sidecar::state::State;
use serde::Serialize;
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize)]
pub struct StateEvent {
    pub model: String,
    pub pod: String,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub at: String,
}

pub struct EventHub {
    tx: broadcast::Sender<StateEvent>,
}

impl EventHub {
    pub fn new() -> Self {
        Self {
            tx: broadcast::Sender::new(1024),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.tx.subscribe()
    }

    /// Publishes one state change (of a sidecar seen through its GPU record).
    pub fn publish(&self, event: StateEvent) {
        // No subscriber is fine.
        let _ = self.tx.send(event);
    }

    /// Publishes every transition of one sidecar.
    pub fn follow(
        &self,
        model: &str,
        pod: &str,
        mut transitions: broadcast::Receiver<(State, State)>,
    ) {
        let (tx, model, pod) = (self.tx.clone(), model.to_string(), pod.to_string());
        tokio::spawn(async move {
            loop {
                let (from, to) = match transitions.recv().await {
                    Ok(t) => t,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let event = StateEvent {
                    model: model.clone(),
                    pod: pod.clone(),
                    from: Some(from.as_str()),
                    to: to.as_str(),
                    at: jiff::Timestamp::now().to_string(),
                };
                // No subscriber is fine.
                let _ = tx.send(event);
            }
        });
    }
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}
