-- taskwarden schema v1: objectives, tasks, task events.
-- Status values mirror store::TaskStatus; transitions are checked in Rust (one state machine).

CREATE TABLE objectives (
    id          bigserial PRIMARY KEY,
    title       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id                bigserial PRIMARY KEY,
    objective_id      bigint REFERENCES objectives(id) ON DELETE CASCADE,
    step_key          text,
    depends_on        text[]      NOT NULL DEFAULT '{}',
    agent             text        NOT NULL,
    payload           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    session_id        text,
    status            text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out')),
    priority          integer     NOT NULL DEFAULT 0,
    attempts          integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts      integer     NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after         timestamptz NOT NULL DEFAULT now(),
    lease_owner       text,
    lease_expires_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    error             text,
    prompt_tokens     bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cost_usd          numeric(20, 8) NOT NULL DEFAULT 0 CHECK (cost_usd >= 0),
    UNIQUE (objective_id, step_key)
);

-- The claim query: runnable tasks by priority, then age.
CREATE INDEX tasks_runnable_idx ON tasks (priority DESC, run_after, id) WHERE status = 'queued';
CREATE INDEX tasks_running_idx ON tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_session_idx ON tasks (session_id, id) WHERE session_id IS NOT NULL;
CREATE INDEX tasks_objective_idx ON tasks (objective_id) WHERE objective_id IS NOT NULL;
CREATE INDEX tasks_status_idx ON tasks (status, id);

CREATE TABLE task_events (
    id          bigserial PRIMARY KEY,
    task_id     bigint      NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
    kind        text        NOT NULL,
    data        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_events_task_idx ON task_events (task_id, id);
