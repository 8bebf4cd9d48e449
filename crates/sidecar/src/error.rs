//! The sidecar's errors and wait reasons. Each error has a stable `metric_label()`, so
//! that metrics labels and log fields come from one place.

use std::{sync::Arc, time::Duration};

use greenthread_ledger::{LedgerError, decide};

use crate::{engine::EngineError, state::State};

/// A ledger write of the wake or sleep path that did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Refused(#[from] decide::Refusal),
}

impl ClaimError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ClaimError::Ledger(e) => e.metric_label(),
            ClaimError::Refused(decide::Refusal::DoesNotFit { .. }) => "does_not_fit",
            ClaimError::Refused(decide::Refusal::LockHeld { .. }) => "lock_held",
            ClaimError::Refused(decide::Refusal::NotAnOccupant { .. }) => "not_an_occupant",
            ClaimError::Refused(decide::Refusal::HostFull { .. }) => "host_full",
        }
    }
}

/// Why the engine could not be brought up (booted, woken, restarted) or put to sleep.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    #[error("engine was lost")]
    Lost,
    #[error("engine process exited during start-up: {0}")]
    ExitedDuringStart(EngineError),
    #[error("engine did not come up within {after:?}: {last}")]
    BootTimeout { after: Duration, last: EngineError },
    #[error("{0}")]
    Start(String),
    #[error("engine still reports is_sleeping=true after waking")]
    StillAsleep,
    #[error("warm-up failed: {0}")]
    WarmUp(EngineError),
    #[error("engine is wedged: a one-token warm-up got no answer within {0:?}")]
    Wedged(Duration),
    #[error("engine failed to wake after {restarts} cold restarts: {last}")]
    GaveUp {
        restarts: u32,
        last: Box<DriverError>,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl DriverError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            DriverError::ShuttingDown => "shutting_down",
            DriverError::Lost => "lost",
            DriverError::ExitedDuringStart(_) => "exited_during_start",
            DriverError::BootTimeout { .. } => "boot_timeout",
            DriverError::Start(_) => "start",
            DriverError::StillAsleep => "still_asleep",
            DriverError::WarmUp(_) => "warm_up",
            DriverError::Wedged(_) => "wedged",
            DriverError::GaveUp { .. } => "gave_up",
            DriverError::Engine(EngineError::Timeout(_)) => "engine_timeout",
            DriverError::Engine(_) => "engine",
        }
    }
}

/// Why queued requests were failed rather than served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    #[error("could not claim GPU memory: {0}")]
    Claim(Arc<ClaimError>),
    #[error("{0}")]
    Wake(Arc<DriverError>),
    /// A request of higher priority took this one's place in the full queue.
    #[error(
        "a {0} request was refused to make room in the full queue for a more important one; retry later"
    )]
    Shed(greenthread_api::Priority),
}

/// What a queued request waits on: the end of its 503 message when its deadline passes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitReason {
    /// Serving: nothing to wait on.
    #[error("")]
    Nothing,
    #[error("the engine is booting")]
    Booting,
    #[error("waiting for GPU memory")]
    Memory,
    #[error("gpu {gpu}: {why}")]
    Gpu { gpu: u32, why: decide::GpuWait },
    #[error("the engine is waking")]
    EngineWaking,
    #[error("the engine woke and is answering its warm-up request")]
    WarmingUp,
    #[error("engine cold restart #{restarts} after: {after}")]
    ColdRestart { restarts: u32, after: String },
    #[error("the model is going to sleep; held until the next wake")]
    GoingToSleep,
}

/// What a request that waited past its deadline is told.
#[derive(Debug, Clone, thiserror::Error)]
#[error("model {model} is {state}: {waiting}")]
pub struct Stalled {
    pub model: String,
    pub state: State,
    pub waiting: WaitReason,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Rejection {
    #[error("request queue is full ({depth} waiting); retry later")]
    QueueFull { depth: usize },
    /// A sheddable request past half the queue, or one evicted by a more important one.
    #[error("{why}")]
    Shed { why: String },
    #[error("request waited {:.1}s without being served: {reason}", waited.as_secs_f64())]
    Deadline { waited: Duration, reason: Stalled },
    #[error("{0}")]
    Failed(Failure),
    /// A batch request while the capacity is not idle: its batch tries again later.
    #[error(
        "batch requests take only idle capacity, and this is not: {why}; the batch tries again later"
    )]
    NotIdle { why: String },
}

impl Rejection {
    /// The `reason` label of `gthread_sidecar_rejections_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Rejection::QueueFull { .. } | Rejection::Shed { .. } => "queue_full",
            Rejection::Deadline { .. } => "deadline",
            Rejection::Failed(_) => "failed",
            Rejection::NotIdle { .. } => "not_idle",
        }
    }
}

/// Why a sleep was not carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SleepError {
    #[error("model is {0}, not serving")]
    NotServing(State),
}

impl SleepError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            SleepError::NotServing(_) => "not_serving",
        }
    }
}

/// Why a boot failed (the claim and the wake lock are given back).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("reading the GPU records: {0}")]
    Ledger(#[from] LedgerError),
    #[error("claiming GPU memory for the boot: {0}")]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Engine(#[from] DriverError),
}

impl BootError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            BootError::Ledger(e) => e.metric_label(),
            BootError::Claim(e) => e.metric_label(),
            BootError::Engine(e) => e.metric_label(),
        }
    }
}
