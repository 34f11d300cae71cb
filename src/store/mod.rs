//! The database: reads a snapshot, applies a plan, keeps the run history and the lock.
//!
//! One implementation per backend, chosen once from the URL scheme. The store knows nothing
//! of the rules: it reads rows and writes what a [`Plan`] says.

pub mod check;
mod history;
pub mod migrations;
mod pgcopy;
mod postgres;
mod sqlite;
mod sqlite_read;

use std::collections::HashSet;
use std::time::Duration;

use crate::config::NewSubscriptionConfig;
use crate::demo::{DemoCounts, DemoSpec};
use crate::instant::Instant;
use crate::program::slots::plan::{Plan, PlanStats};
use crate::snapshot::{GrantsRead, Scope, Shard, Snapshot};

pub use history::{ChangeFilter, GrantRow, RewardChangeRow, RunLedgerCounts};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the database {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{what}: {message}")]
    Sql { what: &'static str, message: String },
    /// A cell of the snapshot that cannot be read as what the rules need. `row` is the row's
    /// own id (the table's primary key), `None` when the id itself is the bad cell; `value` is
    /// shown as the database holds it (text quoted, `NULL`, blobs and non-UTF-8 text in hex).
    #[error("{}", bad_value_message(table, column, *row, value, expected))]
    BadValue {
        table: &'static str,
        column: &'static str,
        row: Option<i64>,
        value: String,
        expected: &'static str,
    },
    /// More than one subscription row for a user the run reads: counting them would count the
    /// user twice, and picking one would be a guess.
    #[error("{}", duplicate_subscriptions_message(users))]
    DuplicateSubscriptions {
        /// `(user_id, subscription ids)`, by user id.
        users: Vec<(i64, Vec<i64>)>,
    },
    /// Bad usage (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// A failure of the machine rather than of the request (exit 1): lock files, threads.
    #[error("{0}")]
    Runtime(String),
    /// The run's row is no longer `running` (another run marked it): its writes rolled back.
    #[error(
        "run {run_id} is no longer running (its row says {status:?}); its writes were rolled back"
    )]
    NotRunning { run_id: i64, status: String },
}

impl StoreError {
    /// Wraps a driver error, adding the fix for the most common setup mistake.
    pub(crate) fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |e| {
            let code = e
                .as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned());
            StoreError::driver_coded(what, &e, code.as_deref())
        }
    }

    /// Whether SQLite said the database is busy or locked (another writer, a host reader).
    pub fn is_busy(&self) -> bool {
        matches!(self, StoreError::Sql { message, .. }
            if message.contains("database is locked") || message.contains("database is busy"))
    }

    /// Any driver's error (sqlx, rusqlite) as one line, with the fix for missing tables.
    pub(crate) fn driver(what: &'static str, e: &dyn std::fmt::Display) -> StoreError {
        Self::driver_coded(what, e, None)
    }

    /// As [`StoreError::driver`], explaining the SQLSTATEs an operator can act on.
    pub(crate) fn driver_coded(
        what: &'static str,
        e: &dyn std::fmt::Display,
        code: Option<&str>,
    ) -> StoreError {
        let mut message = one_line(&e.to_string());
        match code {
            Some("55P03") => message.push_str(
                " (another transaction held a lock this run needed for longer than \
                 database.lock_timeout_secs; the next run tries again)",
            ),
            Some("57014") if message.contains("statement timeout") => {
                message.push_str(" (a statement ran longer than database.statement_timeout_secs)")
            }
            _ => {}
        }
        // A missing table or column: often a database the job's newer migrations have not
        // reached yet (SQLite says "no such column", PostgreSQL "… does not exist").
        if message.contains("no such table")
            || message.contains("no such column")
            || message.contains("does not exist")
        {
            message.push_str(
                " (run `referral-rewards migrate`, plus `--with-reference-schema` for a demo database)",
            );
        }
        StoreError::Sql { what, message }
    }
}

fn bad_value_message(
    table: &str,
    column: &str,
    row: Option<i64>,
    value: &str,
    expected: &str,
) -> String {
    match row {
        Some(id) => {
            format!("{table}.{column} of the {table} row with id {id}: {value} is not {expected}")
        }
        None => format!("{table}.{column}: {value} is not {expected}"),
    }
}

/// How many users a duplicate-subscription error lists before "and N more".
const DUPLICATES_LISTED: usize = 10;

