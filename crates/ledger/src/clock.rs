//! Where the times written into GPU records come from.

use jiff::{SignedDuration, Timestamp};

/// The clock a sidecar stamps ledger records with. `Wall` in production: records are
/// compared across nodes. `Tokio` follows tokio's clock from a wall-clock anchor, so a
/// test or a simulation on a paused clock moves ledger time with its timers (a lock
/// lapses, a `minRuntime` passes, without waiting for them).
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    #[default]
    Wall,
    Tokio {
        anchor: Timestamp,
        at: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that follows tokio's, from the wall clock's now.
    pub fn tokio() -> Self {
        Clock::Tokio {
            anchor: Timestamp::now(),
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        match self {
            Clock::Wall => Timestamp::now(),
            Clock::Tokio { anchor, at } => {
                let elapsed = SignedDuration::try_from(at.elapsed()).unwrap_or(SignedDuration::MAX);
                anchor.checked_add(elapsed).unwrap_or(Timestamp::MAX)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Clock;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time() {
        let clock = Clock::tokio();
        let t0 = clock.now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let waited = clock.now().duration_since(t0);
        assert_eq!(waited.as_secs(), 3600);
        // The wall clock did not move an hour meanwhile.
        assert!(Clock::Wall.now().duration_since(t0).as_secs() < 3600);
    }
}
