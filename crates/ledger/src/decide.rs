//! Pure decisions over one GPU's record. Every function takes the current status and
//! returns the next one (or why not); none does I/O, so each is tested from tables.

use std::time::Duration;

use greenthread_api::{GpuSpec, GpuStatus, Occupant, OccupantState, WakeLock};
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
}

/// What a pod claims when it wakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub pod: String,
    pub model: String,
    pub bytes: u64,
    pub popular: bool,
    pub min_runtime: Duration,
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
    let used: u64 = status
        .occupants
        .iter()
        .filter(|o| Some(o.pod_name.as_str()) != except)
        .map(charged_bytes)
        .sum();
    spec.memory_bytes.saturating_sub(used)
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

/// Ensures `pod` has a record (sleeping, nothing held) so that others can see it.
pub fn register(status: &GpuStatus, claim: &Claim, now: Timestamp) -> GpuStatus {
    let mut next = status.clone();
    match next.occupant_mut(&claim.pod) {
        Some(o) => {
            o.model_name.clone_from(&claim.model);
            o.popular = claim.popular;
            o.min_runtime = claim.min_runtime;
            o.heartbeat = now;
        }
        None => next.occupants.push(Occupant {
            pod_name: claim.pod.clone(),
            model_name: claim.model.clone(),
            state: OccupantState::Sleeping,
            reserved_memory_bytes: 0,
            residual_memory_bytes: 0,
            popular: claim.popular,
            last_accessed: None,
            became_serving_at: None,
            min_runtime: claim.min_runtime,
            heartbeat: now,
        }),
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
    if next.wake_lock.as_ref().is_some_and(|l| l.pod_name == pod) {
        next.wake_lock = None;
    }
    next
}

/// Heartbeat, and the access time used for least-recently-used victim choice.
pub fn touch(
    status: &GpuStatus,
    pod: &str,
    accessed: Option<Timestamp>,
    now: Timestamp,
) -> GpuStatus {
    let mut next = status.clone();
    if let Some(o) = next.occupant_mut(pod) {
        o.heartbeat = now;
        if accessed.is_some() {
            o.last_accessed = accessed;
        }
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

/// Removes every trace of a pod: occupant, intents, lock.
pub fn remove_pod(status: &GpuStatus, pod: &str) -> GpuStatus {
    let mut next = release(status, pod, 0, Timestamp::UNIX_EPOCH);
    next.occupants.retain(|o| o.pod_name != pod);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

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
            min_runtime: Duration::from_secs(10),
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
            last_accessed: None,
            became_serving_at: None,
            min_runtime: Duration::ZERO,
            heartbeat: t(0),
        }
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
        let alive = touch(&status, "a", None, t(8));
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
}
