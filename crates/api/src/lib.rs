//! Types shared by every GreenThread component: the GPU ledger records that sidecars
//! coordinate through, and the size and duration formats accepted on the command line
//! and in configuration files.

pub mod engine_command;
pub mod gpu;
pub mod model;
pub mod units;

pub use engine_command::shell_quote;
pub use gpu::{
    Gpu, GpuResource, GpuSpec, GpuStats, GpuStatus, Occupant, OccupantState, PreemptionIntent,
    WakeLock,
};
pub use model::{
    EngineKind, FairnessSpec, FieldError, Model, ModelSpec, ModelStatus, SleepSpec, ValidModel,
};
pub use units::{ByteSize, ParseError, arg, format_duration, parse_duration};

/// A pod's key in the GPU ledger (occupants, intents, wake locks): `namespace/name`, so
/// that pods of the same name in two tenants' namespaces never share an entry.
pub fn ledger_key(namespace: &str, pod: &str) -> String {
    format!("{namespace}/{pod}")
}
