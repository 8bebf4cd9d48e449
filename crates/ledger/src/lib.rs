//! The GPU ledger: the only state sidecars share. Decisions are pure functions over a
//! GPU's status ([`decide`]); backends ([`MemoryLedger`], [`KubeLedger`]) only
//! store records, enforce compare-and-swap, and notify watchers of changes.

mod clock;
pub mod decide;

mod kube_ledger;
mod ledger;
mod memory;
pub mod policy;

pub use clock::Clock;
pub use greenthread_api::feed::{self, Feed, Subscriber};
pub use kube_ledger::KubeLedger;
pub use ledger::{Backoff, Ledger, LedgerError, MAX_CONFLICTS, seed_jitter, update};
pub use memory::MemoryLedger;
pub use policy::Policy;
