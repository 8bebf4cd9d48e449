//! Pure decisions over one GPU's record. Every function takes the current status and
//! returns the next one (or why not); none does I/O, so each is tested from tables.

use std::{collections::BTreeSet, time::Duration};

use greenthread_api::{GpuSpec, GpuStatus, Occupant, OccupantState, PreemptionIntent, WakeLock};
use jiff::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("needs {need} bytes but only {available} of {total} are available")]
    DoesNotFit {
        need: u64,
        available: u64,
        total: u64,
    },
    #[error("wake lock is held by {holder}")]
    LockHeld { holder: String },
    #[error("{pod} has no occupant record on this gpu")]
    NotAnOccupant { pod: String },
    #[error(
        "needs {need} bytes of host memory for its weights but only {available} of the {total} kept for sleepers are free"
    )]
    HostFull {
        need: u64,
        available: u64,
        total: u64,
    },
}

/// What a pod claims when it wakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub pod: String,
    pub model: String,
    pub bytes: u64,
    pub popular: bool,
    /// The Model's priority class: sheddable wakers never preempt, critical ones do not
    /// wait out the fairness time; victims are taken sheddable first, critical last.
    pub priority: greenthread_api::Priority,
    pub min_runtime: Duration,
    /// Requests the waker received in the last ten minutes (those queued included).
    pub recent_requests: u32,
}

/// Memory that counts against a GPU for one occupant: the reservation while serving or
/// waking, what the engine still holds while sleeping.
pub fn charged_bytes(o: &Occupant) -> u64 {
    match o.state {
        OccupantState::Serving | OccupantState::Waking => o.reserved_memory_bytes,
        OccupantState::Sleeping => o.residual_memory_bytes,
    }
}

/// `memoryBytes − Σ reserved(serving, waking) − Σ residual(sleeping)`, ignoring `except`
/// (a waker's own record, which its claim replaces).
pub fn available_bytes(spec: &GpuSpec, status: &GpuStatus, except: Option<&str>) -> u64 {
    spec.memory_bytes
        .saturating_sub(sum_except(status, except, charged_bytes))
}

/// Σ `bytes` of every occupant but `except`.
fn sum_except(status: &GpuStatus, except: Option<&str>, bytes: fn(&Occupant) -> u64) -> u64 {
    status
        .occupants
        .iter()
        .filter(|o| Some(o.pod_name.as_str()) != except)
        .map(bytes)
        .sum()
}

/// Σ charged bytes: what an observer checks never exceeds the GPU's memory.
pub fn committed_bytes(status: &GpuStatus) -> u64 {
    status.occupants.iter().map(charged_bytes).sum()
}

pub fn fits(spec: &GpuSpec, status: &GpuStatus, pod: &str, need: u64) -> Result<(), Refusal> {
    let available = available_bytes(spec, status, Some(pod));
    if need <= available {
        Ok(())
    } else {
        Err(Refusal::DoesNotFit {
            need,
            available,
            total: spec.memory_bytes,
        })
    }
}

/// Σ host memory the occupants hold (level-1 sleepers' weights, pinned models').
pub fn host_held_bytes(status: &GpuStatus) -> u64 {
    sum_except(status, None, |o| o.host_memory_bytes)
}

/// This GPU's share of host memory for sleepers less what the occupants hold, ignoring
/// `except`; `None` where host memory is not accounted.
pub fn available_host_bytes(
    spec: &GpuSpec,
    status: &GpuStatus,
    except: Option<&str>,
) -> Option<u64> {
    let total = spec.host_memory_bytes?;
    Some(total.saturating_sub(sum_except(status, except, |o| o.host_memory_bytes)))
}

/// Keeps `need` bytes of host memory for `pod`'s weights before it sleeps at level 1:
/// recorded when they fit beside what the others hold (or where host memory is not
/// accounted); otherwise [`Refusal::HostFull`], and the pod sleeps at level 2. A pinned
/// pod that holds its bytes already keeps them whatever the others hold: it is never
/// the one sent to level 2.
pub fn hold_host(
    spec: &GpuSpec,
    status: &GpuStatus,
    pod: &str,
    need: u64,
    pinned: bool,
) -> Result<GpuStatus, Refusal> {
    let o = status.occupant(pod).ok_or_else(|| Refusal::NotAnOccupant {
        pod: pod.to_string(),
    })?;
    if !(o.pinned && o.host_memory_bytes >= need)
        && let Some(available) = available_host_bytes(spec, status, Some(pod))
        && need > available
    {
        return Err(Refusal::HostFull {
            need,
            available,
            total: spec.host_memory_bytes.unwrap_or_default(),
        });
    }
    record_host(status, pod, need, pinned)
}

/// Records `need` bytes of host memory for `pod`'s weights whatever the others hold:
/// for an engine that keeps them there at any level (the truth beats the budget), and
/// for [`hold_host`] once they fit. A pinned pod keeps more if it held more.
pub fn record_host(
    status: &GpuStatus,
    pod: &str,
    need: u64,
    pinned: bool,
) -> Result<GpuStatus, Refusal> {
    let mut next = status.clone();
    let o = next
        .occupant_mut(pod)
        .ok_or_else(|| Refusal::NotAnOccupant {
            pod: pod.to_string(),
        })?;
    o.host_memory_bytes = if o.pinned {
        need.max(o.host_memory_bytes)
    } else {
        need
    };
    o.pinned = pinned;
    Ok(next)
}

/// The engine no longer holds its weights in host memory (it woke, slept at level 2,
/// or stopped): the pod's host bytes go back, except a pinned pod's, which are kept
/// for it (`lost`: its engine is gone, and a pinned pod's bytes go back too).
pub fn drop_host(status: &GpuStatus, pod: &str, lost: bool) -> GpuStatus {
    let mut next = status.clone();
    if let Some(o) = next.occupant_mut(pod) {
        host_copy_gone(o, lost);
    }
    next
}

/// `o`'s host bytes go back, unless it is pinned and its engine not `lost`.
fn host_copy_gone(o: &mut Occupant, lost: bool) {
    if lost || !o.pinned {
        o.host_memory_bytes = 0;
        o.pinned &= !lost;
    }
}

/// Why batch work alone may not wake a pod on this GPU now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotIdle {
    #[error("{0} waits for memory here")]
    Wanted(String),
    #[error("{0} is waking here")]
    Waking(String),
    #[error(transparent)]
    Short(Refusal),
}

/// Whether `pod` may wake on this GPU for batch work alone: nobody else waits for memory
/// here or is waking here, and `need` fits in the memory free now, so that the wake
/// neither preempts anyone nor delays anyone's wake.
pub fn idle_room(
    spec: &GpuSpec,
    status: &GpuStatus,
    pod: &str,
    need: u64,
    lock_ttl: Duration,
    now: Timestamp,
) -> Result<(), NotIdle> {
    if let Some(i) = status.preemption_intents.iter().find(|i| i.pod_name != pod) {
        return Err(NotIdle::Wanted(i.pod_name.clone()));
    }
    if let Some(lock) = &status.wake_lock
        && lock.pod_name != pod
        && !lock_expired(status, lock, lock_ttl, now)
    {
        return Err(NotIdle::Waking(lock.pod_name.clone()));
    }
    fits(spec, status, pod, need).map_err(NotIdle::Short)
}

