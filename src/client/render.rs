//! What the client prints: the status page, tasks, events and objectives as plain-text
//! tables (the `--json` forms print the API's answer as it came).

use std::fmt::Write as _;

use serde_json::Value;

/// Left-aligned columns with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        let _ = writeln!(out, "{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r.clone(), &mut out);
    }
    out
}

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The human-readable form of `GET /v1/status`.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "taskwarden {} — instance {}, config {} (loaded {})\n",
        s(&v["version"]),
        s(&v["instance"]),
        s(&v["config"]["version"]),
        s(&v["config"]["loaded_at"])
    );
    render_pool(&mut out, &v["pool"]);
    render_tls(&mut out, &v["database_tls"]);
    render_sessions(&mut out, &v["sessions"]);
    render_watch(&mut out, &v["watch"]);
    render_tasks(&mut out, &v["tasks"]);
    render_queues(&mut out, &v["queues"]);
    render_alerts(&mut out, &v["alerts_firing"]);
    render_instances(&mut out, &v["instances"]);
    out
}

/// One line: the sslmode in force and how many sessions the server sees encrypted.
fn render_tls(out: &mut String, t: &Value) {
    if t.is_null() {
        let _ = writeln!(out, "database TLS: not read yet\n");
        return;
    }
    let how = match (t["version"].as_str(), t["cipher"].as_str()) {
        (Some(v), Some(c)) => format!(" ({v}, {c})"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "database TLS: sslmode {}; {} of {} sessions encrypted{how}\n",
        s(&t["sslmode"]),
        s(&t["encrypted"]),
        s(&t["sessions"])
    );
}

/// Rows of a JSON array, `limit` at most; none when it is absent.
fn rows_of(v: &Value, limit: usize, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| a.iter().take(limit).map(row).collect())
        .unwrap_or_default()
}

fn seconds(v: &Value) -> String {
    format!("{:.1}s", v.as_f64().unwrap_or(0.0))
}

