-- taskwarden schema v4: enqueue from SQL (inside the application's own transaction) and
-- unique keys.
--
-- Everything lives in the public schema, beside the tables (see README "Job-queue
-- features"). The HTTP API's submit goes through the same function when a task has a
-- unique key, so the rules below are written once.

-- A task may hold a key. Which tasks hold their key, by scope:
--   queued  while it waits for its first start (status queued, never started);
--   active  while queued or running;
--   period  until unique_until (its creation time plus the period); a later enqueue of
--           the same key clears unique_until once it has passed.
-- At most one task holds a given key at a time (the unique index below); keys of all
-- scopes share one namespace.
ALTER TABLE tasks
    ADD COLUMN unique_key   text,
    ADD COLUMN unique_scope text,
    ADD COLUMN unique_until timestamptz,
    ADD CONSTRAINT tasks_unique_scope_valid
        CHECK (unique_scope IN ('queued', 'active', 'period')),
    ADD CONSTRAINT tasks_unique_key_scoped
        CHECK ((unique_key IS NULL) = (unique_scope IS NULL)),
    ADD CONSTRAINT tasks_unique_until_period
        CHECK (unique_until IS NULL OR unique_scope = 'period');

-- "queued" ends at the first start (started_at is set by every move to running and never
-- cleared), so a retry that puts a started task back in the queue never takes a key another
-- task holds. "active" holds through running -> queued retries, which stay inside it.
CREATE UNIQUE INDEX tasks_unique_key_idx ON tasks (unique_key)
    WHERE (unique_scope = 'queued' AND status = 'queued' AND started_at IS NULL)
       OR (unique_scope = 'active' AND status IN ('queued', 'running'))
       OR (unique_scope = 'period' AND unique_until IS NOT NULL);

-- The daemon's workers.max_attempts, written by each instance at start, so an enqueue from
-- SQL that gives no max_attempts gets the same budget as one through the API. One row; with
-- instances configured differently, the one started last wins.
CREATE TABLE enqueue_defaults (
    name          text        PRIMARY KEY DEFAULT 'default' CHECK (name = 'default'),
    max_attempts  integer     NOT NULL CHECK (max_attempts BETWEEN 1 AND 1000),
    set_by        text        NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- taskwarden_enqueue_detailed: queues one task, or finds the task holding its unique key.
-- Returns the task's id and whether it was a duplicate (an existing task, nothing written).
-- Call it inside your own transaction: rolled back, nothing was queued; committed, the
-- insert's statement trigger has sent NOTIFY taskwarden_tasks and a daemon claims it.
--
-- Under READ COMMITTED (PostgreSQL's default) it is race-free: the insert is
-- INSERT ... ON CONFLICT DO NOTHING against tasks_unique_key_idx, which waits for an
-- uncommitted holder of the same key; on a conflict the holder is read with a fresh
-- snapshot, and when it stopped holding in between (finished, or its period ran out) the
-- insert is tried again, at most 20 times. Under REPEATABLE READ or SERIALIZABLE a key
-- committed after the transaction's snapshot raises 40001: retry the transaction.
-- Bad arguments raise 22023 (invalid_parameter_value) naming the argument.
CREATE FUNCTION taskwarden_enqueue_detailed(
    agent         text,
    payload       jsonb       DEFAULT '{}',
    priority      integer     DEFAULT 0,
    max_attempts  integer     DEFAULT NULL,
    run_after     timestamptz DEFAULT now(),
    unique_key    text        DEFAULT NULL,
    unique_scope  text        DEFAULT NULL,
    unique_for    interval    DEFAULT NULL,
    session_id    text        DEFAULT NULL)
RETURNS TABLE (task_id bigint, duplicate boolean)
LANGUAGE plpgsql VOLATILE
AS $fn$
#variable_conflict use_column
DECLARE
    a_agent   text        := taskwarden_enqueue_detailed.agent;
    a_payload jsonb       := COALESCE(taskwarden_enqueue_detailed.payload, '{}'::jsonb);
    a_prio    integer     := COALESCE(taskwarden_enqueue_detailed.priority, 0);
    a_after   timestamptz := COALESCE(taskwarden_enqueue_detailed.run_after, now());
    a_key     text        := taskwarden_enqueue_detailed.unique_key;
    a_scope   text        := taskwarden_enqueue_detailed.unique_scope;
    a_for     interval    := taskwarden_enqueue_detailed.unique_for;
    a_session text        := taskwarden_enqueue_detailed.session_id;
    a_max     integer     := taskwarden_enqueue_detailed.max_attempts;
    v_until   timestamptz;
    v_id      bigint;
    h_id      bigint;
    h_scope   text;
    h_until   timestamptz;
BEGIN
    IF a_agent IS NULL OR length(a_agent) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'taskwarden_enqueue: agent must be 1..200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_session IS NOT NULL AND length(a_session) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'taskwarden_enqueue: session_id must be 1..200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_max IS NULL THEN
        SELECT d.max_attempts INTO a_max FROM enqueue_defaults d WHERE d.name = 'default';
        a_max := COALESCE(a_max, 3);
    END IF;
    IF a_max NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'taskwarden_enqueue: max_attempts must be in 1..1000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF a_key IS NULL THEN
        IF a_scope IS NOT NULL OR a_for IS NOT NULL THEN
            RAISE EXCEPTION 'taskwarden_enqueue: unique_scope and unique_for need a unique_key'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        INSERT INTO tasks (agent, payload, session_id, priority, max_attempts, run_after)
        VALUES (a_agent, a_payload, a_session, a_prio, a_max, a_after)
        RETURNING id INTO v_id;
        task_id := v_id;
        duplicate := false;
        RETURN NEXT;
        RETURN;
    END IF;

    IF length(a_key) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'taskwarden_enqueue: unique_key must be 1..200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    a_scope := COALESCE(a_scope, CASE WHEN a_for IS NULL THEN 'active' ELSE 'period' END);
    IF a_scope NOT IN ('queued', 'active', 'period') THEN
        RAISE EXCEPTION 'taskwarden_enqueue: unique_scope must be queued, active or period'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (a_scope = 'period') <> (a_for IS NOT NULL) THEN
        RAISE EXCEPTION 'taskwarden_enqueue: unique_for is given exactly when unique_scope is period'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_for IS NOT NULL AND (a_for < interval '1 second' OR a_for > interval '365 days') THEN
        RAISE EXCEPTION 'taskwarden_enqueue: unique_for must be between 1 second and 365 days'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_scope = 'period' THEN
        v_until := now() + a_for;
    END IF;

    FOR i IN 1..20 LOOP
        INSERT INTO tasks (agent, payload, session_id, priority, max_attempts, run_after,
                           unique_key, unique_scope, unique_until)
        VALUES (a_agent, a_payload, a_session, a_prio, a_max, a_after, a_key, a_scope, v_until)
        ON CONFLICT DO NOTHING
        RETURNING id INTO v_id;
        IF v_id IS NOT NULL THEN
            task_id := v_id;
            duplicate := false;
            RETURN NEXT;
            RETURN;
        END IF;
        -- The holder, read with this statement's fresh snapshot.
        SELECT t.id, t.unique_scope, t.unique_until INTO h_id, h_scope, h_until
        FROM tasks t
        WHERE t.unique_key = a_key
          AND ((t.unique_scope = 'queued' AND t.status = 'queued' AND t.started_at IS NULL)
            OR (t.unique_scope = 'active' AND t.status IN ('queued', 'running'))
            OR (t.unique_scope = 'period' AND t.unique_until IS NOT NULL));
        IF h_id IS NOT NULL THEN
            IF h_scope = 'period' AND h_until <= now() THEN
                -- Its period is over: release the key, then insert again.
                UPDATE tasks SET unique_until = NULL, updated_at = now()
                WHERE id = h_id AND unique_until <= now();
            ELSE
                task_id := h_id;
                duplicate := true;
                RETURN NEXT;
                RETURN;
            END IF;
        END IF;
        h_id := NULL;
    END LOOP;
    RAISE EXCEPTION 'taskwarden_enqueue: unique key % changed hands 20 times; try again', a_key
        USING ERRCODE = 'serialization_failure';
END
$fn$;

COMMENT ON FUNCTION taskwarden_enqueue_detailed(text, jsonb, integer, integer, timestamptz, text, text, interval, text) IS
    'Queue one taskwarden task (or find the task holding its unique_key); returns (task_id, duplicate). See README "Job-queue features".';

-- taskwarden_enqueue: the same, returning only the id (of the new task, or of the one
-- already holding the key).
CREATE FUNCTION taskwarden_enqueue(
    agent         text,
    payload       jsonb       DEFAULT '{}',
    priority      integer     DEFAULT 0,
    max_attempts  integer     DEFAULT NULL,
    run_after     timestamptz DEFAULT now(),
    unique_key    text        DEFAULT NULL,
    unique_scope  text        DEFAULT NULL,
    unique_for    interval    DEFAULT NULL,
    session_id    text        DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $fn$
    SELECT e.task_id FROM taskwarden_enqueue_detailed($1, $2, $3, $4, $5, $6, $7, $8, $9) e
$fn$;

COMMENT ON FUNCTION taskwarden_enqueue(text, jsonb, integer, integer, timestamptz, text, text, interval, text) IS
    'Queue one taskwarden task inside the caller''s transaction; returns its id (or the id of the task already holding unique_key). See README "Job-queue features".';