/// Ensures `pod` has a record (sleeping, nothing held) so that others can see it.
pub fn register(status: &GpuStatus, claim: &Claim, now: Timestamp) -> GpuStatus {
    let mut next = status.clone();
    match next.occupant_mut(&claim.pod) {
        Some(o) => {
            o.model_name.clone_from(&claim.model);
            o.popular = claim.popular;
            o.priority = claim.priority;
            o.min_runtime = claim.min_runtime;
            o.heartbeat = now;
            o.recent_requests = claim.recent_requests;
        }
        None => next.occupants.push(Occupant {
            pod_name: claim.pod.clone(),
            model_name: claim.model.clone(),
            state: OccupantState::Sleeping,
            reserved_memory_bytes: 0,
            residual_memory_bytes: 0,
            popular: claim.popular,
            priority: claim.priority,
            last_accessed: None,
            became_serving_at: None,
            min_runtime: claim.min_runtime,
            heartbeat: now,
            in_flight: 0,
            draining: 0,
            recent_requests: claim.recent_requests,
            host_memory_bytes: 0,
            pinned: false,
        }),
    }
    next
}

/// Records the waker's recent requests on its entry (nothing else: a step that finds
/// nothing new writes nothing, or every waker would wake itself with its own write).
pub fn note_demand(status: &GpuStatus, claim: &Claim) -> GpuStatus {
    let mut next = status.clone();
    if let Some(o) = next.occupant_mut(&claim.pod) {
        o.recent_requests = claim.recent_requests;
    }
    next
}

/// Claims `claim.bytes` for a wake: the occupant becomes `waking` with that reservation.
/// The pod's own residual is part of what it will hold, so it is not counted twice.
pub fn claim(
    spec: &GpuSpec,
    status: &GpuStatus,
    claim: &Claim,
    now: Timestamp,
) -> Result<GpuStatus, Refusal> {
    fits(spec, status, &claim.pod, claim.bytes)?;
    let mut next = register(status, claim, now);
    let o = next.occupant_mut(&claim.pod).expect("registered above");
    o.state = OccupantState::Waking;
    o.reserved_memory_bytes = claim.bytes;
    o.residual_memory_bytes = 0;
    // The claim satisfies the pod's intent, if it had one.
    next.preemption_intents.retain(|i| i.pod_name != claim.pod);
    Ok(next)
}

/// The wake finished: the occupant serves from now on.
pub fn mark_serving(status: &GpuStatus, pod: &str, now: Timestamp) -> Result<GpuStatus, Refusal> {
    let mut next = status.clone();
    let o = next
        .occupant_mut(pod)
        .ok_or_else(|| Refusal::NotAnOccupant {
            pod: pod.to_string(),
        })?;
    o.state = OccupantState::Serving;
    o.became_serving_at = Some(now);
    o.last_accessed = Some(now);
    o.heartbeat = now;
    // Awake, the engine's weights are back on the GPU: its host copy is gone (a
    // pinned model's bytes stay kept for its next sleep).
    host_copy_gone(o, false);
    Ok(next)
}

/// Updates the reservation to what was measured while serving (never above the claim
/// unless it fits).
pub fn set_reserved(
    spec: &GpuSpec,
    status: &GpuStatus,
    pod: &str,
    bytes: u64,
) -> Result<GpuStatus, Refusal> {
    let current = status.occupant(pod).ok_or_else(|| Refusal::NotAnOccupant {
        pod: pod.to_string(),
    })?;
    if bytes > current.reserved_memory_bytes {
        fits(spec, status, pod, bytes)?;
    }
    let mut next = status.clone();
    next.occupant_mut(pod)
        .expect("checked above")
        .reserved_memory_bytes = bytes;
    Ok(next)
}

/// The engine slept (or died): the reservation goes, what it still holds is recorded.
pub fn release(status: &GpuStatus, pod: &str, residual: u64, now: Timestamp) -> GpuStatus {
    let mut next = status.clone();
    if let Some(o) = next.occupant_mut(pod) {
        o.state = OccupantState::Sleeping;
        o.reserved_memory_bytes = 0;
        o.residual_memory_bytes = residual;
        o.became_serving_at = None;
        o.heartbeat = now;
    }
    next.preemption_intents.retain(|i| i.pod_name != pod);
    // A victim that slept has done its part; the waker re-chooses if still short.
    for i in &mut next.preemption_intents {
        if i.victim_pod_name.as_deref() == Some(pod) {
            i.victim_pod_name = None;
        }
    }
    if next.wake_lock.as_ref().is_some_and(|l| l.pod_name == pod) {
        next.wake_lock = None;
    }
    next
}

/// What a sidecar reports of its traffic with each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// When a request last started or ended.
    pub accessed: Option<Timestamp>,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Requests that arrived in the last ten minutes.
    pub recent_requests: u32,
    /// Requests in flight that a preemption cannot stop.
    pub draining: u32,
}

/// Heartbeat, and the traffic victim choice goes by (access time, requests in flight
/// and recent).
pub fn touch(status: &GpuStatus, pod: &str, load: Load, now: Timestamp) -> GpuStatus {
    let mut next = status.clone();
    if let Some(o) = next.occupant_mut(pod) {
        o.heartbeat = now;
        if load.accessed.is_some() {
            o.last_accessed = load.accessed;
        }
        o.in_flight = load.in_flight;
        o.draining = load.draining.min(load.in_flight);
        o.recent_requests = load.recent_requests;
    }
    next
}

/// Whether the lock's holder has stopped heartbeating for longer than `ttl`.
pub fn lock_expired(status: &GpuStatus, lock: &WakeLock, ttl: Duration, now: Timestamp) -> bool {
    let last_sign_of_life = status
        .occupant(&lock.pod_name)
        .map(|o| o.heartbeat.max(lock.since))
        .unwrap_or(lock.since);
    now.duration_since(last_sign_of_life).unsigned_abs() > ttl
}

/// Takes the GPU's wake lock: free, already ours, or held by someone who went silent.
pub fn acquire_wake_lock(
    status: &GpuStatus,
    pod: &str,
    ttl: Duration,
    now: Timestamp,
) -> Result<GpuStatus, Refusal> {
    if let Some(lock) = &status.wake_lock
        && lock.pod_name != pod
        && !lock_expired(status, lock, ttl, now)
    {
        return Err(Refusal::LockHeld {
            holder: lock.pod_name.clone(),
        });
    }
    let mut next = status.clone();
    next.wake_lock = Some(WakeLock {
        pod_name: pod.to_string(),
        since: now,
    });
    Ok(next)
}

pub fn release_wake_lock(status: &GpuStatus, pod: &str) -> GpuStatus {
    let mut next = status.clone();
    if next.wake_lock.as_ref().is_some_and(|l| l.pod_name == pod) {
        next.wake_lock = None;
    }
    next
}

/// What a sidecar that is not in the middle of a wake or a sleep knows its entry must say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Asleep, still holding `residual` bytes on the GPU and `host` in host memory: no
    /// reservation, no lock, no intent.
    Asleep { residual: u64, host: u64 },
    /// Serving: marked serving, no lock, no intent.
    Serving,
}

