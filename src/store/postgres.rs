//! PostgreSQL: production. The session runs in UTC so that `TIMESTAMP` and `TIMESTAMPTZ` host
//! columns read and compare as the same instants; the snapshot is one repeatable-read
//! transaction; writes are set-based (`UNNEST` arrays), one statement per kind of write.

use std::collections::HashSet;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use super::pgcopy;
use super::{
    ApplyOutcome, ChunkFeed, ConnectOptions, EncodedChunk, Held, RUN_STATUS, RunFinish, RunLock,
    RunRow, StoreError, hex, host_int,
};
use crate::config::NewSubscriptionConfig;
use crate::demo::{DemoChunk, DemoSpec};
use crate::instant::{self, Instant};
use crate::plan::{HostChange, Plan};
use crate::rewards::RewardResult;
use crate::snapshot::{Interner, ReferredUser, Scope, Shard, Snapshot, Stopwatch, Subscription};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("sql/migrations/postgres");

/// The advisory lock key of applying runs ("referral-rewards" as 8 bytes, big-endian).
pub const LOCK_KEY: i64 = 0x7265_6665_7272_616c;
/// Shard count N's advisory key is `COUNT_KEY_BASE + N` (clear of the shards' own keys, which
/// stay below `LOCK_KEY + 2^37`).
const COUNT_KEY_BASE: i64 = LOCK_KEY + (1 << 40);

pub struct PgStore {
    pub(super) pool: PgPool,
    options: PgConnectOptions,
    /// Read the large snapshot queries through binary COPY; cleared for good the first time
    /// the server refuses it (an error with one of [`COPY_REFUSALS`]' SQLSTATEs), and only then.
    copy: std::sync::atomic::AtomicBool,
    /// Idle connections for the run lock, kept so that a one-referrer run does not pay a new
    /// connection each time.
    lock_conns: tokio::sync::Mutex<Vec<sqlx::PgConnection>>,
    /// `SET LOCAL` statements bounding lock waits and statements in the run's transactions.
    timeouts: String,
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    StoreError::sql(what)
}

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
            super::one_line(&e.to_string())
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
const TIME_OUT_OF_RANGE: i64 = i64::MIN;

