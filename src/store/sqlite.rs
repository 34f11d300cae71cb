//! SQLite: the embedded default. Times are ISO-8601 text, parsed into instants in Rust;
//! set-based writes go through `json_each`, one statement per kind of write.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection, Row};

use super::migrations;
use super::{
    ApplyOutcome, ChunkFeed, ConnectOptions, EncodedChunk, GrantsApplied, Held, RUN_COLUMNS,
    RunLock, RunRow, StoreError, Trigger, Writes, host_int,
};
use crate::demo::{DemoChunk, DemoCounts, DemoSpec};
use crate::instant::{self, Instant};
use crate::program::slots::plan::HostChange;
use crate::snapshot::{GrantsRead, Scope, Shard, Snapshot};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("sql/migrations/sqlite");

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// `None` for an in-memory database (no lock file is possible; one process only).
    pub(super) path: Option<PathBuf>,
    busy_timeout: std::time::Duration,
    /// `PRAGMA mmap_size` of the snapshot's connection.
    mmap_bytes: i64,
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    StoreError::sql(what)
}

/// Whether a `<database>.lock.shards-M` file of another count M is locked by some process:
/// trying it exclusively succeeds only when nobody holds it (then it is let go at once).
fn other_shard_count_in_use(database: &std::path::Path, count: u32) -> Result<bool, StoreError> {
    let dir = database.parent().unwrap_or(std::path::Path::new("."));
    let prefix = format!(
        "{}.lock.shards-",
        database.file_name().unwrap_or_default().to_string_lossy()
    );
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Runtime(format!("cannot list {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(m) = name.strip_prefix(&prefix) else {
            continue;
        };
        if m == count.to_string() {
            continue;
        }
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        match file.try_lock() {
            Ok(()) => drop(file),
            Err(std::fs::TryLockError::WouldBlock) => return Ok(true),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Runtime(format!(
                    "cannot lock {}: {e}",
                    entry.path().display()
                )));
            }
        }
    }
    Ok(false)
}

fn opt_time(
    table: &'static str,
    column: &'static str,
    row: i64,
    value: Option<&str>,
) -> Result<Option<Instant>, StoreError> {
    value
        .map(|v| super::sqlite_time(table, column, row, v))
        .transpose()
}

