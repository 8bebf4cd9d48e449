//! The sidecar's lifecycle as a pure transition table.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Engine asleep (or not running); initial once booted.
    Sleeping,
    /// Demand arrived; waiting for GPU memory.
    Pending,
    /// Wake lock and memory claimed; the engine is waking.
    Waking,
    Serving,
    /// Barrier up, draining in-flight requests before the engine sleeps.
    Deactivating,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Sleeping,
        State::Pending,
        State::Waking,
        State::Serving,
        State::Deactivating,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Sleeping => "sleeping",
            State::Pending => "pending",
            State::Waking => "waking",
            State::Serving => "serving",
            State::Deactivating => "deactivating",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A request (or an admin wake) needs the model.
    Demand,
    /// Lock and memory claimed on every GPU.
    Claimed,
    /// Nobody waits any more (every queued request left or timed out) before a claim.
    Abandoned,
    /// The engine answered after waking.
    Awake,
    /// Waking failed for good (restarts exhausted); the reservation is released.
    WakeFailed,
    /// Idle timeout, preemption or an admin sleep raises the barrier.
    Deactivate,
    /// The engine slept and the reservation was released.
    Slept,
    /// The engine process died: held like a sleep until its reservation is released
    /// (a wake that claimed meanwhile would have its claim overwritten by the release).
    EngineLost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event:?} in state {from}")]
pub struct IllegalTransition {
    pub from: State,
    pub event: Event,
}

pub fn transition(from: State, event: Event) -> Result<State, IllegalTransition> {
    use Event::*;
    use State::*;
    let to = match (from, event) {
        (Sleeping, Demand) => Pending,
        (Pending, Claimed) => Waking,
        (Pending, Abandoned) => Sleeping,
        (Waking, Awake) => Serving,
        (Waking, WakeFailed) => Sleeping,
        (Serving, Deactivate) => Deactivating,
        (Deactivating, Slept) => Sleeping,
        (Serving, EngineLost) => Deactivating,
        _ => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;
    use State::*;

    const EVENTS: [Event; 8] = [
        Demand, Claimed, Abandoned, Awake, WakeFailed, Deactivate, Slept, EngineLost,
    ];

    #[test]
    fn every_legal_transition() {
        let legal = [
            (Sleeping, Demand, Pending),
            (Pending, Claimed, Waking),
            (Pending, Abandoned, Sleeping),
            (Waking, Awake, Serving),
            (Waking, WakeFailed, Sleeping),
            (Serving, Deactivate, Deactivating),
            (Deactivating, Slept, Sleeping),
            (Serving, EngineLost, Deactivating),
        ];
        for (from, event, to) in legal {
            assert_eq!(transition(from, event), Ok(to), "{from} --{event:?}-->");
        }
        // Everything not in the table is rejected.
        let mut rejected = 0;
        for from in State::ALL {
            for event in EVENTS {
                if legal.iter().any(|(f, e, _)| *f == from && *e == event) {
                    continue;
                }
                assert_eq!(
                    transition(from, event),
                    Err(IllegalTransition { from, event })
                );
                rejected += 1;
            }
        }
        assert_eq!(rejected, State::ALL.len() * EVENTS.len() - legal.len());
    }

    #[test]
    fn a_full_cycle_returns_to_sleeping() {
        let mut s = Sleeping;
        for e in [Demand, Claimed, Awake, Deactivate, Slept] {
            s = transition(s, e).unwrap();
        }
        assert_eq!(s, Sleeping);
    }

    #[test]
    fn no_request_can_skip_the_claim() {
        assert!(transition(Sleeping, Awake).is_err());
        assert!(transition(Pending, Awake).is_err());
        assert!(transition(Sleeping, Deactivate).is_err());
        assert!(transition(Deactivating, Demand).is_err());
    }
}
