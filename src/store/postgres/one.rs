//! A one-referrer snapshot of the slots program in one round trip: its seven small queries and
//! the transaction around them sent as one simple-query message, their rows told apart by the
//! statement they end. The queries are prepared once per connection (`PREPARE`) and sent as
//! `EXECUTE`s: the server plans them once instead of on every run, which was half of the round
//! trip's time. The same queries, with the same ids, as the indexed path in read.rs (values
//! inlined: the simple query protocol takes no parameters, and they are the job's own integers
//! and instants). Anything unusual (a cell that does not decode, a duplicate subscription, an
//! error) is read again on that path, which names it.
//!
//! A one-referrer apply sends the run's start (`begin_run.sql`) in the same message, ahead of
//! the snapshot, on the run lock's connection: see [`PgStore::begin_run_reading`].

use futures_util::TryStreamExt;
use sqlx::Either;

use super::read::{host_bonus_from_row, pairs_from_rows, referred_from_row, reward_from_row};
use super::*;
use crate::store::{Begun, Trigger};

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

/// The run's start as a prepared statement of the run lock's connection.
const BEGIN_STATEMENT: &str = "referral_rewards_begin";

/// The name of query `i`'s prepared statement (clear of sqlx's own `sqlx_s_N`).
fn statement_name(i: usize) -> String {
    format!("referral_rewards_one_{i}")
}

/// The `PREPARE`s of [`QUERIES`], for a connection that does not hold them yet.
pub(super) fn prepare_sql() -> String {
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

/// The `PREPARE` of the run's start ([`BEGIN_STATEMENT`]).
pub(super) fn prepare_begin_sql() -> String {
    format!(
        "PREPARE {BEGIN_STATEMENT}(bigint, timestamptz, bigint, text, timestamptz, text, text) \
         AS {}",
        include_str!("../../../sql/queries/postgres/begin_run.sql")
    )
}

/// Whether an error says that a prepared statement is not there (SQLSTATE 26000).
pub(super) fn not_prepared(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "26000")
}

fn timestamptz(t: Instant) -> String {
    format!("'{}'::timestamptz", instant::to_rfc3339(t))
}

/// What one simple-query message of several statements returned.
struct Sent {
    /// Each statement's rows, by the statement's position (rows no statement claims are
    /// dropped and flagged in `odd`).
    rows: Vec<Vec<PgRow>>,
    /// How many statements completed.
    ended: usize,
    odd: bool,
    /// The error the message stopped at, if it did.
    error: Option<sqlx::Error>,
}

/// Sends `statements` as one message and reads what comes, up to its end or its error (sqlx
/// reads the rest before the connection's next use).
async fn send(conn: &mut sqlx::PgConnection, statements: &[String]) -> Sent {
    let mut sent = Sent {
        rows: (0..statements.len()).map(|_| vec![]).collect(),
        ended: 0,
        odd: false,
        error: None,
    };
    let text = statements.join(";\n");
    let mut stream = sqlx::raw_sql(sqlx::AssertSqlSafe(text)).fetch_many(&mut *conn);
    loop {
        match stream.try_next().await {
            Ok(None) => break,
            Ok(Some(Either::Left(_))) => sent.ended += 1,
            Ok(Some(Either::Right(row))) => match sent.rows.get_mut(sent.ended) {
                Some(rows) => rows.push(row),
                None => sent.odd = true,
            },
            Err(e) => {
                sent.error = Some(e);
                break;
            }
        }
    }
    sent
}

