//! The task store against a real PostgreSQL: the state machine, usage, objectives,
//! migrations under concurrency.

mod common;

use std::time::Duration;

use common::TestDb;
use taskwarden::store::{
    NewObjective, NewStep, NewTask, Store, StoreError, TaskFilter, TaskStatus, TransitionArgs,
    Usage,
};

fn store(t: &TestDb) -> Store {
    Store::new(t.pool(2, 0, Duration::from_secs(5)), 3)
}

fn running_args(owner: &str) -> TransitionArgs {
    TransitionArgs {
        lease_owner: Some(owner.into()),
        lease: Some(Duration::from_secs(30)),
        ..Default::default()
    }
}

#[tokio::test]
async fn legal_transitions_apply_and_illegal_ones_are_refused() {
    let t = TestDb::new().await;
    let s = store(&t);
    let task = s
        .create_task(&NewTask::new("echo", serde_json::json!({"q": 1})))
        .await
        .unwrap();
    assert_eq!(task.status, TaskStatus::Queued);
    assert_eq!(task.max_attempts, 3);

    // queued -> succeeded skips running: refused, and the row is untouched.
    let err = s
        .transition(task.id, TaskStatus::Succeeded, &TransitionArgs::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::IllegalTransition {
                from: TaskStatus::Queued,
                to: TaskStatus::Succeeded,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        s.get_task(task.id).await.unwrap().status,
        TaskStatus::Queued
    );

    let running = s
        .transition(task.id, TaskStatus::Running, &running_args("me"))
        .await
        .unwrap();
    assert_eq!(running.attempts, 1);
    assert_eq!(running.lease_owner.as_deref(), Some("me"));
    assert!(running.started_at.is_some() && running.lease_expires_at.is_some());

    let done = s
        .transition(task.id, TaskStatus::Succeeded, &TransitionArgs::default())
        .await
        .unwrap();
    assert!(done.finished_at.is_some());
    assert!(done.lease_owner.is_none());

    // Terminal states are final.
    for to in TaskStatus::ALL {
        let err = s
            .transition(task.id, to, &running_args("me"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::IllegalTransition {
                    from: TaskStatus::Succeeded,
                    ..
                }
            ),
            "{to}: {err:?}"
        );
    }
    assert!(matches!(
        s.transition(999_999, TaskStatus::Running, &running_args("me"))
            .await,
        Err(StoreError::TaskNotFound(999_999))
    ));
}

#[tokio::test]
async fn retry_requeue_keeps_the_error_and_the_backoff() {
    let t = TestDb::new().await;
    let s = store(&t);
    let task = s
        .create_task(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap();
    s.transition(task.id, TaskStatus::Running, &running_args("me"))
        .await
        .unwrap();
    let later = chrono::Utc::now() + chrono::Duration::seconds(60);
    let requeued = s
        .transition(
            task.id,
            TaskStatus::Queued,
            &TransitionArgs {
                error: Some("attempt 1: boom".into()),
                run_after: Some(later),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(requeued.status, TaskStatus::Queued);
    assert_eq!(requeued.error.as_deref(), Some("attempt 1: boom"));
    assert!(requeued.run_after >= later - chrono::Duration::milliseconds(1));
    assert!(requeued.lease_owner.is_none());
}

#[tokio::test]
async fn usage_accumulates_across_updates() {
    let t = TestDb::new().await;
    let s = store(&t);
    let task = s
        .create_task(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap();
    s.record_usage(
        task.id,
        Usage {
            prompt_tokens: 100,
            completion_tokens: 20,
            cost_usd: 0.0015,
        },
    )
    .await
    .unwrap();
    let total = s
        .record_usage(
            task.id,
            Usage {
                prompt_tokens: 50,
                completion_tokens: 5,
                cost_usd: 0.0005,
            },
        )
        .await
        .unwrap();
    assert_eq!(total.prompt_tokens, 150);
    assert_eq!(total.completion_tokens, 25);
    assert!((total.cost_usd - 0.002).abs() < 1e-9, "{}", total.cost_usd);
    let row = s.get_task(task.id).await.unwrap();
    assert_eq!((row.prompt_tokens, row.completion_tokens), (150, 25));

    let err = s
        .record_usage(
            task.id,
            Usage {
                prompt_tokens: -1,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { ref field, .. } if field == "usage.prompt_tokens"));
    assert!(matches!(
        s.record_usage(424_242, Usage::default()).await,
        Err(StoreError::TaskNotFound(_))
    ));
}

fn step(key: &str, deps: &[&str]) -> NewStep {
    NewStep {
        key: key.into(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        task: NewTask::new("echo", serde_json::json!({ "step": key })),
    }
}

#[tokio::test]
async fn objectives_are_written_whole_or_not_at_all() {
    let t = TestDb::new().await;
    let s = store(&t);
    let o = s
        .create_objective(
            &NewObjective {
                title: "research".into(),
                steps: vec![
                    step("plan", &[]),
                    step("search", &["plan"]),
                    step("write", &["search"]),
                ],
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(o.tasks.len(), 3);
    let back = s.get_objective(o.id).await.unwrap();
    assert_eq!(back.tasks[2].depends_on, vec!["search".to_string()]);
    assert_eq!(back.tasks[1].step_key.as_deref(), Some("search"));

    let err = s
        .create_objective(
            &NewObjective {
                title: "loop".into(),
                steps: vec![step("a", &["b"]), step("b", &["a"])],
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err:?}");

    // A failure part-way through the transaction: the server rejects the third step.
    let c = t.admin().await;
    let before: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .unwrap()
        .get(0);
    let objectives_before: i64 = c
        .query_one("SELECT count(*) FROM objectives", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute(
        "CREATE FUNCTION reject_third() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.step_key = 'third' THEN RAISE EXCEPTION 'rejected'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER reject_third BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION reject_third();",
    )
    .await
    .unwrap();
    let err = s
        .create_objective(
            &NewObjective {
                title: "partial".into(),
                steps: vec![step("first", &[]), step("second", &[]), step("third", &[])],
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Db(_)), "{err:?}");
    let after: i64 = c
        .query_one("SELECT count(*) FROM tasks", &[])
        .await
        .unwrap()
        .get(0);
    let objectives_after: i64 = c
        .query_one("SELECT count(*) FROM objectives", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((after, objectives_after), (before, objectives_before));
    assert_eq!(s.db().status().in_use, 0);
}

#[tokio::test]
async fn list_filters_by_status_and_session() {
    let t = TestDb::new().await;
    let s = store(&t);
    for i in 0..5 {
        let mut n = NewTask::new("echo", serde_json::json!({ "i": i }));
        n.slot_id = Some(if i % 2 == 0 { "even" } else { "odd" }.into());
        s.create_task(&n).await.unwrap();
    }
    let first = s
        .list_tasks(&TaskFilter::default(), u64::MAX)
        .await
        .unwrap()
        .0;
    s.transition(
        first[0].id,
        TaskStatus::Cancelled,
        &TransitionArgs::default(),
    )
    .await
    .unwrap();

    let even = s
        .list_tasks(
            &TaskFilter {
                slot_id: Some("even".into()),
                ..Default::default()
            },
            u64::MAX,
        )
        .await
        .unwrap()
        .0;
    assert_eq!(even.len(), 3);
    let queued_even = s
        .list_tasks(
            &TaskFilter {
                slot_id: Some("even".into()),
                status: Some(TaskStatus::Queued),
                ..Default::default()
            },
            u64::MAX,
        )
        .await
        .unwrap()
        .0;
    assert_eq!(queued_even.len(), 2);
    let page = s
        .list_tasks(
            &TaskFilter {
                after_id: Some(first[1].id),
                limit: Some(2),
                ..Default::default()
            },
            u64::MAX,
        )
        .await
        .unwrap()
        .0;
    assert_eq!(
        page.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![first[2].id, first[3].id]
    );
    assert!(matches!(
        s.list_tasks(
            &TaskFilter {
                limit: Some(0),
                ..Default::default()
            },
            u64::MAX
        )
        .await,
        Err(StoreError::Invalid { .. })
    ));
    let counts = s.count_by_status().await.unwrap();
    assert!(counts.contains(&(TaskStatus::Queued, 4)));
    assert!(counts.contains(&(TaskStatus::Cancelled, 1)));
    assert!(counts.contains(&(TaskStatus::Running, 0)));
}

#[tokio::test]
async fn shutdown_requeue_touches_only_this_instances_running_tasks() {
    let t = TestDb::new().await;
    let s = store(&t);
    let mine = s
        .create_task(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap();
    let theirs = s
        .create_task(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap();
    s.transition(mine.id, TaskStatus::Running, &running_args("me"))
        .await
        .unwrap();
    s.transition(theirs.id, TaskStatus::Running, &running_args("other"))
        .await
        .unwrap();
    assert_eq!(s.requeue_running_owned_by("me").await.unwrap(), 1);
    let m = s.get_task(mine.id).await.unwrap();
    assert_eq!(
        (m.status, m.attempts, m.lease_owner),
        (TaskStatus::Queued, 0, None)
    );
    assert_eq!(
        s.get_task(theirs.id).await.unwrap().status,
        TaskStatus::Running
    );
}

/// The migrations this build embeds, by file name without ".sql" (`V1__init`, ...).
fn migration_files() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".sql").map(str::to_string))
        .collect();
    names.sort();
    names
}

fn version_of(name: &str) -> i32 {
    name.strip_prefix('V')
        .and_then(|r| r.split("__").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("migration file name {name:?} is not V<version>__<name>"))
}

/// The migration lock's advisory key ("twmigrat" as a big-endian i64, src/db/migrate.rs).
const MIGRATION_LOCK_KEY: i64 = 0x7477_6d69_6772_6174;

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    // An empty database, and several instances starting on it at the same time. The test
    // holds the migration lock itself until every run has connected, so all of them are
    // under way together when it is released: a real race, not runs one after another.
    let t = TestDb::new_unmigrated().await;
    let expected = migration_files();
    assert!(!expected.is_empty());
    assert_eq!(
        expected.iter().map(|n| version_of(n)).max(),
        Some(taskwarden::db::migrate::latest_version())
    );
    let c = t.admin().await;
    let locked: bool = c
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .unwrap()
        .get(0);
    assert!(locked);

    const RUNS: usize = 6;
    let cfg = t.config(1, 0, Duration::from_secs(5));
    let runs: Vec<_> = (0..RUNS)
        .map(|_| {
            let pg = t.pg.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move { taskwarden::db::migrate::run(&pg, &cfg).await })
        })
        .collect();
    let migrate_app = format!("{}:migrate", t.application_name);
    let connected = || async {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&migrate_app],
            )
            .await
            .unwrap()
            .get(0);
        n == RUNS as i64
    };
    assert!(
        common::eventually(Duration::from_secs(60), connected).await,
        "not every migration run connected"
    );
    // Each run polls the lock every 200 ms; give every one of them a chance to find it
    // taken. None may have got past the lock while the test holds it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        runs.iter().all(|r| !r.is_finished()),
        "a migration run finished while the migration lock was held by the test"
    );
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "something was created while the lock was held");
    let unlocked: bool = c
        .query_one("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .unwrap()
        .get(0);
    assert!(unlocked);

    let mut reports = Vec::new();
    for r in runs {
        let report = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .expect("a migration run hung")
            .unwrap()
            .expect("a migration run failed");
        assert_eq!(report.latest, taskwarden::db::migrate::latest_version());
        reports.push(report.applied);
    }
    // Every migration was applied by exactly one run...
    for name in &expected {
        let by = reports
            .iter()
            .filter(|a| a.iter().any(|m| m == name))
            .count();
        assert_eq!(by, 1, "{name} applied by {by} runs: {reports:?}");
    }
    // ...the one that took the lock first applied all of them, and the others found
    // nothing left to do.
    let appliers: Vec<_> = reports.iter().filter(|a| !a.is_empty()).collect();
    assert_eq!(appliers.len(), 1, "{reports:?}");
    assert_eq!(appliers[0], &expected, "{reports:?}");
    // The history table holds each version once, and nothing else.
    let rows = c
        .query(
            "SELECT version, count(*) FROM refinery_schema_history GROUP BY version ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let history: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(i32, i64)> = expected.iter().map(|n| (version_of(n), 1)).collect();
    assert_eq!(history, want);
    // And the schema is usable.
    let s = store(&t);
    s.create_task(&NewTask::new("echo", serde_json::json!({})))
        .await
        .unwrap();
}

#[tokio::test]
async fn migrating_an_up_to_date_database_concurrently_applies_nothing() {
    let t = TestDb::new().await; // already migrated once; run four more at the same time
    let cfg = t.config(1, 0, Duration::from_secs(5));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let pg = t.pg.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move { taskwarden::db::migrate::run(&pg, &cfg).await })
        })
        .collect();
    for r in runs {
        let report = r.await.unwrap().unwrap();
        assert!(report.applied.is_empty(), "{report:?}");
    }
    let c = t.admin().await;
    let rows = c
        .query(
            "SELECT version, count(*) FROM refinery_schema_history GROUP BY version ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let history: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(i32, i64)> = migration_files()
        .iter()
        .map(|n| (version_of(n), 1))
        .collect();
    assert_eq!(history, want);
}

#[tokio::test]
async fn a_task_list_stops_at_its_byte_budget_and_says_where_to_go_on() {
    let t = TestDb::new().await;
    let s = store(&t);
    let big = "x".repeat(1000);
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            s.create_task(&NewTask::new(
                "echo",
                serde_json::json!({ "n": n, "big": big }),
            ))
            .await
            .unwrap()
            .id,
        );
    }
    // Each payload is a little over 1,000 bytes: a budget of 1,500 takes the second row
    // (it starts below the budget) but not the third.
    let (page, cut) = s.list_tasks(&TaskFilter::default(), 1500).await.unwrap();
    assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), ids[..2]);
    assert!(cut);
    // A budget below one row still returns that row, so paging always advances.
    let (page, cut) = s.list_tasks(&TaskFilter::default(), 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert!(cut);
    let (page, cut) = s.list_tasks(&TaskFilter::default(), 1 << 20).await.unwrap();
    assert_eq!(page.len(), 3);
    assert!(!cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_batches_and_lease_extensions_over_the_same_rows_never_deadlock() {
    // The outcome writer finishes tasks in the order they ended; the lease keeper
    // extends every lease at once. The keeper never waits for a row lock (it skips rows
    // being written), so running them side by side over the same rows, batch after batch,
    // never trips the deadlock detector, and every row still ours is reported as ours.
    let t = TestDb::new().await;
    let s = Store::new(t.pool(4, 0, Duration::from_secs(5)), 3);
    let c = t.admin().await;
    c.batch_execute(
        "INSERT INTO tasks (agent, status, attempts, started_at, lease_owner, lease_expires_at) \
         SELECT 'a', 'running', 1, now(), 'x', now() + interval '1 minute' \
         FROM generate_series(1, 600)",
    )
    .await
    .unwrap();
    let mut ids: Vec<i64> = c
        .query("SELECT id FROM tasks ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    while ids.len() > 30 {
        // The batch in descending order, the extension over everything left.
        let batch: Vec<i64> = ids.split_off(ids.len() - 30).into_iter().rev().collect();
        let results = vec![None; batch.len()];
        let everything: Vec<i64> = ids.iter().chain(batch.iter()).copied().collect();
        let (done, extended) = tokio::join!(
            s.complete_batch(&batch, &results, "x"),
            s.extend_leases(&everything, "x", Duration::from_secs(60)),
        );
        let done = done.expect("completion batch");
        let extended = extended.expect("lease extension");
        assert_eq!(done.len(), batch.len());
        // Rows the batch had not committed yet when the extension read them may be
        // reported either way; every other row left is still ours.
        for id in &ids {
            assert!(
                extended.contains(id),
                "task {id} reported as no longer ours"
            );
        }
    }
}

/// Status lists an instance silent for less than 10 minutes (STATUS_INSTANCE_SILENCE), not
/// one silent for longer, whether or not a leader reaped it.
#[tokio::test]
async fn status_hides_instances_silent_past_the_bound() {
    let t = TestDb::new().await;
    let s = store(&t);
    let admin = t.admin().await;
    admin
        .batch_execute(
            "INSERT INTO instances (id, hostname, pid, version, heartbeat_at) VALUES \
             ('quiet', 'h', 1, 'v', now() - interval '9 minutes'), \
             ('dead', 'h', 2, 'v', now() - interval '11 minutes')",
        )
        .await
        .unwrap();
    assert_eq!(
        taskwarden::store::STATUS_INSTANCE_SILENCE,
        Duration::from_secs(600)
    );
    let view = s.read_view(Duration::from_secs(5), &[]).await.unwrap();
    let ids: Vec<&str> = view
        .instances
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["quiet"], "{:?}", view.instances);
}
