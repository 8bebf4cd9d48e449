//! Seeded faults and the invariants that must hold through them. A [`FaultPlan`] is
//! drawn from a seed: engine crashes (mid-wake, mid-stream, while asleep), failed and
//! hung wakes, slow and conflicting ledger writes, sidecars killed and restarted. The
//! run injects them at their moments of virtual time and checks the invariants at every
//! ledger commit; a broken one is reported with the seed and the step, and the same seed
//! replays the same run, so it reproduces.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use greenthread_api::{Gpu, GpuStats, GpuStatus};
use greenthread_ledger::{Ledger, LedgerError, MemoryLedger, Subscriber};
use tokio::time::Instant;

use crate::rng::Rng;

/// When a crash strikes: the injector waits for its replica to be in this state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashWhen {
    /// While the sidecar wakes the engine.
    Waking,
    /// While the engine streams answers.
    Streaming,
    /// While the model sleeps (nobody is talking to the engine).
    Asleep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The engine process dies; like a container under its kubelet, it is started again
    /// after [`ENGINE_RESTART_DELAY`] and loads its weights (it comes back awake).
    Crash { replica: usize, when: CrashWhen },
    /// The engine's next wake calls fail (CUDA out of memory).
    WakeFails { replica: usize, times: u32 },
    /// The engine's next wake call is never answered.
    WakeHangs { replica: usize },
    /// Every ledger write takes up to `delay` more, for `lasting`.
    SlowLedger { lasting: Duration, delay: Duration },
    /// Another writer (the agent, updating a GPU's stats) writes just before about half
    /// of the ledger writes, for `lasting`: they conflict and must be decided again.
    ConflictingWrites { lasting: Duration },
    /// The sidecar is killed where it stands and a new one starts in its place (the
    /// engine runs on), as a container restart does.
    SidecarRestart { replica: usize },
    /// Not a fault but a bug, planted to show that the checks catch one: a record that
    /// charges GPU `gpu` more than its memory is written behind the sidecars' backs.
    /// Never drawn by [`FaultPlan::generate`].
    Corrupt { gpu: usize },
}

impl Fault {
    /// A stable name for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Crash {
                when: CrashWhen::Waking,
                ..
            } => "crash-waking",
            Fault::Crash {
                when: CrashWhen::Streaming,
                ..
            } => "crash-streaming",
            Fault::Crash {
                when: CrashWhen::Asleep,
                ..
            } => "crash-asleep",
            Fault::WakeFails { .. } => "wake-fails",
            Fault::WakeHangs { .. } => "wake-hangs",
            Fault::SlowLedger { .. } => "slow-ledger",
            Fault::ConflictingWrites { .. } => "conflicting-writes",
            Fault::SidecarRestart { .. } => "sidecar-restart",
            Fault::Corrupt { .. } => "corrupt",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Crash { replica, when } => {
                write!(f, "engine crash of replica {replica} ({when:?})")
            }
            Fault::WakeFails { replica, times } => {
                write!(f, "{times} failed wakes of replica {replica}")
            }
            Fault::WakeHangs { replica } => write!(f, "a hung wake of replica {replica}"),
            Fault::SlowLedger { lasting, delay } => {
                write!(f, "ledger writes up to {delay:?} slow for {lasting:?}")
            }
            Fault::ConflictingWrites { lasting } => {
                write!(f, "conflicting ledger writes for {lasting:?}")
            }
            Fault::SidecarRestart { replica } => {
                write!(f, "restart of replica {replica}'s sidecar")
            }
            Fault::Corrupt { gpu } => write!(f, "a corrupt record on GPU {gpu} (planted)"),
        }
    }
}

/// How long a crashed engine stays down before its restart begins.
pub const ENGINE_RESTART_DELAY: Duration = Duration::from_secs(5);
/// How long a crash waits for its replica to reach the state it strikes in.
pub const CRASH_PATIENCE: Duration = Duration::from_secs(60);

