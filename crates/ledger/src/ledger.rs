use async_trait::async_trait;
use greenthread_api::{Gpu, GpuStatus};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("gpu {0:?} is not in the ledger")]
    NotFound(String),
    #[error("gpu {gpu:?} changed since version {version} was read")]
    Conflict { gpu: String, version: String },
    #[error("ledger backend: {0}")]
    Backend(String),
    #[error("gpu {gpu:?}: gave up after {attempts} conflicting writes in a row")]
    Contended { gpu: String, attempts: u32 },
}

impl LedgerError {
    /// A stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::Backend(_) => "backend",
            Self::Contended { .. } => "contended",
        }
    }

    /// Whether the same write may succeed if tried again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Backend(_) | Self::Contended { .. })
    }
}

/// Conflicts retried at once (the common case: another sidecar wrote a moment ago)
/// before backing off.
const EAGER_RETRIES: u32 = 3;
/// Conflicts in a row after which a write gives up: something writes this record
/// continuously, and spinning would only add to it.
pub const MAX_CONFLICTS: u32 = 200;

/// Capped exponential backoff with jitter (each delay uniform in its upper half), so
/// that writers that collided do not collide again in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: std::time::Duration,
    cap: std::time::Duration,
}

impl Backoff {
    pub fn new(base: std::time::Duration, cap: std::time::Duration) -> Self {
        Self { next: base, cap }
    }

    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d / 2 + d.mul_f64(jitter() / 2.0)
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

thread_local! {
    /// SplitMix64 state of this thread's jitter; seeded from the OS unless
    /// [`seed_jitter`] fixed it.
    static JITTER: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Makes this thread's backoff jitter a fixed sequence from `seed`: a simulation on one
/// thread then retries at the same moments on every run.
pub fn seed_jitter(seed: u64) {
    JITTER.with(|j| j.set(Some(seed)));
}

/// A number in [0, 1), different on every call (no RNG crate needed for jitter).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let state = JITTER.with(|j| {
        let s = j
            .get()
            .unwrap_or_else(|| {
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            })
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        j.set(Some(s));
        s
    });
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Storage for GPU records with compare-and-swap on the status.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError>;

    async fn list(&self) -> Result<Vec<Gpu>, LedgerError>;

    /// Replaces the status if the record is still at `resource_version`; otherwise
    /// [`LedgerError::Conflict`].
    async fn replace_status(
        &self,
        gpu: &str,
        resource_version: &str,
        status: GpuStatus,
    ) -> Result<Gpu, LedgerError>;

    /// The latest record, updated on every change.
    fn watch(&self, gpu: &str) -> Result<crate::Subscriber<Gpu>, LedgerError>;
}

/// Read-modify-write with compare-and-swap: `decide` sees the current record and returns
/// the new status to write (or `None` to leave it) together with its result. A conflict
/// re-reads and decides again; `on_conflict` is called once per conflict. Past a few
/// conflicts in a row it backs off (capped, with jitter); past [`MAX_CONFLICTS`] it gives
/// up with [`LedgerError::Contended`].
pub async fn update<T, E>(
    ledger: &dyn Ledger,
    gpu: &str,
    on_conflict: &(dyn Fn() + Send + Sync),
    mut decide: impl FnMut(&Gpu) -> Result<(Option<GpuStatus>, T), E> + Send,
) -> Result<T, E>
where
    E: From<LedgerError>,
    T: Send,
{
    let mut conflicts = 0;
    let mut backoff = Backoff::new(
        std::time::Duration::from_millis(1),
        std::time::Duration::from_millis(100),
    );
    loop {
        let current = ledger.get(gpu).await?;
        let (next, out) = decide(&current)?;
        let Some(mut next) = next else { return Ok(out) };
        next.available_memory_bytes =
            Some(crate::decide::available_bytes(&current.spec, &next, None));
        if next == current.status {
            return Ok(out);
        }
        match ledger
            .replace_status(gpu, &current.resource_version, next)
            .await
        {
            Ok(_) => return Ok(out),
            Err(LedgerError::Conflict { .. }) => {
                on_conflict();
                conflicts += 1;
                if conflicts >= MAX_CONFLICTS {
                    return Err(LedgerError::Contended {
                        gpu: gpu.to_string(),
                        attempts: conflicts,
                    }
                    .into());
                }
                if conflicts <= EAGER_RETRIES {
                    tokio::task::yield_now().await;
                } else {
                    backoff.wait().await;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::MemoryLedger;

    /// A ledger where every write conflicts (something else writes the record forever).
    struct AlwaysConflicts(MemoryLedger);

    #[async_trait]
    impl Ledger for AlwaysConflicts {
        async fn get(&self, gpu: &str) -> Result<Gpu, LedgerError> {
            self.0.get(gpu).await
        }
        async fn list(&self) -> Result<Vec<Gpu>, LedgerError> {
            self.0.list().await
        }
        async fn replace_status(
            &self,
            gpu: &str,
            version: &str,
            _status: GpuStatus,
        ) -> Result<Gpu, LedgerError> {
            Err(LedgerError::Conflict {
                gpu: gpu.into(),
                version: version.into(),
            })
        }
        fn watch(&self, gpu: &str) -> Result<crate::Subscriber<Gpu>, LedgerError> {
            self.0.watch(gpu)
        }
    }

    /// Finding: the compare-and-swap loop retried forever, at once, with no backoff.
    #[tokio::test(start_paused = true)]
    async fn endless_conflicts_back_off_and_give_up() {
        let l = AlwaysConflicts(MemoryLedger::new());
        l.0.add_gpu("g", Default::default());
        let counted = std::sync::atomic::AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let r = update(
            &l,
            "g",
            &|| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
            |g| {
                let mut next = g.status.clone();
                next.preemption_intents.clear();
                next.available_memory_bytes = Some(1);
                Ok::<_, LedgerError>((Some(next), ()))
            },
        )
        .await;
        assert_eq!(
            r,
            Err(LedgerError::Contended {
                gpu: "g".into(),
                attempts: MAX_CONFLICTS
            })
        );
        assert_eq!(
            counted.load(std::sync::atomic::Ordering::Relaxed),
            MAX_CONFLICTS
        );
        // Backed off: the paused clock moved (about 100 ms per retry once capped).
        let waited = start.elapsed();
        assert!(waited > Duration::from_secs(5), "{waited:?}");
        assert!(waited < Duration::from_secs(25), "{waited:?}");
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, nominal) in delays.iter().zip([10u64, 20, 40, 80, 80, 80]) {
            let n = Duration::from_millis(nominal);
            assert!(*d >= n / 2 && *d <= n, "{d:?} for {n:?}");
        }
    }
}
