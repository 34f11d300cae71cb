//! The snapshot: one repeatable-read transaction, large queries through binary COPY (with
//! a fallback to SELECT where the server refuses it), every cell decoded or named in an error.

use super::grants::{SideError, SidePart};
use super::*;

/// A SQL literal of a bigint array, for COPY (which takes no bind parameters).
fn array(ids: &[i64]) -> String {
    let mut s = String::with_capacity(ids.len() * 8 + 16);
    s.push_str("'{");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s.push_str("}'");
    s
}

/// A SQL literal of an instant, for COPY.
fn ts(t: Instant) -> String {
    format!("'{}'::timestamptz", instant::to_rfc3339(t))
}

/// SQLSTATEs with which a server refuses binary COPY itself rather than the data it reads:
/// `0A000` feature_not_supported (a server without `COPY (query) TO STDOUT` or its binary
/// format, as PostgreSQL-compatible distributed databases answer), `42501`
/// insufficient_privilege (COPY denied to the role or by a proxy), `42601` syntax_error (a
/// parser that does not know this form of COPY), `42883` undefined_function (no binary output
/// function for a column's type). Only these switch COPY off and fall back to SELECT; any
/// other error fails the run and leaves COPY on.
const COPY_REFUSALS: [&str; 4] = ["0A000", "42501", "42601", "42883"];

fn is_copy_refusal(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| COPY_REFUSALS.contains(&c.as_ref()))
}

fn copy_error(what: &'static str, e: &sqlx::Error, why: &str) -> StoreError {
    let code = e.as_database_error().and_then(|d| d.code());
    let code = code.map(|c| format!(" (SQLSTATE {c})")).unwrap_or_default();
    StoreError::Sql {
        what,
        message: format!(
            "binary COPY failed: {}{code}; {why} (database.pg_binary_copy = false reads with \
             SELECT instead)",
            crate::store::one_line(&e.to_string())
        ),
    }
}

/// Runs `COPY (SELECT * FROM (<query>) LIMIT 0) TO STDOUT (FORMAT binary)` through the simple
/// query protocol and reads its whole answer: `None` if the server accepted it, else its error.
/// sqlx does not hand out the data of a COPY run this way: it ends the statement with a
/// protocol error at the CopyOutResponse ("unexpected message"), which here means accepted,
/// and reads the rest of the answer (and any error in it) at the connection's next use: the
/// pings below.
async fn probe_copy(
    tx: &mut sqlx::PgConnection,
    query: &str,
) -> Result<Option<sqlx::Error>, StoreError> {
    let probe =
        format!("COPY (SELECT * FROM (\n{query}\n) AS probe LIMIT 0) TO STDOUT (FORMAT binary)");
    let answer = sqlx::raw_sql(sqlx::AssertSqlSafe(probe))
        .execute(&mut *tx)
        .await;
    let mut failure = match answer {
        Err(sqlx::Error::Protocol(m)) if m.contains("CopyOutResponse") => None,
        Err(e) => Some(e),
        Ok(_) => Some(sqlx::Error::Protocol(
            "the server answered COPY … TO STDOUT without a COPY stream".into(),
        )),
    };
    // Each ping reads up to its own ReadyForQuery; an error in the probe's remaining answer
    // stops one early, and the next ping goes on from there.
    let mut pings = 0;
    loop {
        match tx.ping().await {
            Ok(()) => break,
            Err(e @ sqlx::Error::Database(_)) if pings < 3 => {
                failure.get_or_insert(e);
                pings += 1;
            }
            Err(e) => return Err(q("reading with COPY")(e)),
        }
    }
    Ok(failure)
}

/// What referred*.sql reads for a finite time whose epoch microseconds do not fit a bigint.
pub(super) const TIME_OUT_OF_RANGE: i64 = i64::MIN;

/// Why a snapshot row could not be decoded, before the error names it in full (some values
/// are looked up afterwards, in the same transaction).
pub(super) enum Bad {
    Sql(sqlx::Error),
    Copy(pgcopy::CopyError),
    /// `value: None`: look it up by the row's id.
    Cell {
        table: &'static str,
        column: &'static str,
        row: Option<i64>,
        value: Option<String>,
        expected: &'static str,
    },
}

impl From<sqlx::Error> for Bad {
    fn from(e: sqlx::Error) -> Self {
        Bad::Sql(e)
    }
}

impl From<pgcopy::CopyError> for Bad {
    fn from(e: pgcopy::CopyError) -> Self {
        Bad::Copy(e)
    }
}