/// `pod`'s entry brought in line with what its sidecar knows (a write that failed, or a
/// lock left behind): the periodic reconcile that makes a lost write harmless. Other
/// pods' entries are untouched; a pod with no occupant is left alone.
pub fn reconcile_own(status: &GpuStatus, pod: &str, settled: Settled, now: Timestamp) -> GpuStatus {
    let Some(o) = status.occupant(pod) else {
        return status.clone();
    };
    match settled {
        Settled::Asleep { residual, host } => {
            let mut next = if o.state == OccupantState::Sleeping
                && o.reserved_memory_bytes == 0
                && o.residual_memory_bytes == residual
            {
                // Only a stray lock or intent to drop.
                release_wake_lock(&clear_intent(status, pod), pod)
            } else {
                release(status, pod, residual, now)
            };
            if let Some(o) = next.occupant_mut(pod)
                && o.host_memory_bytes != host
                && !(o.pinned && o.host_memory_bytes > host)
            {
                o.host_memory_bytes = host;
            }
            next
        }
        Settled::Serving => {
            let mut next = if o.state == OccupantState::Serving {
                status.clone()
            } else {
                let mut next = status.clone();
                let o = next.occupant_mut(pod).expect("checked above");
                o.state = OccupantState::Serving;
                o.became_serving_at.get_or_insert(now);
                next
            };
            if let Some(o) = next.occupant_mut(pod) {
                host_copy_gone(o, false);
            }
            release_wake_lock(&clear_intent(&next, pod), pod)
        }
    }
}

/// Every pod a record names: occupants, intents (wakers and victims), the wake lock.
pub fn pods_named(status: &GpuStatus) -> BTreeSet<String> {
    let mut pods: BTreeSet<String> = status
        .occupants
        .iter()
        .map(|o| o.pod_name.clone())
        .collect();
    for i in &status.preemption_intents {
        pods.insert(i.pod_name.clone());
        pods.extend(i.victim_pod_name.clone());
    }
    pods.extend(status.wake_lock.as_ref().map(|l| l.pod_name.clone()));
    pods
}

/// Removes every trace of a pod: occupant, intents, lock.
pub fn remove_pod(status: &GpuStatus, pod: &str) -> GpuStatus {
    let mut next = release(status, pod, 0, Timestamp::UNIX_EPOCH);
    next.occupants.retain(|o| o.pod_name != pod);
    next
}

/// Declares (or refreshes) that `pod` needs `needed` bytes here and may preempt for
/// them. `since` is kept from an existing intent: the fairness wait counts from the first.
pub fn write_intent(
    status: &GpuStatus,
    pod: &str,
    model: &str,
    needed: u64,
    now: Timestamp,
) -> GpuStatus {
    let mut next = status.clone();
    match next
        .preemption_intents
        .iter_mut()
        .find(|i| i.pod_name == pod)
    {
        Some(i) => {
            i.needed_bytes = needed;
            i.model_name = model.to_string();
        }
        None => next.preemption_intents.push(PreemptionIntent {
            pod_name: pod.to_string(),
            model_name: model.to_string(),
            needed_bytes: needed,
            since: now,
            victim_pod_name: None,
        }),
    }
    next
}

pub fn clear_intent(status: &GpuStatus, pod: &str) -> GpuStatus {
    let mut next = status.clone();
    next.preemption_intents.retain(|i| i.pod_name != pod);
    next
}

/// Names `victim` on `waker`'s intent (the victim's watcher acts on it).
pub fn name_victim(status: &GpuStatus, waker: &str, victim: &str) -> GpuStatus {
    let mut next = status.clone();
    if let Some(i) = next
        .preemption_intents
        .iter_mut()
        .find(|i| i.pod_name == waker)
    {
        i.victim_pod_name = Some(victim.to_string());
    }
    next
}

/// Whether some intent names `pod` as its victim.
pub fn is_victim(status: &GpuStatus, pod: &str) -> bool {
    status
        .preemption_intents
        .iter()
        .any(|i| i.victim_pod_name.as_deref() == Some(pod))
}

/// Why nobody can be preempted: every request that keeps waiting is told this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoVictim {
    #[error("nobody else serves on this gpu; waiting for memory to free")]
    NobodyServing,
    #[error("every serving occupant of this gpu is popular ({0})")]
    AllPopular(String),
    #[error("no serving occupant is eligible yet: {0}")]
    NotEligible(String),
    #[error("the memory of this gpu is held for {0}, which has waited longer than its bound")]
    HeldFor(String),
    #[error("a sheddable model never preempts another; waiting for memory to free")]
    Sheddable,
    #[error(
        "preempting every eligible occupant ({eligible}) frees {freeable} of the {deficit} bytes missing"
    )]
    NotEnough {
        eligible: String,
        freeable: u64,
        deficit: u64,
    },
}

/// The serving occupants other than `waker`, of which some may be preempted; why none
/// can when none serves or all that serve are popular.
pub(crate) fn serving_others<'a>(
    status: &'a GpuStatus,
    waker: &str,
) -> Result<Vec<&'a Occupant>, NoVictim> {
    let serving: Vec<&Occupant> = status
        .occupants
        .iter()
        .filter(|o| o.pod_name != waker && o.state == OccupantState::Serving)
        .collect();
    if serving.is_empty() {
        return Err(NoVictim::NobodyServing);
    }
    if serving.iter().all(|o| o.popular) {
        let names: Vec<&str> = serving.iter().map(|o| o.model_name.as_str()).collect();
        return Err(NoVictim::AllPopular(names.join(", ")));
    }
    Ok(serving)
}

/// When an occupant may be preempted: serving, not popular, served its `minRuntime`.
pub(crate) fn eligible_at(o: &Occupant) -> Option<Timestamp> {
    if o.state != OccupantState::Serving || o.popular {
        return None;
    }
    let since = o.became_serving_at?;
    let min = jiff::SignedDuration::try_from(o.min_runtime).unwrap_or(jiff::SignedDuration::MAX);
    since.checked_add(min).ok()
}

/// Why `o` may not be preempted yet: every waiter that cannot preempt it is told this.
pub(crate) fn inside_min_runtime(o: &Occupant) -> String {
    format!(
        "{} has not served its minRuntime of {:?}",
        o.model_name, o.min_runtime
    )
}

/// The earliest future moment an occupant that is not yet eligible becomes so, if any:
/// a waiter re-evaluates then (eligibility changes with time, not with a ledger write).
pub fn next_eligibility(status: &GpuStatus, waker: &str, now: Timestamp) -> Option<Timestamp> {
    status
        .occupants
        .iter()
        .filter(|o| o.pod_name != waker)
        .filter_map(eligible_at)
        .filter(|t| *t > now)
        .min()
}

/// Whether preempting every one of `eligible` frees `deficit` bytes; if not, why not.
pub(crate) fn frees_enough(eligible: &[&Occupant], deficit: u64) -> Result<(), NoVictim> {
    let freeable: u64 = eligible.iter().map(|o| o.reserved_memory_bytes).sum();
    if freeable < deficit {
        let names: Vec<&str> = eligible.iter().map(|o| o.model_name.as_str()).collect();
        return Err(NoVictim::NotEnough {
            eligible: names.join(", "),
            freeable,
            deficit,
        });
    }
    Ok(())
}

