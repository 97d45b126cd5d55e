//! The notification listener: `LISTEN <schema>_tasks` on a connection of its own,
//! probed while idle so a frozen link is replaced; claims fall back to polling meanwhile.

use super::Context;
use crate::db::DbError;
use futures_util::FutureExt;
use futures_util::StreamExt;

/// What the listener alone needs: the connection settings it opens its own session with.
pub(super) struct Listener {
    pub(super) pg: tokio_postgres::Config,
}

impl Listener {
    pub(super) async fn run(&self, ctx: &Context) {
        while !ctx.shutdown.is_cancelled() {
            if let Err(e) = self.listen_once(ctx).await {
                tracing::warn!(error = %e, "task notification listener lost its connection; polling meanwhile");
            }
            let poll = ctx.config.load().workers.poll_interval.get();
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// One LISTEN connection's life. Connect and LISTEN are bounded; while idle, a probe
    /// round trip every `query_timeout` proves the link alive, so a frozen connection is
    /// replaced within two deadlines instead of silently delivering nothing.
    async fn listen_once(&self, ctx: &Context) -> Result<(), DbError> {
        let cfg = ctx.config.load_full();
        let deadline = cfg.database.query_timeout.get();
        // LISTEN needs a session that lasts: `direct_url` when set.
        let (mut pg, pooler, tls) = crate::db::session_target(&self.pg, &cfg.database)?;
        crate::db::session_settings_via(&mut pg, &cfg.database, pooler);
        pg.application_name(format!("{}:listener", cfg.database.application_name));
        let connect_limit = cfg.database.connect_timeout.get();
        let (client, mut conn) =
            match tokio::time::timeout(connect_limit, crate::db::tls::connect(&pg, &tls)).await {
                Ok(r) => r.map_err(DbError::Connect)?,
                Err(_) => return Err(DbError::ConnectTimeout(connect_limit)),
            };
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        let on_message =
            |m: Option<Result<tokio_postgres::AsyncMessage, tokio_postgres::Error>>| match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    ctx.wake.notify_one();
                    Ok(true)
                }
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(DbError::Connect(e)),
                None => Ok(false),
            };
        // The connection is driven (messages polled) while each round trip runs.
        let channel = crate::db::Schema::new(&cfg.database.schema).channel();
        let sql = format!("LISTEN {channel}");
        let mut round_trip = Some(client.batch_execute(&sql).boxed());
        let mut next_probe = tokio::time::Instant::now() + deadline;
        let mut listening = false;
        loop {
            match round_trip.as_mut() {
                Some(rt) => {
                    let expires = tokio::time::sleep(deadline);
                    tokio::pin!(expires);
                    loop {
                        tokio::select! {
                            _ = ctx.shutdown.cancelled() => return Ok(()),
                            r = &mut *rt => { r?; break; }
                            m = messages.next() => if !on_message(m)? { return Ok(()) },
                            _ = &mut expires => return Err(DbError::Deadline(deadline)),
                        }
                    }
                    if !listening {
                        // Notifications sent while nothing listened are lost: look now.
                        listening = true;
                        ctx.wake.notify_one();
                    }
                    round_trip = None;
                    next_probe = tokio::time::Instant::now() + deadline;
                }
                None => {
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        m = messages.next() => if !on_message(m)? { return Ok(()) },
                        _ = tokio::time::sleep_until(next_probe) => {
                            round_trip = Some(client.batch_execute("SELECT 1").boxed());
                        }
                    }
                }
            }
        }
    }
}