pub(super) fn null(
    table: &'static str,
    column: &'static str,
    row: Option<i64>,
    expected: &'static str,
) -> Bad {
    Bad::Cell {
        table,
        column,
        row,
        value: Some("NULL".into()),
        expected,
    }
}

pub(super) fn pg_time(
    v: Option<i64>,
    table: &'static str,
    column: &'static str,
    row: i64,
) -> Result<Option<Instant>, Bad> {
    match v {
        Some(TIME_OUT_OF_RANGE) => Err(Bad::Cell {
            table,
            column,
            row: Some(row),
            value: None,
            expected: "a time the job can hold (up to 294247-01-10 04:00:54.775807 UTC)",
        }),
        v => Ok(v),
    }
}

pub(super) fn pg_text<'a>(
    v: Option<&'a [u8]>,
    table: &'static str,
    column: &'static str,
    row: i64,
) -> Result<Option<&'a str>, Bad> {
    v.map(|b| {
        std::str::from_utf8(b).map_err(|_| Bad::Cell {
            table,
            column,
            row: Some(row),
            value: Some(format!("x'{}' (text that is not UTF-8)", hex(b))),
            expected: "UTF-8 text",
        })
    })
    .transpose()
}

/// The error for a row that could not be decoded, naming its table, id, column and value.
pub(super) async fn bad(tx: &mut sqlx::PgConnection, what: &'static str, b: Bad) -> StoreError {
    match b {
        Bad::Sql(e) => q(what)(e),
        Bad::Copy(e) => StoreError::Sql {
            what,
            message: e.to_string(),
        },
        Bad::Cell {
            table,
            column,
            row,
            value,
            expected,
        } => {
            let value = match (value, row) {
                (Some(v), _) => v,
                (None, Some(id)) => {
                    // Both names are the job's own constants.
                    let sql = format!("SELECT {column}::text FROM {table} WHERE id = $1");
                    match sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await
                    {
                        Ok(Some(Some(v))) => format!("{v:?}"),
                        Ok(Some(None)) => "NULL".into(),
                        _ => "(a value that could not be read)".into(),
                    }
                }
                (None, None) => "(a value that could not be read)".into(),
            };
            StoreError::BadValue {
                table,
                column,
                row,
                value,
                expected,
            }
        }
    }
}

/// A row of `referred*.sql`, from either reader.
struct RawReferred<'a> {
    id: Option<i64>,
    referrer: Option<i64>,
    created_at: Option<i64>,
    is_active: Option<bool>,
    is_verified: Option<bool>,
    has_sub: Option<bool>,
    tier: Option<&'a [u8]>,
    status: Option<&'a [u8]>,
    started_at: Option<i64>,
    expires_at: Option<i64>,
    sub_id: Option<i64>,
}

fn referred_user(raw: RawReferred<'_>, interner: &mut Interner) -> Result<ReferredUser, Bad> {
    let id = raw.id.ok_or_else(|| null("users", "id", None, "an id"))?;
    let user = |column, expected| null("users", column, Some(id), expected);
    let created_at = pg_time(raw.created_at, "users", "created_at", id)?
        .ok_or_else(|| user("created_at", "a time"))?;
    let subscription = if raw.has_sub == Some(true) {
        let sid = raw
            .sub_id
            .ok_or_else(|| null("subscriptions", "id", None, "an id"))?;
        let text = |v, column| pg_text(v, "subscriptions", column, sid);
        Some(Subscription {
            tier: interner.intern(text(raw.tier, "tier")?.unwrap_or_default()),
            status: interner.intern(text(raw.status, "status")?.unwrap_or_default()),
            started_at: pg_time(raw.started_at, "subscriptions", "started_at", sid)?,
            expires_at: pg_time(raw.expires_at, "subscriptions", "expires_at", sid)?,
        })
    } else {
        None
    };
    Ok(ReferredUser {
        id,
        referrer_id: raw
            .referrer
            .ok_or_else(|| user("referred_by_user_id", "an id"))?,
        created_at,
        is_active: raw
            .is_active
            .ok_or_else(|| user("is_active", "a boolean"))?,
        is_verified: raw
            .is_verified
            .ok_or_else(|| user("is_verified", "a boolean"))?,
        subscription,
    })
}

