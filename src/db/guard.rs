//! The one guard through which code reaches a pooled connection: `Session` (and its
//! transaction, `Tx`). Every statement is bracketed and bounded by `query_timeout`; on drop
//! an uncommitted transaction rolls back, and a connection with an abandoned statement, a
//! discard request or a closed socket is cancelled and discarded instead of reused.

use super::CANCEL_REQUEST_LIMIT;
use super::Db;
use super::PgManager;
use super::error::DbError;
use super::error::with_deadline;
use super::param;
use super::param::Params;
use super::schema::Schema;
use crate::db::tracker::SessionInfo;
use deadpool::managed::Object;
use deadpool_postgres::ClientWrapper;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;
use tokio_postgres::Row;

// Each statement is bracketed by begin/end_statement (see SessionInfo): the end is not in
// a Drop guard on purpose, so a future dropped mid-statement — or one that missed its
// deadline — leaves the mark set, and the guard's drop discards the connection.
macro_rules! query_methods {
    () => {
        pub async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, DbError> {
            let sql = &*self.schema.sql(sql);
            self.info.begin_statement();
            let c = self.client();
            let r = with_deadline(self.timeout, async {
                if self.unnamed {
                    c.query_typed(sql, &param::typed(params)).await
                } else {
                    let stmt = c.prepare_cached(sql).await?;
                    c.query(&stmt, &param::values(params)).await
                }
            })
            .await;
            self.settle(r)
        }

        pub async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, DbError> {
            let sql = &*self.schema.sql(sql);
            self.info.begin_statement();
            let c = self.client();
            let r = with_deadline(self.timeout, async {
                if self.unnamed {
                    c.query_typed_one(sql, &param::typed(params)).await
                } else {
                    let stmt = c.prepare_cached(sql).await?;
                    c.query_one(&stmt, &param::values(params)).await
                }
            })
            .await;
            self.settle(r)
        }

        pub async fn query_opt(
            &self,
            sql: &str,
            params: Params<'_>,
        ) -> Result<Option<Row>, DbError> {
            let sql = &*self.schema.sql(sql);
            self.info.begin_statement();
            let c = self.client();
            let r = with_deadline(self.timeout, async {
                if self.unnamed {
                    c.query_typed_opt(sql, &param::typed(params)).await
                } else {
                    let stmt = c.prepare_cached(sql).await?;
                    c.query_opt(&stmt, &param::values(params)).await
                }
            })
            .await;
            self.settle(r)
        }

        pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, DbError> {
            let sql = &*self.schema.sql(sql);
            self.info.begin_statement();
            let c = self.client();
            let r = with_deadline(self.timeout, async {
                if self.unnamed {
                    let rows = c.query_typed_raw(sql, param::typed(params)).await?;
                    param::drain_count(rows).await
                } else {
                    let stmt = c.prepare_cached(sql).await?;
                    c.execute(&stmt, &param::values(params)).await
                }
            })
            .await;
            self.settle(r)
        }

        /// Runs several statements without parameters (simple query protocol).
        pub async fn batch_execute(&self, sql: &str) -> Result<(), DbError> {
            let sql = &*self.schema.sql(sql);
            self.info.begin_statement();
            let r = with_deadline(self.timeout, self.client().batch_execute(sql)).await;
            self.settle(r)
        }

        /// The schema taskwarden's objects are in (for what a statement cannot name
        /// itself: the notification channel).
        pub fn schema(&self) -> &Schema {
            &self.schema
        }

        /// Ends the statement bracket unless the deadline passed: then the statement is
        /// still in flight as far as we know, and the connection must not be reused.
        fn settle<T>(&self, r: Result<T, DbError>) -> Result<T, DbError> {
            if !matches!(r, Err(DbError::Deadline(_))) {
                self.info.end_statement();
            }
            r
        }
    };
}