impl SqliteStore {
    /// Opens the database without changing it: no journal mode is set (the host's choice
    /// persists in the file and is not ours to change), dry runs open it `mode=ro`, and only
    /// `migrate` and `demo-data` may create a missing file.
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self, StoreError> {
        let connect_err = |e: sqlx::Error| StoreError::Connect {
            url: url.to_owned(),
            message: super::one_line(&e.to_string()),
        };
        let mut options = SqliteConnectOptions::from_str(url)
            .map_err(connect_err)?
            .busy_timeout(opts.busy_timeout);
        options = if opts.read_only {
            options.read_only(true)
        } else {
            options.create_if_missing(opts.create)
        };
        let path = options.get_filename().to_path_buf();
        let in_memory = url.contains(":memory:") || path.as_os_str().is_empty();
        if !opts.create && !in_memory && !path.exists() {
            return Err(StoreError::Connect {
                url: url.to_owned(),
                message: "no database file there (`referral-rewards migrate` creates one)".into(),
            });
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        Ok(Self {
            pool,
            path: (!in_memory).then_some(path),
            busy_timeout: opts.busy_timeout,
            mmap_bytes: opts.sqlite_mmap_bytes,
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
    /// them there) into its own table, in one write transaction. Returns how many rows moved.
    async fn adopt_legacy_migrations(&self) -> Result<u64, StoreError> {
        use sqlx::migrate::Migrate;
        if !self.has_table(migrations::LEGACY_TABLE).await? {
            return Ok(0);
        }
        let mut conn = self.pool.acquire().await.map_err(q("running migrations"))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q("running migrations"))?;
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
        if moved > 0 {
            tracing::info!(
                moved,
                "moved the job's migration rows from _sqlx_migrations to referral_rewards_migrations"
            );
        }
        Ok(moved)
    }

    async fn has_table(&self, name: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await
        .map_err(q("reading the schema"))?;
        Ok(n > 0)
    }

    /// Each of the job's migrations with its state; reads only.
    pub async fn migration_info(&self) -> Result<Vec<migrations::MigrationStatus>, StoreError> {
        let mut read = vec![];
        for table in [migrations::TABLE, migrations::LEGACY_TABLE] {
            if !self.has_table(table).await? {
                read.push(vec![]);
                continue;
            }
            // The job's own constant table names.
            let sql = format!(
                "SELECT version, success, installed_on, checksum FROM {table} ORDER BY version"
            );
            let rows: Vec<(i64, bool, Option<String>, Vec<u8>)> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(q("reading the migration history"))?;
            read.push(
                rows.into_iter()
                    .map(|(v, ok, at, sum)| (v, ok, migrations::sqlite_installed_on(at), sum))
                    .collect(),
            );
        }
        Ok(migrations::statuses(&MIGRATOR, &read[0], &read[1]))
    }

    /// The host tables of SPEC section 2, and their indexes when asked (a bulk load creates
    /// them afterwards).
    async fn reference_schema(&self, indexes: bool) -> Result<(), StoreError> {
        sqlx::raw_sql(include_str!("../../sql/reference/sqlite.sql"))
            .execute(&self.pool)
            .await
            .map_err(q("creating the reference schema"))?;
        if indexes {
            sqlx::raw_sql(include_str!("../../sql/reference/sqlite_indexes.sql"))
                .execute(&self.pool)
                .await
                .map_err(q("creating the reference indexes"))?;
        }
        Ok(())
    }

    pub async fn user_exists(&self, id: i64) -> Result<bool, StoreError> {
        let row: Option<(bool,)> =
            sqlx::query_as(include_str!("../../sql/queries/sqlite/referrer_one.sql"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q("reading users"))?;
        Ok(row.is_some())
    }

    /// `None`: no such user; `Some(None)`: a user nobody referred.
    pub async fn referred_by(&self, id: i64) -> Result<Option<Option<i64>>, StoreError> {
        sqlx::query_scalar(include_str!("../../sql/queries/sqlite/referred_by.sql"))
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
        let Some(path) = self.path.clone() else {
            return Ok(Default::default());
        };
        let busy = self.busy_timeout;
        tokio::task::spawn_blocking(move || {
            super::sqlite_read::ip_last_used(&path, busy, user, window)
        })
        .await
        .map_err(|e| StoreError::Runtime(format!("reading referrer events: {e}")))?
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || super::sqlite_read::ping(&path))
            .await
            .map_err(|e| StoreError::Runtime(format!("reaching the database: {e}")))?
    }

    /// One consistent read, through rusqlite on a blocking thread (see `sqlite_read`).
    pub async fn snapshot(
        &self,
        scope: Scope,
        window: (Instant, Instant),
        grants: Option<GrantsRead>,
        uncounted: bool,
    ) -> Result<Snapshot, StoreError> {
        let Some(path) = self.path.clone() else {
            return Err(StoreError::Invalid(
                "an in-memory SQLite database has nothing to reconcile; use a file".into(),
            ));
        };
        let open = super::sqlite_read::Open {
            busy_timeout: self.busy_timeout,
            // A one-referrer run reads a few pages: mapping the file would cost it more (about
            // 1.5 ms at 1M users) than the copies it saves.
            mmap_bytes: if matches!(scope, Scope::Referrer(_)) {
                0
            } else {
                self.mmap_bytes
            },
        };
        tokio::task::spawn_blocking(move || {
            super::sqlite_read::snapshot(&path, open, scope, window, grants, uncounted)
        })
        .await
        .map_err(|e| StoreError::Runtime(format!("reading the snapshot: {e}")))?
    }

    /// `flock` on `<database>.lock`: exclusive for a full or one-referrer run; shared plus an
    /// exclusive `<database>.lock.shard-K-of-N` for a shard, so that shards run side by side
    /// but never beside a full run or the same shard. The lock files sit beside the database's
    /// canonical path, so that a symlink or `./x.db` beside `x.db` finds the same lock.
    pub fn try_lock(&self, shard: Option<Shard>) -> Result<Option<RunLock>, StoreError> {
        let Some(path) = &self.path else {
            return Err(StoreError::Invalid(
                "an in-memory SQLite database cannot be reconciled with a lock; use a file".into(),
            ));
        };
        let path = &std::fs::canonicalize(path)
            .map_err(|e| StoreError::Runtime(format!("cannot resolve {}: {e}", path.display())))?;
        let open = |suffix: String| -> Result<(std::fs::File, PathBuf), StoreError> {
            let mut lock_path = path.clone().into_os_string();
            lock_path.push(suffix);
            let lock_path = PathBuf::from(lock_path);
            let file = std::fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| {
                    StoreError::Runtime(format!(
                        "cannot open lock file {}: {e}",
                        lock_path.display()
                    ))
                })?;
            Ok((file, lock_path))
        };
        let take =
            |r: Result<(), std::fs::TryLockError>, at: &PathBuf| -> Result<bool, StoreError> {
                match r {
                    Ok(()) => Ok(true),
                    Err(std::fs::TryLockError::WouldBlock) => Ok(false),
                    Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Runtime(format!(
                        "cannot lock {}: {e}",
                        at.display()
                    ))),
                }
            };
        let (global, global_path) = open(".lock".into())?;
        match shard {
            None => {
                if !take(global.try_lock(), &global_path)? {
                    return Ok(None);
                }
                Ok(Some(RunLock {
                    shard,
                    _held: Held::Files(vec![global]),
                }))
            }
            Some(s) => {
                if !take(global.try_lock_shared(), &global_path)? {
                    return Ok(None);
                }
                let (own, own_path) = open(format!(".lock.shard-{}-of-{}", s.index, s.count))?;
                if !take(own.try_lock(), &own_path)? {
                    return Ok(None);
                }
                // One shard count at a time: `K/2` beside `K/3` would cover users twice. Hold
                // this count's file shared, then look for any other count's file in use. Each
                // process takes its own before looking, so two counts never both go ahead.
                let (count, count_path) = open(format!(".lock.shards-{}", s.count))?;
                if !take(count.try_lock_shared(), &count_path)? {
                    return Ok(None);
                }
                if other_shard_count_in_use(path, s.count)? {
                    return Ok(None);
                }
                Ok(Some(RunLock {
                    shard,
                    _held: Held::Files(vec![global, own, count]),
                }))
            }
        }
    }

    pub async fn abandon_orphans(
        &self,
        shard: Option<Shard>,
        now: Instant,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(include_str!("../../sql/queries/abandon_orphans.sql"))
            .bind(instant::to_sql_text(now))
            .bind(shard.map(|s| s.to_string()))
            .bind(crate::store::ORPHAN_ERROR)
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
        trigger: Option<Trigger>,
    ) -> Result<i64, StoreError> {
        sqlx::query_scalar(include_str!("../../sql/queries/start_run.sql"))
            .bind(scope.mode())
            .bind(scope.referrer())
            .bind(scope.shard().map(|s| s.to_string()))
            .bind(instant::to_sql_text(as_of))
            .bind(instant::to_sql_text(now))
            .bind(trigger.map(Trigger::as_str))
            .fetch_one(&self.pool)
            .await
            .map_err(q("recording the run"))
    }

    pub async fn fail_run(
        &self,
        run_id: i64,
        error: &str,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(include_str!("../../sql/queries/fail_run.sql"))
            .bind(instant::to_sql_text(now))
            .bind(error)
            .bind(run_id)
            .execute(&self.pool)
            .await
            .map_err(q("recording the failed run"))?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn apply(&self, writes: &Writes<'_>) -> Result<ApplyOutcome, StoreError> {
        let Writes {
            plan,
            grants,
            run_id,
            as_of,
            new_subscription: new_sub,
            finish,
            progress,
        } = *writes;
        let mut out = ApplyOutcome::default();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q("starting the write transaction"))?;
        let now = instant::to_sql_text(instant::from_datetime(chrono::Utc::now()));

        let upserts: Vec<_> = plan
            .reward_upserts()
            .map(|r| {
                json!([
                    r.referrer_user_id,
                    r.referred_users_total,
                    r.qualified_referrals,
                    r.disqualified_self_referral,
                    r.disqualified_cooldown,
                    r.disqualified_missing_ip,
                    r.disqualified_shared_ip,
                    r.disqualified_duplicate_ip,
                    r.bonus_slots,
                    r.badge
                ])
            })
            .collect();
        if !upserts.is_empty() {
            let r = sqlx::query(include_str!("../../sql/queries/sqlite/upsert_rewards.sql"))
                .bind(serde_json::Value::Array(upserts).to_string())
                .bind(run_id)
                .bind(&now)
                .execute(&mut *tx)
                .await
                .map_err(q("writing referral_rewards"))?;
            out.reward_rows_written = r.rows_affected();
        }
        crate::engine::inside_write(progress).await;

        let mut updates = Vec::new();
        let mut inserts = Vec::new();
        for (user, change) in plan.host_changes() {
            match change {
                HostChange::Update { old, new } => updates.push(json!([user, old, host_int(new)])),
                HostChange::Insert { new } => inserts.push(json!([user, host_int(new)])),
            }
        }
        let mut applied: HashSet<i64> = HashSet::new();
        if !updates.is_empty() {
            let ids: Vec<i64> =
                sqlx::query_scalar(include_str!("../../sql/queries/sqlite/update_host.sql"))
                    .bind(serde_json::Value::Array(updates).to_string())
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q("writing subscriptions.referral_bonus_domains"))?;
            applied.extend(ids);
        }
        if !inserts.is_empty() {
            let ids: Vec<i64> =
                sqlx::query_scalar(include_str!("../../sql/queries/sqlite/insert_host.sql"))
                    .bind(serde_json::Value::Array(inserts).to_string())
                    .bind(&new_sub.tier)
                    .bind(&new_sub.status)
                    .bind(new_sub.max_domains)
                    .bind(instant::to_sql_text(as_of))
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

        let ledger: Vec<_> = plan
            .ledger(|u| applied.contains(&u))
            .into_iter()
            .map(|c| json!([c.referrer_user_id, c.field, c.old_value, c.new_value]))
            .collect();
        out.ledger_rows_written = ledger.len() as u64;
        if !ledger.is_empty() {
            sqlx::query(include_str!("../../sql/queries/sqlite/insert_changes.sql"))
                .bind(run_id)
                .bind(serde_json::Value::Array(ledger).to_string())
                .execute(&mut *tx)
                .await
                .map_err(q("writing reward_changes"))?;
        }

        out.grants = apply_grants(&mut tx, grants, run_id, as_of).await?;
        if let Some(programs) = crate::store::programs_json(finish, &out.grants) {
            sqlx::query("UPDATE reward_runs SET programs = $1 WHERE id = $2")
                .bind(programs)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(q("recording the run"))?;
        }

        let s = &finish.stats;
        let finished = sqlx::query(include_str!("../../sql/queries/sqlite/finish_run.sql"))
            .bind(instant::to_sql_text(instant::from_datetime(
                chrono::Utc::now(),
            )))
            .bind(s.referrers as i64)
            .bind(s.rewards_up as i64)
            .bind(s.rewards_down as i64)
            .bind(s.bonus_delta)
            .bind(out.reward_rows_written as i64)
            .bind(out.host_values_written as i64)
            .bind(out.conflicts.len() as i64)
            .bind(&finish.outcome_counts)
            .bind(&finish.digest)
            .bind(&finish.error)
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(q("recording the run"))?;
        if finished.rows_affected() != 1 {
            let status: Option<String> = sqlx::query_scalar(super::RUN_STATUS)
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

    /// The newest `limit` runs, or the one run `id`.
    pub async fn runs(&self, id: Option<i64>, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        self.runs_where("TRUE", id, limit).await
    }

    /// The newest `limit` runs whose row matches `filter` (one of the job's constant SQL
    /// conditions, [`crate::store::RunKind`]), or the one run `id`.
    pub async fn runs_where(
        &self,
        filter: &'static str,
        id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM reward_runs WHERE ({filter}) AND ($1 IS NULL OR id = $1) \
             ORDER BY id DESC LIMIT $2"
        )))
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading reward_runs"))?;
        rows.iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let t = |i: usize, col| -> Result<Option<Instant>, StoreError> {
                    opt_time(
                        "reward_runs",
                        col,
                        id,
                        r.get::<Option<String>, _>(i).as_deref(),
                    )
                };
                Ok(RunRow {
                    id,
                    mode: r.get(1),
                    referrer_user_id: r.get(2),
                    as_of: t(3, "as_of")?.unwrap_or_default(),
                    started_at: t(4, "started_at")?.unwrap_or_default(),
                    finished_at: t(5, "finished_at")?,
                    status: r.get(6),
                    referrers_processed: r.get(7),
                    rewards_up: r.get(8),
                    rewards_down: r.get(9),
                    bonus_delta: r.get(10),
                    reward_rows_written: r.get(11),
                    host_values_written: r.get(12),
                    conflicts: r.get(13),
                    outcome_counts: r.get(14),
                    digest: r.get(15),
                    error: r.get(16),
                    programs: r.get(17),
                    shard: r.get(18),
                    trigger: r.get(19),
                })
            })
            .collect()
    }

    pub async fn load_demo(&self, spec: &DemoSpec) -> Result<DemoCounts, StoreError> {
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
        // Referrers may have larger ids than the users they refer: check keys at the end.
        sqlx::query("PRAGMA foreign_keys = OFF")
            .execute(&mut *conn)
            .await
            .map_err(q("loading demo data"))?;
        let mut tx = conn.begin().await.map_err(q("loading demo data"))?;
        // No index maintained row by row (`migrate --with-reference-schema` creates them before
        // the load): dropped here, recreated as they were before the commit.
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
             AND tbl_name IN ('users', 'subscriptions', 'telemetry_events', 'payments')",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(q("reading the host tables' indexes"))?;
        for (name, _) in &indexes {
            let drop = format!("DROP INDEX \"{}\"", name.replace('"', "\"\""));
            sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&mut *tx)
                .await
                .map_err(q("loading demo data"))?;
        }
        let mut n = DemoCounts::default();
        let mut feed = ChunkFeed::new(*spec, encode_json);
        while let Some([users, subs, events, payments]) = feed.next().await? {
            n.users += sqlx::query(
                "INSERT INTO users (id, email, created_at, is_active, is_verified, invite_code, referred_by_user_id, credit_until, credit_cents) \
                 SELECT v->>0, v->>1, v->>2, v->>3, v->>4, v->>5, v->>6, v->>7, v->>8 FROM (SELECT value AS v FROM json_each($1))",
            )
            .bind(users)
            .execute(&mut *tx)
            .await
            .map_err(q("inserting demo users"))?
            .rows_affected();
            n.subscriptions += sqlx::query(
                "INSERT INTO subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at) \
                 SELECT v->>0, v->>1, v->>2, v->>3, v->>4, v->>5, v->>6 FROM (SELECT value AS v FROM json_each($1))",
            )
            .bind(subs)
            .execute(&mut *tx)
            .await
            .map_err(q("inserting demo subscriptions"))?
            .rows_affected();
            n.events += sqlx::query(
                "INSERT INTO telemetry_events (id, user_id, event_name, ip_hash, created_at) \
                 SELECT v->>0, v->>1, v->>2, v->>3, v->>4 FROM (SELECT value AS v FROM json_each($1))",
            )
            .bind(events)
            .execute(&mut *tx)
            .await
            .map_err(q("inserting demo events"))?
            .rows_affected();
            n.payments += sqlx::query(
                "INSERT INTO payments (id, user_id, amount_cents, currency, status, created_at) \
                 SELECT v->>0, v->>1, v->>2, v->>3, v->>4, v->>5 FROM (SELECT value AS v FROM json_each($1))",
            )
            .bind(payments)
            .execute(&mut *tx)
            .await
            .map_err(q("inserting demo payments"))?
            .rows_affected();
        }
        for (_, create) in indexes {
            sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                .execute(&mut *tx)
                .await
                .map_err(q("creating the host tables' indexes"))?;
        }
        tx.commit().await.map_err(q("committing demo data"))?;
        self.reference_schema(true).await?;
        sqlx::query("PRAGMA foreign_keys = ON")
            .execute(&mut *conn)
            .await
            .map_err(q("loading demo data"))?;
        sqlx::query("ANALYZE")
            .execute(&mut *conn)
            .await
            .map_err(q("analyzing demo data"))?;
        Ok(n)
    }
}