fn duplicate_subscriptions_message(users: &[(i64, Vec<i64>)]) -> String {
    let listed: Vec<String> = users
        .iter()
        .take(DUPLICATES_LISTED)
        .map(|(user, subs)| {
            let ids: Vec<String> = subs.iter().map(i64::to_string).collect();
            if subs.len() > 1 {
                format!("user {user} has subscriptions with ids {}", ids.join(", "))
            } else {
                format!("user {user} is read more than once (its users row is repeated)")
            }
        })
        .collect();
    let more = users.len().saturating_sub(DUPLICATES_LISTED);
    let more = if more > 0 {
        format!(" (and {more} more users)")
    } else {
        String::new()
    };
    format!(
        "more than one subscriptions row for one user: {}{more}; a user has at most one \
         subscription (SPEC: subscriptions.user_id is UNIQUE), so the run refuses to guess: \
         remove the extra rows, or map the table through a view with one row per user",
        listed.join("; ")
    )
}

/// A time column's text as an instant; the error names the table, column, row and value.
pub(crate) fn sqlite_time(
    table: &'static str,
    column: &'static str,
    row: i64,
    value: &str,
) -> Result<Instant, StoreError> {
    crate::instant::parse_sql_text(value).ok_or_else(|| StoreError::BadValue {
        table,
        column,
        row: Some(row),
        value: format!("{value:?}"),
        expected: "a time",
    })
}

/// Gives `referred[i]` each subscription `(i, subscription)` read for it by a scan. A second
/// one becomes a row of its own, as the joined query gives one row per subscription, so that
/// the snapshot refuses the user's duplicates by name ([`users_with_duplicate_subscriptions`]).
pub(crate) fn attach_subscriptions(
    referred: &mut Vec<crate::snapshot::ReferredUser>,
    subscriptions: impl IntoIterator<Item = (usize, crate::snapshot::Subscription)>,
) {
    let mut extra = vec![];
    for (i, sub) in subscriptions {
        let u = &mut referred[i];
        if u.subscription.is_none() {
            u.subscription = Some(sub);
        } else {
            extra.push(crate::snapshot::ReferredUser {
                subscription: Some(sub),
                ..u.clone()
            });
        }
    }
    referred.extend(extra);
}

/// Users the snapshot read more than one subscription row for: referred users (one row per
/// subscription comes out of the join) and the host-bonus rows.
pub(crate) fn users_with_duplicate_subscriptions(snap: &Snapshot) -> Vec<i64> {
    let mut ids: Vec<i64> = Vec::with_capacity(snap.referred.len());
    ids.extend(snap.referred.iter().map(|u| u.id));
    let mut dup = crate::ids::repeated(ids);
    ids = Vec::with_capacity(snap.host_bonus.len());
    ids.extend(snap.host_bonus.iter().map(|(u, _)| *u));
    dup.extend(crate::ids::repeated(ids));
    dup.sort_unstable();
    dup.dedup();
    dup
}

/// The error for users with more than one subscription row, from `(user_id, subscription id)`
/// pairs read for them.
pub(crate) fn duplicate_subscriptions(users: &[i64], rows: &[(i64, i64)]) -> StoreError {
    let mut by_user: std::collections::BTreeMap<i64, Vec<i64>> =
        users.iter().map(|u| (*u, Vec::new())).collect();
    for (user, id) in rows {
        if let Some(ids) = by_user.get_mut(user) {
            ids.push(*id);
        }
    }
    for ids in by_user.values_mut() {
        ids.sort_unstable();
    }
    StoreError::DuplicateSubscriptions {
        users: by_user.into_iter().collect(),
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How to open the database.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// A dry run opens SQLite with `mode=ro` and never writes on PostgreSQL.
    pub read_only: bool,
    pub busy_timeout: Duration,
    /// SQLite: bytes of the file the snapshot reads through a memory map (0: none).
    pub sqlite_mmap_bytes: i64,
    /// PostgreSQL: read the large snapshot queries through binary COPY (falling back to plain
    /// SELECTs where the server refuses it); `false` always uses SELECTs.
    pub pg_binary_copy: bool,
    /// PostgreSQL `lock_timeout` of the snapshot and apply transactions (zero: none).
    pub lock_timeout: Duration,
    /// PostgreSQL `statement_timeout` of the snapshot and apply transactions (zero: none).
    pub statement_timeout: Duration,
    /// SQLite: only `migrate` and `demo-data` may create a missing database file.
    pub create: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            read_only: false,
            busy_timeout: Duration::from_secs(30),
            sqlite_mmap_bytes: 2048 << 20,
            pg_binary_copy: true,
            lock_timeout: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(600),
            create: false,
        }
    }
}

