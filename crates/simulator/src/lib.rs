//! `greenthread sim-engine`: a vLLM-compatible server whose timings follow bytes and
//! bandwidths, whose memory lives on a simulated GPU, and which can misbehave on purpose.

mod config;
mod endpoints;
mod engine;
mod metrics;
mod openai;
mod server;
pub mod stand_in;

pub use config::{AsleepBehavior, SimConfig};
pub use engine::SimEngine;
pub use server::{bind_and_serve, router};
