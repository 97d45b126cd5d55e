//! [`Query`]: the one interface over every handle that runs statements — the pooled
//! [`Session`], its transaction [`Tx`], the [`DirectClient`] and its [`DirectTx`] — so a
//! store function is written once, takes `&impl Query`, and runs on whichever its caller
//! holds (the supervisor's admin connection, inside its lock-timeout transaction or not;
//! a pooled session; a transaction).
//!
//! Each implementation only forwards to the handle's own methods, so what bounds a round
//! trip stays with the handle: the statement bracket and deadline of a session (whose
//! abandoned statement discards the connection), the deadline and broken flag of a direct
//! connection. Nothing here adds a round trip or a wait.
//!
//! The futures are `Send` by signature (return-position `impl Future + Send`, not `async
//! fn` in the trait, whose futures could not be required `Send` by callers), so a store
//! function generic over `Query` can run in a spawned task.

use tokio_postgres::Row;

use super::direct::{DirectClient, DirectTx};
use super::error::DbError;
use super::guard::{Session, Tx};
use super::param::Params;
use super::schema::Schema;

/// Runs statements, each under its handle's deadline. See the module docs.
pub trait Query: Sync {
    /// Every row the statement returns.
    fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Vec<Row>, DbError>> + Send;

    /// Exactly one row (an error otherwise).
    fn query_one(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Row, DbError>> + Send;

    /// At most one row (an error if more).
    fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Option<Row>, DbError>> + Send;

    /// The number of rows the statement affected.
    fn execute(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<u64, DbError>> + Send;

    /// The schema taskwarden's objects are in (for what a statement cannot name itself).
    fn schema(&self) -> &Schema;
}

// Each forwards to the inherent method of the same name (inherent items win in a
// `Self::` path), which is where the handle's bracketing and deadline live.
macro_rules! forward_query {
    ($($t:ty),*) => {$(
        impl Query for $t {
            fn query(
                &self,
                sql: &str,
                params: Params<'_>,
            ) -> impl Future<Output = Result<Vec<Row>, DbError>> + Send {
                Self::query(self, sql, params)
            }

            fn query_one(
                &self,
                sql: &str,
                params: Params<'_>,
            ) -> impl Future<Output = Result<Row, DbError>> + Send {
                Self::query_one(self, sql, params)
            }

            fn query_opt(
                &self,
                sql: &str,
                params: Params<'_>,
            ) -> impl Future<Output = Result<Option<Row>, DbError>> + Send {
                Self::query_opt(self, sql, params)
            }

            fn execute(
                &self,
                sql: &str,
                params: Params<'_>,
            ) -> impl Future<Output = Result<u64, DbError>> + Send {
                Self::execute(self, sql, params)
            }

            fn schema(&self) -> &Schema {
                Self::schema(self)
            }
        }
    )*};
}

forward_query!(Session, Tx<'_>, DirectClient, DirectTx<'_>);