/// A run's row in `reward_runs`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub mode: String,
    pub referrer_user_id: Option<i64>,
    pub as_of: Instant,
    pub started_at: Instant,
    pub finished_at: Option<Instant>,
    pub status: String,
    pub referrers_processed: Option<i64>,
    pub rewards_up: Option<i64>,
    pub rewards_down: Option<i64>,
    pub bonus_delta: Option<i64>,
    pub reward_rows_written: Option<i64>,
    pub host_values_written: Option<i64>,
    pub conflicts: Option<i64>,
    /// JSON object: outcome name → count.
    pub outcome_counts: Option<String>,
    pub digest: Option<String>,
    pub error: Option<String>,
    /// JSON: the grant programs' counts and what the run wrote of them (see [`RunFinish`]).
    pub programs: Option<String>,
    /// `K/N` for a shard run.
    pub shard: Option<String>,
    /// What started the run ([`Trigger`]); `None` for runs recorded before it was.
    pub trigger: Option<String>,
}

/// The columns of [`RunRow`], in its order, for the backends' queries.
/// (Names are cast to text, whatever type the column has.)
pub(crate) const RUN_COLUMNS: &str = "id, CAST(mode AS TEXT), referrer_user_id, as_of, \
     started_at, finished_at, CAST(status AS TEXT), referrers_processed, rewards_up, \
     rewards_down, bonus_delta, reward_rows_written, host_values_written, conflicts, \
     outcome_counts, digest, error, programs, shard, CAST(trigger AS TEXT)";

/// What started a run, recorded in its row (`reward_runs.trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// The command line (`reconcile`).
    Cli,
    /// `serve`'s cron schedule (and `schedule.run_on_start`).
    Schedule,
    /// `serve`'s HTTP API (`POST /v1/referrers/{id}/reconcile`).
    Http,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cli => "cli",
            Trigger::Schedule => "schedule",
            Trigger::Http => "http",
        }
    }
}

/// The kinds of applying runs, as the metrics label them (`mode`): a full run, a shard of
/// one (`reconcile --shard`), a one-referrer run. Dry runs leave no run row, so no figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Full,
    Shard,
    Referrer,
}

impl RunKind {
    pub const ALL: [RunKind; 3] = [RunKind::Full, RunKind::Shard, RunKind::Referrer];
    const FULL_SUCCEEDED: &'static str = "mode = 'full' AND shard IS NULL AND status = 'succeeded'";

    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Full => "full",
            RunKind::Shard => "shard",
            RunKind::Referrer => "referrer",
        }
    }

    /// The finished runs of this kind (a running one has no figures yet).
    fn finished(self) -> &'static str {
        match self {
            RunKind::Full => "mode = 'full' AND shard IS NULL AND status <> 'running'",
            RunKind::Shard => "mode = 'full' AND shard IS NOT NULL AND status <> 'running'",
            RunKind::Referrer => "mode = 'referrer' AND status <> 'running'",
        }
    }
}

/// What the metrics and `/healthz` read of the run history.
#[derive(Debug, Clone, Default)]
pub struct LastRuns {
    /// The newest finished run of each kind, in [`RunKind::ALL`]'s order.
    pub finished: Vec<(RunKind, Option<RunRow>)>,
    /// The newest successful full run.
    pub full_success: Option<RunRow>,
}

impl LastRuns {
    pub fn of(&self, kind: RunKind) -> Option<&RunRow> {
        self.finished
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, r)| r.as_ref())
    }
}

/// What a run records in its row when it succeeds. Its `finished_at` is stamped by the job's
/// clock (like `started_at`) just before the row is updated in the apply transaction.
#[derive(Debug, Clone)]
pub struct RunFinish {
    pub stats: PlanStats,
    /// JSON object: outcome name → count.
    pub outcome_counts: String,
    pub digest: String,
    /// The referrers left unwritten and why (the run succeeded for everyone else).
    pub error: Option<String>,
    /// The grant programs' counts (the run row's `programs`, JSON); `None` without any.
    pub programs: Option<serde_json::Value>,
}

/// What an apply wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub reward_rows_written: u64,
    pub host_values_written: u64,
    pub ledger_rows_written: u64,
    /// Users whose host column changed between snapshot and write: left for the next run.
    pub conflicts: Vec<i64>,
    /// The grant programs' writes (all zero without grant programs).
    pub grants: GrantsApplied,
}

