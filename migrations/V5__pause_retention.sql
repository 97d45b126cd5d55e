-- taskwarden schema v5: paused agents, and the index retention deletes by.

-- One row per paused agent, cluster-wide: no instance claims a paused agent's queued tasks
-- (the claim statement checks this table); tasks already running finish. Resuming deletes
-- the row.
CREATE TABLE paused_agents (
    agent      text        PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now(),
    -- The instance that took the pause request, and the operator's reason, if given.
    paused_by  text        NOT NULL DEFAULT '',
    reason     text
);

-- Retention finds finished tasks (outside objectives: those go whole, found through
-- tasks_objective_idx) past their age by status and finish time, oldest first.
CREATE INDEX tasks_finished_idx ON tasks (status, finished_at)
    WHERE objective_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled', 'timed_out');
