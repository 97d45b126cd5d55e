//! Connections outside the pool, for the jobs that must not depend on it (migrations,
//! the supervisor's admin connection): the same deadline on every round trip, and a
//! socket closed at once when dropped.

use super::error::DbError;
use super::error::describe_pg_error;
use super::error::with_deadline;
use super::limit_settings;
use super::param;
use super::param::Params;
use super::schema::Schema;
use super::session_settings_via;
use super::session_target;
use crate::config::DatabaseConfig;
use crate::config::Pooler;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_postgres::Row;

/// A connection outside the pool, for the few jobs that must not depend on it (migrations
/// under an advisory lock, the supervisor's admin connection). Like
/// a [`Session`], every round trip has the `query_timeout` deadline; unlike one, it is
/// not tracked, and its owner rebuilds it when it breaks. Dropping it closes the socket at
/// once, even with a statement in flight on a dead link.
pub struct DirectClient {
    client: tokio_postgres::Client,
    conn: tokio::task::JoinHandle<()>,
    timeout: Duration,
    /// Set when a round trip missed its deadline: the link is presumed dead.
    broken: std::sync::atomic::AtomicBool,
    /// Through a transaction pooler: unnamed statements only (see `db::param`).
    unnamed: bool,
    schema: Schema,
}

impl DirectClient {
    async fn run<T>(
        &self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        let r = with_deadline(self.timeout, fut).await;
        if matches!(r, Err(DbError::Deadline(_))) {
            self.broken.store(true, Ordering::Relaxed);
        }
        r
    }

    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        let sql = &*self.schema.sql(sql);
        if self.unnamed {
            self.run(self.client.query_typed(sql, &param::typed(params)))
                .await
        } else {
            self.run(self.client.query(sql, &param::values(params)))
                .await
        }
    }

    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        let sql = &*self.schema.sql(sql);
        if self.unnamed {
            self.run(self.client.query_typed_one(sql, &param::typed(params)))
                .await
        } else {
            self.run(self.client.query_one(sql, &param::values(params)))
                .await
        }
    }

    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, DbError> {
        let sql = &*self.schema.sql(sql);
        if self.unnamed {
            self.run(self.client.query_typed_opt(sql, &param::typed(params)))
                .await
        } else {
            self.run(self.client.query_opt(sql, &param::values(params)))
                .await
        }
    }

    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        let sql = &*self.schema.sql(sql);
        if self.unnamed {
            self.run(async {
                let rows = self
                    .client
                    .query_typed_raw(sql, param::typed(params))
                    .await?;
                param::drain_count(rows).await
            })
            .await
        } else {
            self.run(self.client.execute(sql, &param::values(params)))
                .await
        }
    }

    pub async fn batch_execute(&self, sql: &str) -> Result<(), DbError> {
        let sql = &*self.schema.sql(sql);
        self.run(self.client.batch_execute(sql)).await
    }

    /// The schema taskwarden's objects are in.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Closed by the server, or presumed dead after a missed deadline: build a new one.
    pub fn is_broken(&self) -> bool {
        self.client.is_closed() || self.broken.load(Ordering::Relaxed)
    }

    pub fn deadline(&self) -> Duration {
        self.timeout
    }

    /// Opens a transaction whose every lock wait ends after `lock_timeout` (`SET LOCAL`:
    /// nothing outlives it, behind a pooler too), for reads that must never queue behind
    /// a session holding a lock on taskwarden's tables (the supervisor's). A refusal is
    /// an error with SQLSTATE 55P03 ([`DbError::is_lock_timeout`]).
    pub async fn transaction_with_lock_timeout(
        &self,
        lock_timeout: Duration,
    ) -> Result<DirectTx<'_>, DbError> {
        self.batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = {}",
            lock_timeout.as_millis().max(1)
        ))
        .await?;
        Ok(DirectTx {
            client: self,
            open: true,
        })
    }
}

/// A transaction on a [`DirectClient`] (see
/// [`DirectClient::transaction_with_lock_timeout`]); its statements run on the client,
/// with its deadline. End it with [`DirectTx::finish`], [`DirectTx::commit`] or
/// [`DirectTx::rollback`]; dropped open (its future cancelled mid-way), it marks the
/// client broken, since a connection left inside a transaction must not be used again.
pub struct DirectTx<'a> {
    client: &'a DirectClient,
    open: bool,
}

impl DirectTx<'_> {
    pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
        self.client.query(sql, params).await
    }

    pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
        self.client.query_one(sql, params).await
    }

    pub async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, DbError> {
        self.client.query_opt(sql, params).await
    }

    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
        self.client.execute(sql, params).await
    }

    pub fn schema(&self) -> &Schema {
        self.client.schema()
    }

    // `open` is cleared only once the statement returned: cancelled mid-way, or failed,
    // the transaction may still be open, and the drop marks the client broken.
    pub async fn commit(mut self) -> Result<(), DbError> {
        self.client.batch_execute("COMMIT").await?;
        self.open = false;
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), DbError> {
        self.client.batch_execute("ROLLBACK").await?;
        self.open = false;
        Ok(())
    }

    /// Commits after `result` succeeded, else rolls back and returns its error. A failed
    /// ROLLBACK is not reported over the error that caused it: it leaves a broken or
    /// aborted connection, which the owner's next failing statement makes it rebuild.
    pub async fn finish<T>(self, result: Result<T, DbError>) -> Result<T, DbError> {
        match result {
            Ok(v) => {
                self.commit().await?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.rollback().await;
                Err(e)
            }
        }
    }
}

impl Drop for DirectTx<'_> {
    fn drop(&mut self) {
        if self.open {
            self.client.broken.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for DirectClient {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Opens a [`DirectClient`]; the whole connect (socket, startup, auth) is bounded by
/// `connect_timeout`.
pub async fn connect_direct(
    pg: &tokio_postgres::Config,
    cfg: &DatabaseConfig,
    purpose: &str,
) -> Result<DirectClient, DbError> {
    let (mut pg, pooler, tls) = session_target(pg, cfg)?;
    session_settings_via(&mut pg, cfg, pooler);
    pg.application_name(format!("{}:{purpose}", cfg.application_name));
    let (client, conn) =
        match tokio::time::timeout(cfg.connect_timeout.get(), super::tls::connect(&pg, &tls)).await
        {
            Ok(r) => r.map_err(DbError::Connect)?,
            Err(_) => return Err(DbError::ConnectTimeout(cfg.connect_timeout.get())),
        };
    let purpose = purpose.to_string();
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(purpose, error = %describe_pg_error(&e), "direct database connection ended with an error");
        }
    });
    let direct = DirectClient {
        client,
        conn,
        timeout: cfg.query_timeout.get(),
        broken: std::sync::atomic::AtomicBool::new(false),
        unnamed: pooler == Pooler::Transaction,
        schema: Schema::new(&cfg.schema),
    };
    // Behind a session pooler the limits cannot be startup options; the session lasts as
    // long as this connection, so a SET holds.
    if pooler == Pooler::Session {
        direct.batch_execute(&limit_settings(cfg, false)).await?;
    }
    Ok(direct)
}