impl PgStore {
    /// The read transaction of referrer `id`'s snapshot: its statements, and where its
    /// `EXECUTE`s start among them. `lock_session`: sent on the run lock's connection, whose
    /// session plans without bitmap scans (see `lock_connection`); the read plans as it would
    /// on any other connection.
    fn read_statements(
        &self,
        id: i64,
        window: (Instant, Instant),
        lock_session: bool,
    ) -> (Vec<String>, usize) {
        let mut statements: Vec<String> = vec![
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".into(),
            "SET LOCAL TIME ZONE 'UTC'".into(),
        ];
        if lock_session {
            statements.push("SET LOCAL enable_bitmapscan = on".into());
        }
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
                format!("{}, {}, {id}", timestamptz(window.0), timestamptz(window.1))
            } else {
                id.to_string()
            };
            statements.push(format!("EXECUTE {}({args})", statement_name(i)));
        }
        statements.push("COMMIT".into());
        (statements, first)
    }

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
                // Preparing reads the tables' definitions, waiting for their locks: bounded by
                // the run's timeouts as the reads are.
                let prepare = format!(
                    "ROLLBACK;\nBEGIN;\n{}\n{};\nCOMMIT",
                    self.timeouts,
                    prepare_sql()
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
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
        let (statements, first) = self.read_statements(id, window, false);
        let sent = send(conn, &statements).await;
        if let Some(e) = sent.error {
            return Err(e);
        }
        if sent.odd || sent.ended != statements.len() {
            return Ok(None);
        }
        Ok(decode(&sent.rows[first..first + QUERIES.len()], id))
    }

    /// A one-referrer apply's start (`begin_run.sql`: the run lock, the orphans, the run's
    /// row) and, when it started, the referrer's snapshot, in one round trip on the run lock's
    /// connection where there were two on two connections: `BEGIN; EXECUTE begin; COMMIT;`
    /// then the read transaction of [`PgStore::read_one_pipelined`], whose snapshot is taken
    /// after the start's commit, so under the lock as before. The snapshot is `None` when the
    /// run did not start or anything was unusual: it is then read the usual way.
    pub async fn begin_run_reading(
        &self,
        id: i64,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
        window: (Instant, Instant),
    ) -> Result<(Begun, Option<Snapshot>), StoreError> {
        self.on_lock_connection(|conn| self.begin_reading_on(conn, id, as_of, now, trigger, window))
            .await?
    }

    /// `Err`: the start did not commit, and may be tried again on a fresh connection;
    /// `Ok(Err)`: it did, and the run fails as it is.
    async fn begin_reading_on(
        &self,
        mut conn: sqlx::PgConnection,
        id: i64,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
        window: (Instant, Instant),
    ) -> Result<Result<(Begun, Option<Snapshot>), StoreError>, StoreError> {
        let sw = std::time::Instant::now();
        let text = |v: Option<&str>| v.map_or_else(|| "NULL".to_owned(), write::dollar_quoted);
        let mut statements = vec![
            "BEGIN".to_owned(),
            format!(
                "EXECUTE {BEGIN_STATEMENT}({LOCK_KEY}, {}, {id}, 'referrer', {}, {}, {})",
                timestamptz(now),
                timestamptz(as_of),
                text(trigger.map(Trigger::as_str)),
                text(Some(crate::store::ORPHAN_ERROR)),
            ),
            "COMMIT".to_owned(),
        ];
        let started = statements.len();
        let (reads, first) = self.read_statements(id, window, true);
        let first = started + first;
        statements.extend(reads);

        let mut attempt = 0;
        let sent = loop {
            let sent = send(&mut conn, &statements).await;
            if sent.ended >= started {
                break sent;
            }
            // The start did not commit. On a connection new to this, it stopped at its
            // statement, which did nothing: prepare it and the reads (best effort: a read
            // that cannot be prepared is read the usual way, which names what is wrong), then
            // send again once.
            let missing = sent.ended == 1 && sent.error.as_ref().is_some_and(not_prepared);
            if missing && attempt == 0 {
                attempt += 1;
                let prepare = format!("ROLLBACK;\n{};\n{}", prepare_begin_sql(), prepare_sql());
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
                    .execute(&mut conn)
                    .await
                {
                    tracing::debug!(error = %e, "preparing the one-referrer statements");
                }
                continue;
            }
            if missing && sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.is_ok() {
                // Still not there: the start the other way, which names what is wrong.
                let begun = self
                    .begin_on(conn, Scope::Referrer(id), Some(id), as_of, now, trigger)
                    .await?;
                return Ok(Ok((begun, None)));
            }
            // Otherwise the start's statement may have taken the lock before it failed (a
            // session lock outlives the rollback): the connection goes (dropped here), and
            // with it any lock.
            return Err(sent.error.map_or_else(
                || StoreError::Runtime("recording the run: the run's start was cut short".into()),
                q("taking the run lock and recording the run"),
            ));
        };

        // The start committed: from here on an error is this run's, not one to try again on
        // a fresh connection (that would start the run a second time).
        Ok(self
            .after_start(conn, sent, statements.len(), first, id, sw)
            .await)
    }

    /// The start's row and the read that followed it, once the start committed.
    async fn after_start(
        &self,
        mut conn: sqlx::PgConnection,
        sent: Sent,
        statements: usize,
        first: usize,
        id: i64,
        sw: std::time::Instant,
    ) -> Result<(Begun, Option<Snapshot>), StoreError> {
        let read_error = sent.error.is_some();
        if let Some(e) = &sent.error {
            tracing::debug!(error = %e, "the referrer's snapshot beside the run's start failed; reading it the usual way");
            // Should the rollback fail, the connection is broken: the run's write fails on it,
            // and the run is recorded `failed` (on another connection).
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
        }
        let start = sent.rows[1].first().map(|r| {
            Ok::<_, sqlx::Error>((
                r.try_get::<bool, _>(0)?,
                r.try_get::<bool, _>(1)?,
                r.try_get::<i64, _>(2)?,
                r.try_get::<Option<i64>, _>(3)?,
            ))
        });
        let (got, known, abandoned, run_id) = match start {
            Some(Ok(start)) => start,
            // Dropping the connection releases a lock the start took; a `running` row it
            // inserted is marked abandoned by the next run.
            Some(Err(e)) => return Err(q("taking the run lock and recording the run")(e)),
            None => {
                return Err(StoreError::Runtime(
                    "recording the run: the run's start returned no row".into(),
                ));
            }
        };
        if read_error && !got {
            // Nothing held: the connection goes rather than back to the kept ones.
            return Ok((Begun::Locked, None));
        }
        let mut begun = self.begun(conn, got, known, abandoned, run_id).await?;
        if read_error && let Begun::Started { lock, .. } | Begun::UnknownUser(lock) = &mut begun {
            // Its prepared reads may be what failed (a host column's type changed under
            // them, a read that could not be prepared): closed at the run's release instead
            // of kept, so that the next run prepares them afresh on a new connection.
            lock.discard_connection();
        }
        let read_whole = !read_error && !sent.odd && sent.ended == statements;
        let snapshot = match (&begun, read_whole) {
            (Begun::Started { .. }, true) => decode(&sent.rows[first..first + QUERIES.len()], id)
                .map(|mut snap| {
                    snap.timings.push(crate::snapshot::QueryTiming {
                        query: "one_referrer_with_the_run_start",
                        rows: snap.referred.len(),
                        elapsed: sw.elapsed(),
                    });
                    snap
                }),
            _ => None,
        };
        Ok((begun, snapshot))
    }
}

