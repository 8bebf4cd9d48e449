//! What happens in the installation, fanned out to `/api/v1/events` subscribers: every
//! replica's state changes (`state`, as always), and typed events — a wake started,
//! completed (with its duration and phases) or failed, a sleep started or completed, a
//! key created or revoked. Each event has an id, in order; the last [`BUFFERED`] are
//! kept, so that a client reconnecting with `Last-Event-ID` gets what it missed.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use greenthread_sidecar::Sidecar;
use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for clients that reconnect.
pub const BUFFERED: usize = 1024;

#[derive(Debug, Clone, Serialize)]
pub struct StateEvent {
    pub model: String,
    pub pod: String,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub at: String,
}

/// One event: its id, its type (the SSE `event:` field) and its data.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: u64,
    pub kind: &'static str,
    pub data: serde_json::Value,
}

impl Event {
    /// The event as one server-sent event.
    pub fn frame(&self) -> String {
        frame(Some(self.id), self.kind, &self.data)
    }
}

/// One server-sent event of type `kind`, with its id when it has one.
pub fn frame(id: Option<u64>, kind: &str, data: &serde_json::Value) -> String {
    match id {
        Some(id) => format!("id: {id}\nevent: {kind}\ndata: {data}\n\n"),
        None => format!("event: {kind}\ndata: {data}\n\n"),
    }
}

pub struct EventHub {
    tx: broadcast::Sender<Arc<Event>>,
    /// The next id, and the last events (ids ascending).
    log: Mutex<(u64, VecDeque<Arc<Event>>)>,
}

/// What a reconnecting client missed.
pub enum Missed {
    /// These events, in order (none when it missed nothing).
    Events(Vec<Arc<Event>>),
    /// More than the buffer holds (or an id from another run): it needs a snapshot.
    TooMany,
}

impl EventHub {
    pub fn new() -> Self {
        Self {
            tx: broadcast::Sender::new(BUFFERED),
            log: Mutex::new((1, VecDeque::with_capacity(BUFFERED))),
        }
    }

    /// Events from now on, and the id of the last one published before (0: none).
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<Event>>, u64) {
        let log = self.log.lock().unwrap();
        (self.tx.subscribe(), log.0 - 1)
    }

    /// The events after `last` up to `upto`, if the buffer still holds them all.
    pub fn since(&self, last: u64, upto: u64) -> Missed {
        let log = self.log.lock().unwrap();
        if last > upto {
            return Missed::TooMany;
        }
        if last == upto {
            return Missed::Events(Vec::new());
        }
        match log.1.front() {
            Some(first) if first.id <= last + 1 => Missed::Events(
                log.1
                    .iter()
                    .filter(|e| e.id > last && e.id <= upto)
                    .cloned()
                    .collect(),
            ),
            _ => Missed::TooMany,
        }
    }

    /// Publishes an event of type `kind`, stamped with the time (`at`) unless its data
    /// says when it happened.
    pub fn emit(&self, kind: &'static str, mut data: serde_json::Value) {
        if let Some(fields) = data.as_object_mut() {
            fields
                .entry("at")
                .or_insert_with(|| jiff::Timestamp::now().to_string().into());
        }
        let mut log = self.log.lock().unwrap();
        let event = Arc::new(Event {
            id: log.0,
            kind,
            data,
        });
        log.0 += 1;
        if log.1.len() == BUFFERED {
            log.1.pop_front();
        }
        log.1.push_back(event.clone());
        // Sent under the lock, so that subscribers see ids in order. No subscriber is fine.
        let _ = self.tx.send(event);
    }

    /// Publishes one state change (of a sidecar seen through its GPU record).
    pub fn publish(&self, event: StateEvent) {
        self.emit(
            "state",
            serde_json::to_value(&event).expect("events serialize"),
        );
    }

    /// Publishes every transition of one sidecar in this process, and the typed events
    /// they make: a wake started, completed (its duration and phases, as the sidecar
    /// measured them) or failed, a sleep started or completed.
    pub fn follow(self: &Arc<Self>, model: &str, pod: &str, sidecar: Arc<Sidecar>) {
        self.follow_notices(model, pod, &sidecar);
        let mut transitions = sidecar.transitions();
        // Not kept alive by this: once the sidecar goes (its model removed), so does
        // its transitions' sender, and this task ends.
        let sidecar = Arc::downgrade(&sidecar);
        let (hub, model, pod) = (self.clone(), model.to_string(), pod.to_string());
        tokio::spawn(async move {
            loop {
                let (from, to) = match transitions.recv().await {
                    Ok(t) => t,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let at = jiff::Timestamp::now().to_string();
                hub.publish(StateEvent {
                    model: model.clone(),
                    pod: pod.clone(),
                    from: Some(from.as_str()),
                    to: to.as_str(),
                    at: at.clone(),
                });
                let Some(kind) = typed(from.as_str(), to.as_str()) else {
                    continue;
                };
                let mut data = serde_json::json!({"model": model, "pod": pod, "at": at});
                if kind == "wake_completed"
                    && let Some(sidecar) = sidecar.upgrade()
                    && let Some(wake) = sidecar.status_json().get("lastWake").cloned()
                {
                    data["seconds"] = wake["seconds"].clone();
                    data["phases"] = wake["phases"].clone();
                }
                hub.emit(kind, data);
            }
        });
    }
}

