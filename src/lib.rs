//! taskwarden: a daemon that runs agent and background tasks whose state lives in
//! PostgreSQL, and watches its own database sessions, pool, tasks and memory so that
//! leaks, pool exhaustion and hung tasks are seen and cleaned up. See ARCHITECTURE.md.

// The daemon's runtime paths never unwrap; unit tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agents;
pub mod alert_rules;
pub mod alerts;
pub mod api;
pub mod client;
pub mod config;
pub mod daemon;
pub mod db;
pub mod logging;
pub mod metrics;
pub mod orchestrator;
pub mod periodic;
pub mod process;
pub mod reload;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod task_state;