/// Referrer `id`'s snapshot from the rows of [`QUERIES`], in order; `None` for anything
/// unusual (a cell that does not decode, a duplicate subscription, a panic): the indexed path
/// reads it again and names it.
///
/// A panic is caught here because the read that travels with the run's start is decoded
/// before the engine's own `catch_unwind` covers the run: uncaught, it would end the process
/// with the run's row left `running`. The run then reads the referrer again the usual way
/// (the pool's pipelined read, decoded here too, then the indexed queries), under that guard:
/// a panic that comes back there fails the run and records it `failed`.
fn decode(rows: &[Vec<PgRow>], id: i64) -> Option<Snapshot> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_rows(rows, id)))
        .unwrap_or_else(|payload| {
            tracing::error!(
                referrer = id,
                panic = crate::engine::panic_message(&*payload),
                "internal error (a bug; please report it) decoding the referrer's snapshot; reading it again the usual way"
            );
            None
        })
}

fn decode_rows(rows: &[Vec<PgRow>], id: i64) -> Option<Snapshot> {
    if crate::fault::for_referrer("panic-decoding-referrer", id) {
        panic!("fault injected decoding referrer {id}'s snapshot");
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
    decoded
        .ok()
        .filter(|snap| crate::store::users_with_duplicate_subscriptions(snap).is_empty())
}