/// The faults of one run, each at its moment from the first arrival; none after `until`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    pub until: Duration,
    pub events: Vec<(Duration, Fault)>,
}

impl FaultPlan {
    /// About one fault every `every` over `[0, until)`, of every kind, on random
    /// replicas, drawn from `seed`.
    pub fn generate(seed: u64, replicas: usize, until: Duration, every: Duration) -> Self {
        // Apart from the workload's draws: the same seed gives other numbers here.
        let mut rng = Rng::new(seed ^ 0x6661_756c_7473);
        let mut events = Vec::new();
        let mut at = 0.0;
        loop {
            at += rng.exponential(every.as_secs_f64());
            if at >= until.as_secs_f64() || replicas == 0 {
                break;
            }
            let replica = rng.below(replicas);
            let lasting = Duration::from_secs(10 + rng.below(50) as u64);
            let fault = match rng.below(8) {
                0 => Fault::Crash {
                    replica,
                    when: CrashWhen::Waking,
                },
                1 => Fault::Crash {
                    replica,
                    when: CrashWhen::Streaming,
                },
                2 => Fault::Crash {
                    replica,
                    when: CrashWhen::Asleep,
                },
                3 => Fault::WakeFails {
                    replica,
                    times: 1 + rng.below(3) as u32,
                },
                4 => Fault::WakeHangs { replica },
                5 => Fault::SlowLedger {
                    lasting,
                    delay: Duration::from_millis(50 + rng.below(2000) as u64),
                },
                6 => Fault::ConflictingWrites { lasting },
                _ => Fault::SidecarRestart { replica },
            };
            events.push((Duration::from_secs_f64(at), fault));
        }
        Self {
            seed,
            until,
            events,
        }
    }
}

/// An invariant that did not hold: the seed reproduces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seed: u64,
    /// Virtual time from the first arrival.
    pub at: Duration,
    /// Ledger commits so far.
    pub step: u64,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} step {} at {:.3} s: {}",
            self.seed,
            self.step,
            self.at.as_secs_f64(),
            self.what
        )
    }
}

/// What the ledger does wrong for a while.
struct Trouble {
    slow: Option<(Instant, Duration)>,
    conflicts: Option<Instant>,
    rng: Rng,
}

/// The in-memory ledger with seeded trouble: slow writes, and writes that lose a race
/// against another writer. Everything it passes on is the real [`MemoryLedger`].
pub struct FaultyLedger {
    inner: Arc<MemoryLedger>,
    trouble: Mutex<Trouble>,
}

impl FaultyLedger {
    pub fn new(inner: Arc<MemoryLedger>, seed: u64) -> Self {
        Self {
            inner,
            trouble: Mutex::new(Trouble {
                slow: None,
                conflicts: None,
                rng: Rng::new(seed ^ 0x6c65_6467_6572),
            }),
        }
    }

    pub fn slow_for(&self, lasting: Duration, delay: Duration) {
        self.trouble.lock().unwrap().slow = Some((Instant::now() + lasting, delay));
    }

    pub fn conflicts_for(&self, lasting: Duration) {
        self.trouble.lock().unwrap().conflicts = Some(Instant::now() + lasting);
    }

    /// (extra delay of this write, whether another writer gets in first)
    fn draw(&self) -> (Duration, bool) {
        let mut t = self.trouble.lock().unwrap();
        let now = Instant::now();
        let slow = t.slow.filter(|(until, _)| now < *until).map(|(_, d)| d);
        let conflicting = t.conflicts.is_some_and(|until| now < until);
        let delay = slow.map_or(Duration::ZERO, |d| d.mul_f64(t.rng.unit()));
        let race = conflicting && t.rng.unit() < 0.5;
        (delay, race)
    }
}

#[async_trait]
impl Ledger for FaultyLedger {
    async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError> {
        self.inner.get(gpu).await
    }

    async fn list(&self) -> Result<Vec<Gpu>, LedgerError> {
        self.inner.list().await
    }

