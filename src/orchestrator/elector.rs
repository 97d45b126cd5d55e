//! Leader election through one row with an expiry (`leader`, migration V3), the way River's
//! elector works: the leader renews the row every third of its time to live; another
//! instance takes it over only once it has expired. Nothing is held on a connection, so a
//! frozen link or a wedged process cannot keep leadership: it simply fails to renew.
//!
//! Safety: this instance counts itself leader only until `sent + ttl`, where `sent` is
//! when the winning statement was sent. The server set `expires_at = now() + ttl` later
//! than that, so this instance stops leading before any other can start. Leader work is
//! also idempotent (conditional updates), so an overlap could not double-apply anyway.

use std::time::{Duration, Instant};

use crate::db::{Db, DbError};
use crate::metrics::{self as m, Metrics};
use crate::store::leader;

pub struct Elector {
    instance_id: String,
    db: Db,
    metrics: Metrics,
    /// Leadership is ours until this instant, if we hold it.
    leading_until: Option<Instant>,
}

impl Elector {
    pub fn new(instance_id: String, db: Db, metrics: Metrics) -> Elector {
        Elector {
            instance_id,
            db,
            metrics,
            leading_until: None,
        }
    }

    /// Whether this instance may do leader work right now.
    pub fn is_leading(&self) -> bool {
        self.leading_until.is_some_and(|t| Instant::now() < t)
    }

    /// Takes or renews leadership for `ttl`. Failing to reach the database steps down at
    /// once. Returns whether this instance leads now.
    pub async fn run_once(&mut self, ttl: Duration) -> bool {
        let was = self.is_leading();
        let sent = Instant::now();
        match self.try_hold(ttl).await {
            Ok(true) => {
                self.leading_until = sent.checked_add(ttl);
                if !was {
                    tracing::info!(instance = %self.instance_id, ttl_ms = ttl.as_millis() as u64, "became leader");
                }
            }
            Ok(false) => {
                if was {
                    tracing::warn!(instance = %self.instance_id, "leadership taken over by another instance; stepping down");
                }
                self.leading_until = None;
            }
            Err(e) => {
                if was {
                    tracing::warn!(instance = %self.instance_id, error = %e, sqlstate = ?e.sqlstate().map(|c| c.code()), "could not renew leadership; stepping down");
                }
                self.leading_until = None;
            }
        }
        let leading = self.is_leading();
        self.metrics
            .gauge(m::LEADER, &[])
            .set(if leading { 1.0 } else { 0.0 });
        leading
    }

    /// After a pass that was dropped at its deadline: if the leadership counted from the
    /// last successful renewal has lapsed meanwhile, steps down as a failed renewal does
    /// (said in the log, `taskwarden_leader` 0), rather than keep the stale state.
    pub fn step_down_if_lapsed(&mut self) {
        if self.leading_until.is_some() && !self.is_leading() {
            tracing::warn!(instance = %self.instance_id, "leadership lapsed: the renewal did not finish in time; stepping down");
            self.leading_until = None;
            self.metrics.gauge(m::LEADER, &[]).set(0.0);
        }
    }

    /// One statement: insert the row, renew it if it is ours, or take it if it expired.
    async fn try_hold(&self, ttl: Duration) -> Result<bool, DbError> {
        let s = self.db.session("elector.hold").await?;
        leader::hold(&s, &self.instance_id, ttl).await
    }

    /// Gives leadership up (shutdown), so another instance need not wait for the expiry.
    pub async fn resign(&mut self) {
        if self.leading_until.take().is_none() {
            return;
        }
        self.metrics.gauge(m::LEADER, &[]).set(0.0);
        let r = async {
            let s = self.db.session("elector.resign").await?;
            leader::resign(&s, &self.instance_id).await
        }
        .await;
        match r {
            Ok(_) => tracing::info!(instance = %self.instance_id, "resigned leadership"),
            Err(e) => {
                tracing::warn!(instance = %self.instance_id, error = %e, "could not resign leadership; it lapses at its expiry")
            }
        }
    }
}