/// Picks the fewest eligible victims whose reservations free `needed` bytes for `waker`,
/// least recently accessed first among sets of that size. Eligible: serving, not popular,
/// served at least its `minRuntime`, not the waker.
pub fn choose_victims(
    spec: &GpuSpec,
    status: &GpuStatus,
    waker: &str,
    needed: u64,
    now: Timestamp,
) -> Result<Vec<String>, NoVictim> {
    let available = available_bytes(spec, status, Some(waker));
    let deficit = needed.saturating_sub(available);
    if deficit == 0 {
        return Ok(vec![]);
    }
    let serving = serving_others(status, waker)?;
    let mut eligible: Vec<&Occupant> = serving
        .iter()
        .copied()
        .filter(|o| eligible_at(o).is_some_and(|t| t <= now))
        .collect();
    if eligible.is_empty() {
        let why: Vec<String> = serving
            .iter()
            .filter(|o| !o.popular)
            .map(|o| inside_min_runtime(o))
            .collect();
        return Err(NoVictim::NotEligible(why.join("; ")));
    }
    // Least recently accessed first; never accessed counts as oldest.
    eligible.sort_by_key(|o| {
        (
            o.last_accessed.unwrap_or(Timestamp::MIN),
            o.pod_name.clone(),
        )
    });
    frees_enough(&eligible, deficit)?;
    // Fewest victims: the smallest k whose k largest reservations cover the deficit.
    let mut sizes: Vec<u64> = eligible.iter().map(|o| o.reserved_memory_bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let mut k = 0;
    let mut acc = 0u64;
    while acc < deficit {
        acc += sizes[k];
        k += 1;
    }
    // Among sets of size k, take victims in LRU order whenever the rest can still be
    // completed from the largest remaining candidates.
    let mut chosen: Vec<String> = Vec::with_capacity(k);
    let mut freed = 0u64;
    let mut remaining: Vec<&Occupant> = eligible.clone();
    while chosen.len() < k {
        let slots_after = k - chosen.len() - 1;
        let pick = remaining
            .iter()
            .position(|c| {
                let mut rest: Vec<u64> = remaining
                    .iter()
                    .filter(|o| o.pod_name != c.pod_name)
                    .map(|o| o.reserved_memory_bytes)
                    .collect();
                rest.sort_unstable_by(|a, b| b.cmp(a));
                let best_rest: u64 = rest.iter().take(slots_after).sum();
                freed + c.reserved_memory_bytes + best_rest >= deficit
            })
            .expect("k was chosen so that a completion exists");
        let c = remaining.remove(pick);
        freed += c.reserved_memory_bytes;
        chosen.push(c.pod_name.clone());
    }
    Ok(chosen)
}

/// Why a wake cannot claim a GPU yet. Each renders the message a queued request gets
/// at its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuWait {
    /// Another pod holds the wake lock (or the claim was refused for another reason).
    #[error("{0}")]
    Refused(Refusal),
    /// Short of memory, inside the fairness wait: others may still free it by themselves.
    #[error("waiting up to {max_wait:?} for memory to free before preempting")]
    Fairness { max_wait: Duration },
    /// The fairness wait is over and `victim` is named: waiting for it to sleep.
    /// `named_now`: this step named it (the others found it named already).
    #[error("preempting {victim}")]
    Preempting { victim: String, named_now: bool },
    /// Short a moment ago, enough now: the next step claims.
    #[error("memory is free; claiming")]
    Claiming,
    /// The fairness wait is over and nobody can be preempted.
    #[error("{0}")]
    NoVictim(NoVictim),
}

impl GpuWait {
    /// Whether the wake is short of memory (the fairness clock runs), rather than
    /// waiting for the lock.
    pub fn short_of_memory(&self) -> bool {
        !matches!(self, GpuWait::Refused(_))
    }
}

/// One step of a wake on one GPU, decided from the record alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WakeStep {
    /// The memory is claimed and the wake lock is this pod's.
    Claimed,
    /// Not yet: look again when the record changes, or at `recheck_at` when only time
    /// can change the answer (a lock lapsing, the fairness wait ending, a victim
    /// becoming eligible).
    Wait { why: GpuWait, recheck_at: Timestamp },
}

/// What a waking pod asks of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeRequest<'a> {
    pub claim: &'a Claim,
    /// A silent holder's wake lock lapses after this.
    pub lock_ttl: Duration,
    /// How long to wait for memory to free by itself before preempting.
    pub max_wait: Duration,
    /// Whom to preempt, and whether to wait out `max_wait` first.
    pub policy: crate::Policy,
    /// Under the cost-aware policy, how long a waker waits at most before it may preempt
    /// anyone (two fifths of its requests' queue deadline).
    pub starvation_bound: Duration,
    /// When this wake first found the GPU short of memory (the fairness clock), if it has.
    pub short_since: Option<Timestamp>,
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The record with the waker's intent declared. The cost-aware policy weighs the waker's
/// recent requests: they are recorded with its intent. The documented policy writes the
/// intent alone, as it always did.
fn declare_intent(
    status: &GpuStatus,
    claim: &Claim,
    policy: crate::Policy,
    now: Timestamp,
) -> GpuStatus {
    let (pod, model, bytes) = (&claim.pod, &claim.model, claim.bytes);
    if policy.rules().weighs_demand() {
        write_intent(&note_demand(status, claim), pod, model, bytes, now)
    } else {
        write_intent(status, pod, model, bytes, now)
    }
}

