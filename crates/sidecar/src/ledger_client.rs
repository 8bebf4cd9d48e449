//! This pod's side of the GPU ledger protocol: claim (with intents, the fairness wait
//! and victims), withdraw, release, mark serving, heartbeat, and leave. Every decision
//! is a pure function of `decide`; this only reads, writes and waits.

use std::{sync::Arc, time::Duration};

use greenthread_api::{Gpu, GpuStatus};
use greenthread_ledger::{Backoff, Clock, Ledger, decide};
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::{
    SidecarConfig,
    admission::Admission,
    error::{ClaimError, WaitReason},
    metrics::SidecarMetrics,
};

/// A GPU this sidecar's engine uses: its ledger record name and device index.
#[derive(Debug, Clone)]
pub struct GpuRef {
    pub name: String,
    pub index: u32,
}

/// Tries of one ledger write before it is left to the heartbeat's reconcile (about 20 s
/// of backoff in all).
const LEDGER_WRITE_ATTEMPTS: u32 = 8;

pub struct LedgerClient {
    ledger: Arc<dyn Ledger>,
    pub(crate) gpus: Vec<GpuRef>,
    pod: String,
    model: String,
    /// Changed at run time (`PATCH` of `fairness.popular`), so an atomic.
    popular: std::sync::atomic::AtomicBool,
    /// `staging.pinned`: host memory, once held, is kept across wakes.
    pinned: bool,
    priority: greenthread_api::Priority,
    min_runtime: Duration,
    lock_ttl: Duration,
    max_wait: Duration,
    policy: greenthread_ledger::Policy,
    /// Two fifths of the queue deadline (2 minutes by default): a waker may preempt
    /// anyone after waiting this long, leaving the rest for a drain, a sleep and a wake.
    starvation_bound: Duration,
    pub(crate) clock: Clock,
    metrics: Arc<SidecarMetrics>,
    /// Cancelled at shutdown: failed writes are not retried any more.
    stop: CancellationToken,
    /// The wake under way is for batch work alone: it claims as `sheddable`, so that it
    /// never preempts anyone (any other request lifts this).
    batch_only: std::sync::atomic::AtomicBool,
}

/// How a claim on every GPU ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Claimed {
    All,
    /// Nobody waits any more; nothing is held.
    Abandoned,
}

/// How a claim on one GPU ended.
enum One {
    Claimed,
    Abandoned,
    /// It would have to wait (only when told not to).
    Blocked,
}

