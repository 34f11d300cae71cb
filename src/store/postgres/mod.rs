//! PostgreSQL: production. The session runs in UTC so that `TIMESTAMP` and `TIMESTAMPTZ` host
//! columns read and compare as the same instants; the snapshot is one repeatable-read
//! transaction; writes are set-based (`UNNEST` arrays), one statement per kind of write.

mod demo;
mod grants;
mod one;
mod read;
mod runs;
mod scan;
mod write;

use std::collections::HashSet;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use super::{
    ApplyOutcome, ChunkFeed, ConnectOptions, EncodedChunk, Held, RUN_STATUS, RunLock, RunRow,
    StoreError, Writes, hex, host_int,
};
use super::{migrations, pgcopy};
use crate::demo::{DemoChunk, DemoCounts, DemoSpec};
use crate::instant::{self, Instant};
use crate::program::slots::plan::HostChange;
use crate::program::slots::rewards::RewardResult;
use crate::snapshot::{
    GrantsRead, Interner, ReferredUser, Scope, Shard, Snapshot, Stopwatch, Subscription,
};

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
    /// One snapshot at a time reads on a second connection: a snapshot holding one connection
    /// and waiting for another cannot then starve others doing the same.
    side_reads: std::sync::Arc<tokio::sync::Semaphore>,
    /// Cleared for good the first time the server refuses to export or import a snapshot;
    /// every snapshot then reads on one connection.
    side_ok: std::sync::atomic::AtomicBool,
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    StoreError::sql(what)
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

/// How long a pooled connection may sit idle before it is pinged as it is handed out.
const POOL_PING_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

fn dt(t: Instant) -> DateTime<Utc> {
    instant::to_datetime(t)
}

