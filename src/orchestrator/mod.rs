//! The orchestrator: what runs tasks in this process. So far it owns the registry of tasks
//! running here ([`registry::RunningTasks`]), through which the supervisor and shutdown
//! cancel them; the workers and agents that fill it are the orchestrator issue's work.

pub mod elector;
pub mod registry;
pub mod worker;

pub use worker::{Orchestrator, OrchestratorError, OrchestratorParts};