/// The wake's next step on one GPU, and the record to write for it (`None`: write
/// nothing). Claims under the wake lock when the memory fits; when it does not, declares
/// the intent, waits out `max_wait`, then names a victim.
pub fn wake_step(
    spec: &GpuSpec,
    status: &GpuStatus,
    req: &WakeRequest,
    now: Timestamp,
) -> (Option<GpuStatus>, WakeStep) {
    let claim = req.claim;
    // Lock expiry is a matter of time: look again after a TTL whatever else happens.
    let lapse = plus(now, req.lock_ttl);
    let wait = |why, at: Option<Timestamp>| WakeStep::Wait {
        why,
        recheck_at: at.map_or(lapse, |t| t.min(lapse)),
    };
    let rules = req.policy.rules();
    let view = |status| crate::policy::View {
        spec,
        status,
        now,
        bound: req.starvation_bound,
    };
    if let Some(holder) = rules.held_for(view(status), &claim.pod, claim.bytes, req.lock_ttl) {
        return (
            Some(declare_intent(status, claim, req.policy, now)),
            wait(GpuWait::NoVictim(NoVictim::HeldFor(holder)), None),
        );
    }
    // The lock before the fit: while another pod's wake holds it, a waker short of
    // memory waits for it rather than naming a victim, so that one waker acts on a GPU
    // at a time. Fit first (victims named during others' wakes) was never better on the
    // two Azure traces and up to a point worse within 3 s at 7 and 10 models per GPU
    // (docs/simulate.md, "The lock before the fit").
    let claimed = acquire_wake_lock(&register(status, claim, now), &claim.pod, req.lock_ttl, now)
        .and_then(|locked| self::claim(spec, &locked, claim, now));
    match claimed {
        Ok(next) => return (Some(next), WakeStep::Claimed),
        Err(Refusal::DoesNotFit { .. }) => {}
        Err(refused) => return (None, wait(GpuWait::Refused(refused), None)),
    }
    let with_intent = declare_intent(status, claim, req.policy, now);
    let since = req.short_since.unwrap_or(now);
    let fairness_ends = plus(since, req.max_wait);
    if now < fairness_ends
        && rules.waits_for_fairness()
        && claim.priority != greenthread_api::Priority::Critical
    {
        let why = GpuWait::Fairness {
            max_wait: req.max_wait,
        };
        return (Some(with_intent), wait(why, Some(fairness_ends)));
    }
    match crate::policy::victims(req.policy, view(&with_intent), &claim.pod, claim.bytes) {
        // One victim at a time: the next is chosen once it slept, on what is left then
        // (naming them all at once drains more models than turn out to be needed).
        Ok(victims) => match victims.into_iter().next() {
            Some(victim) => {
                let named_now = !with_intent.preemption_intents.iter().any(|i| {
                    i.pod_name == claim.pod && i.victim_pod_name.as_deref() == Some(&victim)
                });
                let next = name_victim(&with_intent, &claim.pod, &victim);
                let why = GpuWait::Preempting { victim, named_now };
                (Some(next), wait(why, None))
            }
            None => (Some(with_intent), wait(GpuWait::Claiming, None)),
        },
        Err(why) => {
            let eligible = rules.recheck_at(view(&with_intent), &claim.pod);
            (Some(with_intent), wait(GpuWait::NoVictim(why), eligible))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_corrects_only_the_pods_own_entry() {
        let lock = |pod: &str| {
            Some(WakeLock {
                pod_name: pod.into(),
                since: t(0),
            })
        };
        let base = GpuStatus {
            occupants: vec![
                occupant("ns/a", OccupantState::Waking, 20 * GI, 0),
                occupant("ns/b", OccupantState::Serving, 30 * GI, 0),
            ],
            wake_lock: lock("ns/a"),
            ..Default::default()
        };
        // (status, pod, settled) → (a's state, reserved, residual, lock holder)
        type Expect<'a> = (OccupantState, u64, u64, Option<&'a str>);
        let cases: Vec<(GpuStatus, &str, Settled, Expect)> = vec![
            // Marking serving failed: the lock is freed and the occupant serves.
            (
                base.clone(),
                "ns/a",
                Settled::Serving,
                (OccupantState::Serving, 20 * GI, 0, None),
            ),
            // A release that failed: the reservation goes, the residual is recorded.
            (
                base.clone(),
                "ns/a",
                Settled::Asleep {
                    residual: GI,
                    host: 0,
                },
                (OccupantState::Sleeping, 0, GI, None),
            ),
            // Another pod's lock is not ours to drop.
            (
                GpuStatus {
                    wake_lock: lock("ns/b"),
                    ..base.clone()
                },
                "ns/a",
                Settled::Serving,
                (OccupantState::Serving, 20 * GI, 0, Some("ns/b")),
            ),
            // Same name, other namespace: no entry of ours, nothing changes.
            (
                base.clone(),
                "other/a",
                Settled::Asleep {
                    residual: 0,
                    host: 0,
                },
                (OccupantState::Waking, 20 * GI, 0, Some("ns/a")),
            ),
        ];
        for (status, pod, settled, (state, reserved, residual, holder)) in cases {
            let next = reconcile_own(&status, pod, settled, t(5));
            let a = next.occupant("ns/a").unwrap();
            assert_eq!(
                (
                    a.state,
                    a.reserved_memory_bytes,
                    a.residual_memory_bytes,
                    next.wake_lock.as_ref().map(|l| l.pod_name.as_str())
                ),
                (state, reserved, residual, holder),
                "{pod} {settled:?}"
            );
            assert_eq!(
                next.occupant("ns/b"),
                status.occupant("ns/b"),
                "b untouched"
            );
        }
        // Already consistent: no write at all.
        let settled = reconcile_own(&base, "ns/b", Settled::Serving, t(5));
        assert_eq!(settled, base);
    }

    const GI: u64 = 1 << 30;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn spec(mem: u64) -> GpuSpec {
        GpuSpec {
            node: "n".into(),
            index: 0,
            memory_bytes: mem,
            ..Default::default()
        }
    }

    fn mk_claim(pod: &str, bytes: u64) -> Claim {
        Claim {
            pod: pod.into(),
            model: format!("model-{pod}"),
            bytes,
            popular: false,
            priority: Default::default(),
            min_runtime: Duration::from_secs(10),
            recent_requests: 0,
        }
    }

    fn occupant(pod: &str, state: OccupantState, reserved: u64, residual: u64) -> Occupant {
        Occupant {
            pod_name: pod.into(),
            model_name: pod.into(),
            state,
            reserved_memory_bytes: reserved,
            residual_memory_bytes: residual,
            popular: false,
            priority: Default::default(),
            last_accessed: None,
            became_serving_at: None,
            min_runtime: Duration::ZERO,
            heartbeat: t(0),
            in_flight: 0,
            draining: 0,
            recent_requests: 0,
            host_memory_bytes: 0,
            pinned: false,
        }
    }

    /// Host memory for level-1 sleepers, from a table: (this GPU's share, the others'
    /// (pod, held, pinned), the sleeper's own (held, pinned), its need, pinned) →
    /// held afterwards, or the refusal.
    #[test]
    fn host_memory_holds_what_fits_and_keeps_pinned_bytes() {
        type Case = (
            Option<u64>,
            Vec<(&'static str, u64, bool)>,
            (u64, bool),
            u64,
            bool,
            Result<u64, Refusal>,
        );
        let full = |need, available| {
            Err(Refusal::HostFull {
                need,
                available,
                total: 40 * GI,
            })
        };
        let cases: Vec<Case> = vec![
            // Not accounted here: recorded, never refused.
            (
                None,
                vec![("b", 90 * GI, false)],
                (0, false),
                30 * GI,
                false,
                Ok(30 * GI),
            ),
            // Fits exactly beside another sleeper.
            (
                Some(40 * GI),
                vec![("b", 10 * GI, false)],
                (0, false),
                30 * GI,
                false,
                Ok(30 * GI),
            ),
            // One byte more: level 2.
            (
                Some(40 * GI),
                vec![("b", 10 * GI, false)],
                (0, false),
                30 * GI + 1,
                false,
                full(30 * GI + 1, 30 * GI),
            ),
            // Its own old bytes do not count against it.
            (
                Some(40 * GI),
                vec![("b", 10 * GI, false)],
                (30 * GI, false),
                30 * GI,
                false,
                Ok(30 * GI),
            ),
            // Others' pinned bytes count, awake or asleep.
            (
                Some(40 * GI),
                vec![("b", 20 * GI, true)],
                (0, true),
                30 * GI,
                true,
                full(30 * GI, 20 * GI),
            ),
            // A pinned pod keeps what it holds even when the others filled the rest.
            (
                Some(40 * GI),
                vec![("b", 40 * GI, false)],
                (30 * GI, true),
                30 * GI,
                true,
                Ok(30 * GI),
            ),
            // ... but growing past what it holds must fit.
            (
                Some(40 * GI),
                vec![("b", 20 * GI, false)],
                (10 * GI, true),
                30 * GI,
                true,
                full(30 * GI, 20 * GI),
            ),
        ];
        for (i, (share, others, (own, own_pinned), need, pinned, want)) in
            cases.into_iter().enumerate()
        {
            let spec = GpuSpec {
                host_memory_bytes: share,
                ..spec(80 * GI)
            };
            let mut status = GpuStatus::default();
            for (pod, held, pinned) in others {
                let mut o = occupant(pod, OccupantState::Sleeping, 0, 0);
                o.host_memory_bytes = held;
                o.pinned = pinned;
                status.occupants.push(o);
            }
            let mut me = occupant("a", OccupantState::Serving, 30 * GI, 0);
            me.host_memory_bytes = own;
            me.pinned = own_pinned;
            status.occupants.push(me);
            let got = hold_host(&spec, &status, "a", need, pinned).map(|next| {
                let o = next.occupant("a").unwrap();
                assert_eq!(o.pinned, pinned, "case {i}");
                assert_eq!(
                    next.occupants
                        .iter()
                        .filter(|o| o.pod_name != "a")
                        .collect::<Vec<_>>(),
                    status
                        .occupants
                        .iter()
                        .filter(|o| o.pod_name != "a")
                        .collect::<Vec<_>>(),
                    "case {i}: the others are untouched"
                );
                o.host_memory_bytes
            });
            assert_eq!(got, want, "case {i}");
        }
        // No entry: nothing to hold for.
        assert_eq!(
            hold_host(&spec(GI), &GpuStatus::default(), "a", 1, false),
            Err(Refusal::NotAnOccupant { pod: "a".into() })
        );
    }

    /// Waking, the engine takes its weights back from host memory: an unpinned pod's
    /// host bytes go (at the wake's end, never before: until then it still holds them);
    /// a pinned pod's stay kept, unless its engine is gone.
    #[test]
    fn host_bytes_go_back_at_wake_unless_pinned() {
        let mk = |pinned| {
            let mut o = occupant("a", OccupantState::Sleeping, 0, GI);
            o.host_memory_bytes = 16 * GI;
            o.pinned = pinned;
            GpuStatus {
                occupants: vec![o],
                ..Default::default()
            }
        };
        for (pinned, after_wake) in [(false, 0), (true, 16 * GI)] {
            let s = spec(80 * GI);
            let claimed = claim(&s, &mk(pinned), &mk_claim("a", 30 * GI), t(1)).unwrap();
            assert_eq!(claimed.occupant("a").unwrap().host_memory_bytes, 16 * GI);
            let serving = mark_serving(&claimed, "a", t(2)).unwrap();
            assert_eq!(serving.occupant("a").unwrap().host_memory_bytes, after_wake);
            let reconciled = reconcile_own(&claimed, "a", Settled::Serving, t(3));
            assert_eq!(
                reconciled.occupant("a").unwrap().host_memory_bytes,
                after_wake
            );
            assert_eq!(
                drop_host(&mk(pinned), "a", false)
                    .occupant("a")
                    .unwrap()
                    .host_memory_bytes,
                after_wake
            );
            let lost = drop_host(&mk(pinned), "a", true);
            assert_eq!(
                (
                    lost.occupant("a").unwrap().host_memory_bytes,
                    lost.occupant("a").unwrap().pinned
                ),
                (0, false)
            );
        }
        // The heartbeat records what a sleeper holds (a write that failed).
        let asleep = reconcile_own(
            &mk(false),
            "a",
            Settled::Asleep {
                residual: GI,
                host: 0,
            },
            t(3),
        );
        assert_eq!(asleep.occupant("a").unwrap().host_memory_bytes, 0);
        let status = GpuStatus {
            occupants: vec![
                occupant("a", OccupantState::Sleeping, 0, GI),
                occupant("b", OccupantState::Sleeping, 0, 0),
            ],
            ..Default::default()
        };
        let asleep = reconcile_own(
            &status,
            "a",
            Settled::Asleep {
                residual: GI,
                host: 8 * GI,
            },
            t(3),
        );
        assert_eq!(host_held_bytes(&asleep), 8 * GI);
        assert_eq!(
            available_host_bytes(
                &GpuSpec {
                    host_memory_bytes: Some(10 * GI),
                    ..spec(80 * GI)
                },
                &asleep,
                None
            ),
            Some(2 * GI)
        );
    }

    #[test]
    fn available_counts_reservations_of_active_and_residuals_of_sleeping() {
        use OccupantState::*;
        let status = GpuStatus {
            occupants: vec![
                occupant("a", Serving, 30 * GI, 5 * GI),
                occupant("b", Waking, 20 * GI, 0),
                occupant("c", Sleeping, 40 * GI, 2 * GI),
            ],
            ..Default::default()
        };
        let s = spec(80 * GI);
        assert_eq!(available_bytes(&s, &status, None), 28 * GI);
        assert_eq!(available_bytes(&s, &status, Some("a")), 58 * GI);
        assert_eq!(available_bytes(&s, &status, Some("c")), 30 * GI);
        assert_eq!(committed_bytes(&status), 52 * GI);
        assert_eq!(available_bytes(&spec(GI), &status, None), 0, "saturates");
    }

    #[test]
    fn claim_fits_exactly_and_refuses_one_byte_more() {
        let s = spec(80 * GI);
        let status = claim(&s, &GpuStatus::default(), &mk_claim("a", 50 * GI), t(0)).unwrap();
        let o = status.occupant("a").unwrap();
        assert_eq!(
            (o.state, o.reserved_memory_bytes),
            (OccupantState::Waking, 50 * GI)
        );

        assert!(claim(&s, &status, &mk_claim("b", 30 * GI), t(1)).is_ok());
        let err = claim(&s, &status, &mk_claim("b", 30 * GI + 1), t(1)).unwrap_err();
        assert_eq!(
            err,
            Refusal::DoesNotFit {
                need: 30 * GI + 1,
                available: 30 * GI,
                total: 80 * GI
            }
        );
    }

    #[test]
    fn a_wakers_own_residual_is_not_counted_twice() {
        let s = spec(10 * GI);
        let status = GpuStatus {
            occupants: vec![occupant("a", OccupantState::Sleeping, 0, 3 * GI)],
            ..Default::default()
        };
        let next = claim(&s, &status, &mk_claim("a", 10 * GI), t(0)).unwrap();
        assert_eq!(next.occupant("a").unwrap().residual_memory_bytes, 0);
        assert_eq!(committed_bytes(&next), 10 * GI);
    }

    #[test]
    fn serve_then_release_records_the_residual() {
        let s = spec(80 * GI);
        let status = claim(&s, &GpuStatus::default(), &mk_claim("a", 50 * GI), t(0)).unwrap();
        let status = mark_serving(&status, "a", t(1)).unwrap();
        let o = status.occupant("a").unwrap();
        assert_eq!(o.state, OccupantState::Serving);
        assert_eq!(o.became_serving_at, Some(t(1)));
        let status = release(&status, "a", GI, t(2));
        let o = status.occupant("a").unwrap();
        assert_eq!(
            (o.state, o.reserved_memory_bytes, o.residual_memory_bytes),
            (OccupantState::Sleeping, 0, GI)
        );
        assert_eq!(available_bytes(&s, &status, None), 79 * GI);
        assert!(mark_serving(&status, "ghost", t(3)).is_err());
    }

    #[test]
    fn measured_reservation_may_shrink_freely_but_grows_only_if_it_fits() {
        let s = spec(10 * GI);
        let status = claim(&s, &GpuStatus::default(), &mk_claim("a", 6 * GI), t(0)).unwrap();
        let status = claim(&s, &status, &mk_claim("b", 4 * GI), t(0)).unwrap();
        let shrunk = set_reserved(&s, &status, "a", 5 * GI).unwrap();
        assert_eq!(shrunk.occupant("a").unwrap().reserved_memory_bytes, 5 * GI);
        assert!(set_reserved(&s, &status, "a", 7 * GI).is_err());
    }

    #[test]
    fn wake_lock_is_exclusive_until_its_holder_goes_silent() {
        let ttl = Duration::from_secs(10);
        let status = register(&GpuStatus::default(), &mk_claim("a", 0), t(0));
        let status = acquire_wake_lock(&status, "a", ttl, t(0)).unwrap();
        assert_eq!(
            acquire_wake_lock(&status, "b", ttl, t(5)).unwrap_err(),
            Refusal::LockHeld { holder: "a".into() }
        );
        // Re-entrant for its holder.
        assert!(acquire_wake_lock(&status, "a", ttl, t(5)).is_ok());
        // A heartbeat keeps it alive past the ttl counted from `since`.
        let alive = touch(&status, "a", Load::default(), t(8));
        assert!(acquire_wake_lock(&alive, "b", ttl, t(15)).is_err());
        // Silence past the ttl lets the next waker in.
        let taken = acquire_wake_lock(&alive, "b", ttl, t(19)).unwrap();
        assert_eq!(taken.wake_lock.as_ref().unwrap().pod_name, "b");
        // Releasing someone else's lock does nothing.
        assert_eq!(release_wake_lock(&taken, "a"), taken);
        assert!(release_wake_lock(&taken, "b").wake_lock.is_none());
    }

    #[test]
    fn remove_pod_leaves_no_trace() {
        let s = spec(10 * GI);
        let ttl = Duration::from_secs(10);
        let status = claim(&s, &GpuStatus::default(), &mk_claim("a", 6 * GI), t(0)).unwrap();
        let status = acquire_wake_lock(&status, "a", ttl, t(0)).unwrap();
        let status = remove_pod(&status, "a");
        assert!(status.occupants.is_empty());
        assert!(status.wake_lock.is_none());
    }

    fn serving(pod: &str, reserved: u64, served_since: i64, accessed: i64) -> Occupant {
        Occupant {
            became_serving_at: Some(t(served_since)),
            last_accessed: Some(t(accessed)),
            min_runtime: Duration::from_secs(10),
            ..occupant(pod, OccupantState::Serving, reserved, 0)
        }
    }

    fn gpu_with(occupants: Vec<Occupant>) -> GpuStatus {
        GpuStatus {
            occupants,
            ..Default::default()
        }
    }

    #[test]
    fn victim_choice_table() {
        let popular = |mut o: Occupant| {
            o.popular = true;
            o
        };
        struct Case {
            name: &'static str,
            occupants: Vec<Occupant>,
            waker: &'static str,
            needed: u64,
            now: i64,
            want: Result<Vec<&'static str>, &'static str>,
        }
        let cases = vec![
            Case {
                name: "fits already: nobody",
                occupants: vec![serving("a", 40 * GI, 0, 0)],
                waker: "w",
                needed: 40 * GI,
                now: 100,
                want: Ok(vec![]),
            },
            Case {
                name: "least recently accessed first",
                occupants: vec![serving("a", 40 * GI, 0, 50), serving("b", 40 * GI, 0, 20)],
                waker: "w",
                needed: 40 * GI,
                now: 100,
                want: Ok(vec!["b"]),
            },
            Case {
                name: "popular skipped even when least recently used",
                occupants: vec![
                    popular(serving("a", 40 * GI, 0, 1)),
                    serving("b", 40 * GI, 0, 90),
                ],
                waker: "w",
                needed: 40 * GI,
                now: 100,
                want: Ok(vec!["b"]),
            },
            Case {
                name: "minRuntime respected",
                occupants: vec![serving("a", 40 * GI, 95, 95), serving("b", 40 * GI, 0, 99)],
                waker: "w",
                needed: 40 * GI,
                now: 100,
                want: Ok(vec!["b"]),
            },
            Case {
                name: "never itself",
                occupants: vec![serving("w", 80 * GI, 0, 0)],
                waker: "w",
                needed: 80 * GI,
                now: 100,
                want: Ok(vec![]),
            },
            Case {
                name: "fewest victims beat strict LRU",
                occupants: vec![
                    serving("a", 20 * GI, 0, 1),
                    serving("b", 20 * GI, 0, 2),
                    serving("c", 40 * GI, 0, 3),
                ],
                waker: "w",
                needed: 40 * GI,
                now: 100,
                want: Ok(vec!["c"]),
            },
            Case {
                name: "two needed: LRU among those that complete the set",
                occupants: vec![
                    serving("a", 10 * GI, 0, 1),
                    serving("b", 30 * GI, 0, 2),
                    serving("c", 30 * GI, 0, 3),
                    serving("d", 10 * GI, 0, 4),
                ],
                waker: "w",
                needed: 60 * GI,
                now: 100,
                want: Ok(vec!["b", "c"]),
            },
            Case {
                name: "only popular: reason names them",
                occupants: vec![popular(serving("a", 80 * GI, 0, 0))],
                waker: "w",
                needed: 10 * GI,
                now: 100,
                want: Err("every serving occupant of this gpu is popular (a)"),
            },
            Case {
                name: "not yet eligible: reason names minRuntime",
                occupants: vec![serving("a", 80 * GI, 95, 95)],
                waker: "w",
                needed: 10 * GI,
                now: 100,
                want: Err(
                    "no serving occupant is eligible yet: a has not served its minRuntime of 10s",
                ),
            },
            Case {
                name: "sleeping residuals cannot be preempted",
                occupants: vec![occupant("a", OccupantState::Sleeping, 0, 80 * GI)],
                waker: "w",
                needed: 10 * GI,
                now: 100,
                want: Err("nobody else serves on this gpu; waiting for memory to free"),
            },
        ];
        for c in cases {
            let status = gpu_with(c.occupants);
            let got = choose_victims(&spec(80 * GI), &status, c.waker, c.needed, t(c.now));
            match (got, c.want) {
                (Ok(v), Ok(w)) => assert_eq!(v, w, "{}", c.name),
                (Err(e), Err(w)) => {
                    assert_eq!(e.to_string(), w, "{}", c.name)
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
            }
        }
    }

    #[test]
    fn eligibility_changes_with_time_and_the_next_moment_is_known() {
        let status = gpu_with(vec![serving("a", 80 * GI, 95, 95)]);
        assert_eq!(next_eligibility(&status, "w", t(100)), Some(t(105)));
        assert!(choose_victims(&spec(80 * GI), &status, "w", GI, t(104)).is_err());
        assert_eq!(
            choose_victims(&spec(80 * GI), &status, "w", GI, t(105)).unwrap(),
            vec!["a"]
        );
        assert_eq!(next_eligibility(&status, "w", t(106)), None);
    }

    #[test]
    fn batch_work_wakes_only_into_idle_capacity() {
        let ttl = Duration::from_secs(10);
        let lock = |pod: &str, at: i64| {
            Some(WakeLock {
                pod_name: pod.into(),
                since: t(at),
            })
        };
        let mut waiter = write_intent(&GpuStatus::default(), "ns/w", "w", 10 * GI, t(0));
        waiter.occupants = vec![occupant("ns/b", OccupantState::Sleeping, 0, GI)];
        // (status, the pod waking for batch work, needing 40 GiB of 80) → allowed, or why not
        let serving = |gib| occupant("ns/a", OccupantState::Serving, gib * GI, 0);
        let cases: Vec<(GpuStatus, Result<(), &str>)> = vec![
            (GpuStatus::default(), Ok(())),
            // Free memory beside a serving model: it fits, nobody is preempted.
            (
                GpuStatus {
                    occupants: vec![serving(40)],
                    ..Default::default()
                },
                Ok(()),
            ),
            // It would need the serving model's memory: never.
            (
                GpuStatus {
                    occupants: vec![serving(41)],
                    ..Default::default()
                },
                Err("needs"),
            ),
            // Someone else waits for memory here, or is waking here: they go first.
            (waiter.clone(), Err("ns/w waits for memory here")),
            (
                GpuStatus {
                    wake_lock: lock("ns/a", 5),
                    ..Default::default()
                },
                Err("ns/a is waking here"),
            ),
            // A lock that lapsed, or the pod's own, or its own intent: no one else's.
            (
                GpuStatus {
                    wake_lock: lock("ns/a", -20),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                GpuStatus {
                    wake_lock: lock("ns/b", 5),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                write_intent(&GpuStatus::default(), "ns/b", "b", 40 * GI, t(0)),
                Ok(()),
            ),
        ];
        for (status, want) in cases {
            let got = idle_room(&spec(80 * GI), &status, "ns/b", 40 * GI, ttl, t(6))
                .map_err(|e| e.to_string());
            match (&got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(w)) if e.contains(w) => {}
                _ => panic!("{status:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn intents_keep_their_start_and_name_victims() {
        let s = write_intent(&GpuStatus::default(), "w", "m", GI, t(1));
        let s = write_intent(&s, "w", "m", 2 * GI, t(5));
        assert_eq!(s.preemption_intents.len(), 1);
        assert_eq!(
            (
                s.preemption_intents[0].since,
                s.preemption_intents[0].needed_bytes
            ),
            (t(1), 2 * GI)
        );
        let s = name_victim(&s, "w", "a");
        assert!(is_victim(&s, "a"));
        assert!(!is_victim(&s, "w"));
        let s = clear_intent(&s, "w");
        assert!(!is_victim(&s, "a"));
    }

    #[test]
    fn wake_step_table() {
        let ttl = Duration::from_secs(2);
        let max_wait = Duration::from_secs(30);
        let lock = |pod: &str, since: i64| {
            Some(WakeLock {
                pod_name: pod.into(),
                since: t(since),
            })
        };
        let claim = mk_claim("ns/w", 40 * GI);
        struct Case {
            name: &'static str,
            status: GpuStatus,
            short_since: Option<i64>,
            now: i64,
            want: WakeStep,
            /// (waker's state if written, lock holder, intent's victim)
            written: Option<(
                Option<OccupantState>,
                Option<&'static str>,
                Option<&'static str>,
            )>,
        }
        let b_serving = serving("ns/b", 50 * GI, 0, 5);
        let cases = vec![
            Case {
                name: "fits: claimed under the lock",
                status: gpu_with(vec![serving("ns/b", 30 * GI, 0, 5)]),
                short_since: None,
                now: 100,
                want: WakeStep::Claimed,
                written: Some((Some(OccupantState::Waking), Some("ns/w"), None)),
            },
            Case {
                name: "another holds the lock: wait for it, nothing written",
                status: GpuStatus {
                    wake_lock: lock("ns/b", 99),
                    ..gpu_with(vec![])
                },
                short_since: None,
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::Refused(Refusal::LockHeld {
                        holder: "ns/b".into(),
                    }),
                    recheck_at: t(102),
                },
                written: None,
            },
            Case {
                name: "short while another holds the lock: it waits for the lock, names no victim",
                status: GpuStatus {
                    wake_lock: lock("ns/c", 99),
                    ..gpu_with(vec![b_serving.clone()])
                },
                short_since: Some(70),
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::Refused(Refusal::LockHeld {
                        holder: "ns/c".into(),
                    }),
                    recheck_at: t(102),
                },
                written: None,
            },
            Case {
                name: "a silent holder's lock lapses: claimed",
                status: GpuStatus {
                    wake_lock: lock("ns/b", 90),
                    ..gpu_with(vec![])
                },
                short_since: None,
                now: 100,
                want: WakeStep::Claimed,
                written: Some((Some(OccupantState::Waking), Some("ns/w"), None)),
            },
            Case {
                name: "short: the intent is declared and the fairness wait starts",
                status: gpu_with(vec![b_serving.clone()]),
                short_since: None,
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::Fairness { max_wait },
                    recheck_at: t(102),
                },
                written: Some((None, None, None)),
            },
            Case {
                name: "fairness wait nearly over: look again when it ends",
                status: gpu_with(vec![b_serving.clone()]),
                short_since: Some(71),
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::Fairness { max_wait },
                    recheck_at: t(101),
                },
                written: Some((None, None, None)),
            },
            Case {
                name: "fairness wait over: the LRU eligible victim is named",
                status: gpu_with(vec![b_serving.clone()]),
                short_since: Some(70),
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::Preempting {
                        victim: "ns/b".into(),
                        named_now: true,
                    },
                    recheck_at: t(102),
                },
                written: Some((None, None, Some("ns/b"))),
            },
            Case {
                name: "a victim named before is not named again",
                status: GpuStatus {
                    preemption_intents: vec![PreemptionIntent {
                        pod_name: "ns/w".into(),
                        model_name: "model-ns/w".into(),
                        needed_bytes: 40 * GI,
                        since: t(70),
                        victim_pod_name: Some("ns/b".into()),
                    }],
                    ..gpu_with(vec![b_serving.clone()])
                },
                short_since: Some(70),
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::Preempting {
                        victim: "ns/b".into(),
                        named_now: false,
                    },
                    recheck_at: t(102),
                },
                written: Some((None, None, Some("ns/b"))),
            },
            Case {
                name: "nobody eligible yet: look again when the victim has served its minRuntime",
                status: gpu_with(vec![serving("ns/b", 50 * GI, 91, 91)]),
                short_since: Some(0),
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::NoVictim(NoVictim::NotEligible(
                        "ns/b has not served its minRuntime of 10s".into(),
                    )),
                    recheck_at: t(101),
                },
                written: Some((None, None, None)),
            },
            Case {
                name: "only popular models serve: wait, with the reason",
                status: gpu_with(vec![Occupant {
                    popular: true,
                    priority: Default::default(),
                    ..b_serving.clone()
                }]),
                short_since: Some(0),
                now: 100,
                want: WakeStep::Wait {
                    why: GpuWait::NoVictim(NoVictim::AllPopular("ns/b".into())),
                    recheck_at: t(102),
                },
                written: Some((None, None, None)),
            },
        ];
        for c in cases {
            let req = WakeRequest {
                policy: crate::Policy::Lru,
                starvation_bound: Duration::MAX,
                claim: &claim,
                lock_ttl: ttl,
                max_wait,
                short_since: c.short_since.map(t),
            };
            let (next, step) = wake_step(&spec(80 * GI), &c.status, &req, t(c.now));
            assert_eq!(step, c.want, "{}", c.name);
            let written = next.as_ref().map(|n| {
                (
                    n.occupant("ns/w").map(|o| o.state),
                    n.wake_lock.as_ref().map(|l| l.pod_name.as_str()),
                    n.preemption_intents
                        .iter()
                        .find(|i| i.pod_name == "ns/w")
                        .and_then(|i| i.victim_pod_name.as_deref()),
                )
            });
            assert_eq!(written, c.written, "{}", c.name);
            // A wait short of memory leaves the intent in the record; a claim clears it.
            if let Some(n) = &next {
                let has_intent = n.preemption_intents.iter().any(|i| i.pod_name == "ns/w");
                assert_eq!(has_intent, step != WakeStep::Claimed, "{}", c.name);
            }
        }
        // The reasons read as the messages queued requests get.
        assert_eq!(
            GpuWait::Fairness { max_wait }.to_string(),
            "waiting up to 30s for memory to free before preempting"
        );
        assert_eq!(
            GpuWait::Preempting {
                victim: "ns/b".into(),
                named_now: true
            }
            .to_string(),
            "preempting ns/b"
        );
    }
}
