-- taskwarden schema v6: periodic tasks (schedules) and per-agent rate limits.

-- One row per configured schedule ([schedules.NAME]): the due time it last enqueued a run
-- for. Every instance runs the scheduler; a run is enqueued in the same transaction that
-- advances last_due, under this row's lock (FOR UPDATE SKIP LOCKED), so each due time is
-- enqueued once however many instances see it. A schedule seen for the first time starts
-- at that moment (last_due = now()): its first run is its first due time after that.
CREATE TABLE schedules (
    name         text        PRIMARY KEY,
    last_due     timestamptz NOT NULL,
    -- The task the last due time enqueued (NULL until the first run; the task may have
    -- been deleted by retention since).
    last_task_id bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- A task a schedule enqueued names it and its due time; at most one task per schedule
-- and due time (a second guard beside the schedules row).
ALTER TABLE tasks
    ADD COLUMN schedule     text,
    ADD COLUMN scheduled_at timestamptz,
    ADD CONSTRAINT tasks_schedule_dated CHECK ((schedule IS NULL) = (scheduled_at IS NULL));
CREATE UNIQUE INDEX tasks_schedule_due_idx ON tasks (schedule, scheduled_at)
    WHERE schedule IS NOT NULL;

-- Rate limits per agent (an agent's `rate = "N/sec|min|hour"`), cluster-wide: one row per
-- limited agent holding the current fixed window and the claims counted in it. A claim
-- takes the row's lock (an upsert), claims at most what the window has left, and adds
-- what it claimed, in one transaction; so every instance together claims at most N per
-- window.
CREATE TABLE rate_windows (
    agent        text        PRIMARY KEY,
    window_start timestamptz NOT NULL,
    used         bigint      NOT NULL DEFAULT 0 CHECK (used >= 0)
);