/// The referred users from binary COPY of `referred*.sql` (same columns as [`referred_from_row`]).
fn referred_from_copy(bytes: &[u8]) -> Result<Vec<ReferredUser>, Bad> {
    let mut t = pgcopy::Tuples::new(bytes, 11)?;
    let mut interner = Interner::default();
    let mut out = Vec::new();
    while t.next_tuple()? {
        let raw = RawReferred {
            id: t.i64()?,
            referrer: t.i64()?,
            created_at: t.i64()?,
            is_active: t.bool()?,
            is_verified: t.bool()?,
            has_sub: t.bool()?,
            tier: t.field()?,
            status: t.field()?,
            started_at: t.i64()?,
            expires_at: t.i64()?,
            sub_id: t.i64()?,
        };
        out.push(referred_user(raw, &mut interner)?);
    }
    Ok(out)
}

/// A text cell's bytes as the server sent them (NULL: `None`).
fn raw_bytes(r: &PgRow, i: usize) -> Result<Option<&[u8]>, sqlx::Error> {
    use sqlx::ValueRef;
    let v = r.try_get_raw(i)?;
    if v.is_null() {
        return Ok(None);
    }
    v.as_bytes().map(Some).map_err(sqlx::Error::Decode)
}

pub(super) fn referred_from_row(r: &PgRow, interner: &mut Interner) -> Result<ReferredUser, Bad> {
    // Times arrive as epoch microseconds (see referred.sql).
    let raw = RawReferred {
        id: r.try_get(0)?,
        referrer: r.try_get(1)?,
        created_at: r.try_get(2)?,
        is_active: r.try_get(3)?,
        is_verified: r.try_get(4)?,
        has_sub: r.try_get(5)?,
        tier: raw_bytes(r, 6)?,
        status: raw_bytes(r, 7)?,
        started_at: r.try_get(8)?,
        expires_at: r.try_get(9)?,
        sub_id: r.try_get(10)?,
    };
    referred_user(raw, interner)
}

pub(super) fn pair(user: Option<i64>, ip: Option<&[u8]>) -> Result<(i64, String), Bad> {
    // Both queries join the user and keep non-NULL hashes.
    let user = user.ok_or_else(|| null("telemetry_events", "user_id", None, "a user id"))?;
    let ip = ip.ok_or_else(|| null("telemetry_events", "ip_hash", None, "an IP hash"))?;
    // PostgreSQL checks text against the client encoding (UTF8) before sending it, even from a
    // SQL_ASCII database, so this does not fail; should it, the IP queries read no event ids.
    match std::str::from_utf8(ip) {
        Ok(ip) => Ok((user, ip.to_owned())),
        Err(_) => Err(Bad::Cell {
            table: "telemetry_events",
            column: "ip_hash",
            row: None,
            value: Some(format!("x'{}' of user {user}", hex(ip))),
            expected: "UTF-8 text",
        }),
    }
}

/// `(user_id, ip_hash)` pairs from binary COPY.
fn pairs_from_copy(bytes: &[u8]) -> Result<Vec<(i64, String)>, Bad> {
    let mut t = pgcopy::Tuples::new(bytes, 2)?;
    let mut out = Vec::new();
    while t.next_tuple()? {
        let user = t.i64()?;
        out.push(pair(user, t.field()?)?);
    }
    Ok(out)
}

/// `(user_id, ip_hash)` pairs from SELECT rows.
pub(super) fn pairs_from_rows(rows: &[PgRow]) -> Result<Vec<(i64, String)>, Bad> {
    rows.iter()
        .map(|r| pair(r.try_get(0)?, raw_bytes(r, 1)?))
        .collect()
}

/// `(user_id, referral_bonus_domains)` of a `host_bonus*.sql` row (its third column is the
/// subscription's own id, for errors).
pub(super) fn host_bonus_from_row(r: &PgRow) -> Result<(i64, i64), Bad> {
    let id: Option<i64> = r.try_get(2)?;
    let id = id.ok_or_else(|| null("subscriptions", "id", None, "an id"))?;
    let user: Option<i64> = r.try_get(0)?;
    let bonus: Option<i64> = r.try_get(1)?;
    Ok((
        user.ok_or_else(|| null("subscriptions", "user_id", Some(id), "a user id"))?,
        bonus.ok_or_else(|| {
            null(
                "subscriptions",
                "referral_bonus_domains",
                Some(id),
                "an integer",
            )
        })?,
    ))
}

