//! Issue 19: the task list (the console's tasks page, `GET /v1/tasks`, `taskwarden tasks
//! list`) with 100,000 tasks in the table. Each filter's page is read through an index in
//! id order: EXPLAIN ANALYZE of the store's own statement shows no sequential scan and
//! fewer than 1,000 rows read and thrown away, however rare the filtered rows are and
//! wherever they sit in the table.

mod common;

use common::TestDb;
use serde_json::Value;

/// Rows the plan read and threw away (every node's "Rows Removed by Filter"), and whether
/// any node is a sequential scan.
fn waste(plan: &Value) -> (f64, bool) {
    let mut removed = plan["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
    let mut seq = plan["Node Type"] == "Seq Scan";
    for p in plan["Plans"].as_array().into_iter().flatten() {
        let (r, s) = waste(p);
        removed += r;
        seq |= s;
    }
    (removed, seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_list_filter_reads_an_index_at_100000_rows() {
    let t = TestDb::new().await;
    let c = t.admin().await;
    // 100,000 tasks: most succeeded for a busy agent; 0.5 % failed, spread out; 20 of a rare
    // agent and 20 of a run slot, all at the end (the worst place for an id-order walk);
    // one objective of 20 steps at the end too.
    c.batch_execute(
        "INSERT INTO objectives (title) VALUES ('late');
         INSERT INTO tasks (agent, status, payload)
           SELECT 'busy', CASE WHEN g % 200 = 0 THEN 'failed' ELSE 'succeeded' END, '{}'
           FROM generate_series(1, 99940) g;
         INSERT INTO tasks (agent, status) SELECT 'rare', 'queued' FROM generate_series(1, 20);
         INSERT INTO tasks (agent, status, session_id) SELECT 'busy', 'succeeded', 'chat-7' FROM generate_series(1, 20);
         INSERT INTO tasks (agent, status, objective_id, step_key)
           SELECT 'busy', 'queued', (SELECT id FROM objectives), 's' || g FROM generate_series(1, 20) g;
         ANALYZE tasks;",
    )
    .await
    .unwrap();
    assert_eq!(
        common::count(&c, "SELECT count(*) FROM tasks").await,
        100_000
    );
    let objective: i64 = c
        .query_one("SELECT id FROM objectives", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute(&format!(
        "PREPARE list(text, text, bigint, bigint, bigint, bigint, text) AS {}",
        taskwarden::store::list_tasks_sql()
    ))
    .await
    .unwrap();
    let cases = [
        (
            "no filter",
            "NULL, NULL, NULL, NULL, 100, 8388608, NULL".to_string(),
        ),
        (
            "status failed",
            "'failed', NULL, NULL, NULL, 100, 8388608, NULL".into(),
        ),
        (
            "status queued",
            "'queued', NULL, NULL, NULL, 100, 8388608, NULL".into(),
        ),
        (
            "agent rare",
            "NULL, NULL, NULL, NULL, 100, 8388608, 'rare'".into(),
        ),
        (
            "agent + status",
            "'queued', NULL, NULL, NULL, 100, 8388608, 'rare'".into(),
        ),
        (
            "run slot",
            "NULL, 'chat-7', NULL, NULL, 100, 8388608, NULL".into(),
        ),
        (
            "objective",
            format!("NULL, NULL, {objective}, NULL, 100, 8388608, NULL"),
        ),
        (
            "second page",
            "'failed', NULL, NULL, 50000, 100, 8388608, NULL".into(),
        ),
    ];
    let mut bad = Vec::new();
    for (name, args) in &cases {
        // Six runs so a generic plan, if the server would switch to one, is the one checked.
        let mut plan = Value::Null;
        for _ in 0..6 {
            let row = c
                .query_one(
                    &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE list({args})"),
                    &[],
                )
                .await
                .unwrap();
            let v: Value = row.get(0);
            plan = v[0]["Plan"].clone();
        }
        let (removed, seq) = waste(&plan);
        println!("{name}: {removed} rows thrown away, seq scan: {seq}");
        if seq || removed >= 1000.0 {
            bad.push(format!(
                "{name}: removed {removed}, seq scan {seq}\n{plan:#}"
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n\n"));
}