    async fn replace_status(
        &self,
        gpu: &str,
        resource_version: &str,
        status: GpuStatus,
    ) -> Result<Gpu, LedgerError> {
        let (delay, race) = self.draw();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if race {
            // The agent's stats update lands first: a real write, so the version moves
            // and watchers see it, and the sidecar's write conflicts.
            let current = self.inner.get(gpu).await?;
            let mut theirs = current.status.clone();
            let stats = theirs.stats.get_or_insert_with(GpuStats::default);
            stats.utilization_percent = (stats.utilization_percent + 1.0) % 100.0;
            let _ = self
                .inner
                .replace_status(gpu, &current.resource_version, theirs)
                .await;
        }
        self.inner
            .replace_status(gpu, resource_version, status)
            .await
    }

    fn watch(&self, gpu: &str) -> Result<Subscriber<Gpu>, LedgerError> {
        self.inner.watch(gpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_the_same_for_a_seed_and_stays_in_its_window() {
        let until = Duration::from_secs(300);
        let a = FaultPlan::generate(7, 6, until, Duration::from_secs(20));
        assert_eq!(a, FaultPlan::generate(7, 6, until, Duration::from_secs(20)));
        assert_ne!(a, FaultPlan::generate(8, 6, until, Duration::from_secs(20)));
        assert!(a.events.len() > 5, "{}", a.events.len());
        assert!(a.events.iter().all(|(t, _)| *t < until));
        assert!(a.events.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(a.events.iter().all(|(_, f)| match f {
            Fault::Crash { replica, .. }
            | Fault::WakeFails { replica, .. }
            | Fault::WakeHangs { replica }
            | Fault::SidecarRestart { replica } => *replica < 6,
            _ => true,
        }));
    }

    #[test]
    fn two_hundred_seeds_draw_every_kind_of_fault() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..200 {
            for (_, f) in
                FaultPlan::generate(seed, 8, Duration::from_secs(300), Duration::from_secs(30))
                    .events
            {
                kinds.insert(f.kind());
            }
        }
        assert_eq!(kinds.len(), 8, "{kinds:?}");
        assert!(!kinds.contains("corrupt"), "a planted bug is never drawn");
    }

    #[tokio::test(start_paused = true)]
    async fn conflicting_writes_are_real_writes_that_the_next_write_loses_to() {
        let inner = Arc::new(MemoryLedger::new());
        inner.add_gpu("g", Default::default());
        let ledger = FaultyLedger::new(inner.clone(), 1);
        ledger.conflicts_for(Duration::from_secs(10));
        let mut lost = 0;
        for _ in 0..40 {
            let g = ledger.get("g").await.unwrap();
            if let Err(LedgerError::Conflict { .. }) = ledger
                .replace_status("g", &g.resource_version, g.status.clone())
                .await
            {
                lost += 1;
            }
        }
        assert!((5..35).contains(&lost), "{lost} of 40 lost a race");
        assert_eq!(inner.conflicts(), lost);
        tokio::time::advance(Duration::from_secs(11)).await;
        let g = ledger.get("g").await.unwrap();
        assert!(
            ledger
                .replace_status("g", &g.resource_version, g.status)
                .await
                .is_ok(),
            "the trouble ends"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_writes_take_longer_only_while_the_fault_lasts() {
        let inner = Arc::new(MemoryLedger::new());
        inner.add_gpu("g", Default::default());
        let ledger = FaultyLedger::new(inner, 1);
        ledger.slow_for(Duration::from_secs(30), Duration::from_secs(2));
        let started = Instant::now();
        for _ in 0..10 {
            let g = ledger.get("g").await.unwrap();
            ledger
                .replace_status("g", &g.resource_version, g.status)
                .await
                .unwrap();
        }
        let slow = started.elapsed();
        assert!(slow > Duration::from_secs(3), "{slow:?}");
        tokio::time::advance(Duration::from_secs(30)).await;
        let started = Instant::now();
        let g = ledger.get("g").await.unwrap();
        ledger
            .replace_status("g", &g.resource_version, g.status)
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