impl PgStore {
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self, StoreError> {
        let connect_err = |e: sqlx::Error| StoreError::Connect {
            url: redact(url),
            message: crate::store::one_line(&e.to_string()),
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
            .max_connections(6)
            .acquire_timeout(std::time::Duration::from_secs(30))
            // sqlx pings every connection it hands out: a round trip per acquire, a fifth of
            // a one-referrer run (0.2 of 1 ms on the 2-core development machine). A connection
            // used within the last second is taken as alive; one idle longer is pinged (the
            // server or a proxy may have closed it meanwhile), and replaced if it does not answer.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= POOL_PING_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options.clone());
        Ok(Self {
            pool,
            options,
            copy: std::sync::atomic::AtomicBool::new(opts.pg_binary_copy),
            lock_conns: tokio::sync::Mutex::new(Vec::new()),
            side_reads: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            side_ok: std::sync::atomic::AtomicBool::new(true),
            timeouts: timeouts_sql(opts),
        })
    }

    pub async fn migrate(&self, with_reference_schema: bool) -> Result<(), StoreError> {
        if with_reference_schema {
            self.reference_schema(true).await?;
        }
        self.adopt_legacy_migrations().await?;
        migrations::migrator(&MIGRATOR)
            .run(&self.pool)
            .await
            .map_err(migrations::migrate_error)
    }

    /// Moves the job's rows of `_sqlx_migrations` (versions of the job before this one kept
    /// them there) into its own table, under sqlx's migration lock so that neither migrator
    /// runs meanwhile. Returns how many rows moved.
    async fn adopt_legacy_migrations(&self) -> Result<u64, StoreError> {
        use sqlx::migrate::Migrate;
        let mut conn = self.pool.acquire().await.map_err(q("running migrations"))?;
        let legacy: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .map_err(q("reading _sqlx_migrations"))?;
        if !legacy {
            return Ok(0);
        }
        conn.lock().await.map_err(migrations::migrate_error)?;
        let moved = async {
            let mut tx = conn.begin().await.map_err(q("running migrations"))?;
            tx.ensure_migrations_table(migrations::TABLE)
                .await
                .map_err(migrations::migrate_error)?;
            let mut moved = 0;
            for m in MIGRATOR.iter() {
                sqlx::query(migrations::ADOPT_INSERT)
                    .bind(m.version)
                    .bind(m.checksum.as_ref())
                    .execute(&mut *tx)
                    .await
                    .map_err(q("moving the job's rows out of _sqlx_migrations"))?;
                moved += sqlx::query(migrations::ADOPT_DELETE)
                    .bind(m.version)
                    .bind(m.checksum.as_ref())
                    .execute(&mut *tx)
                    .await
                    .map_err(q("moving the job's rows out of _sqlx_migrations"))?
                    .rows_affected();
            }
            tx.commit().await.map_err(q("running migrations"))?;
            Ok::<u64, StoreError>(moved)
        }
        .await;
        let _ = conn.unlock().await;
        let moved = moved?;
        if moved > 0 {
            tracing::info!(
                moved,
                "moved the job's migration rows from _sqlx_migrations to referral_rewards_migrations"
            );
        }
        Ok(moved)
    }

    /// Each of the job's migrations with its state; reads only.
    pub async fn migration_info(&self) -> Result<Vec<migrations::MigrationStatus>, StoreError> {
        let read = |table: &'static str| async move {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(table)
                .fetch_one(&self.pool)
                .await
                .map_err(q("reading the migration history"))?;
            if !exists {
                return Ok::<_, StoreError>(vec![]);
            }
            // The job's own constant table names.
            let sql = format!(
                "SELECT version, success, (EXTRACT(EPOCH FROM installed_on) * 1000000)::bigint, \
                 checksum FROM {table} ORDER BY version"
            );
            let rows: Vec<(i64, bool, Option<i64>, Vec<u8>)> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("reading the migration history"))?;
            Ok(rows)
        };
        let ours = read(migrations::TABLE).await?;
        let legacy = read(migrations::LEGACY_TABLE).await?;
        Ok(migrations::statuses(&MIGRATOR, &ours, &legacy))
    }

    /// The host tables of SPEC section 2, and their indexes when asked (a bulk load creates
    /// them afterwards).
    async fn reference_schema(&self, indexes: bool) -> Result<(), StoreError> {
        sqlx::raw_sql(include_str!("../../../sql/reference/postgres.sql"))
            .execute(&self.pool)
            .await
            .map_err(q("creating the reference schema"))?;
        if indexes {
            sqlx::raw_sql(include_str!("../../../sql/reference/postgres_indexes.sql"))
                .execute(&self.pool)
                .await
                .map_err(q("creating the reference indexes"))?;
        }
        Ok(())
    }

    pub async fn user_exists(&self, id: i64) -> Result<bool, StoreError> {
        let row: Option<bool> = sqlx::query_scalar(include_str!(
            "../../../sql/queries/postgres/referrer_one.sql"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading users"))?;
        Ok(row.is_some())
    }

    /// `None`: no such user; `Some(None)`: a user nobody referred.
    pub async fn referred_by(&self, id: i64) -> Result<Option<Option<i64>>, StoreError> {
        sqlx::query_scalar(include_str!(
            "../../../sql/queries/postgres/referred_by.sql"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading users"))
    }

    /// The newest time `user` used each IP hash inside the window (`explain`'s facts).
    pub async fn ip_last_used(
        &self,
        user: i64,
        window: (Instant, Instant),
    ) -> Result<std::collections::HashMap<String, Instant>, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("reading referrer events"))?;
        utc(&mut tx, &self.timeouts).await?;
        let rows: Vec<(String, chrono::DateTime<Utc>)> = sqlx::query_as(include_str!(
            "../../../sql/queries/postgres/ip_last_used.sql"
        ))
        .bind(dt(window.0))
        .bind(dt(window.1))
        .bind(user)
        .fetch_all(&mut *tx)
        .await
        .map_err(q("reading referrer events"))?;
        tx.commit().await.map_err(q("reading referrer events"))?;
        Ok(rows
            .into_iter()
            .map(|(ip, at)| (ip, instant::from_datetime(at)))
            .collect())
    }
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