/// A demo chunk as JSON arrays of rows, for `json_each`. Tuples serialize as arrays, without
/// building a `Value` tree per row.
fn encode_json(c: DemoChunk) -> EncodedChunk {
    let users = serde_json::to_string(
        &c.users
            .iter()
            .map(|u| {
                (
                    u.id,
                    &u.email,
                    instant::to_sql_text(u.created_at),
                    u.is_active,
                    u.is_verified,
                    &u.invite_code,
                    u.referred_by_user_id,
                    u.credit_until.map(instant::to_sql_text),
                    u.credit_cents,
                )
            })
            .collect::<Vec<_>>(),
    )
    .expect("plain data serializes");
    let subs = serde_json::to_string(
        &c.subscriptions
            .iter()
            .map(|s| {
                (
                    s.user_id,
                    s.tier,
                    s.status,
                    s.max_domains,
                    s.referral_bonus_domains,
                    s.started_at.map(instant::to_sql_text),
                    s.expires_at.map(instant::to_sql_text),
                )
            })
            .collect::<Vec<_>>(),
    )
    .expect("plain data serializes");
    let events = serde_json::to_string(
        &c.events
            .iter()
            .map(|e| {
                (
                    e.id,
                    e.user_id,
                    e.event_name,
                    &e.ip_hash,
                    instant::to_sql_text(e.created_at),
                )
            })
            .collect::<Vec<_>>(),
    )
    .expect("plain data serializes");
    let payments = serde_json::to_string(
        &c.payments
            .iter()
            .map(|p| {
                (
                    p.id,
                    p.user_id,
                    p.amount_cents,
                    p.currency,
                    p.status,
                    instant::to_sql_text(p.created_at),
                )
            })
            .collect::<Vec<_>>(),
    )
    .expect("plain data serializes");
    [users, subs, events, payments]
}

