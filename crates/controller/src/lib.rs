//! The controller. Pure "build" functions come first ([`render`]): a Model and its
//! placement in, pods and a Service out, tested from Model YAML.

pub mod render;