/// The one handle to a pooled connection. See the module docs.
pub struct Session {
    pub(super) obj: Option<Object<PgManager>>,
    pub(super) info: Arc<SessionInfo>,
    pub(super) db: Db,
    pub(super) timeout: Duration,
    /// Unnamed statements only (behind a transaction pooler); see `db::param`.
    pub(super) unnamed: bool,
    pub(super) schema: Schema,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.info.id)
            .field("caller", &self.info.caller)
            .field("label", &self.info.label)
            .field("backend_pid", &self.info.backend_pid)
            .finish()
    }
}

impl Session {
    fn client(&self) -> &ClientWrapper {
        match &self.obj {
            Some(o) => &o.client,
            // obj is only taken in Drop.
            None => unreachable!("session used after drop"),
        }
    }

    pub fn id(&self) -> u64 {
        self.info.id
    }

    pub fn backend_pid(&self) -> i32 {
        self.info.backend_pid
    }

    query_methods!();

    /// Starts a transaction. It commits only through [`Tx::commit`]; dropped, or on any
    /// error path that drops it, it rolls back.
    pub async fn transaction(&mut self) -> Result<Tx<'_>, DbError> {
        let obj = self.obj.as_mut().ok_or(DbError::PoolClosed)?;
        self.info.begin_statement();
        let tx = with_deadline(self.timeout, obj.client.transaction()).await?;
        self.info.end_statement();
        let tx = Tx {
            tx,
            info: Arc::clone(&self.info),
            timeout: self.timeout,
            unnamed: self.unnamed,
            schema: self.schema.clone(),
        };
        // Behind a transaction pooler no startup options reach the server: the
        // transaction carries its own limits.
        if let Some(set_local) = &self.db.inner.set_local {
            tx.batch_execute(set_local).await?;
        }
        Ok(tx)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.db.inner.tracker.unregister(self.info.id);
        let Some(mut obj) = self.obj.take() else {
            return;
        };
        obj.returned = Some(Instant::now());
        let abandoned = self.info.statement_in_flight();
        if abandoned {
            // The server may still be running the abandoned statement: ask it to stop,
            // and do not hand this connection to anyone else.
            let token = obj.client.cancel_token();
            let tls = self.db.inner.tls.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                // Bounded: on a dead link the cancel request may get no answer either.
                rt.spawn(async move {
                    let _ =
                        tokio::time::timeout(CANCEL_REQUEST_LIMIT, token.cancel_query(tls)).await;
                });
            }
            tracing::debug!(session_id = self.info.id, caller = %self.info.caller, label = self.info.label, "session dropped mid-statement; cancelling it and discarding the connection");
        }
        let discard = abandoned || self.info.discard_requested() || obj.client.is_closed();
        let overflow =
            self.db.inner.pool.status().size > self.db.inner.base_size.load(Ordering::Relaxed);
        if discard || overflow {
            // Detach from the pool; dropping the client closes the socket.
            drop(Object::take(obj));
        }
        if self.info.is_lent() {
            // Take back the slot the pool lent while this force-closed guard was held.
            self.db.inner.lent.fetch_sub(1, Ordering::Relaxed);
            self.db.apply_size();
        }
        tracing::trace!(
            session_id = self.info.id,
            discard,
            overflow,
            "session returned"
        );
    }
}

/// A transaction on a [`Session`]. Rolled back on drop unless committed.
pub struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    info: Arc<SessionInfo>,
    timeout: Duration,
    unnamed: bool,
    schema: Schema,
}

impl Tx<'_> {
    fn client(&self) -> &deadpool_postgres::Transaction<'_> {
        &self.tx
    }

    query_methods!();

    pub async fn commit(self) -> Result<(), DbError> {
        let info = Arc::clone(&self.info);
        info.begin_statement();
        let r = with_deadline(self.timeout, self.tx.commit()).await;
        if !matches!(r, Err(DbError::Deadline(_))) {
            info.end_statement();
        }
        r
    }

    pub async fn rollback(self) -> Result<(), DbError> {
        let info = Arc::clone(&self.info);
        info.begin_statement();
        let r = with_deadline(self.timeout, self.tx.rollback()).await;
        if !matches!(r, Err(DbError::Deadline(_))) {
            info.end_statement();
        }
        r
    }
}
