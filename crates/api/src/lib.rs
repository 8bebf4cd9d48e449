//! Types shared by every GreenThread component: the GPU ledger records that sidecars
//! coordinate through, and the size and duration formats accepted on the command line
//! and in configuration files.

pub mod engine_command;
pub mod feed;
pub mod gpu;
pub mod keys;
pub mod model;
pub mod priority;
pub mod units;

pub use engine_command::{shell_quote, split_simple};
pub use gpu::{
    Gpu, GpuResource, GpuSpec, GpuStats, GpuStatus, Occupant, OccupantState, PreemptionIntent,
    WakeLock,
};
pub use model::{
    AdapterSpec, DownloadStatus, EngineKind, FairnessSpec, FieldError, GPU_PRODUCT_LABEL,
    LORA_RANKS, LoraSettings, MAX_GPUS_PER_REPLICA, Model, ModelSpec, ModelStatus, ModelType,
    Parallelism, SleepSpec, ValidModel, adapter_clashes, product_label,
};
pub use priority::{BATCH_HEADER, PRIORITY_HEADER, Priority};
pub use units::{ByteSize, HostBudget, ParseError, arg, format_duration, parse_duration};

/// A pod's key in the GPU ledger (occupants, intents, wake locks): `namespace/name`, so
/// that pods of the same name in two tenants' namespaces never share an entry.
pub fn ledger_key(namespace: &str, pod: &str) -> String {
    format!("{namespace}/{pod}")
}

/// Declares a struct of metric families with each family's exposition name and help next
/// to its field, and `fn registered(&mut Registry) -> Self`, which creates them and
/// registers the named ones (a field without `=> (name, help)` is created, not
/// registered). The crates that use it depend on `prometheus-client` themselves.
///
/// ```text
/// greenthread_api::metric_families! {
///     pub struct ApiFamilies {
///         requests: Family<Labels, Counter> = Family::default()
///             => ("gthread_apiserver_requests", "API server requests"),
///     }
/// }
/// ```
#[macro_export]
macro_rules! metric_families {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $fvis:vis $field:ident : $ty:ty = $init:expr $(=> ($metric:expr, $help:expr))?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty, )*
        }

        impl $name {
            /// The families, each registered under its exposition name.
            $vis fn registered(registry: &mut ::prometheus_client::registry::Registry) -> Self {
                let m = Self { $( $field: $init, )* };
                $( $( registry.register($metric, $help, m.$field.clone()); )? )*
                m
            }
        }
    };
}
