//! The one way a taskwarden is put together: pool and store on a migrated database, the
//! supervisor, and the orchestrator with its loops. `taskwarden run` uses it (and adds the
//! HTTP listener, signals and systemd), and so does a program that embeds taskwarden with
//! agents of its own (see `examples/embed_agent.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DaemonError, instance_id};
use crate::agents::{AgentEntry, EventHub};
use crate::alerts::Alerts;
use crate::config::Config;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::orchestrator::registry::RunningTasks;
use crate::orchestrator::{Orchestrator, OrchestratorParts};
use crate::store::Store;
use crate::supervisor::{Liveness, Supervisor};

/// A running taskwarden's parts. Stop it with [`Parts::stop`].
pub struct Parts {
    pub config: Arc<ArcSwap<Config>>,
    pub db: Db,
    pub store: Store,
    pub metrics: Metrics,
    pub running: Arc<RunningTasks>,
    pub alerts: Alerts,
    pub liveness: Arc<Liveness>,
    pub orchestrator: Orchestrator,
    pub instance_id: String,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl Parts {
    /// Builds the pool (proving it works), starts the supervisor and the orchestrator.
    /// `pg` must point at a migrated database (`db::migrate::run`); `extra_agents` run
    /// beside the configured ones.
    pub async fn start(
        pg: tokio_postgres::Config,
        config: Arc<ArcSwap<Config>>,
        extra_agents: BTreeMap<String, AgentEntry>,
    ) -> Result<Parts, DaemonError> {
        let cfg = config.load_full();
        let metrics = Metrics::new();
        let db = Db::new(pg.clone(), &cfg.database, &metrics)?;
        let store = Store::new(db.clone(), cfg.workers.max_attempts);
        drop(db.session("daemon.startup_check").await?);
        let instance_id = instance_id();
        // Enqueues from SQL that give no max_attempts get this instance's default.
        store.record_enqueue_defaults(&instance_id).await?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let running = RunningTasks::new();
        let alerts = Alerts::new(
            metrics.clone(),
            Arc::clone(&config),
            &tasks,
            shutdown.clone(),
        );
        let supervisor = Supervisor::new(
            Arc::clone(&config),
            pg.clone(),
            db.clone(),
            Arc::clone(&running),
            alerts.clone(),
            metrics.clone(),
        );
        let liveness = supervisor.liveness();
        tasks.spawn(supervisor.run(shutdown.clone()));
        let orchestrator = Orchestrator::new(OrchestratorParts {
            config: Arc::clone(&config),
            pg,
            db: db.clone(),
            store: store.clone(),
            running: Arc::clone(&running),
            hub: EventHub::default(),
            metrics: metrics.clone(),
            instance_id: instance_id.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            extra_agents,
        });
        orchestrator.start();
        Ok(Parts {
            config,
            db,
            store,
            metrics,
            running,
            alerts,
            liveness,
            orchestrator,
            instance_id,
            shutdown,
            tasks,
        })
    }

    /// Stops in order (see `daemon::stop`): no new claims, running tasks get
    /// `workers.shutdown_grace`, the rest are cancelled and re-queued, loops joined with a
    /// deadline, the pool closed.
    pub async fn stop(&self) -> Result<(), DaemonError> {
        super::stop_parts(self).await
    }
}