/// Everything one apply writes, program by program, and the run it belongs to.
#[derive(Clone, Copy)]
pub struct Writes<'a> {
    /// The slots program's plan.
    pub plan: &'a Plan,
    /// The grant programs' plans.
    pub grants: &'a [crate::program::grants::plan::ProgramPlan],
    pub run_id: i64,
    pub as_of: Instant,
    pub new_subscription: &'a NewSubscriptionConfig,
    pub finish: &'a RunFinish,
    pub progress: Option<&'a crate::engine::Progress>,
}

/// What an orphaned run's row says (`abandoned`): recorded by the next run that holds the lock.
pub const ORPHAN_ERROR: &str = "no end was recorded: the process running it was killed, or lost the database (or its lock) before it could record one";

/// The start of an applying run ([`Store::begin_run`]).
pub enum Begun {
    /// Another run holds the lock: nothing was done.
    Locked,
    /// The one referrer asked about is not a user: the lock is held, nothing was written.
    UnknownUser(RunLock),
    /// The lock is held, the orphans are marked and the run's `running` row is in.
    Started {
        lock: RunLock,
        abandoned: u64,
        run_id: i64,
    },
}

/// Held for the whole of an applying run; dropping it releases the lock.
pub struct RunLock {
    /// `None`: exclusive (a full or one-referrer run); `Some`: one shard's.
    pub shard: Option<Shard>,
    pub(crate) _held: Held,
}

