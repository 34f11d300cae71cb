//! Test databases: a fresh SQLite file or a fresh PostgreSQL database per test, over real
//! connections, so tests run in parallel and never see each other's rows.
//!
//! PostgreSQL comes from `REFERRAL_REWARDS_TEST_PG_URL` (the Makefile sets it). When it is
//! unreachable, tests fail under `CI=true` and are skipped loudly elsewhere.

#![allow(dead_code)]

mod fixtures;
#[allow(unused_imports)]
pub use fixtures::*;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use referral_rewards::config::Config;
use referral_rewards::engine::{self, EngineError, RunReport, RunRequest};
use referral_rewards::instant::{self, Instant};
use referral_rewards::snapshot::Scope;
use referral_rewards::store::{ConnectOptions, Store};
use sqlx::{AssertSqlSafe, Connection, Row};

pub const PG_ENV: &str = "REFERRAL_REWARDS_TEST_PG_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    /// The reference schema: `TIMESTAMP` columns; the database's TimeZone is far from UTC.
    PgTimestamp,
    /// `TIMESTAMPTZ` columns, another far TimeZone, an ICU database locale (`en-US`, whose
    /// order is not byte order), and the host's text columns (`users.invite_code`,
    /// `subscriptions.tier` and `.status`, `telemetry_events.event_name` and `.ip_hash`) under a
    /// nondeterministic, case-insensitive ICU collation (`ci`), under which `'B' = 'b'`.
    PgTimestamptz,
}

pub const ALL: [Backend; 3] = [
    Backend::Sqlite,
    Backend::PgTimestamp,
    Backend::PgTimestamptz,
];

pub enum Admin {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub admin: Admin,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn pg_base_url() -> Option<String> {
    std::env::var(PG_ENV).ok().filter(|u| !u.is_empty())
}

/// The PostgreSQL server URL, or `None` (with a loud notice) when tests must skip it.
pub async fn pg_available() -> Option<String> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let Some(url) = pg_base_url() else {
        assert!(!ci, "CI=true but {PG_ENV} is not set");
        eprintln!("!!! SKIPPED PostgreSQL: {PG_ENV} is not set (make test sets it)");
        return None;
    };
    match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url)).await {
        Ok(Ok(c)) => {
            let _ = c.close().await;
            Some(url)
        }
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            assert!(!ci, "CI=true but PostgreSQL at {url} is unreachable: {why}");
            eprintln!("!!! SKIPPED PostgreSQL: {url} is unreachable: {why}");
            None
        }
    }
}

