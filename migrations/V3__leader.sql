-- taskwarden schema v3: leadership as a row with an expiry.
--
-- One row at most. The leader renews expires_at every third of its time to live; any
-- instance may take the row once it has expired. A frozen or partitioned leader therefore
-- loses leadership when its row lapses, not when the server's TCP keepalive notices its
-- dead connection (hours) — which is what a session advisory lock would wait for.
CREATE TABLE leader (
    name        text        PRIMARY KEY DEFAULT 'default' CHECK (name = 'default'),
    leader_id   text        NOT NULL,
    elected_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