pub(crate) enum Held {
    /// SQLite: `flock`s on `<database>.lock` files, released by the OS if the process dies.
    Files(#[allow(dead_code)] Vec<std::fs::File>),
    /// PostgreSQL: session advisory locks on a dedicated connection, released when the
    /// connection closes, so a killed process never leaves them behind. The apply transaction
    /// runs on this same connection: if the server closed it (and so released the lock), the
    /// write cannot commit, whoever holds the lock now.
    Postgres {
        /// `None` once a failed write left it unusable: dropped at once, ending its session.
        conn: Option<Box<sqlx::PgConnection>>,
        /// The run's end released the locks already, in its own round trip (see
        /// `finish_run_and_release`): the connection goes back as it is.
        released: bool,
        /// Closed at the release instead of kept for the next run (see
        /// `RunLock::discard_connection`).
        discard: bool,
    },
}

pub enum Store {
    Sqlite(SqliteStore),
    /// Shared with the snapshot's second connection, a task of its own (see `PgStore::snapshot`).
    Postgres(std::sync::Arc<PgStore>),
}

impl Store {
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Store, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Store::Sqlite(SqliteStore::connect(url, opts).await?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(std::sync::Arc::new(
                PgStore::connect(url, opts).await?,
            )))
        } else {
            Err(StoreError::Invalid(format!(
                "database URL must start with sqlite:// or postgres://, got {url:?}"
            )))
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Creates the job-owned tables, and the reference host tables when asked.
    pub async fn migrate(&self, with_reference_schema: bool) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.migrate(with_reference_schema).await,
            Store::Postgres(s) => s.migrate(with_reference_schema).await,
        }
    }

    /// Each of the job's migrations, applied or pending (`migrate --info`); reads only.
    pub async fn migration_info(&self) -> Result<Vec<migrations::MigrationStatus>, StoreError> {
        match self {
            Store::Sqlite(s) => s.migration_info().await,
            Store::Postgres(s) => s.migration_info().await,
        }
    }

    /// One consistent read of everything a run computes from. `window` is the inclusive IP
    /// window of the rules.
    pub async fn snapshot(
        &self,
        scope: Scope,
        window: (Instant, Instant),
        grants: Option<GrantsRead>,
    ) -> Result<Snapshot, StoreError> {
        self.snapshot_listing(scope, window, grants, false).await
    }

    /// [`Store::snapshot`], with `uncounted`: a full or shard run also reads the referrals whose
    /// referrer holds no invite code ([`Snapshot::uncounted`]; a one-user run always does).
    pub async fn snapshot_listing(
        &self,
        scope: Scope,
        window: (Instant, Instant),
        grants: Option<GrantsRead>,
        uncounted: bool,
    ) -> Result<Snapshot, StoreError> {
        match self {
            Store::Sqlite(s) => s.snapshot(scope, window, grants, uncounted).await,
            Store::Postgres(s) => s.snapshot(scope, window, grants, uncounted).await,
        }
    }

    /// Whether the user exists at all (for `--referrer` on an unknown id).
    pub async fn user_exists(&self, id: i64) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.user_exists(id).await,
            Store::Postgres(s) => s.user_exists(id).await,
        }
    }

    /// Who referred a user: `None` when there is no such user, `Some(None)` when nobody did.
    pub async fn referred_by(&self, id: i64) -> Result<Option<Option<i64>>, StoreError> {
        match self {
            Store::Sqlite(s) => s.referred_by(id).await,
            Store::Postgres(s) => s.referred_by(id).await,
        }
    }

    /// The newest time `user` used each IP hash inside the window (both ends included), for
    /// the `shared_ip` facts of `explain`. Read after the run's snapshot, not inside it.
    pub async fn ip_last_used(
        &self,
        user: i64,
        window: (Instant, Instant),
    ) -> Result<std::collections::HashMap<String, Instant>, StoreError> {
        match self {
            Store::Sqlite(s) => s.ip_last_used(user, window).await,
            Store::Postgres(s) => s.ip_last_used(user, window).await,
        }
    }

    /// The applying-run lock for a scope: `None` when another run holds it.
    pub async fn try_lock(&self, scope: Scope) -> Result<Option<RunLock>, StoreError> {
        match self {
            Store::Sqlite(s) => s.try_lock(scope.shard()),
            Store::Postgres(s) => s.try_lock(scope.shard()).await,
        }
    }

    /// [`Store::begin_run`] for a one-referrer run of the slots program alone, with the
    /// referrer's snapshot when the store reads it in the same round trip (PostgreSQL); `None`
    /// when it is to be read with [`Store::snapshot`].
    pub async fn begin_run_reading(
        &self,
        id: i64,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
        window: (Instant, Instant),
    ) -> Result<(Begun, Option<Snapshot>), StoreError> {
        match self {
            Store::Postgres(s) => s.begin_run_reading(id, as_of, now, trigger, window).await,
            Store::Sqlite(_) => {
                let begun = self
                    .begin_run(Scope::Referrer(id), Some(id), as_of, now, trigger)
                    .await?;
                Ok((begun, None))
            }
        }
    }

    /// An applying run's start: the lock, then (if `user` is given, only when it is a user)
    /// the orphans marked and the run's row. On PostgreSQL a full or one-referrer run does it
    /// in one statement on the lock's connection; elsewhere it is [`Store::try_lock`],
    /// [`Store::abandon_orphans`] and [`Store::start_run`].
    pub async fn begin_run(
        &self,
        scope: Scope,
        user: Option<i64>,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
    ) -> Result<Begun, StoreError> {
        if let (Store::Postgres(s), None) = (self, scope.shard()) {
            return s.begin_run(scope, user, as_of, now, trigger).await;
        }
        let Some(lock) = self.try_lock(scope).await? else {
            return Ok(Begun::Locked);
        };
        if let Some(id) = user {
            match self.user_exists(id).await {
                Ok(true) => {}
                Ok(false) => return Ok(Begun::UnknownUser(lock)),
                Err(e) => {
                    self.release(lock).await;
                    return Err(e);
                }
            }
        }
        match self.start_locked(&lock, scope, as_of, now, trigger).await {
            Ok((abandoned, run_id)) => Ok(Begun::Started {
                lock,
                abandoned,
                run_id,
            }),
            Err(e) => {
                self.release(lock).await;
                Err(e)
            }
        }
    }

    /// Under a held lock: the orphans marked, then the run's `running` row.
    pub async fn start_locked(
        &self,
        lock: &RunLock,
        scope: Scope,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
    ) -> Result<(u64, i64), StoreError> {
        let abandoned = self.abandon_orphans(lock, now).await?;
        let run_id = self.start_run(scope, as_of, now, trigger).await?;
        Ok((abandoned, run_id))
    }

    /// Releases the run lock (on PostgreSQL keeping its connection for the next run).
    pub async fn release(&self, lock: RunLock) {
        match self {
            Store::Sqlite(_) => drop(lock),
            Store::Postgres(s) => s.release(lock).await,
        }
    }

    /// Under the exclusive lock, any `running` row belongs to a process that died; under a
    /// shard's lock, any `running` row of that shard. Marks them `abandoned`.
    pub async fn abandon_orphans(&self, lock: &RunLock, now: Instant) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.abandon_orphans(lock.shard, now).await,
            Store::Postgres(s) => s.abandon_orphans(lock.shard, now).await,
        }
    }

    /// Inserts the run's `running` row; `trigger` says what started it (`None`: not said).
    pub async fn start_run(
        &self,
        scope: Scope,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
    ) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.start_run(scope, as_of, now, trigger).await,
            Store::Postgres(s) => s.start_run(scope, as_of, now, trigger).await,
        }
    }

    /// Writes the plan in one transaction and marks the run succeeded in the same commit,
    /// fenced by the run lock: the commit happens only while `lock` is still held and the
    /// run's row still says `running`.
    pub async fn apply(
        &self,
        lock: &mut RunLock,
        writes: &Writes<'_>,
    ) -> Result<ApplyOutcome, StoreError> {
        match self {
            Store::Sqlite(s) => s.apply(writes).await,
            Store::Postgres(s) => s.apply(lock, writes).await,
        }
    }

    /// After a failed or aborted run: ends what is left of its write transaction (an in-flight
    /// commit completes or not; an unsent rollback goes out) before the run's row is marked
    /// failed, so that the row is not left locked by it.
    pub async fn settle(&self, lock: &mut RunLock) {
        if let Store::Postgres(s) = self {
            s.settle(lock).await
        }
    }

    /// Marks the run `failed` with its error, also over an `abandoned` mark that another run
    /// made meanwhile (this process knows better why it ended), never over `succeeded`.
    /// Returns whether the row changed: `false` when its commit had landed after all.
    pub async fn fail_run(
        &self,
        run_id: i64,
        error: &str,
        now: Instant,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => s.fail_run(run_id, error, now).await,
            Store::Postgres(s) => s.fail_run(run_id, error, now).await,
        }
    }

    /// The status of one run's row (`None`: no such row).
    pub async fn run_status(&self, run_id: i64) -> Result<Option<String>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                sqlx::query_scalar(RUN_STATUS)
                    .bind(run_id)
                    .fetch_optional(&s.pool)
                    .await
            }
            Store::Postgres(s) => {
                sqlx::query_scalar(RUN_STATUS)
                    .bind(run_id)
                    .fetch_optional(&s.pool)
                    .await
            }
        }
        .map_err(StoreError::sql("reading reward_runs"))
    }

    /// The newest `limit` runs, newest first.
    pub async fn runs(&self, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        match self {
            Store::Sqlite(s) => s.runs(None, limit).await,
            Store::Postgres(s) => s.runs(None, limit).await,
        }
    }

    /// One run's row (`None`: no such run).
    pub async fn run(&self, id: i64) -> Result<Option<RunRow>, StoreError> {
        let rows = match self {
            Store::Sqlite(s) => s.runs(Some(id), 1).await,
            Store::Postgres(s) => s.runs(Some(id), 1).await,
        }?;
        Ok(rows.into_iter().next())
    }

    /// The newest finished run of each kind, and the newest successful full run (metrics and
    /// `/healthz`: a one-referrer or shard run says nothing about the full runs).
    pub async fn last_runs(&self) -> Result<LastRuns, StoreError> {
        let last = |filter: &'static str| async move {
            let rows = match self {
                Store::Sqlite(s) => s.runs_where(filter, None, 1).await,
                Store::Postgres(s) => s.runs_where(filter, None, 1).await,
            }?;
            Ok::<_, StoreError>(rows.into_iter().next())
        };
        let mut out = LastRuns::default();
        for kind in RunKind::ALL {
            let row = last(kind.finished()).await?;
            out.finished.push((kind, row));
        }
        out.full_success = last(RunKind::FULL_SUCCEEDED).await?;
        Ok(out)
    }

    /// How many runs there are of each kind (`full`, `shard`, `referrer`) in each status.
    pub async fn run_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let sql = "SELECT CASE WHEN mode = 'referrer' THEN 'referrer' WHEN shard IS NULL THEN 'full' \
                   ELSE 'shard' END, status, COUNT(*) FROM reward_runs GROUP BY 1, 2 ORDER BY 1, 2";
        match self {
            Store::Sqlite(s) => sqlx::query_as(sql).fetch_all(&s.pool).await,
            Store::Postgres(s) => sqlx::query_as(sql).fetch_all(&s.pool).await,
        }
        .map_err(StoreError::sql("reading reward_runs"))
    }

    /// PostgreSQL: every pooled connection is in use (a ping waits for one: busy, not down).
    pub fn pool_saturated(&self) -> bool {
        match self {
            Store::Sqlite(_) => false,
            Store::Postgres(s) => {
                s.pool.num_idle() == 0 && s.pool.size() >= s.pool.options().get_max_connections()
            }
        }
    }

    /// Whether the database answers. [`StoreError::is_busy`] tells a busy database apart.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.ping().await,
            Store::Postgres(s) => sqlx::query("SELECT 1")
                .execute(&s.pool)
                .await
                .map(|_| ())
                .map_err(StoreError::sql("reaching the database")),
        }
    }

    /// Fills the host tables with `demo-data`, in bulk. Returns the rows loaded per table.
    pub async fn load_demo(&self, spec: &DemoSpec) -> Result<DemoCounts, StoreError> {
        match self {
            Store::Sqlite(s) => s.load_demo(spec).await,
            Store::Postgres(s) => s.load_demo(spec).await,
        }
    }

    pub async fn close(self) {
        match self {
            Store::Sqlite(s) => s.pool.close().await,
            Store::Postgres(s) => s.pool.close().await,
        }
    }
}

