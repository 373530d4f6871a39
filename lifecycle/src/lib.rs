//! baton-lifecycle: zero-downtime upgrades for any Rust service.
//!
//! (Crate documentation: see the façade below.)

pub mod activation;
pub mod control;
pub mod daemon;
pub mod env;
pub mod fdstore;
pub mod generation;
pub mod keeper;
pub mod logging;
pub mod manager;
pub mod notify;
pub mod pidfile;
pub mod signals;
pub mod upgrade;
pub mod workload;