impl PgStore {
    /// One repeatable-read snapshot. A snapshot that fails closes its connection instead of
    /// returning it to the pool: a COPY statement refused outright leaves it out of step (see
    /// [`PgStore::copy_out`]).
    pub async fn snapshot(
        self: &std::sync::Arc<Self>,
        scope: Scope,
        window: (Instant, Instant),
        grants: Option<GrantsRead>,
        uncounted: bool,
    ) -> Result<Snapshot, StoreError> {
        use std::sync::atomic::Ordering;
        // The slots program's one-referrer snapshot: one round trip (one.rs), else below.
        if let (Scope::Referrer(id), None) = (scope, &grants) {
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(q("starting the snapshot"))?;
            let sw = std::time::Instant::now();
            match self.read_one_pipelined(&mut conn, id, window).await {
                Ok(Some(mut snap)) => {
                    snap.timings.push(crate::snapshot::QueryTiming {
                        query: "one_referrer",
                        rows: snap.referred.len(),
                        elapsed: sw.elapsed(),
                    });
                    return Ok(snap);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "reading the referrer's snapshot again, query by query");
                    conn.close_on_drop();
                }
            }
        }
        let copy_before = self.copy.load(Ordering::Relaxed);
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(q("starting the snapshot"))?;
        match self
            .read_snapshot(&mut conn, scope, window, grants.as_ref(), uncounted)
            .await
        {
            Ok(snap) => Ok(snap),
            Err(e) => {
                conn.close_on_drop();
                drop(conn);
                if copy_before && !self.copy.load(Ordering::Relaxed) {
                    // COPY was refused at its statement after its probe passed (see
                    // `copy_out`): read again, with SELECTs, on a fresh connection.
                    tracing::warn!(error = %e, "reading the snapshot again with SELECT");
                    let mut conn = self
                        .pool
                        .acquire()
                        .await
                        .map_err(q("starting the snapshot"))?;
                    let r = self
                        .read_snapshot(&mut conn, scope, window, grants.as_ref(), uncounted)
                        .await;
                    if r.is_err() {
                        conn.close_on_drop();
                    }
                    return r;
                }
                Err(e)
            }
        }
    }

    async fn read_snapshot(
        self: &std::sync::Arc<Self>,
        conn: &mut sqlx::PgConnection,
        scope: Scope,
        window: (Instant, Instant),
        grants: Option<&GrantsRead>,
        uncounted: bool,
    ) -> Result<Snapshot, StoreError> {
        const UNCOUNTED: &str = "reading the referrals of users without invite code";
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(q("starting the snapshot"))?;
        utc(&mut tx, &self.timeouts).await?;
        use std::sync::atomic::Ordering;
        // A full or shard run reads its large queries as scans on two more connections (scan.rs),
        // and the grant programs' payments and ledger on two others, all on this transaction's
        // snapshot, while this one reads the rest.
        let mut side = vec![];
        let mut scans = None;
        let copy = self.copy.load(Ordering::Relaxed);
        if (copy || grants.is_some())
            && !matches!(scope, Scope::Referrer(_))
            && self.side_ok.load(Ordering::Relaxed)
            && let Ok(permit) = self.side_reads.clone().try_acquire_owned()
        {
            let exported: Result<String, _> = sqlx::query_scalar("SELECT pg_export_snapshot()")
                .fetch_one(&mut *tx)
                .await;
            match exported {
                Ok(id) => {
                    let permit = std::sync::Arc::new(permit);
                    if copy {
                        scans = Some(self.spawn_scans(&id, permit.clone(), window, scope));
                    }
                    if let Some(gr) = grants {
                        // With the scans, the referrers come from the users' scan. The payments
                        // and the ledger on a connection each: read one after the other, they
                        // were the snapshot's longest chain.
                        let payments = SidePart::Payments { referrers: !copy };
                        for part in [payments, SidePart::Ledger] {
                            side.push(self.spawn_side_read(
                                id.clone(),
                                permit.clone(),
                                window.1,
                                gr.clone(),
                                part,
                            ));
                        }
                    }
                }
                Err(e) => {
                    // The transaction is aborted: start it again, before anything is read.
                    self.refuse_side_reads(&e);
                    tx.rollback().await.map_err(q("starting the snapshot"))?;
                    tx = conn
                        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                        .await
                        .map_err(q("starting the snapshot"))?;
                    utc(&mut tx, &self.timeouts).await?;
                }
            }
        }
        let mut snap = Snapshot::default();
        let mut sw = Stopwatch::start();
        let (from, to) = (dt(window.0), dt(window.1));

        snap.referrers = match scope {
            Scope::Referrer(id) => {
                let r: Option<bool> = sqlx::query_scalar(include_str!(
                    "../../../sql/queries/postgres/referrer_one.sql"
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("reading the referrer"))?;
                if r == Some(false) {
                    let ids: Vec<i64> = sqlx::query_scalar(include_str!(
                        "../../../sql/queries/postgres/uncounted_one.sql"
                    ))
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q(UNCOUNTED))?;
                    snap.uncounted = ids.into_iter().map(|u| (id, u)).collect();
                }
                if r == Some(true) { vec![id] } else { vec![] }
            }
            Scope::Full | Scope::Shard(_) => {
                // Through COPY where it can (the scans wait for this list), else SELECT.
                let all: Vec<i64> = self
                    .rows(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/referrers.sql"),
                        &[],
                        |q| q,
                        1,
                        "reading referrers",
                        |c| {
                            Ok(Some(
                                c.i64()?.ok_or_else(|| null("users", "id", None, "an id"))?,
                            ))
                        },
                    )
                    .await?;
                if uncounted {
                    let pairs: Vec<(i64, i64)> =
                        sqlx::query_as(include_str!("../../../sql/queries/postgres/uncounted.sql"))
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(q(UNCOUNTED))?;
                    snap.uncounted = pairs
                        .into_iter()
                        .filter(|(referrer, _)| scope.covers(*referrer))
                        .collect();
                }
                // Sorted here: the server sorted a million ids on disk (past work_mem) at 10M users.
                let mut ids: Vec<i64> = all.into_iter().filter(|id| scope.covers(*id)).collect();
                ids.sort_unstable();
                ids
            }
        };
        sw.lap(&mut snap.timings, "referrers", snap.referrers.len());

        // The current state: a shard reads all of it and keeps its own users'.
        snap.stored_rewards = match scope {
            Scope::Referrer(id) => sqlx::query(include_str!(
                "../../../sql/queries/postgres/stored_rewards_one.sql"
            ))
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading referral_rewards"))?
            .iter()
            .map(reward_from_row)
            .collect::<Result<_, _>>()
            .map_err(q("decoding referral_rewards"))?,
            _ => self.stored_rewards(&mut tx, scope).await?,
        };
        sw.lap(
            &mut snap.timings,
            "stored_rewards",
            snap.stored_rewards.len(),
        );

        // The scans, read meanwhile on their own connections; without them (COPY refused, no
        // second connection), the joined queries on this one.
        let others = match scans {
            Some(scans) => {
                sw.lap(&mut snap.timings, "before the scans", 0);
                let others = self.join_scans(&mut tx, scans, &mut snap).await?;
                sw = Stopwatch::start();
                others
            }
            None => None,
        };
        let joined = others.is_some();
        if !joined && !snap.referrers.is_empty() {
            const REFERRED: &str = "reading referred users";
            let ids = &snap.referrers;
            let copied = match scope {
                Scope::Full => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/referred.sql"),
                        &[],
                        REFERRED,
                    )
                    .await?
                }
                Scope::Shard(_) => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/referred_shard.sql"),
                        &[array(ids)],
                        REFERRED,
                    )
                    .await?
                }
                Scope::Referrer(_) => None,
            };
            let referred = if let Some(bytes) = copied {
                snap.via_copy = true;
                referred_from_copy(&bytes)
            } else {
                let rows: Vec<PgRow> = match scope {
                    Scope::Full => {
                        sqlx::query(include_str!("../../../sql/queries/postgres/referred.sql"))
                            .fetch_all(&mut *tx)
                            .await
                    }
                    Scope::Referrer(id) => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/referred_one.sql"
                        ))
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Shard(_) => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/referred_shard.sql"
                        ))
                        .bind(ids)
                        .fetch_all(&mut *tx)
                        .await
                    }
                }
                .map_err(q(REFERRED))?;
                let mut interner = Interner::default();
                rows.iter()
                    .map(|r| referred_from_row(r, &mut interner))
                    .collect()
            };
            snap.referred = match referred {
                Ok(r) => r,
                Err(b) => return Err(bad(&mut tx, REFERRED, b).await),
            };
            sw.lap(&mut snap.timings, "referred_users", snap.referred.len());

            const REGISTRATIONS: &str = "reading registration events";
            let ids = &snap.referrers;
            let copied = match scope {
                Scope::Full => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/registrations.sql"),
                        &[],
                        REGISTRATIONS,
                    )
                    .await?
                }
                Scope::Shard(_) => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/registrations_shard.sql"),
                        &[array(ids)],
                        REGISTRATIONS,
                    )
                    .await?
                }
                Scope::Referrer(_) => None,
            };
            let pairs = if let Some(bytes) = copied {
                pairs_from_copy(&bytes)
            } else {
                match scope {
                    Scope::Full => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/registrations.sql"
                        ))
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Referrer(id) => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/registrations_one.sql"
                        ))
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Shard(_) => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/registrations_shard.sql"
                        ))
                        .bind(ids)
                        .fetch_all(&mut *tx)
                        .await
                    }
                }
                .map_err(q(REGISTRATIONS))
                .map(|rows| pairs_from_rows(&rows))?
            };
            snap.registrations = match pairs {
                Ok(p) => p,
                Err(b) => return Err(bad(&mut tx, REGISTRATIONS, b).await),
            };
            sw.lap(&mut snap.timings, "registrations", snap.registrations.len());

            const EVENTS: &str = "reading referrer events";
            let copied = match scope {
                Scope::Full => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/referrer_events.sql"),
                        &[ts(window.0), ts(window.1)],
                        EVENTS,
                    )
                    .await?
                }
                Scope::Shard(_) => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../../sql/queries/postgres/referrer_events_shard.sql"),
                        &[ts(window.0), ts(window.1), array(ids)],
                        EVENTS,
                    )
                    .await?
                }
                Scope::Referrer(_) => None,
            };
            let pairs = if let Some(bytes) = copied {
                pairs_from_copy(&bytes)
            } else {
                match scope {
                    Scope::Full => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/referrer_events.sql"
                        ))
                        .bind(from)
                        .bind(to)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Referrer(id) => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/referrer_events_one.sql"
                        ))
                        .bind(from)
                        .bind(to)
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Shard(_) => {
                        sqlx::query(include_str!(
                            "../../../sql/queries/postgres/referrer_events_shard.sql"
                        ))
                        .bind(from)
                        .bind(to)
                        .bind(ids)
                        .fetch_all(&mut *tx)
                        .await
                    }
                }
                .map_err(q(EVENTS))
                .map(|rows| pairs_from_rows(&rows))?
            };
            snap.referrer_events = match pairs {
                Ok(p) => p,
                Err(b) => return Err(bad(&mut tx, EVENTS, b).await),
            };
            sw.lap(
                &mut snap.timings,
                "referrer_events",
                snap.referrer_events.len(),
            );
        }

        if !joined {
            const SUBSCRIPTIONS: &str = "reading subscriptions";
            let rows: Vec<PgRow> = match scope {
                Scope::Referrer(id) => {
                    sqlx::query(include_str!(
                        "../../../sql/queries/postgres/host_bonus_one.sql"
                    ))
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await
                }
                _ => {
                    sqlx::query(include_str!("../../../sql/queries/postgres/host_bonus.sql"))
                        .fetch_all(&mut *tx)
                        .await
                }
            }
            .map_err(q(SUBSCRIPTIONS))?;
            let host: Result<Vec<(i64, i64)>, Bad> = rows.iter().map(host_bonus_from_row).collect();
            let host = match host {
                Ok(h) => h,
                Err(b) => return Err(bad(&mut tx, SUBSCRIPTIONS, b).await),
            };
            snap.host_bonus = host.into_iter().filter(|(u, _)| scope.covers(*u)).collect();
            sw.lap(&mut snap.timings, "host_bonus", snap.host_bonus.len());
        }

        if let Some(gr) = grants {
            let mut timings = vec![];
            let (grants, side_read) = self
                .read_grants(
                    &mut tx,
                    scope,
                    window,
                    gr,
                    &snap,
                    others,
                    &mut timings,
                    side,
                )
                .await?;
            snap.grants = Some(grants);
            snap.side_read = side_read;
            snap.timings.extend(timings);
        }

        let repeated = crate::store::users_with_duplicate_subscriptions(&snap);
        if !repeated.is_empty() {
            let rows: Vec<(i64, i64)> = sqlx::query_as(include_str!(
                "../../../sql/queries/postgres/duplicate_subscriptions.sql"
            ))
            .bind(&repeated)
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading duplicate subscriptions"))?;
            return Err(crate::store::duplicate_subscriptions(&repeated, &rows));
        }

        tx.commit().await.map_err(q("ending the snapshot"))?;
        Ok(snap)
    }

    /// Every stored reward (a shard keeps its own), decoded row by row as they arrive: a whole
    /// answer held at once cost more than the rewards (a million rows at 10M users). Through
    /// binary COPY where it can: through sqlx's rows the 944k rewards of 10M users took 2.9-3.3 s
    /// beside the scans (which share the cores), through COPY 1.4-1.9 s.
    async fn stored_rewards(
        &self,
        tx: &mut sqlx::PgConnection,
        scope: Scope,
    ) -> Result<Vec<RewardResult>, StoreError> {
        use futures_util::TryStreamExt;
        const WHAT: &str = "reading referral_rewards";
        const SQL: &str = include_str!("../../../sql/queries/postgres/stored_rewards.sql");
        let mut kept = vec![];
        let copied = self
            .scan(tx, WHAT, SQL, 10, |t| {
                let r = reward_from_copy(t).map_err(|b| super::scan::Fail(WHAT, b))?;
                if scope.covers(r.referrer_user_id) {
                    kept.push(r);
                }
                Ok(())
            })
            .await;
        match copied {
            Ok(Some(_)) => return Ok(kept),
            // Refused, maybe after some rows: read again with SELECT.
            Ok(None) => kept.clear(),
            Err(SideError::Decode(what, b)) => return Err(bad(tx, what, b).await),
            Err(SideError::Read(e) | SideError::Import(e)) => return Err(e),
        }
        let mut rows = sqlx::query(SQL).fetch(&mut *tx);
        while let Some(row) = rows.try_next().await.map_err(q(WHAT))? {
            let r = reward_from_row(&row).map_err(q("decoding referral_rewards"))?;
            if scope.covers(r.referrer_user_id) {
                kept.push(r);
            }
        }
        Ok(kept)
    }

    /// `COPY (<query>) TO STDOUT (FORMAT binary)` with `params` ($1, $2, … as SQL literals) in
    /// the snapshot's transaction, or `None` when COPY is off or refused: the caller then runs
    /// the same query as a SELECT. A savepoint keeps a refusal from aborting the snapshot.
    ///
    /// A refusal is an error with one of [`COPY_REFUSALS`]' SQLSTATEs: it switches COPY off for
    /// the life of the process (logged once). Any other error fails the snapshot, and so the
    /// run, and leaves COPY on for later runs: it says nothing about COPY.
    ///
    /// The statement is probed first, as `COPY (SELECT * FROM (<query>) LIMIT 0) …` through the
    /// simple query protocol, whose answer sqlx reads to its end whatever it is: sqlx 0.9's
    /// `copy_out_raw` does not read the ReadyForQuery that follows an error answering the COPY
    /// statement itself, so the next statement on the connection (the savepoint's rollback)
    /// would fail with "expected ParseComplete, got ReadyForQuery". The probe meets the same
    /// refusals (parsing, permissions, planning), so the COPY that follows it is refused only in
    /// the middle of its data, where `copy_out_raw` reads the error to its end. Should the COPY
    /// statement be refused anyway, the snapshot fails, its connection is closed, and
    /// [`PgStore::snapshot`] reads it again with SELECTs.
    pub(super) async fn copy_out(
        &self,
        tx: &mut sqlx::PgConnection,
        sql: &str,
        params: &[String],
        what: &'static str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut buf = Vec::new();
        let read = self
            .copy_out_each(tx, sql, params, what, |chunk| {
                buf.extend_from_slice(chunk);
                Ok::<(), std::convert::Infallible>(())
            })
            .await?;
        Ok(read.map(|_| buf))
    }

    /// [`PgStore::copy_out`], each chunk of the answer handed to `each` as it arrives instead
    /// of gathered. `Some(Err(e))`: `each` refused a chunk; the COPY was left in the middle of
    /// its data, so the connection must not be used again.
    pub(super) async fn copy_out_each<E>(
        &self,
        tx: &mut sqlx::PgConnection,
        sql: &str,
        params: &[String],
        what: &'static str,
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<Option<Result<(), E>>, StoreError> {
        use futures_util::TryStreamExt;
        use std::sync::atomic::Ordering;
        if !self.copy.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut query = sql.to_owned();
        // Highest first, so that $1 does not match the start of $10.
        for (i, p) in params.iter().enumerate().rev() {
            query = query.replace(&format!("${}", i + 1), p);
        }
        sqlx::query("SAVEPOINT copy_read")
            .execute(&mut *tx)
            .await
            .map_err(q("reading with COPY"))?;

        if let Some(e) = probe_copy(tx, &query).await? {
            return self.copy_failed(tx, what, e).await.map(|()| None);
        }

        let statement = format!("COPY (\n{query}\n) TO STDOUT (FORMAT binary)");
        let mut stream = match tx.copy_out_raw(&statement).await {
            Ok(s) => s,
            Err(e) => {
                // Refused at the statement although the probe passed: this connection has an
                // unread ReadyForQuery now, and must not run anything more.
                if is_copy_refusal(&e) {
                    self.refuse_copy(&e);
                }
                return Err(copy_error(
                    what,
                    &e,
                    "COPY was refused at its statement after its probe passed; the connection is closed",
                ));
            }
        };
        let read: Result<Result<(), E>, sqlx::Error> = async {
            while let Some(chunk) = stream.try_next().await? {
                if let Err(b) = each(&chunk) {
                    return Ok(Err(b));
                }
            }
            Ok(Ok(()))
        }
        .await;
        drop(stream);
        match read {
            Ok(Ok(())) => {
                sqlx::query("RELEASE SAVEPOINT copy_read")
                    .execute(&mut *tx)
                    .await
                    .map_err(q("reading with COPY"))?;
                Ok(Some(Ok(())))
            }
            Ok(Err(b)) => Ok(Some(Err(b))),
            Err(e) => self.copy_failed(tx, what, e).await.map(|()| None),
        }
    }

    /// After a COPY error with the connection in step: a refusal rolls back to the savepoint
    /// and answers `Ok` (the caller reads with SELECT); anything else fails the snapshot.
    async fn copy_failed(
        &self,
        tx: &mut sqlx::PgConnection,
        what: &'static str,
        e: sqlx::Error,
    ) -> Result<(), StoreError> {
        if !is_copy_refusal(&e) {
            return Err(copy_error(
                what,
                &e,
                "not a refusal of COPY, so COPY stays on for later runs",
            ));
        }
        self.refuse_copy(&e);
        sqlx::query("ROLLBACK TO SAVEPOINT copy_read")
            .execute(&mut *tx)
            .await
            .map_err(q("reading with COPY"))?;
        Ok(())
    }

    /// Switches COPY off for the life of the process, saying so once.
    fn refuse_copy(&self, e: &sqlx::Error) {
        if self.copy.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, "binary COPY refused; reading with SELECT from now on");
        }
    }

    /// The server refused to export or import a snapshot: every snapshot reads on one
    /// connection from now on (logged once).
    pub(super) fn refuse_side_reads(&self, e: &dyn std::fmt::Display) {
        if self
            .side_ok
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "snapshot export refused; reading each snapshot on one connection from now on");
        }
    }
}