/// Users per bulk statement when loading demo data.
pub(crate) const DEMO_CHUNK_USERS: i64 = 20_000;

/// Encoded demo rows, one buffer per host table: users, subscriptions, telemetry events,
/// payments.
pub(crate) type EncodedChunk = [String; 4];

/// Demo chunks, generated and encoded on a blocking thread one chunk ahead of the writer, so
/// that generating and writing overlap.
pub(crate) struct ChunkFeed {
    spec: DemoSpec,
    from: i64,
    encode: fn(crate::demo::DemoChunk) -> EncodedChunk,
    pending: Option<tokio::task::JoinHandle<EncodedChunk>>,
}

impl ChunkFeed {
    pub(crate) fn new(spec: DemoSpec, encode: fn(crate::demo::DemoChunk) -> EncodedChunk) -> Self {
        let mut feed = ChunkFeed {
            spec,
            from: 1,
            encode,
            pending: None,
        };
        feed.start_next();
        feed
    }

    fn start_next(&mut self) {
        if self.from > self.spec.users {
            return;
        }
        let (spec, from, encode) = (self.spec, self.from, self.encode);
        self.from += DEMO_CHUNK_USERS;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            encode(spec.chunk(from, from + DEMO_CHUNK_USERS))
        }));
    }

    pub(crate) async fn next(&mut self) -> Result<Option<EncodedChunk>, StoreError> {
        let Some(pending) = self.pending.take() else {
            return Ok(None);
        };
        let chunk = pending
            .await
            .map_err(|e| StoreError::Runtime(format!("generating demo data: {e}")))?;
        self.start_next();
        Ok(Some(chunk))
    }
}

