-- The task list filtered by agent (GET /v1/tasks?agent=, the console's tasks page, retry by
-- agent) walks this index in id order instead of every task; tests/list_scale.rs checks
-- the plan at 100,000 rows.
CREATE INDEX tasks_agent_idx ON tasks (agent, id);