/// A row of stored_rewards.sql from binary COPY (the job's own table: every count NOT NULL).
fn reward_from_copy(t: &mut pgcopy::Tuples<'_>) -> Result<RewardResult, Bad> {
    const TABLE: &str = "referral_rewards";
    let referrer_user_id = t
        .i64()?
        .ok_or_else(|| null(TABLE, "referrer_user_id", None, "an id"))?;
    let mut count = |column| {
        t.i64()?
            .ok_or_else(|| null(TABLE, column, Some(referrer_user_id), "an integer"))
    };
    Ok(RewardResult {
        referrer_user_id,
        referred_users_total: count("referred_users_total")?,
        qualified_referrals: count("qualified_referrals")?,
        disqualified_self_referral: count("disqualified_self_referral")?,
        disqualified_cooldown: count("disqualified_cooldown")?,
        disqualified_missing_ip: count("disqualified_missing_ip")?,
        disqualified_shared_ip: count("disqualified_shared_ip")?,
        disqualified_duplicate_ip: count("disqualified_duplicate_ip")?,
        bonus_slots: count("bonus_slots")?,
        badge: pg_text(t.field()?, TABLE, "badge", referrer_user_id)?.map(str::to_owned),
    })
}

pub(super) fn reward_from_row(r: &PgRow) -> Result<RewardResult, sqlx::Error> {
    Ok(RewardResult {
        referrer_user_id: r.try_get(0)?,
        referred_users_total: r.try_get(1)?,
        qualified_referrals: r.try_get(2)?,
        disqualified_self_referral: r.try_get(3)?,
        disqualified_cooldown: r.try_get(4)?,
        disqualified_missing_ip: r.try_get(5)?,
        disqualified_shared_ip: r.try_get(6)?,
        disqualified_duplicate_ip: r.try_get(7)?,
        bonus_slots: r.try_get(8)?,
        badge: r.try_get(9)?,
    })
}
