-- taskwarden schema v2: what the orchestrator needs.

-- The agent's final reply (JSON), kept with the task.
ALTER TABLE tasks ADD COLUMN result jsonb;

-- Daemon instances sharing this database, with their heartbeat; the leader reaps the dead.
CREATE TABLE instances (
    id            text PRIMARY KEY,
    hostname      text        NOT NULL,
    pid           integer     NOT NULL,
    version       text        NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

-- Workers LISTEN on this channel; one notification per inserting statement, not per row.
CREATE FUNCTION taskwarden_notify_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskwarden_tasks', '');
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_notify AFTER INSERT ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskwarden_notify_tasks();

-- Dependency lookups: steps of an objective by key.
CREATE INDEX tasks_objective_step_idx ON tasks (objective_id, step_key) WHERE objective_id IS NOT NULL;