fn render_pool(out: &mut String, p: &Value) {
    let _ = writeln!(
        out,
        "POOL  in use {}/{} ({:.0}%, alert at {:.0}%)  idle {}  waiting {}  open {}",
        s(&p["in_use"]),
        s(&p["max"]),
        p["utilization"].as_f64().unwrap_or(0.0) * 100.0,
        p["alert_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        s(&p["idle"]),
        s(&p["waiting"]),
        s(&p["size"])
    );
}

/// DB sessions (checked-out pool connections), the oldest 20 listed.
fn render_sessions(out: &mut String, ss: &Value) {
    let _ = writeln!(
        out,
        "\nSESSIONS  open {}  opened {}  force-closed {}  (warn at {}s, force-close at {}s)",
        s(&ss["open"]),
        s(&ss["opened"]),
        s(&ss["force_closed"]),
        s(&ss["warn_age_seconds"]),
        s(&ss["max_age_seconds"])
    );
    let rows = rows_of(&ss["live"], 20, |x| {
        vec![
            s(&x["id"]),
            seconds(&x["age_seconds"]),
            s(&x["label"]),
            s(&x["caller"]),
            s(&x["backend_pid"]),
            s(&x["task_id"]),
        ]
    });
    if !rows.is_empty() {
        out.push_str(&table(
            &["ID", "AGE", "LABEL", "CALLER", "PID", "TASK"],
            &rows,
        ));
    }
}

/// The server's connection use, and each watch rule's sessions, oldest first (at most 20
/// per rule are listed; the counts cover all).
fn render_watch(out: &mut String, w: &Value) {
    if w.is_null() {
        return;
    }
    let srv = &w["server"];
    let _ = writeln!(
        out,
        "\nSERVER  client connections {}/{} ({:.0}%)  active {}  idle {}  idle in transaction {}",
        s(&srv["in_use"]),
        s(&srv["max"]),
        srv["utilization"].as_f64().unwrap_or(0.0) * 100.0,
        s(&srv["by_state"]["active"]),
        s(&srv["by_state"]["idle"]),
        s(&srv["by_state"]["idle_in_transaction"])
    );
    let Some(rules) = w["rules"].as_object() else {
        return;
    };
    for (name, r) in rules {
        let budget = match r["max_sessions"].as_u64() {
            Some(m) => format!("/{m}"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "\nWATCH {name}  ({}, {})  sessions {}{budget}  active {}  idle {}  idle in transaction {}  oldest {}",
            s(&r["application_name"]),
            s(&r["action"]),
            s(&r["sessions_total"]),
            s(&r["by_state"]["active"]),
            s(&r["by_state"]["idle"]),
            s(&r["by_state"]["idle_in_transaction"]),
            seconds(&r["oldest_age_seconds"])
        );
        let rows = rows_of(&r["sessions"], 20, |x| {
            let over: Vec<String> = x["over_limit"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            vec![
                s(&x["pid"]),
                seconds(&x["age_seconds"]),
                s(&x["state"]),
                seconds(&x["state_seconds"]),
                s(&x["application_name"]),
                format!("{}@{}", s(&x["user"]), s(&x["database"])),
                over.join(","),
            ]
        });
        if !rows.is_empty() {
            out.push_str(&table(
                &[
                    "PID",
                    "AGE",
                    "STATE",
                    "IN STATE",
                    "APPLICATION",
                    "ROLE@DB",
                    "PAST LIMIT",
                ],
                &rows,
            ));
        }
    }
}

fn render_tasks(out: &mut String, tasks: &Value) {
    let by = &tasks["by_status"];
    let counts: Vec<String> = [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "timed_out",
    ]
    .iter()
    .map(|k| format!("{k} {}", s(&by[*k])))
    .collect();
    let _ = writeln!(out, "\nTASKS  {}", counts.join("  "));
    let rows = rows_of(&tasks["running_here"], 20, |t| {
        let u = &t["usage"];
        let sessions = match u["oldest_db_session_seconds"].as_f64() {
            Some(age) => format!(
                "{} (oldest {age:.0}s, {} idle in tx)",
                s(&u["db_sessions"]),
                s(&u["db_sessions_idle_in_transaction"])
            ),
            None => s(&u["db_sessions"]),
        };
        vec![
            s(&t["task_id"]),
            s(&t["agent"]),
            seconds(&t["running_seconds"]),
            s(&u["processes"]),
            format!(
                "{:.1} MiB",
                u["resident_memory_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
            ),
            seconds(&u["cpu_seconds"]),
            sessions,
        ]
    });
    if !rows.is_empty() {
        out.push_str(&table(
            &[
                "TASK",
                "AGENT",
                "RUNNING",
                "PROCS",
                "MEMORY",
                "CPU",
                "DB SESSIONS",
            ],
            &rows,
        ));
    }
}

/// Queued tasks per agent, with the age of the oldest and whether the queue is paused.
fn render_queues(out: &mut String, queues: &Value) {
    let queues: Vec<Vec<String>> = queues
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(agent, q)| {
                    vec![
                        agent.clone(),
                        s(&q["queued"]),
                        format!("{:.1}s", q["oldest_queued_seconds"].as_f64().unwrap_or(0.0)),
                        if q["paused"] == Value::Bool(true) {
                            format!("paused since {}", s(&q["paused_at"]))
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !queues.is_empty() {
        out.push_str("\nQUEUES\n");
        out.push_str(&table(&["AGENT", "QUEUED", "OLDEST", "STATE"], &queues));
    }
}

fn render_alerts(out: &mut String, firing: &Value) {
    let alerts = rows_of(firing, usize::MAX, |x| {
        let alert = match x["subject"].as_str() {
            Some(subj) => format!("{}[{subj}]", s(&x["alert"])),
            None => s(&x["alert"]),
        };
        vec![alert, s(&x["severity"]), s(&x["since"]), s(&x["summary"])]
    });
    if alerts.is_empty() {
        out.push_str("\nALERTS  none firing\n");
    } else {
        out.push_str("\nALERTS\n");
        out.push_str(&table(&["ALERT", "SEVERITY", "SINCE", "SUMMARY"], &alerts));
    }
}

fn render_instances(out: &mut String, instances: &Value) {
    let inst = rows_of(instances, usize::MAX, |x| {
        let role = if x["leader"] == Value::Bool(true) {
            "leader"
        } else {
            ""
        };
        vec![
            s(&x["id"]),
            s(&x["version"]),
            s(&x["heartbeat_at"]),
            role.to_string(),
        ]
    });
    if !inst.is_empty() {
        out.push_str("\nINSTANCES\n");
        out.push_str(&table(&["ID", "VERSION", "HEARTBEAT", "ROLE"], &inst));
    }
}

/// One line for a task, for `submit`. The run slot is printed as `session`, like the
/// task field's wire name (`session_id`), unchanged since before slots had their name.
pub fn render_task(v: &Value) -> String {
    let mut out = format!(
        "task {} {} (agent {}{}{})",
        s(&v["id"]),
        s(&v["status"]),
        s(&v["agent"]),
        v["session_id"]
            .as_str()
            .map(|x| format!(", session {x}"))
            .unwrap_or_default(),
        v["unique_key"]
            .as_str()
            .map(|x| format!(", unique key {x:?} ({})", s(&v["unique_scope"])))
            .unwrap_or_default()
    );
    if v["duplicate"] == Value::Bool(true) {
        out.push_str("\nduplicate: this task already holds the unique key; nothing was queued");
    }
    out
}

/// A page of tasks, for `tasks list`.
pub fn render_task_list(v: &Value) -> String {
    let rows = rows_of(&v["tasks"], usize::MAX, |t| {
        vec![
            s(&t["id"]),
            s(&t["status"]),
            s(&t["agent"]),
            format!("{}/{}", s(&t["attempts"]), s(&t["max_attempts"])),
            s(&t["priority"]),
            s(&t["created_at"]),
            one_line(&t["error"], 60),
        ]
    });
    let mut out = table(
        &[
            "ID", "STATUS", "AGENT", "ATTEMPTS", "PRIO", "CREATED", "ERROR",
        ],
        &rows,
    );
    if let Some(n) = v["next_after"].as_i64() {
        let _ = writeln!(out, "(more: the API pages on with after={n})");
    }
    out
}

/// A value on one line, cut to `max` characters.
fn one_line(v: &Value, max: usize) -> String {
    let t = s(v).replace(['\n', '\r'], " ");
    if t.chars().count() > max {
        format!("{}…", t.chars().take(max).collect::<String>())
    } else {
        t
    }
}

/// Events as table rows (time, kind, data).
pub fn render_events(events: &[Value]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                s(&e["id"]),
                s(&e["created_at"]),
                s(&e["kind"]),
                one_line(&e["data"], 120),
            ]
        })
        .collect();
    table(&["EVENT", "AT", "KIND", "DATA"], &rows)
}

/// One event on a line, for `tasks follow`.
pub fn render_event_line(e: &Value) -> String {
    format!(
        "{}  {}  {}",
        s(&e["created_at"]),
        s(&e["kind"]),
        one_line(&e["data"], 200)
    )
}

/// A task with its events, for `tasks show`.
pub fn render_task_detail(t: &Value, events: &[Value]) -> String {
    let mut out = String::new();
    for (k, label) in [
        ("id", "task"),
        ("status", "status"),
        ("agent", "agent"),
        ("attempts", "attempts"),
        ("max_attempts", "max attempts"),
        ("priority", "priority"),
        ("session_id", "run slot"),
        ("objective_id", "objective"),
        ("created_at", "created"),
        ("run_after", "run after"),
        ("started_at", "started"),
        ("finished_at", "finished"),
        ("error", "error"),
    ] {
        if !t[k].is_null() {
            let _ = writeln!(out, "{label:<13} {}", s(&t[k]));
        }
    }
    let _ = writeln!(out, "{:<13} {}", "payload", t["payload"]);
    if !t["result"].is_null() {
        let _ = writeln!(out, "{:<13} {}", "result", t["result"]);
    }
    if t["prompt_tokens"].as_i64().unwrap_or(0) > 0 || t["cost_usd"].as_f64().unwrap_or(0.0) > 0.0 {
        let _ = writeln!(
            out,
            "{:<13} {} prompt + {} completion tokens, ${}",
            "usage",
            s(&t["prompt_tokens"]),
            s(&t["completion_tokens"]),
            t["cost_usd"]
        );
    }
    let _ = writeln!(out, "\nEVENTS ({})", events.len());
    out.push_str(&render_events(events));
    out
}

/// An objective and its steps, for `objective`.
pub fn render_objective(v: &Value) -> String {
    let mut out = format!(
        "objective {} {:?}: {}\n",
        s(&v["id"]),
        s(&v["title"]),
        s(&v["status"])
    );
    let rows: Vec<Vec<String>> = v["tasks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    let deps = t["depends_on"]
                        .as_array()
                        .map(|d| d.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    vec![
                        s(&t["step_key"]),
                        s(&t["id"]),
                        s(&t["agent"]),
                        s(&t["status"]),
                        deps,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(
        &["STEP", "TASK", "AGENT", "STATUS", "DEPENDS ON"],
        &rows,
    ));
    out
}