/// A host column value to write: [`Plan::host_changes`] leaves out every referrer whose value
/// does not fit the INTEGER column ([`crate::program::slots::plan::PlanEntry::write_error`]).
pub(crate) fn host_int(v: i64) -> i32 {
    i32::try_from(v).expect("Plan::host_changes yields only values that fit INTEGER")
}

/// One run row's status.
pub(crate) const RUN_STATUS: &str = "SELECT status FROM reward_runs WHERE id = $1";

/// Lowercase hex of bytes that are not text, for error messages.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The ledger's grant rows, each marked `reversed` when a reversal row ends it (same program,
/// referred user, party and `grant_seq`). `rows`: every ledger row read, with whether it is a
/// reversal. Matched here rather than by a lookup per grant in SQL.
pub(crate) fn live_ledger(
    rows: Vec<(crate::program::grants::LedgerGrant, bool)>,
) -> Vec<crate::program::grants::LedgerGrant> {
    let reversed: Vec<bool> = {
        let ended: HashSet<(&str, i64, crate::program::grants::Party, i64)> = rows
            .iter()
            .filter(|(_, reversal)| *reversal)
            .map(|(g, _)| (&*g.program, g.user_id, g.party, g.seq))
            .collect();
        rows.iter()
            .map(|(g, _)| ended.contains(&(&*g.program, g.user_id, g.party, g.seq)))
            .collect()
    };
    rows.into_iter()
        .zip(reversed)
        .filter(|((_, reversal), _)| !reversal)
        .map(|((mut g, _), ended)| {
            g.reversed = ended;
            g
        })
        .collect()
}

/// A ledger row as read, checked: the job writes it, so anything odd is a bug or a hand edit.
#[allow(clippy::too_many_arguments)] // one per column
pub(crate) fn ledger_grant(
    program: &str,
    referrer_id: i64,
    user_id: i64,
    party: &str,
    credited_user_id: i64,
    days: Option<i64>,
    cents: Option<i64>,
    seq: i64,
    payment_id: Option<i64>,
    reversed: bool,
    interner: &mut crate::snapshot::Interner,
) -> Result<crate::program::grants::LedgerGrant, StoreError> {
    use crate::program::grants::{Amount, LedgerGrant, Party};
    let bad = |column, value: String, expected| StoreError::BadValue {
        table: "referral_grants",
        column,
        row: None,
        value: format!("{value} (program {program:?}, referred user {user_id})"),
        expected,
    };
    let party = Party::parse(party)
        .ok_or_else(|| bad("party", party.to_owned(), "referrer or referred"))?;
    let amount = match (days, cents) {
        (Some(d), None) => Amount::Days(d),
        (None, Some(c)) => Amount::Cents(c),
        _ => {
            return Err(bad(
                "credit_days",
                format!("{days:?}/{cents:?}"),
                "exactly one of credit_days and credit_cents",
            ));
        }
    };
    Ok(LedgerGrant {
        program: interner.intern(program),
        referrer_id,
        user_id,
        party,
        credited_user_id,
        amount,
        seq,
        payment_id,
        reversed,
    })
}