fn with_db(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("PostgreSQL URL");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

impl TestDb {
    /// A fresh, migrated database with the reference host schema, or `None` if the backend
    /// is PostgreSQL and it is unavailable outside CI.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        let db = Self::empty(backend).await?;
        db.store().await.migrate(true).await.expect("migrate");
        if backend == Backend::PgTimestamptz {
            // Times as TIMESTAMPTZ (the values are UTC instants whatever the session says), and
            // the host's text columns under a nondeterministic, case-insensitive collation:
            // SPEC compares names and hashes exactly, so the job must not compare them under
            // the column's collation. One ALTER TABLE per table: each rewrites it.
            let mut sql = String::from(
                "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);\n",
            );
            for (table, times, texts) in [
                (
                    "users",
                    &["created_at", "credit_until"][..],
                    &["invite_code"][..],
                ),
                (
                    "subscriptions",
                    &["started_at", "expires_at"][..],
                    &["tier", "status"][..],
                ),
                (
                    "telemetry_events",
                    &["created_at"][..],
                    &["event_name", "ip_hash"][..],
                ),
                ("payments", &["created_at"][..], &["currency", "status"][..]),
            ] {
                let changes: Vec<String> = times
                    .iter()
                    .map(|c| {
                        format!("ALTER COLUMN {c} TYPE TIMESTAMPTZ USING {c} AT TIME ZONE 'UTC'")
                    })
                    .chain(
                        texts
                            .iter()
                            .map(|c| format!("ALTER COLUMN {c} TYPE text COLLATE ci")),
                    )
                    .collect();
                sql.push_str(&format!("ALTER TABLE {table} {};\n", changes.join(", ")));
            }
            db.exec(&sql).await;
            assert_eq!(
                db.scalar(
                    "SELECT count(*) FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND collation_name = 'ci'"
                )
                .await,
                7
            );
            assert_eq!(
                db.scalar("SELECT count(*) FROM (SELECT WHERE 'B' = 'b' COLLATE ci) t")
                    .await,
                1,
                "ci is case-insensitive"
            );
        }
        Some(db)
    }

    /// A fresh database with nothing in it.
    pub async fn empty(backend: Backend) -> Option<TestDb> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}_{}_{}", std::process::id(), n, rand_suffix());
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("test.db");
                let url = format!("sqlite://{}", path.display());
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10));
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(opts)
                    .await
                    .expect("sqlite");
                Some(TestDb {
                    backend,
                    url,
                    admin: Admin::Sqlite(pool),
                    _dir: Some(dir),
                    pg_name: None,
                })
            }
            Backend::PgTimestamp | Backend::PgTimestamptz => {
                let base = pg_available().await?;
                let name = format!("rr_test_{tag}");
                let mut admin = sqlx::PgConnection::connect(&base).await.expect("pg admin");
                let create = if backend == Backend::PgTimestamptz {
                    format!(
                        "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu \
                         ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
                    )
                } else {
                    format!("CREATE DATABASE {name}")
                };
                sqlx::raw_sql(AssertSqlSafe(create))
                    .execute(&mut admin)
                    .await
                    .expect("create db");
                // Sessions default to a time zone far from UTC: the job must not care.
                let tz = if backend == Backend::PgTimestamp {
                    "Pacific/Chatham"
                } else {
                    "America/St_Johns"
                };
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "ALTER DATABASE {name} SET timezone = '{tz}'"
                )))
                .execute(&mut admin)
                .await
                .expect("set tz");
                let _ = admin.close().await;
                let url = with_db(&base, &name);
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await
                    .expect("pg");
                Some(TestDb {
                    backend,
                    url,
                    admin: Admin::Pg(pool),
                    _dir: None,
                    pg_name: Some(name),
                })
            }
        }
    }

    pub fn is_pg(&self) -> bool {
        self.backend != Backend::Sqlite
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.url, &self.opts())
            .await
            .expect("store")
    }

    /// `demo-data`'s population of `users` users, built around `anchor`.
    pub async fn load_demo(&self, users: i64, seed: u64, anchor: Instant) {
        let store = self.store().await;
        store
            .load_demo(&referral_rewards::demo::DemoSpec {
                users,
                seed,
                anchor,
            })
            .await
            .expect("demo data");
        store.close().await;
    }

    pub async fn exec(&self, sql: &str) {
        let r = match &self.admin {
            Admin::Sqlite(p) => sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .map(|_| ()),
            Admin::Pg(p) => sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
                .execute(p)
                .await
                .map(|_| ()),
        };
        r.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        match &self.admin {
            Admin::Sqlite(p) => {
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.to_owned()))
                    .fetch_one(p)
                    .await
            }
            Admin::Pg(p) => {
                sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.to_owned()))
                    .fetch_one(p)
                    .await
            }
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Rows of a query with every column cast to text by the caller, as strings.
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        fn take<R: Row>(r: &R, n: usize) -> Vec<Option<String>>
        where
            for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            (0..n).map(|i| r.get::<Option<String>, _>(i)).collect()
        }
        match &self.admin {
            Admin::Sqlite(p) => sqlx::query(AssertSqlSafe(sql.to_owned()))
                .fetch_all(p)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| take(r, r.len()))
                .collect(),
            Admin::Pg(p) => sqlx::query(AssertSqlSafe(sql.to_owned()))
                .fetch_all(p)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .iter()
                .map(|r| take(r, r.len()))
                .collect(),
        }
    }

    /// A time literal for this backend: SPEC's text on SQLite, an explicit UTC instant on
    /// PostgreSQL (a naive literal would be read in the session's far-away time zone).
    pub fn ts(&self, t: Instant) -> String {
        match self.backend {
            Backend::Sqlite => format!("'{}'", instant::to_sql_text(t)),
            Backend::PgTimestamp => format!("'{}'::timestamp", instant::to_sql_text(t)),
            Backend::PgTimestamptz => format!("'{}+00'::timestamptz", instant::to_sql_text(t)),
        }
    }

    pub fn opt_ts(&self, t: Option<Instant>) -> String {
        t.map_or_else(|| "NULL".into(), |t| self.ts(t))
    }

    pub fn bool(&self, b: bool) -> &'static str {
        match (self.backend, b) {
            (Backend::Sqlite, true) => "1",
            (Backend::Sqlite, false) => "0",
            (_, true) => "TRUE",
            (_, false) => "FALSE",
        }
    }

    /// Everything a run may write, as text, for before/after comparisons.
    pub async fn state(&self) -> Vec<Vec<Option<String>>> {
        let mut all = self
            .rows(
                "SELECT 'rr', CAST(referrer_user_id AS TEXT), CAST(referred_users_total AS TEXT), \
                 CAST(qualified_referrals AS TEXT), CAST(disqualified_self_referral AS TEXT), \
                 CAST(disqualified_cooldown AS TEXT), CAST(disqualified_missing_ip AS TEXT), \
                 CAST(disqualified_shared_ip AS TEXT), CAST(disqualified_duplicate_ip AS TEXT), \
                 CAST(bonus_slots AS TEXT), badge, CAST(last_run_id AS TEXT) \
                 FROM referral_rewards ORDER BY referrer_user_id",
            )
            .await;
        all.extend(
            self.rows(
                "SELECT 'sub', CAST(id AS TEXT), CAST(user_id AS TEXT), tier, status, \
                 CAST(max_domains AS TEXT), CAST(referral_bonus_domains AS TEXT), \
                 CAST(started_at AS TEXT), CAST(expires_at AS TEXT) FROM subscriptions ORDER BY user_id",
            )
            .await,
        );
        all.extend(
            self.rows(
                "SELECT 'chg', CAST(run_id AS TEXT), CAST(referrer_user_id AS TEXT), field, old_value, new_value \
                 FROM reward_changes ORDER BY id",
            )
            .await,
        );
        all.extend(
            self.rows("SELECT 'usr', CAST(id AS TEXT), invite_code, CAST(referred_by_user_id AS TEXT) FROM users ORDER BY id")
                .await,
        );
        all
    }

    /// What matters to users after a run: reward rows, and each subscription's tier, status
    /// and bonus (subscription ids may differ with insertion order).
    pub async fn outcome_state(
        &self,
    ) -> (
        Vec<Vec<Option<String>>>,
        std::collections::BTreeMap<String, Vec<Option<String>>>,
    ) {
        let rewards = self
            .rows(
                "SELECT CAST(referrer_user_id AS TEXT), CAST(referred_users_total AS TEXT), CAST(qualified_referrals AS TEXT), \
                 CAST(disqualified_self_referral AS TEXT), CAST(disqualified_cooldown AS TEXT), \
                 CAST(disqualified_missing_ip AS TEXT), CAST(disqualified_shared_ip AS TEXT), \
                 CAST(disqualified_duplicate_ip AS TEXT), CAST(bonus_slots AS TEXT), badge \
                 FROM referral_rewards ORDER BY referrer_user_id",
            )
            .await;
        let subs = self
            .rows("SELECT CAST(user_id AS TEXT), tier, status, CAST(referral_bonus_domains AS TEXT) FROM subscriptions")
            .await
            .into_iter()
            .map(|r| (r[0].clone().unwrap(), r[1..].to_vec()))
            .collect();
        (rewards, subs)
    }

    /// Host column per user.
    pub async fn bonus(&self, user: i64) -> Option<i64> {
        let rows = self
            .rows(&format!(
                "SELECT CAST(referral_bonus_domains AS TEXT) FROM subscriptions WHERE user_id = {user}"
            ))
            .await;
        rows.first()
            .and_then(|r| r[0].as_ref())
            .map(|v| v.parse().unwrap())
    }

    /// The `referral_rewards` row of a referrer, as text, without its run id.
    pub async fn reward_row(&self, user: i64) -> Option<Vec<Option<String>>> {
        self.rows(&format!(
            "SELECT CAST(referred_users_total AS TEXT), CAST(qualified_referrals AS TEXT), \
             CAST(disqualified_self_referral AS TEXT), CAST(disqualified_cooldown AS TEXT), \
             CAST(disqualified_missing_ip AS TEXT), CAST(disqualified_shared_ip AS TEXT), \
             CAST(disqualified_duplicate_ip AS TEXT), CAST(bonus_slots AS TEXT), badge \
             FROM referral_rewards WHERE referrer_user_id = {user}"
        ))
        .await
        .into_iter()
        .next()
    }

    pub async fn reconcile(
        &self,
        scope: Scope,
        as_of: Instant,
        dry_run: bool,
    ) -> Result<RunReport, EngineError> {
        self.reconcile_with(&Config::default(), scope, as_of, dry_run)
            .await
    }

    pub async fn reconcile_with(
        &self,
        cfg: &Config,
        scope: Scope,
        as_of: Instant,
        dry_run: bool,
    ) -> Result<RunReport, EngineError> {
        let store = self.store().await;
        let r = engine::run(
            &store,
            cfg,
            RunRequest {
                scope,
                as_of,
                dry_run,
            },
        )
        .await;
        store.close().await;
        r
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let (Some(name), Some(base)) = (self.pg_name.take(), pg_base_url()) {
            // Best effort, on a thread of its own: Drop cannot await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&base).await {
                        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&mut c)
                        .await;
                    }
                });
            })
            .join();
        }
    }
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    t % 100_000
}