/// The grant programs' writes inside the apply transaction (see the PostgreSQL twin,
/// `postgres::grants`). `credit_until` is text here: it is read, computed in Rust as instants
/// and written back, inside the transaction, which holds SQLite's write lock from its start
/// (`BEGIN IMMEDIATE`): nobody writes in between, so the write is still relative to the value
/// at write time.
async fn apply_grants(
    tx: &mut sqlx::SqliteConnection,
    programs: &[crate::program::grants::plan::ProgramPlan],
    run_id: i64,
    as_of: Instant,
) -> Result<GrantsApplied, StoreError> {
    use std::collections::BTreeMap;
    let rows = super::ledger_rows(programs);
    let mut out = GrantsApplied {
        planned: rows.len() as u64,
        ..GrantsApplied::default()
    };
    if rows.is_empty() {
        return Ok(out);
    }
    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!([
                r.program,
                r.referrer_id,
                r.user_id,
                r.party.as_str(),
                r.kind(),
                r.seq,
                r.credited_user_id,
                r.days(),
                r.cents(),
                r.payment_id
            ])
        })
        .collect();
    let written = sqlx::query(include_str!("../../sql/queries/sqlite/insert_grants.sql"))
        .bind(serde_json::Value::Array(json_rows).to_string())
        .bind(run_id)
        .bind(instant::to_sql_text(as_of))
        .fetch_all(&mut *tx)
        .await
        .map_err(q("writing referral_grants"))?;
    let mut balances: BTreeMap<i64, super::Balance> = BTreeMap::new();
    for r in &written {
        let get = |i| -> Result<Option<i64>, StoreError> {
            r.try_get::<Option<i64>, _>(i)
                .map_err(q("writing referral_grants"))
        };
        let kind: String = r.try_get(3).map_err(q("writing referral_grants"))?;
        let credited = get(4)?.unwrap_or_default();
        balances
            .entry(credited)
            .or_default()
            .add(kind == "reversal", get(5)?, get(6)?);
        if kind == "reversal" {
            out.reversals_written += 1;
        } else {
            out.grants_written += 1;
        }
    }
    out.conflicts = out.planned - written.len() as u64;

    let cents: Vec<serde_json::Value> = balances
        .iter()
        .filter(|(_, b)| b.cents != 0)
        .map(|(u, b)| json!([u, b.cents]))
        .collect();
    if !cents.is_empty() {
        sqlx::query(include_str!("../../sql/queries/sqlite/credit_cents.sql"))
            .bind(serde_json::Value::Array(cents).to_string())
            .execute(&mut *tx)
            .await
            .map_err(q("writing users.credit_cents"))?;
    }
    let days: BTreeMap<i64, super::Balance> = balances
        .iter()
        .filter(|(_, b)| b.days_touched)
        .map(|(u, b)| (*u, *b))
        .collect();
    if !days.is_empty() {
        let ids: Vec<i64> = days.keys().copied().collect();
        let current: Vec<(i64, Option<String>)> = sqlx::query_as(include_str!(
            "../../sql/queries/sqlite/credit_until_read.sql"
        ))
        .bind(serde_json::to_string(&ids).expect("integers"))
        .fetch_all(&mut *tx)
        .await
        .map_err(q("reading users.credit_until"))?;
        let mut new = Vec::with_capacity(current.len());
        for (user, text) in current {
            let b = days[&user];
            let until = match text.as_deref() {
                None => None,
                Some(t) => Some(super::sqlite_time("users", "credit_until", user, t)?),
            };
            let until =
                crate::program::grants::credit_until(until, as_of, b.days_reversed, b.days_granted);
            new.push(json!([user, until.map(instant::to_sql_text)]));
        }
        sqlx::query(include_str!(
            "../../sql/queries/sqlite/credit_until_write.sql"
        ))
        .bind(serde_json::Value::Array(new).to_string())
        .execute(&mut *tx)
        .await
        .map_err(q("writing users.credit_until"))?;
    }
    out.balances_written = balances.len() as u64;
    Ok(out)
}