/// Why a snapshot row could not be decoded, before the error names it in full (some values
/// are looked up afterwards, in the same transaction).
enum Bad {
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

fn null(
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

fn pg_time(
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

fn pg_text<'a>(
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
async fn bad(tx: &mut sqlx::PgConnection, what: &'static str, b: Bad) -> StoreError {
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

fn referred_from_row(r: &PgRow, interner: &mut Interner) -> Result<ReferredUser, Bad> {
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

fn pair(user: Option<i64>, ip: Option<&[u8]>) -> Result<(i64, String), Bad> {
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
fn pairs_from_rows(rows: &[PgRow]) -> Result<Vec<(i64, String)>, Bad> {
    rows.iter()
        .map(|r| pair(r.try_get(0)?, raw_bytes(r, 1)?))
        .collect()
}

/// `(user_id, referral_bonus_domains)` of a `host_bonus*.sql` row (its third column is the
/// subscription's own id, for errors).
fn host_bonus_from_row(r: &PgRow) -> Result<(i64, i64), Bad> {
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

/// Pins the transaction to UTC, so that `TIMESTAMP` columns (UTC by SPEC) and `TIMESTAMPTZ`
/// columns compare and convert as the same instants. sqlx asks for UTC at connect, but a URL's
/// `options` or a connection pooler can change it; `SET LOCAL` holds for this transaction.
/// Also bounds lock waits and statements (`database.lock_timeout_secs`,
/// `database.statement_timeout_secs`): a host transaction holding a row the run needs fails
/// the run with a clear message instead of blocking it, and every later tick, forever.
async fn utc(tx: &mut sqlx::PgConnection, timeouts: &str) -> Result<(), StoreError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL TIME ZONE 'UTC'; {timeouts}"
    )))
    .execute(tx)
    .await
    .map(|_| ())
    .map_err(q("setting the time zone and timeouts"))
}

/// `SET LOCAL` of both timeouts, in milliseconds (0: no limit, PostgreSQL's own default).
fn timeouts_sql(opts: &ConnectOptions) -> String {
    format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {};",
        opts.lock_timeout.as_millis(),
        opts.statement_timeout.as_millis()
    )
}

fn dt(t: Instant) -> DateTime<Utc> {
    instant::to_datetime(t)
}

impl PgStore {
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self, StoreError> {
        let connect_err = |e: sqlx::Error| StoreError::Connect {
            url: redact(url),
            message: super::one_line(&e.to_string()),
        };
        let options = PgConnectOptions::from_str(url)
            .map_err(connect_err)?
            .application_name("referral-rewards");
        // `opts.read_only` needs no session option here: dry runs only ever SELECT (the snapshot
        // is a READ ONLY transaction), so a role with nothing but SELECT rights works.
        // One direct attempt first: the pool would retry a refused connection until its
        // acquire timeout, and an unreachable server should fail at once.
        sqlx::PgConnection::connect_with(&options)
            .await
            .map_err(connect_err)?
            .close()
            .await
            .map_err(connect_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect_lazy_with(options.clone());
        Ok(Self {
            pool,
            options,
            copy: std::sync::atomic::AtomicBool::new(opts.pg_binary_copy),
            lock_conns: tokio::sync::Mutex::new(Vec::new()),
            timeouts: timeouts_sql(opts),
        })
    }

    pub async fn migrate(&self, with_reference_schema: bool) -> Result<(), StoreError> {
        if with_reference_schema {
            self.reference_schema(true).await?;
        }
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Sql {
            what: "running migrations",
            message: super::one_line(&e.to_string()),
        })
    }

    /// The host tables of SPEC section 2, and their indexes when asked (a bulk load creates
    /// them afterwards).
    async fn reference_schema(&self, indexes: bool) -> Result<(), StoreError> {
        sqlx::raw_sql(include_str!("../../sql/reference/postgres.sql"))
            .execute(&self.pool)
            .await
            .map_err(q("creating the reference schema"))?;
        if indexes {
            sqlx::raw_sql(include_str!("../../sql/reference/postgres_indexes.sql"))
                .execute(&self.pool)
                .await
                .map_err(q("creating the reference indexes"))?;
        }
        Ok(())
    }

    pub async fn user_exists(&self, id: i64) -> Result<bool, StoreError> {
        let row: Option<bool> =
            sqlx::query_scalar(include_str!("../../sql/queries/postgres/referrer_one.sql"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q("reading users"))?;
        Ok(row.is_some())
    }

    /// One repeatable-read snapshot. A snapshot that fails closes its connection instead of
    /// returning it to the pool: a COPY statement refused outright leaves it out of step (see
    /// [`PgStore::copy_out`]).
    pub async fn snapshot(
        &self,
        scope: Scope,
        window: (Instant, Instant),
    ) -> Result<Snapshot, StoreError> {
        use std::sync::atomic::Ordering;
        let copy_before = self.copy.load(Ordering::Relaxed);
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(q("starting the snapshot"))?;
        match self.read_snapshot(&mut conn, scope, window).await {
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
                    let r = self.read_snapshot(&mut conn, scope, window).await;
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
        &self,
        conn: &mut sqlx::PgConnection,
        scope: Scope,
        window: (Instant, Instant),
    ) -> Result<Snapshot, StoreError> {
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(q("starting the snapshot"))?;
        utc(&mut tx, &self.timeouts).await?;
        let mut snap = Snapshot::default();
        let mut sw = Stopwatch::start();
        let (from, to) = (dt(window.0), dt(window.1));

        snap.referrers = match scope {
            Scope::Referrer(id) => {
                let r: Option<bool> =
                    sqlx::query_scalar(include_str!("../../sql/queries/postgres/referrer_one.sql"))
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(q("reading the referrer"))?;
                if r == Some(true) { vec![id] } else { vec![] }
            }
            Scope::Full | Scope::Shard(_) => {
                let all: Vec<i64> =
                    sqlx::query_scalar(include_str!("../../sql/queries/postgres/referrers.sql"))
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(q("reading referrers"))?;
                all.into_iter().filter(|id| scope.covers(*id)).collect()
            }
        };
        sw.lap(&mut snap.timings, "referrers", snap.referrers.len());

        if !snap.referrers.is_empty() {
            const REFERRED: &str = "reading referred users";
            let ids = &snap.referrers;
            let copied = match scope {
                Scope::Full => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../sql/queries/postgres/referred.sql"),
                        &[],
                        REFERRED,
                    )
                    .await?
                }
                Scope::Shard(_) => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../sql/queries/postgres/referred_shard.sql"),
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
                        sqlx::query(include_str!("../../sql/queries/postgres/referred.sql"))
                            .fetch_all(&mut *tx)
                            .await
                    }
                    Scope::Referrer(id) => {
                        sqlx::query(include_str!("../../sql/queries/postgres/referred_one.sql"))
                            .bind(id)
                            .fetch_all(&mut *tx)
                            .await
                    }
                    Scope::Shard(_) => {
                        sqlx::query(include_str!(
                            "../../sql/queries/postgres/referred_shard.sql"
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
                        include_str!("../../sql/queries/postgres/registrations.sql"),
                        &[],
                        REGISTRATIONS,
                    )
                    .await?
                }
                Scope::Shard(_) => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../sql/queries/postgres/registrations_shard.sql"),
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
                        sqlx::query(include_str!("../../sql/queries/postgres/registrations.sql"))
                            .fetch_all(&mut *tx)
                            .await
                    }
                    Scope::Referrer(id) => {
                        sqlx::query(include_str!(
                            "../../sql/queries/postgres/registrations_one.sql"
                        ))
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Shard(_) => {
                        sqlx::query(include_str!(
                            "../../sql/queries/postgres/registrations_shard.sql"
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
                        include_str!("../../sql/queries/postgres/referrer_events.sql"),
                        &[ts(window.0), ts(window.1)],
                        EVENTS,
                    )
                    .await?
                }
                Scope::Shard(_) => {
                    self.copy_out(
                        &mut tx,
                        include_str!("../../sql/queries/postgres/referrer_events_shard.sql"),
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
                            "../../sql/queries/postgres/referrer_events.sql"
                        ))
                        .bind(from)
                        .bind(to)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Referrer(id) => {
                        sqlx::query(include_str!(
                            "../../sql/queries/postgres/referrer_events_one.sql"
                        ))
                        .bind(from)
                        .bind(to)
                        .bind(id)
                        .fetch_all(&mut *tx)
                        .await
                    }
                    Scope::Shard(_) => {
                        sqlx::query(include_str!(
                            "../../sql/queries/postgres/referrer_events_shard.sql"
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

        // The current state: a shard reads all of it and keeps its own users'.
        snap.stored_rewards = match scope {
            Scope::Referrer(id) => {
                sqlx::query(include_str!(
                    "../../sql/queries/postgres/stored_rewards_one.sql"
                ))
                .bind(id)
                .fetch_all(&mut *tx)
                .await
            }
            _ => {
                sqlx::query(include_str!(
                    "../../sql/queries/postgres/stored_rewards.sql"
                ))
                .fetch_all(&mut *tx)
                .await
            }
        }
        .map_err(q("reading referral_rewards"))?
        .iter()
        .map(reward_from_row)
        .filter(|r| {
            r.as_ref()
                .map_or(true, |r| scope.covers(r.referrer_user_id))
        })
        .collect::<Result<_, _>>()
        .map_err(q("decoding referral_rewards"))?;
        sw.lap(
            &mut snap.timings,
            "stored_rewards",
            snap.stored_rewards.len(),
        );

        const SUBSCRIPTIONS: &str = "reading subscriptions";
        let rows: Vec<PgRow> = match scope {
            Scope::Referrer(id) => {
                sqlx::query(include_str!(
                    "../../sql/queries/postgres/host_bonus_one.sql"
                ))
                .bind(id)
                .fetch_all(&mut *tx)
                .await
            }
            _ => {
                sqlx::query(include_str!("../../sql/queries/postgres/host_bonus.sql"))
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

        let repeated = super::users_with_duplicate_subscriptions(&snap);
        if !repeated.is_empty() {
            let rows: Vec<(i64, i64)> = sqlx::query_as(include_str!(
                "../../sql/queries/postgres/duplicate_subscriptions.sql"
            ))
            .bind(&repeated)
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading duplicate subscriptions"))?;
            return Err(super::duplicate_subscriptions(&repeated, &rows));
        }

        tx.commit().await.map_err(q("ending the snapshot"))?;
        Ok(snap)
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
    async fn copy_out(
        &self,
        tx: &mut sqlx::PgConnection,
        sql: &str,
        params: &[String],
        what: &'static str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
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
            return self.copy_failed(tx, what, e).await;
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
        let mut buf = Vec::new();
        let read: Result<(), sqlx::Error> = async {
            while let Some(chunk) = stream.try_next().await? {
                buf.extend_from_slice(&chunk);
            }
            Ok(())
        }
        .await;
        drop(stream);
        match read {
            Ok(()) => {
                sqlx::query("RELEASE SAVEPOINT copy_read")
                    .execute(&mut *tx)
                    .await
                    .map_err(q("reading with COPY"))?;
                Ok(Some(buf))
            }
            Err(e) => self.copy_failed(tx, what, e).await,
        }
    }

    /// After a COPY error with the connection in step: a refusal rolls back to the savepoint
    /// and answers `None` (read with SELECT); anything else fails the snapshot.
    async fn copy_failed(
        &self,
        tx: &mut sqlx::PgConnection,
        what: &'static str,
        e: sqlx::Error,
    ) -> Result<Option<Vec<u8>>, StoreError> {
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
        Ok(None)
    }

    /// Switches COPY off for the life of the process, saying so once.
    fn refuse_copy(&self, e: &sqlx::Error) {
        if self.copy.swap(false, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, "binary COPY refused; reading with SELECT from now on");
        }
    }

    /// Session advisory locks on a dedicated connection: exclusive on [`LOCK_KEY`] for a full
    /// or one-referrer run; shared on it plus exclusive on the shard's own key for a shard.
    pub async fn try_lock(&self, shard: Option<Shard>) -> Result<Option<RunLock>, StoreError> {
        // A kept connection if there is one (a stale one fails the query: then a fresh one).
        let kept = self.lock_conns.lock().await.pop();
        match kept {
            Some(conn) => match self.lock_on(conn, shard).await {
                Ok(r) => Ok(r),
                Err(_) => self.lock_on(self.lock_connection().await?, shard).await,
            },
            None => self.lock_on(self.lock_connection().await?, shard).await,
        }
    }

    /// The lock's connection sits idle while the run reads and computes: a server-side
    /// `idle_session_timeout` (PostgreSQL 14+) would close it and free the lock mid-run. It is
    /// switched off for this one session; if the connection is lost anyway, the fence in
    /// [`PgStore::apply`] keeps the run from writing.
    async fn lock_connection(&self) -> Result<sqlx::PgConnection, StoreError> {
        let mut conn = sqlx::PgConnection::connect_with(&self.options)
            .await
            .map_err(q("connecting for the run lock"))?;
        sqlx::query(
            "SELECT set_config('idle_session_timeout', '0', false) \
             WHERE current_setting('server_version_num')::int >= 140000",
        )
        .execute(&mut conn)
        .await
        .map_err(q("connecting for the run lock"))?;
        Ok(conn)
    }

    async fn lock_on(
        &self,
        mut conn: sqlx::PgConnection,
        shard: Option<Shard>,
    ) -> Result<Option<RunLock>, StoreError> {
        let got: bool = match shard {
            None => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
            }
            Some(s) => {
                // Shared on the run key, exclusive on the shard's; and one shard count at a
                // time (`K/2` beside `K/3` would cover users twice): shared on the count's key,
                // then no other count's key may be held. Each process takes its own key before
                // looking, so two counts never both go ahead.
                async {
                    let (run, own, count): (bool, bool, bool) =
                        sqlx::query_as(include_str!("../../sql/queries/postgres/shard_lock.sql"))
                            .bind(LOCK_KEY)
                            .bind(LOCK_KEY.wrapping_add(((s.count as i64) << 20) | s.index as i64))
                            .bind(COUNT_KEY_BASE)
                            .bind(s.count as i64)
                            .fetch_one(&mut conn)
                            .await?;
                    if !(run && own && count) {
                        return Ok(false);
                    }
                    let other: bool = sqlx::query_scalar(include_str!(
                        "../../sql/queries/postgres/other_shard_count.sql"
                    ))
                    .bind(COUNT_KEY_BASE)
                    .bind(s.count as i64)
                    .fetch_one(&mut conn)
                    .await?;
                    Ok(!other)
                }
                .await
            }
        }
        .map_err(q("taking the run lock"))?;
        if !got {
            // Let go of whatever half was taken, and keep the connection.
            self.keep(conn).await;
            return Ok(None);
        }
        Ok(Some(RunLock {
            shard,
            _held: Held::Postgres {
                conn: Some(Box::new(conn)),
            },
        }))
    }

    /// Releases the run lock and keeps its connection for the next run (unless a failed write
    /// left it unusable and it is gone already).
    pub async fn release(&self, lock: RunLock) {
        if let Held::Postgres { conn: Some(conn) } = lock._held {
            self.keep(*conn).await;
        }
    }

    /// Waits for the lock's connection to end what a dropped apply left on it (a queued
    /// rollback goes out; an in-flight commit completes or not). If it does not answer, it is
    /// closed at once: its session ends and whatever it held (the run row's lock among them) is
    /// released, so that recording the failure cannot wait on it.
    pub async fn settle(&self, lock: &mut RunLock) {
        if let Held::Postgres { conn } = &mut lock._held
            && let Some(c) = conn
        {
            let ping = tokio::time::timeout(std::time::Duration::from_secs(10), c.ping());
            if !matches!(ping.await, Ok(Ok(()))) {
                tracing::warn!(
                    "the run lock's connection did not answer after a failed run; closing it"
                );
                *conn = None;
            }
        }
    }

    async fn keep(&self, mut conn: sqlx::PgConnection) {
        let unlocked = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut conn)
            .await
            .is_ok();
        let mut kept = self.lock_conns.lock().await;
        if unlocked && kept.len() < 2 {
            kept.push(conn);
        }
        // Otherwise dropped: closing the connection releases its locks.
    }

    pub async fn abandon_orphans(
        &self,
        shard: Option<Shard>,
        now: Instant,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(include_str!("../../sql/queries/abandon_orphans.sql"))
            .bind(dt(now))
            .bind(shard.map(|s| s.to_string()))
            .execute(&self.pool)
            .await
            .map_err(q("marking abandoned runs"))?;
        Ok(r.rows_affected())
    }

    pub async fn start_run(
        &self,
        scope: Scope,
        as_of: Instant,
        now: Instant,
    ) -> Result<i64, StoreError> {
        sqlx::query_scalar(include_str!("../../sql/queries/start_run.sql"))
            .bind(scope.mode())
            .bind(scope.referrer())
            .bind(scope.shard().map(|s| s.to_string()))
            .bind(dt(as_of))
            .bind(dt(now))
            .fetch_one(&self.pool)
            .await
            .map_err(q("recording the run"))
    }

    /// In a transaction bounded by the run's timeouts: the row may be locked by the failed
    /// run's own transaction, still ending on a connection that is gone.
    pub async fn fail_run(
        &self,
        run_id: i64,
        error: &str,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("recording the failed run"))?;
        utc(&mut tx, &self.timeouts).await?;
        let r = sqlx::query(include_str!("../../sql/queries/fail_run.sql"))
            .bind(dt(now))
            .bind(error)
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(q("recording the failed run"))?;
        tx.commit().await.map_err(q("recording the failed run"))?;
        Ok(r.rows_affected() == 1)
    }

    /// The write runs on the run lock's own connection: the lock is a session lock of that
    /// connection, so the transaction can only commit while the lock is held. Had the server
    /// closed the connection (an idle reaper, a network drop, `pg_terminate_backend`), the lock
    /// would be free for another run, and this write fails instead of racing it.
    #[allow(clippy::too_many_arguments)] // one per part of the write; grouped by program later
    pub async fn apply(
        &self,
        lock: &mut RunLock,
        plan: &Plan,
        run_id: i64,
        as_of: Instant,
        new_sub: &NewSubscriptionConfig,
        finish: &RunFinish,
        progress: Option<&crate::engine::Progress>,
    ) -> Result<ApplyOutcome, StoreError> {
        let Held::Postgres { conn: Some(conn) } = &mut lock._held else {
            return Err(StoreError::Runtime(
                "the run lock's connection is gone; nothing was written".into(),
            ));
        };
        let mut out = ApplyOutcome::default();
        let mut tx = conn.begin().await.map_err(|e| StoreError::Sql {
            what: "starting the write transaction",
            message: format!(
                "the run lock's connection was lost, so another run may hold the lock now: {}",
                super::one_line(&e.to_string())
            ),
        })?;
        utc(&mut tx, &self.timeouts).await?;

        let upserts: Vec<&RewardResult> = plan.reward_upserts().collect();
        if !upserts.is_empty() {
            let col =
                |f: fn(&RewardResult) -> i64| upserts.iter().map(|r| f(r)).collect::<Vec<i64>>();
            let r = sqlx::query(include_str!(
                "../../sql/queries/postgres/upsert_rewards.sql"
            ))
            .bind(col(|r| r.referrer_user_id))
            .bind(col(|r| r.referred_users_total))
            .bind(col(|r| r.qualified_referrals))
            .bind(col(|r| r.disqualified_self_referral))
            .bind(col(|r| r.disqualified_cooldown))
            .bind(col(|r| r.disqualified_missing_ip))
            .bind(col(|r| r.disqualified_shared_ip))
            .bind(col(|r| r.disqualified_duplicate_ip))
            .bind(col(|r| r.bonus_slots))
            .bind(
                upserts
                    .iter()
                    .map(|r| r.badge.clone())
                    .collect::<Vec<Option<String>>>(),
            )
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(q("writing referral_rewards"))?;
            out.reward_rows_written = r.rows_affected();
        }
        crate::engine::inside_write(progress).await;

        let (mut up_ids, mut up_old, mut up_new) = (vec![], vec![], vec![]);
        let (mut in_ids, mut in_new) = (vec![], vec![]);
        for (user, change) in plan.host_changes() {
            match change {
                HostChange::Update { old, new } => {
                    up_ids.push(user);
                    up_old.push(old);
                    up_new.push(host_int(new));
                }
                HostChange::Insert { new } => {
                    in_ids.push(user);
                    in_new.push(host_int(new));
                }
            }
        }
        let mut applied: HashSet<i64> = HashSet::new();
        if !up_ids.is_empty() {
            let ids: Vec<i64> =
                sqlx::query_scalar(include_str!("../../sql/queries/postgres/update_host.sql"))
                    .bind(up_ids)
                    .bind(up_old)
                    .bind(up_new)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q("writing subscriptions.referral_bonus_domains"))?;
            applied.extend(ids);
        }
        if !in_ids.is_empty() {
            let ids: Vec<i64> =
                sqlx::query_scalar(include_str!("../../sql/queries/postgres/insert_host.sql"))
                    .bind(in_ids)
                    .bind(in_new)
                    .bind(&new_sub.tier)
                    .bind(&new_sub.status)
                    .bind(new_sub.max_domains as i32)
                    .bind(dt(as_of))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q("creating subscriptions"))?;
            applied.extend(ids);
        }
        out.host_values_written = applied.len() as u64;
        out.conflicts = plan
            .host_changes()
            .map(|(u, _)| u)
            .filter(|u| !applied.contains(u))
            .collect();

        let ledger = plan.ledger(|u| applied.contains(&u));
        out.ledger_rows_written = ledger.len() as u64;
        if !ledger.is_empty() {
            sqlx::query(include_str!(
                "../../sql/queries/postgres/insert_changes.sql"
            ))
            .bind(run_id)
            .bind(
                ledger
                    .iter()
                    .map(|c| c.referrer_user_id)
                    .collect::<Vec<_>>(),
            )
            .bind(
                ledger
                    .iter()
                    .map(|c| c.field.to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(
                ledger
                    .iter()
                    .map(|c| c.old_value.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                ledger
                    .iter()
                    .map(|c| c.new_value.clone())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await
            .map_err(q("writing reward_changes"))?;
        }

        let s = &finish.stats;
        let finished = sqlx::query(include_str!("../../sql/queries/postgres/finish_run.sql"))
            .bind(s.referrers as i64)
            .bind(s.rewards_up as i64)
            .bind(s.rewards_down as i64)
            .bind(s.bonus_delta)
            .bind(out.reward_rows_written as i64)
            .bind(out.host_values_written as i64)
            .bind(out.conflicts.len() as i64)
            .bind(&finish.outcome_counts)
            .bind(&finish.digest)
            .bind(run_id)
            .bind(dt(instant::from_datetime(Utc::now())))
            .bind(&finish.error)
            .execute(&mut *tx)
            .await
            .map_err(q("recording the run"))?;
        if finished.rows_affected() != 1 {
            let status: Option<String> = sqlx::query_scalar(RUN_STATUS)
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("reading the run"))?;
            return Err(StoreError::NotRunning {
                run_id,
                status: status.unwrap_or_else(|| "missing".into()),
            });
        }

        tx.commit().await.map_err(q("committing the run"))?;
        Ok(out)
    }

    pub async fn runs(&self, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, mode, referrer_user_id, as_of, started_at, finished_at, status, \
             referrers_processed, rewards_up, rewards_down, bonus_delta, reward_rows_written, \
             host_values_written, conflicts, outcome_counts, digest, error FROM reward_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading reward_runs"))?;
        rows.iter()
            .map(|r| -> Result<RunRow, sqlx::Error> {
                let t = |i: usize| -> Result<Option<Instant>, sqlx::Error> {
                    Ok(r.try_get::<Option<DateTime<Utc>>, _>(i)?
                        .map(instant::from_datetime))
                };
                Ok(RunRow {
                    id: r.try_get(0)?,
                    mode: r.try_get(1)?,
                    referrer_user_id: r.try_get(2)?,
                    as_of: t(3)?.unwrap_or_default(),
                    started_at: t(4)?.unwrap_or_default(),
                    finished_at: t(5)?,
                    status: r.try_get(6)?,
                    referrers_processed: r.try_get(7)?,
                    rewards_up: r.try_get(8)?,
                    rewards_down: r.try_get(9)?,
                    bonus_delta: r.try_get(10)?,
                    reward_rows_written: r.try_get(11)?,
                    host_values_written: r.try_get(12)?,
                    conflicts: r.try_get(13)?,
                    outcome_counts: r.try_get(14)?,
                    digest: r.try_get(15)?,
                    error: r.try_get(16)?,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(q("decoding reward_runs"))
    }

    /// Loads with `COPY … FROM STDIN` (text format) in one transaction.
    pub async fn load_demo(&self, spec: &DemoSpec) -> Result<(u64, u64, u64), StoreError> {
        self.reference_schema(false).await?;
        let existing: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM users LIMIT 1) AS t")
                .fetch_one(&self.pool)
                .await
                .map_err(q("reading users"))?;
        if existing > 0 {
            return Err(StoreError::Invalid(
                "demo-data needs empty host tables; the users table already has rows".into(),
            ));
        }
        let mut conn = self.pool.acquire().await.map_err(q("connecting"))?;
        let mut tx = conn.begin().await.map_err(q("loading demo data"))?;
        // Referrers may have larger ids than the users they refer: check keys at commit.
        sqlx::query("SET CONSTRAINTS ALL DEFERRED")
            .execute(&mut *tx)
            .await
            .map_err(q("loading demo data"))?;
        let (mut nu, mut ns, mut ne) = (0, 0, 0);
        let mut feed = ChunkFeed::new(*spec, encode_copy);
        while let Some([users, subs, events]) = feed.next().await? {
            nu += copy_in(&mut tx, "COPY users (id, email, created_at, is_active, is_verified, invite_code, referred_by_user_id) FROM STDIN", users).await?;
            ns += copy_in(&mut tx, "COPY subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at) FROM STDIN", subs).await?;
            ne += copy_in(
                &mut tx,
                "COPY telemetry_events (id, user_id, event_name, ip_hash, created_at) FROM STDIN",
                events,
            )
            .await?;
        }
        tx.commit().await.map_err(q("committing demo data"))?;
        self.reference_schema(true).await?;
        sqlx::query("ANALYZE users, subscriptions, telemetry_events")
            .execute(&mut *conn)
            .await
            .map_err(q("analyzing demo data"))?;
        Ok((nu, ns, ne))
    }
}

/// A demo chunk in COPY's text format.
fn encode_copy(c: DemoChunk) -> EncodedChunk {
    let mut users = String::with_capacity(c.users.len() * 80);
    for u in &c.users {
        copy_row(
            &mut users,
            &[
                Some(&u.id.to_string()),
                Some(&u.email),
                Some(&instant::to_sql_text(u.created_at)),
                Some(if u.is_active { "t" } else { "f" }),
                Some(if u.is_verified { "t" } else { "f" }),
                u.invite_code.as_deref(),
                u.referred_by_user_id.map(|r| r.to_string()).as_deref(),
            ],
        );
    }
    let mut subs = String::with_capacity(c.subscriptions.len() * 80);
    for s in &c.subscriptions {
        copy_row(
            &mut subs,
            &[
                Some(&s.user_id.to_string()),
                Some(s.tier),
                Some(s.status),
                Some(&s.max_domains.to_string()),
                Some(&s.referral_bonus_domains.to_string()),
                s.started_at.map(instant::to_sql_text).as_deref(),
                s.expires_at.map(instant::to_sql_text).as_deref(),
            ],
        );
    }
    let mut events = String::with_capacity(c.events.len() * 70);
    for e in &c.events {
        copy_row(
            &mut events,
            &[
                Some(&e.id.to_string()),
                e.user_id.map(|u| u.to_string()).as_deref(),
                Some(e.event_name),
                e.ip_hash.as_deref(),
                Some(&instant::to_sql_text(e.created_at)),
            ],
        );
    }
    [users, subs, events]
}

async fn copy_in(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    data: String,
) -> Result<u64, StoreError> {
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .map_err(q("loading demo data"))?;
    copy.send(data.into_bytes())
        .await
        .map_err(q("loading demo data"))?;
    copy.finish().await.map_err(q("loading demo data"))
}

/// One row of COPY's text format: tab-separated, `\N` for NULL, backslash escapes.
fn copy_row(buf: &mut String, fields: &[Option<&str>]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            buf.push('\t');
        }
        match f {
            None => buf.push_str("\\N"),
            Some(s)
                if !s
                    .bytes()
                    .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
            {
                buf.push_str(s)
            }
            Some(s) => {
                for ch in s.chars() {
                    match ch {
                        '\\' => buf.push_str("\\\\"),
                        '\t' => buf.push_str("\\t"),
                        '\n' => buf.push_str("\\n"),
                        '\r' => buf.push_str("\\r"),
                        c => buf.push(c),
                    }
                }
            }
        }
    }
    buf.push('\n');
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

fn reward_from_row(r: &PgRow) -> Result<RewardResult, sqlx::Error> {
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