impl EventHub {
    /// The sidecar's notices as events: `preempted` (the victim, the preemptor, the GPU),
    /// `engine_restarted` (why) and `sleep_demoted` (level 2 for lack of host memory).
    fn follow_notices(self: &Arc<Self>, model: &str, pod: &str, sidecar: &Sidecar) {
        use greenthread_sidecar::metrics::Notice;
        let mut notices = sidecar.metrics.notices();
        let (hub, model, pod) = (self.clone(), model.to_string(), pod.to_string());
        tokio::spawn(async move {
            loop {
                let notice = match notices.recv().await {
                    Ok(n) => n,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                match notice {
                    Notice::Preempting { victim, gpu } => hub.emit(
                        "preempted",
                        serde_json::json!({"victim": victim, "preemptor": pod, "model": model, "gpu": gpu}),
                    ),
                    Notice::EngineRestarted { reason } => hub.emit(
                        "engine_restarted",
                        serde_json::json!({"model": model, "pod": pod, "reason": reason}),
                    ),
                    Notice::Demoted { reason } => hub.emit(
                        "sleep_demoted",
                        serde_json::json!({"model": model, "pod": pod, "level": 2, "reason": reason}),
                    ),
                }
            }
        });
    }
}

/// The typed event a transition between states (by their names) makes, if any.
pub fn typed(from: &str, to: &str) -> Option<&'static str> {
    match (from, to) {
        ("sleeping", "pending" | "waking") => Some("wake_started"),
        ("pending" | "waking", "serving") => Some("wake_completed"),
        ("pending" | "waking", "sleeping") => Some("wake_failed"),
        ("serving", "deactivating") => Some("sleep_started"),
        ("deactivating", "sleeping") => Some("sleep_completed"),
        _ => None,
    }
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_make_typed_events() {
        use greenthread_sidecar::state::State::*;
        for (from, to, kind) in [
            (Sleeping, Pending, Some("wake_started")),
            (Pending, Waking, None),
            (Waking, Serving, Some("wake_completed")),
            (Waking, Sleeping, Some("wake_failed")),
            (Serving, Deactivating, Some("sleep_started")),
            (Deactivating, Sleeping, Some("sleep_completed")),
            (Deactivating, Serving, None),
        ] {
            assert_eq!(typed(from.as_str(), to.as_str()), kind, "{from} → {to}");
        }
    }

    #[test]
    fn a_reconnecting_client_gets_what_it_missed_while_the_buffer_holds_it() {
        let hub = EventHub::new();
        for i in 0..5 {
            hub.emit("state", serde_json::json!({"i": i}));
        }
        let (_rx, upto) = hub.subscribe();
        assert_eq!(upto, 5);
        let ids = |m: Missed| match m {
            Missed::Events(e) => Some(e.iter().map(|e| e.id).collect::<Vec<_>>()),
            Missed::TooMany => None,
        };
        assert_eq!(ids(hub.since(2, upto)), Some(vec![3, 4, 5]));
        assert_eq!(ids(hub.since(5, upto)), Some(vec![]));
        assert_eq!(ids(hub.since(0, upto)), Some(vec![1, 2, 3, 4, 5]));
        // An id from the future (another run of the server): a snapshot.
        assert_eq!(ids(hub.since(9, upto)), None);
        for i in 0..BUFFERED {
            hub.emit("state", serde_json::json!({"at": "t", "i": i}));
        }
        let (_rx, upto) = hub.subscribe();
        assert_eq!(ids(hub.since(2, upto)), None, "fell out of the buffer");
        let first_kept = upto - BUFFERED as u64 + 1;
        assert_eq!(
            ids(hub.since(first_kept - 1, upto)).map(|v| v.len()),
            Some(BUFFERED)
        );
        let e = hub.since(upto - 1, upto);
        let Missed::Events(e) = e else { panic!() };
        assert_eq!(
            e[0].frame(),
            format!(
                "id: {upto}\nevent: state\ndata: {{\"at\":\"t\",\"i\":{}}}\n\n",
                BUFFERED - 1
            )
        );
        // An event that does not say when it happened is stamped now.
        hub.emit("state", serde_json::json!({"i": 0}));
        let (_rx, upto) = hub.subscribe();
        let Missed::Events(e) = hub.since(upto - 1, upto) else {
            panic!()
        };
        let at = e[0].data["at"].as_str().unwrap();
        assert!(at.parse::<jiff::Timestamp>().is_ok(), "{at}");
    }
}
