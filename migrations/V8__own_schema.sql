-- taskwarden schema v8: everything in a schema of its own.
--
-- The runner applies every migration with `search_path` set to the configured schema
-- (`database.schema`, default `taskwarden`), so the tables, indexes, sequences and
-- functions of V1-V7 were created there, not in `public`; an installation made before v8
-- has had its tables moved there in place by the runner, before this file runs (see
-- src/db/migrate.rs). What is left is what names the schema at run time:
--
-- * the insert trigger notifies `<schema>_tasks` (for the default, the `taskwarden_tasks`
--   of earlier versions), so two deployments in one database wake only their own workers;
-- * the SQL enqueue functions become `<schema>.enqueue` and `<schema>.enqueue_detailed`,
--   bound to their schema (`SET search_path FROM CURRENT`: whatever the caller's
--   search_path, behind a transaction pooler too, they only see taskwarden's tables) and
--   run with the owner's rights (SECURITY DEFINER), so an application role needs only
--   `USAGE ON SCHEMA` and `EXECUTE` on them, never a privilege on a table. Nobody may call
--   them until granted (EXECUTE is revoked from PUBLIC); README "Connecting to a managed
--   PostgreSQL" gives the grants.
--
-- `taskwarden.` below is rewritten to the configured schema's name by the runner, like
-- every statement the daemon sends.

CREATE OR REPLACE FUNCTION taskwarden_notify_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_tasks', '');
    RETURN NULL;
END $$;

-- enqueue_detailed: queues one task, or finds the task holding its unique key; returns
-- the task's id and whether it was a duplicate. The rules are V4's (unchanged): under
-- READ COMMITTED race-free, under REPEATABLE READ / SERIALIZABLE a key committed after
-- the snapshot raises 40001, bad arguments raise 22023 naming the argument.
CREATE FUNCTION enqueue_detailed(
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
SECURITY DEFINER
SET search_path FROM CURRENT
AS $fn$
#variable_conflict use_column
DECLARE
    a_agent   text        := enqueue_detailed.agent;
    a_payload jsonb       := COALESCE(enqueue_detailed.payload, '{}'::jsonb);
    a_prio    integer     := COALESCE(enqueue_detailed.priority, 0);
    a_after   timestamptz := COALESCE(enqueue_detailed.run_after, now());
    a_key     text        := enqueue_detailed.unique_key;
    a_scope   text        := enqueue_detailed.unique_scope;
    a_for     interval    := enqueue_detailed.unique_for;
    a_session text        := enqueue_detailed.session_id;
    a_max     integer     := enqueue_detailed.max_attempts;
    v_until   timestamptz;
    v_id      bigint;
    h_id      bigint;
    h_scope   text;
    h_until   timestamptz;
BEGIN
    IF a_agent IS NULL OR length(a_agent) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'taskwarden.enqueue: agent must be 1..200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_session IS NOT NULL AND length(a_session) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'taskwarden.enqueue: session_id must be 1..200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_max IS NULL THEN
        SELECT d.max_attempts INTO a_max FROM enqueue_defaults d WHERE d.name = 'default';
        a_max := COALESCE(a_max, 3);
    END IF;
    IF a_max NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'taskwarden.enqueue: max_attempts must be in 1..1000'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    IF a_key IS NULL THEN
        IF a_scope IS NOT NULL OR a_for IS NOT NULL THEN
            RAISE EXCEPTION 'taskwarden.enqueue: unique_scope and unique_for need a unique_key'
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
        RAISE EXCEPTION 'taskwarden.enqueue: unique_key must be 1..200 characters'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    a_scope := COALESCE(a_scope, CASE WHEN a_for IS NULL THEN 'active' ELSE 'period' END);
    IF a_scope NOT IN ('queued', 'active', 'period') THEN
        RAISE EXCEPTION 'taskwarden.enqueue: unique_scope must be queued, active or period'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (a_scope = 'period') <> (a_for IS NOT NULL) THEN
        RAISE EXCEPTION 'taskwarden.enqueue: unique_for is given exactly when unique_scope is period'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF a_for IS NOT NULL AND (a_for < interval '1 second' OR a_for > interval '365 days') THEN
        RAISE EXCEPTION 'taskwarden.enqueue: unique_for must be between 1 second and 365 days'
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
    RAISE EXCEPTION 'taskwarden.enqueue: unique key % changed hands 20 times; try again', a_key
        USING ERRCODE = 'serialization_failure';
END
$fn$;

COMMENT ON FUNCTION enqueue_detailed(text, jsonb, integer, integer, timestamptz, text, text, interval, text) IS
    'Queue one taskwarden task (or find the task holding its unique_key); returns (task_id, duplicate). See README "Job-queue features".';

CREATE FUNCTION enqueue(
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
SECURITY DEFINER
SET search_path FROM CURRENT
AS $fn$
    SELECT e.task_id FROM taskwarden.enqueue_detailed($1, $2, $3, $4, $5, $6, $7, $8, $9) e
$fn$;

COMMENT ON FUNCTION enqueue(text, jsonb, integer, integer, timestamptz, text, text, interval, text) IS
    'Queue one taskwarden task inside the caller''s transaction; returns its id (or the id of the task already holding unique_key). See README "Job-queue features".';

REVOKE ALL ON FUNCTION enqueue_detailed(text, jsonb, integer, integer, timestamptz, text, text, interval, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION enqueue(text, jsonb, integer, integer, timestamptz, text, text, interval, text) FROM PUBLIC;

-- V4's functions under their old names, created in this schema by a fresh install, are
-- superseded. (An installation moved from `public` keeps `public.taskwarden_enqueue*` as
-- thin wrappers for one release; the runner writes those.)
DROP FUNCTION IF EXISTS taskwarden_enqueue(text, jsonb, integer, integer, timestamptz, text, text, interval, text);
DROP FUNCTION IF EXISTS taskwarden_enqueue_detailed(text, jsonb, integer, integer, timestamptz, text, text, interval, text);