/// What the grant programs' writes did in an apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GrantsApplied {
    /// Ledger rows the plan asked for.
    pub planned: u64,
    pub grants_written: u64,
    pub reversals_written: u64,
    /// Ledger rows another run had written first: skipped, with their balance changes.
    pub conflicts: u64,
    /// Users whose balance changed.
    pub balances_written: u64,
}

/// One ledger row to write, flattened from the programs' plans.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LedgerRow {
    pub program: String,
    pub referrer_id: i64,
    pub user_id: i64,
    pub party: crate::program::grants::Party,
    pub reversal: bool,
    pub seq: i64,
    pub credited_user_id: i64,
    pub amount: crate::program::grants::Amount,
    pub payment_id: Option<i64>,
}

impl LedgerRow {
    pub fn kind(&self) -> &'static str {
        if self.reversal { "reversal" } else { "grant" }
    }

    pub fn days(&self) -> Option<i64> {
        self.amount.credit_days()
    }

    pub fn cents(&self) -> Option<i64> {
        self.amount.credit_cents()
    }
}

pub(crate) fn ledger_rows(
    programs: &[crate::program::grants::plan::ProgramPlan],
) -> Vec<LedgerRow> {
    programs
        .iter()
        .flat_map(|p| {
            p.changes().map(|(d, c)| LedgerRow {
                program: p.name.clone(),
                referrer_id: d.referrer_id,
                user_id: d.user_id,
                party: c.party,
                reversal: c.reversal,
                seq: c.seq,
                credited_user_id: c.credited_user_id,
                amount: c.amount,
                payment_id: c.payment_id,
            })
        })
        .collect()
}

/// One user's balance change in a run: reversals apply before grants (docs/rules.md §7.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Balance {
    pub cents: i64,
    /// Days taken back (positive).
    pub days_reversed: i64,
    pub days_granted: i64,
    pub days_touched: bool,
}

impl Balance {
    /// Adds a written ledger row (amounts negative for reversals, as stored).
    pub fn add(&mut self, reversal: bool, days: Option<i64>, cents: Option<i64>) {
        self.cents += cents.unwrap_or(0);
        if let Some(d) = days {
            self.days_touched = true;
            if reversal {
                self.days_reversed -= d;
            } else {
                self.days_granted += d;
            }
        }
    }
}

/// The run row's `programs`: the plan's counts per grant program and what the apply wrote.
pub(crate) fn programs_json(finish: &RunFinish, applied: &GrantsApplied) -> Option<String> {
    let mut v = finish.programs.clone()?;
    v["written"] = serde_json::to_value(applied).expect("plain counts");
    Some(v.to_string())
}

/// The part of the grant programs' snapshot that the slots program's part already holds.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    Referrals,
    Registrations,
    ReferrerEvents,
}

/// Completes the grant programs' snapshot of a full or shard run with what the slots program's
/// part of the same transaction read: the referrals of invite-code holders, their referred
/// users' registrations and their IPs in the window (those two by reference: see
/// `GrantsSnapshot::fraud_from_slots`). The grant queries read only the rest, so that enabling
/// grant programs does not read those rows twice.
pub(crate) fn share_slots_reads(
    g: &mut crate::program::grants::GrantsSnapshot,
    slots: &Snapshot,
    part: Part,
) {
    match part {
        Part::Referrals => {
            g.referrals.extend(
                slots
                    .referred
                    .iter()
                    .map(|u| crate::program::grants::Referral {
                        referrer_id: u.referrer_id,
                        user_id: u.id,
                        signed_up_at: u.created_at,
                        referrer_exists: true,
                    }),
            )
        }
        // Not copied: `Facts::new` reads them in the slots part (`fraud_from_slots`).
        Part::Registrations | Part::ReferrerEvents => g.fraud_from_slots = true,
    }
}