impl LedgerClient {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ledger: Arc<dyn Ledger>,
        gpus: Vec<GpuRef>,
        pod: String,
        cfg: &SidecarConfig,
        clock: Clock,
        metrics: Arc<SidecarMetrics>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            ledger,
            gpus,
            pod,
            model: cfg.model.clone(),
            popular: std::sync::atomic::AtomicBool::new(cfg.popular),
            pinned: cfg.pinned,
            priority: cfg.priority,
            min_runtime: cfg.min_runtime,
            lock_ttl: cfg.wake_lock_ttl,
            max_wait: cfg.max_wait_time,
            policy: cfg.policy,
            starvation_bound: cfg.queue_timeout * 2 / 5,
            clock,
            metrics,
            stop,
            batch_only: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn set_batch_only(&self, on: bool) {
        self.batch_only
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a wake for batch work alone may start now ([`decide::idle_room`] on every
    /// GPU), or why not.
    pub async fn idle_room(&self, bytes: u64) -> Result<(), String> {
        for g in &self.gpus {
            let rec = self
                .ledger
                .get(&g.name)
                .await
                .map_err(|e| format!("gpu {}: {e}", g.index))?;
            decide::idle_room(
                &rec.spec,
                &rec.status,
                &self.pod,
                bytes,
                self.lock_ttl,
                self.now(),
            )
            .map_err(|why| format!("gpu {}: {why}", g.index))?;
        }
        Ok(())
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn claim_for(&self, bytes: u64, recent_requests: usize) -> decide::Claim {
        decide::Claim {
            recent_requests: u32::try_from(recent_requests).unwrap_or(u32::MAX),
            pod: self.pod.clone(),
            model: self.model.clone(),
            bytes,
            popular: self.popular.load(std::sync::atomic::Ordering::Relaxed),
            priority: if self.batch_only.load(std::sync::atomic::Ordering::Relaxed) {
                greenthread_api::Priority::Sheddable
            } else {
                self.priority
            },
            min_runtime: self.min_runtime,
        }
    }

    /// Read-modify-write of one GPU record. A write the backend failed (the API server
    /// unreachable, contention past the bound) is retried with capped exponential backoff
    /// and jitter; what still fails is corrected later by the heartbeat's reconcile.
    async fn update<T: Send>(
        &self,
        gpu: &str,
        mut decide: impl FnMut(&Gpu) -> Result<(Option<GpuStatus>, T), ClaimError> + Send,
    ) -> Result<T, ClaimError> {
        let conflicts = &self.metrics.cas_conflicts;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = greenthread_ledger::update(
                &*self.ledger,
                gpu,
                &|| {
                    conflicts.inc();
                },
                &mut decide,
            )
            .await;
            match r {
                Err(ClaimError::Ledger(e))
                    if e.is_transient()
                        && attempt < LEDGER_WRITE_ATTEMPTS
                        && !self.stop.is_cancelled() =>
                {
                    tracing::warn!(gpu, attempt, error = %e, reason = e.metric_label(), "ledger write failed; retrying");
                    backoff.wait().await;
                }
                other => return other,
            }
        }
    }

    /// What a boot may take before the engine has been measured: the least free memory
    /// over this pod's GPUs.
    pub async fn free_bytes(&self) -> Result<u64, greenthread_ledger::LedgerError> {
        let mut free = u64::MAX;
        for g in &self.gpus {
            let rec = self.ledger.get(&g.name).await?;
            free = free.min(decide::available_bytes(
                &rec.spec,
                &rec.status,
                Some(&self.pod),
            ));
        }
        Ok(free)
    }

    /// Claims `bytes` on every GPU under their wake locks, one [`decide::wake_step`] at a
    /// time; every wait reacts to ledger changes at once, and to time when only time can
    /// change the answer. With `abandon`, gives up once nobody waits in it any more. On
    /// failure the GPUs claimed so far go back to holding `residual`.
    ///
    /// All or nothing: a claim holds its GPU's wake lock and reserves memory there, so it
    /// is never kept while waiting on another GPU (a tensor-parallel wake that waits for a
    /// victim on one GPU would otherwise keep every other model off the GPUs it already
    /// has). When one GPU makes it wait, the claims on the others go back, it waits on
    /// that one alone, and then claims the others again; each GPU keeps its fairness
    /// clock across the rounds, so giving claims back does not restart its wait.
    pub async fn claim_all(
        &self,
        bytes: u64,
        residual: &[(u32, u64)],
        abandon: Option<&Admission>,
        waiting: &(dyn Fn(WaitReason) + Send + Sync),
    ) -> Result<Claimed, ClaimError> {
        let mut short_since: Vec<Option<Timestamp>> = vec![None; self.gpus.len()];
        let mut claimed: Vec<usize> = Vec::new();
        // The GPU to wait on before trying the others: none at first.
        let mut blocked: Option<usize> = None;
        loop {
            if let Some(k) = blocked.take() {
                match self
                    .claim_one(
                        &self.gpus[k],
                        bytes,
                        abandon,
                        waiting,
                        &mut short_since[k],
                        true,
                    )
                    .await
                {
                    Ok(One::Claimed) => claimed.push(k),
                    other => return self.give_back(k, claimed, residual, other).await,
                }
            }
            for (k, since) in short_since.iter_mut().enumerate() {
                if claimed.contains(&k) {
                    continue;
                }
                // Waiting is only allowed while holding nothing.
                let wait = claimed.is_empty();
                match self
                    .claim_one(&self.gpus[k], bytes, abandon, waiting, since, wait)
                    .await
                {
                    Ok(One::Claimed) => claimed.push(k),
                    Ok(One::Blocked) => {
                        self.release_claimed(&mut claimed, residual).await;
                        blocked = Some(k);
                        break;
                    }
                    other => return self.give_back(k, claimed, residual, other).await,
                }
            }
            if blocked.is_none() {
                return Ok(Claimed::All);
            }
        }
    }

    /// A claim on every GPU ended without them all: withdraws from GPU `k` and gives the
    /// claimed ones back to holding `residual`.
    async fn give_back(
        &self,
        k: usize,
        mut claimed: Vec<usize>,
        residual: &[(u32, u64)],
        outcome: Result<One, ClaimError>,
    ) -> Result<Claimed, ClaimError> {
        self.withdraw(&self.gpus[k]).await;
        self.release_claimed(&mut claimed, residual).await;
        outcome.map(|_| Claimed::Abandoned)
    }

    /// The claims made so far go back: each of those GPUs holds `residual` again.
    async fn release_claimed(&self, claimed: &mut Vec<usize>, residual: &[(u32, u64)]) {
        for c in claimed.drain(..) {
            let g = &self.gpus[c];
            self.release(g, held(residual, g.index)).await;
        }
    }

    /// Claims one GPU. Without `wait`, the first step that would wait returns
    /// [`One::Blocked`] instead (its intent stays written: the caller waits here next).
    async fn claim_one(
        &self,
        gpu: &GpuRef,
        bytes: u64,
        abandon: Option<&Admission>,
        waiting: &(dyn Fn(WaitReason) + Send + Sync),
        short_since: &mut Option<Timestamp>,
        wait: bool,
    ) -> Result<One, ClaimError> {
        let mut changes = self.ledger.watch(&gpu.name)?;
        loop {
            changes.borrow_and_update();
            let claim = self.claim_for(bytes, abandon.map_or(0, |a| a.load().1));
            let now = self.clock.now();
            let req = decide::WakeRequest {
                claim: &claim,
                lock_ttl: self.lock_ttl,
                max_wait: self.max_wait,
                policy: self.policy,
                starvation_bound: self.starvation_bound,
                short_since: *short_since,
            };
            let step = self
                .update(&gpu.name, |g| {
                    Ok(decide::wake_step(&g.spec, &g.status, &req, now))
                })
                .await?;
            let (why, recheck_at) = match step {
                decide::WakeStep::Claimed => return Ok(One::Claimed),
                decide::WakeStep::Wait { why, recheck_at } => (why, recheck_at),
            };
            if why.short_of_memory() {
                short_since.get_or_insert(now);
            }
            if let decide::GpuWait::Preempting {
                victim,
                named_now: true,
            } = &why
            {
                self.metrics.preemption("preemptor");
                self.metrics.notice(crate::metrics::Notice::Preempting {
                    victim: victim.to_string(),
                    gpu: gpu.name.clone(),
                });
                tracing::info!(model = %self.model, gpu = %gpu.name, %victim, "preempting");
            }
            waiting(WaitReason::Gpu {
                gpu: gpu.index,
                why,
            });
            if !wait {
                return Ok(One::Blocked);
            }
            let wait = self.clock.now().duration_until(recheck_at).unsigned_abs();
            let recheck = tokio::time::Instant::now() + wait;
            if abandon.is_some_and(|a| !a.has_waiters()) {
                return Ok(One::Abandoned);
            }
            let emptied = async {
                match abandon {
                    Some(a) => a.until_empty().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // In order: a fleet simulation replays the same run from the same seed.
                biased;
                _ = changes.changed() => {}
                () = emptied => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// Gives up waiting on a GPU: drops this pod's intent and (if held) the wake lock.
    async fn withdraw(&self, gpu: &GpuRef) {
        let pod = &self.pod;
        let r = self
            .update(&gpu.name, |g| {
                let next = decide::release_wake_lock(&decide::clear_intent(&g.status, pod), pod);
                Ok((Some(next), ()))
            })
            .await;
        if let Err(e) = r {
            tracing::error!(gpu = %gpu.name, error = %e, reason = e.metric_label(), "could not withdraw the intent");
        }
    }

    async fn release(&self, gpu: &GpuRef, residual: u64) {
        let pod = &self.pod;
        let r = self
            .update(&gpu.name, |g| {
                let next = decide::release(&g.status, pod, residual, self.clock.now());
                Ok((Some(next), ()))
            })
            .await;
        if let Err(e) = r {
            tracing::error!(gpu = %gpu.name, error = %e, reason = e.metric_label(), "could not release reservation");
        }
    }

    /// Releases the reservation on every GPU, recording what the engine still holds.
    pub async fn release_all(&self, residual: &[(u32, u64)]) {
        for gpu in &self.gpus {
            let r = held(residual, gpu.index);
            self.release(gpu, r).await;
            self.metrics.set_reserved(gpu.index, 0);
            self.metrics.set_residual(gpu.index, r);
        }
    }

    /// Holds `bytes` of host memory on every GPU for the weights of a level-1 sleep
    /// ([`decide::hold_host`]); when one GPU's share is full, gives back what it held
    /// on the others and says why. `force` records them even so (an engine that keeps
    /// its weights in host memory whatever the level: the truth beats the budget).
    pub async fn hold_host_all(&self, bytes: u64, force: bool) -> Result<(), ClaimError> {
        let pod = &self.pod;
        for (k, gpu) in self.gpus.iter().enumerate() {
            let held = self
                .update(&gpu.name, |g| {
                    let next = if force {
                        decide::record_host(&g.status, pod, bytes, self.pinned)?
                    } else {
                        decide::hold_host(&g.spec, &g.status, pod, bytes, self.pinned)?
                    };
                    Ok((Some(next), ()))
                })
                .await;
            if let Err(e) = held {
                for g in &self.gpus[..k] {
                    self.drop_host(g, false).await;
                }
                return Err(e);
            }
            self.metrics.set_host(gpu.index, bytes);
        }
        Ok(())
    }

    async fn drop_host(&self, gpu: &GpuRef, lost: bool) {
        let pod = &self.pod;
        let r = self
            .update(&gpu.name, |g| {
                Ok((Some(decide::drop_host(&g.status, pod, lost)), ()))
            })
            .await;
        if let Err(e) = r {
            tracing::error!(gpu = %gpu.name, error = %e, reason = e.metric_label(), "could not give host memory back");
        }
        if lost || !self.pinned {
            self.metrics.set_host(gpu.index, 0);
        }
    }

    /// The engine no longer keeps its weights in host memory: the bytes go back on
    /// every GPU (a pinned model's stay kept for it unless its engine is `lost`).
    pub async fn drop_host_all(&self, lost: bool) {
        for gpu in &self.gpus {
            self.drop_host(gpu, lost).await;
        }
    }

    /// The wake finished: serving on every GPU, and the wake locks given back.
    pub async fn mark_serving(&self) {
        let pod = &self.pod;
        for gpu in &self.gpus {
            let r = self
                .update(&gpu.name, |g| {
                    let serving = decide::mark_serving(&g.status, pod, self.clock.now())?;
                    Ok((Some(decide::release_wake_lock(&serving, pod)), ()))
                })
                .await;
            if let Err(e) = r {
                tracing::error!(gpu = %gpu.name, error = %e, reason = e.metric_label(), "could not mark serving");
            }
            // Awake, the weights left host memory (a pinned model's bytes stay kept).
            if !self.pinned {
                self.metrics.set_host(gpu.index, 0);
            }
        }
    }

    /// One heartbeat: keeps this pod's records alive (a silent holder's wake lock
    /// lapses), and brings them in line with `settled` (read inside the compare-and-swap:
    /// a wake or sleep that starts meanwhile changes the record, and this runs again).
    pub async fn heartbeat(
        &self,
        load: decide::Load,
        settled: &(dyn Fn(u32) -> Option<decide::Settled> + Send + Sync),
    ) {
        let pod = &self.pod;
        for gpu in &self.gpus {
            let _ = self
                .update(&gpu.name, |g| {
                    if g.status.occupant(pod).is_none() {
                        return Ok((None, ()));
                    }
                    let now = self.clock.now();
                    let mut next = decide::touch(&g.status, pod, load, now);
                    if let Some(settled) = settled(gpu.index) {
                        next = decide::reconcile_own(&next, pod, settled, now);
                    }
                    Ok((Some(next), ()))
                })
                .await;
        }
    }

    /// Removes every trace of this pod from its GPUs (shutdown).
    /// Whether this model is never chosen as a preemption victim, from now on: in its
    /// records at once, and in every claim after.
    pub async fn set_popular(&self, popular: bool) {
        self.popular
            .store(popular, std::sync::atomic::Ordering::Relaxed);
        let pod = &self.pod;
        for gpu in &self.gpus {
            let _ = self
                .update(&gpu.name, |g| {
                    let mut next = g.status.clone();
                    match next.occupant_mut(pod) {
                        Some(o) if o.popular != popular => {
                            o.popular = popular;
                            Ok((Some(next), ()))
                        }
                        _ => Ok((None, ())),
                    }
                })
                .await;
        }
    }

    pub async fn leave(&self) {
        let pod = &self.pod;
        for gpu in &self.gpus {
            let _ = self
                .update(&gpu.name, |g| {
                    Ok((Some(decide::remove_pod(&g.status, pod)), ()))
                })
                .await;
        }
    }

    /// Watches of this pod's GPU records (the preemption watch).
    pub fn watches(&self) -> Vec<greenthread_ledger::Subscriber<Gpu>> {
        let mut watches = Vec::new();
        for gpu in &self.gpus {
            match self.ledger.watch(&gpu.name) {
                Ok(w) => watches.push(w),
                Err(e) => tracing::error!(gpu = %gpu.name, error = %e, "cannot watch the ledger"),
            }
        }
        watches
    }

    pub fn is_victim(&self, status: &GpuStatus) -> bool {
        decide::is_victim(status, &self.pod)
    }
}

/// What `residual` says GPU `index` holds (0 if it says nothing).
pub fn held(residual: &[(u32, u64)], index: u32) -> u64 {
    residual
        .iter()
        .find(|(i, _)| *i == index)
        .map_or(0, |(_, b)| *b)
}
