-- taskwarden schema v9: rate limits that hold in every window of their period.
--
-- One row per rate-limited agent holding its GCRA schedule (src/store/rate_limit.rs):
-- `tat`, the theoretical arrival time, by the database's clock. A claim of the agent's
-- tasks locks the row (an upsert), reads clock_timestamp() under the lock, takes what
-- the schedule allows at that instant (dating the tasks' started_at with it) and moves
-- `tat` on by what it took, in one transaction; so every instance together starts at
-- most N in any window of the period (N + burst - 1 with a burst), whatever the
-- instances' own clocks say.
--
-- rate_windows (V6's fixed windows, which let 2 x N through across a window's turn) is
-- no longer read or written by v9 daemons; it stays until a later version so that an
-- older daemon still running during a rolling upgrade keeps working (its claims are not
-- counted against the new rows meanwhile).
--
-- `interval_us` and `tolerance_us` are the constants the TAT was kept under: a claim under
-- other ones (a reload changed the rate or burst) brings a TAT far ahead back within one
-- interval of the new rate, instead of waiting out a schedule an old rate left.
CREATE TABLE rate_limits (
    agent        text        PRIMARY KEY,
    tat          timestamptz NOT NULL,
    interval_us  bigint      NOT NULL,
    tolerance_us bigint      NOT NULL
);
