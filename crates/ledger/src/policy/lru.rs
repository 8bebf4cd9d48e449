//! `lru`, the documented behaviour, kept as it was: wait `maxWaitTime` for memory to free
//! by itself, then preempt the least recently accessed serving models (not popular, past
//! their `minRuntime`), as few as free enough memory, one at a time.

use super::{SchedulingPolicy, View};
use crate::decide::NoVictim;

pub struct Lru;

impl SchedulingPolicy for Lru {
    fn waits_for_fairness(&self) -> bool {
        true
    }

    fn victims(&self, gpu: View, waker: &str, needed: u64) -> Result<Vec<String>, NoVictim> {
        crate::decide::choose_victims(gpu.spec, gpu.status, waker, needed, gpu.now)
    }
}
