//! A one-referrer snapshot of the slots program in one round trip: its seven small queries and
//! the transaction around them sent as one simple-query message, their rows told apart by the
//! statement they end. The queries are prepared once per connection (`PREPARE`) and sent as
//! `EXECUTE`s: the server plans them once instead of on every run, which was half of the round
//! trip's time. The same queries, with the same ids, as the indexed path in read.rs (values
//! inlined: the simple query protocol takes no parameters, and they are the job's own integers
//! and instants). Anything unusual (a cell that does not decode, a duplicate subscription, an
//! error) is read again on that path, which names it.

use futures_util::TryStreamExt;
use sqlx::Either;

use super::read::{host_bonus_from_row, pairs_from_rows, referred_from_row, reward_from_row};
use super::*;

const QUERIES: [&str; 7] = [
    include_str!("../../../sql/queries/postgres/referrer_one.sql"),
    include_str!("../../../sql/queries/postgres/uncounted_one.sql"),
    include_str!("../../../sql/queries/postgres/stored_rewards_one.sql"),
    include_str!("../../../sql/queries/postgres/referred_one.sql"),
    include_str!("../../../sql/queries/postgres/registrations_one.sql"),
    include_str!("../../../sql/queries/postgres/referrer_events_one.sql"),
    include_str!("../../../sql/queries/postgres/host_bonus_one.sql"),
];

/// Which of [`QUERIES`] binds the window ($1, $2) and the referrer ($3); the others bind the
/// referrer as $1.
const EVENTS: usize = 5;

/// The name of query `i`'s prepared statement (clear of sqlx's own `sqlx_s_N`).
fn statement_name(i: usize) -> String {
    format!("referral_rewards_one_{i}")
}

/// The `PREPARE`s of [`QUERIES`], for a connection that does not hold them yet.
fn prepare_sql() -> String {
    QUERIES
        .iter()
        .enumerate()
        .map(|(i, sql)| {
            let types = if i == EVENTS {
                "timestamptz, timestamptz, bigint"
            } else {
                "bigint"
            };
            format!("PREPARE {}({types}) AS {sql}", statement_name(i))
        })
        .collect::<Vec<_>>()
        .join(";\n")
}

/// Whether an error says that a prepared statement is not there (SQLSTATE 26000).
pub(super) fn not_prepared(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "26000")
}

impl PgStore {
    /// The snapshot of referrer `id`, or `None` when it must be read on the indexed path.
    /// An `Err` leaves `conn` in an unknown state: the caller closes it.
    pub(super) async fn read_one_pipelined(
        &self,
        conn: &mut sqlx::PgConnection,
        id: i64,
        window: (Instant, Instant),
    ) -> Result<Option<Snapshot>, sqlx::Error> {
        match self.read_one_prepared(conn, id, window).await {
            Err(e) if not_prepared(&e) => {
                // A connection new to this: end the failed transaction, prepare, read again.
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ROLLBACK;\n{}", prepare_sql())))
                    .execute(&mut *conn)
                    .await?;
                self.read_one_prepared(conn, id, window).await
            }
            r => r,
        }
    }

    async fn read_one_prepared(
        &self,
        conn: &mut sqlx::PgConnection,
        id: i64,
        window: (Instant, Instant),
    ) -> Result<Option<Snapshot>, sqlx::Error> {
        let ts = |t| format!("'{}'::timestamptz", instant::to_rfc3339(t));
        let mut statements: Vec<String> = vec![
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".into(),
            "SET LOCAL TIME ZONE 'UTC'".into(),
        ];
        statements.extend(
            self.timeouts
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
        let first = statements.len();
        for i in 0..QUERIES.len() {
            let args = if i == EVENTS {
                format!("{}, {}, {id}", ts(window.0), ts(window.1))
            } else {
                id.to_string()
            };
            statements.push(format!("EXECUTE {}({args})", statement_name(i)));
        }
        statements.push("COMMIT".into());
        let text = statements.join(";\n");

        let mut rows: Vec<Vec<PgRow>> = (0..QUERIES.len()).map(|_| vec![]).collect();
        let (mut ended, mut odd) = (0usize, false);
        // Read to the end whatever comes, so that the connection is ready for its next use.
        let mut stream = sqlx::raw_sql(sqlx::AssertSqlSafe(text)).fetch_many(&mut *conn);
        while let Some(item) = stream.try_next().await? {
            match item {
                Either::Left(_) => ended += 1,
                Either::Right(row) => match ended.checked_sub(first) {
                    Some(i) if i < QUERIES.len() => rows[i].push(row),
                    _ => odd = true,
                },
            }
        }
        drop(stream);
        if odd || ended != statements.len() {
            return Ok(None);
        }
        let decoded = (|| -> Result<Snapshot, super::read::Bad> {
            let mut snap = Snapshot::default();
            let is_referrer: Option<Option<bool>> =
                rows[0].first().map(|r| r.try_get(0)).transpose()?;
            let is_referrer = is_referrer.flatten();
            if is_referrer == Some(false) {
                for r in &rows[1] {
                    let u: i64 = r.try_get(0)?;
                    snap.uncounted.push((id, u));
                }
            }
            snap.stored_rewards = rows[2]
                .iter()
                .map(reward_from_row)
                .collect::<Result<_, _>>()?;
            if is_referrer == Some(true) {
                snap.referrers = vec![id];
                let mut interner = Interner::default();
                snap.referred = rows[3]
                    .iter()
                    .map(|r| referred_from_row(r, &mut interner))
                    .collect::<Result<_, _>>()?;
                snap.registrations = pairs_from_rows(&rows[4])?;
                snap.referrer_events = pairs_from_rows(&rows[5])?;
            }
            snap.host_bonus = rows[6]
                .iter()
                .map(host_bonus_from_row)
                .collect::<Result<_, _>>()?;
            Ok(snap)
        })();
        match decoded {
            Ok(snap) if crate::store::users_with_duplicate_subscriptions(&snap).is_empty() => {
                Ok(Some(snap))
            }
            _ => Ok(None),
        }
    }
}