/// Host rows for a fixture, written with plain INSERTs on either backend.
#[derive(Debug, Clone, Default)]
pub struct Fixture {
    pub users: Vec<U>,
    pub subs: Vec<S>,
    pub events: Vec<E>,
}

#[derive(Debug, Clone)]
pub struct U {
    pub id: i64,
    pub created_at: Instant,
    pub is_active: bool,
    pub is_verified: bool,
    pub invite_code: Option<String>,
    pub referred_by: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct S {
    pub user_id: i64,
    pub tier: String,
    pub status: String,
    pub bonus: i64,
    pub started_at: Option<Instant>,
    pub expires_at: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct E {
    pub id: i64,
    pub user_id: Option<i64>,
    pub name: String,
    pub ip_hash: Option<String>,
    pub created_at: Instant,
}

/// A SQL text literal, or NULL.
pub fn lit(s: &Option<String>) -> String {
    s.as_ref()
        .map_or_else(|| "NULL".into(), |v| format!("'{}'", v.replace('\'', "''")))
}

impl TestDb {
    /// Inserts a fixture's rows in the order given (tests shuffle it).
    pub async fn load(&self, f: &Fixture) {
        self.load_with(f, &mut |t| self.ts(t)).await;
    }

    /// [`TestDb::load`] with each time written as the SQL literal `time` makes of it (SQLite
    /// tests write every accepted text form).
    pub async fn load_with(&self, f: &Fixture, time: &mut dyn FnMut(Instant) -> String) {
        let sql = self.load_sql(f, time);
        self.exec(&sql).await;
    }

    /// The SQL [`TestDb::load_with`] runs (tests that load through views wrap it).
    pub fn load_sql(&self, f: &Fixture, time: &mut dyn FnMut(Instant) -> String) -> String {
        let mut sql = String::new();
        if self.is_pg() {
            sql.push_str("BEGIN; SET CONSTRAINTS ALL DEFERRED;\n");
        } else {
            sql.push_str("PRAGMA foreign_keys = OFF; BEGIN;\n");
        }
        for u in &f.users {
            sql.push_str(&format!(
                "INSERT INTO users (id, email, created_at, is_active, is_verified, invite_code, referred_by_user_id) \
                 VALUES ({}, 'u{}@example.com', {}, {}, {}, {}, {});\n",
                u.id,
                u.id,
                time(u.created_at),
                self.bool(u.is_active),
                self.bool(u.is_verified),
                lit(&u.invite_code),
                u.referred_by.map_or("NULL".into(), |r| r.to_string())
            ));
        }
        for s in &f.subs {
            sql.push_str(&format!(
                "INSERT INTO subscriptions (user_id, tier, status, referral_bonus_domains, started_at, expires_at) \
                 VALUES ({}, {}, {}, {}, {}, {});\n",
                s.user_id,
                lit(&Some(s.tier.clone())),
                lit(&Some(s.status.clone())),
                s.bonus,
                s.started_at.map_or_else(|| "NULL".into(), &mut *time),
                s.expires_at.map_or_else(|| "NULL".into(), &mut *time)
            ));
        }
        for e in &f.events {
            sql.push_str(&format!(
                "INSERT INTO telemetry_events (id, user_id, event_name, ip_hash, created_at) VALUES ({}, {}, {}, {}, {});\n",
                e.id,
                e.user_id.map_or("NULL".into(), |u| u.to_string()),
                lit(&Some(e.name.clone())),
                lit(&e.ip_hash),
                time(e.created_at)
            ));
        }
        sql.push_str("COMMIT;\n");
        if !self.is_pg() {
            sql.push_str("PRAGMA foreign_keys = ON;\n");
        }
        sql
    }
}

pub fn at(s: &str) -> Instant {
    instant::parse_sql_text(s).expect("time")
}

pub const DAY: i64 = instant::MICROS_PER_DAY;

/// Runs `f` once per backend that is available.
#[macro_export]
macro_rules! each_backend {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(db) = TestDb::new(Backend::Sqlite).await {
                    ($body)(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg_timestamp() {
                if let Some(db) = TestDb::new(Backend::PgTimestamp).await {
                    ($body)(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg_timestamptz() {
                if let Some(db) = TestDb::new(Backend::PgTimestamptz).await {
                    ($body)(db).await;
                }
            }
        }
    };
}

/// A handshake with a running engine through its progress hook: when the run reports a stage
/// whose message starts with `stage`, the hook tells the test (`reached`) and, if `hold`, blocks
/// the run right there until the test calls [`Pause::resume`]. No sleeps: the test acts exactly
/// when the run is at that point.
pub struct Pause {
    reached: tokio::sync::mpsc::UnboundedReceiver<String>,
    resume: std::sync::mpsc::Sender<()>,
}

impl Pause {
    pub fn at(stage: &'static str, hold: bool) -> (engine::Progress, Pause) {
        let (reached_tx, reached) = tokio::sync::mpsc::unbounded_channel();
        let (resume, resume_rx) = std::sync::mpsc::channel::<()>();
        let resume_rx = std::sync::Mutex::new(resume_rx);
        let hook: engine::Progress = std::sync::Arc::new(move |what: &str| {
            if what.starts_with(stage) {
                let _ = reached_tx.send(what.to_owned());
                if hold {
                    // Off the runtime's worker: a task it would run next (the test's, woken by
                    // the send above) must not wait behind this block.
                    tokio::task::block_in_place(|| {
                        let _ = resume_rx.lock().unwrap().recv();
                    });
                }
            }
        });
        (hook, Pause { reached, resume })
    }

    /// Waits until the run reaches the stage; returns the stage's message.
    pub async fn reached(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(60), self.reached.recv())
            .await
            .expect("the run never reached the stage")
            .expect("the run ended before the stage")
    }

    pub fn resume(&self) {
        let _ = self.resume.send(());
    }
}

/// Starts an applying (or dry) run on its own store in a task, steered by `progress`.
pub fn spawn_run(
    url: String,
    opts: ConnectOptions,
    cfg: Config,
    req: RunRequest,
    progress: Option<engine::Progress>,
) -> tokio::task::JoinHandle<Result<RunReport, EngineError>> {
    tokio::spawn(async move {
        let store = Store::connect(&url, &opts).await.expect("store");
        let ctl = engine::RunControl {
            progress,
            ..engine::RunControl::default()
        };
        let r = engine::run_controlled(&store, &cfg, req, &ctl).await;
        store.close().await;
        r
    })
}

impl TestDb {
    /// The options the tests' stores use.
    pub fn opts(&self) -> ConnectOptions {
        ConnectOptions {
            read_only: false,
            busy_timeout: Duration::from_secs(10),
            ..ConnectOptions::default()
        }
    }

    /// The database name on PostgreSQL.
    pub fn pg_name(&self) -> Option<&str> {
        self.pg_name.as_deref()
    }
}

/// Runs `f` on each PostgreSQL schema, for what only PostgreSQL has (no SQLite variant that
/// would pass by returning at once).
#[macro_export]
macro_rules! each_pg_backend {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn pg_timestamp() {
                if let Some(db) = TestDb::new(Backend::PgTimestamp).await {
                    ($body)(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn pg_timestamptz() {
                if let Some(db) = TestDb::new(Backend::PgTimestamptz).await {
                    ($body)(db).await;
                }
            }
        }
    };
}

/// The handshake with a real binary held by one of the engine's test holds (which log
/// `test hold: waiting …` once, then wait for their file to go): reads the child's stderr on a
/// thread and returns once that line is logged, failing with `reaching` if it is not within
/// `within`. The handle gives the child's whole log once it ends.
/// The real binary's `reconcile --dry-run` on `url` at [`now`], its stderr piped (for
/// [`wait_for_log`]); the caller adds arguments, the log filter and its stdout.
pub fn dry_run_binary(url: &str) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_referral-rewards"));
    c.args(["--database-url", url, "reconcile", "--dry-run", "--as-of"])
        .arg(referral_rewards::instant::to_rfc3339(now()))
        .stderr(std::process::Stdio::piped());
    c
}

pub fn wait_for_test_hold(
    child: &mut std::process::Child,
    within: Duration,
    reaching: &str,
) -> std::thread::JoinHandle<String> {
    wait_for_log(child, within, reaching, |log| log.contains("test hold"))
}

/// [`wait_for_test_hold`] for any point of the run: returns once `reached` holds of the child's
/// log so far.
pub fn wait_for_log(
    child: &mut std::process::Child,
    within: Duration,
    reaching: &str,
    reached: impl Fn(&str) -> bool,
) -> std::thread::JoinHandle<String> {
    use std::io::BufRead;
    let (lines, log) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("the child's stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            all.push_str(&line);
            all.push('\n');
            let _ = lines.send(line);
        }
        all
    });
    let mut seen = String::new();
    while !reached(&seen) {
        let line = log.recv_timeout(within).expect(reaching);
        seen.push_str(&line);
        seen.push('\n');
    }
    reader
}
