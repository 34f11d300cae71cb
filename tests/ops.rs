//! Operating the job on a real host database: host schemas that are not the reference one
//! (enums, views in another schema), the job's migration history beside the host app's,
//! `check`, environment overrides. Over real databases and the real binary.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use referral_rewards::config::Config;
use referral_rewards::snapshot::Scope;

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");

/// The binary with `args`, in `dir`, with `env` set and nothing inherited that steers it.
fn bin(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("REFERRAL_REWARDS_") && k.contains("__") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c.output().expect("run the binary")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A host whose `subscriptions.tier` and `.status` are PostgreSQL enums, its tables in schema
/// `app`, exposed to the job through views in schema `rr` (the job's `search_path`, set in its
/// URL): full runs (COPY and the SELECT fallback), dry runs, one-referrer runs (explain, and an
/// apply that creates a subscription through the view) all read and write it as a text column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_host_columns_through_views_in_another_schema() {
    use referral_rewards::engine::{self, RunRequest};
    use referral_rewards::store::{ConnectOptions, Store};
    let Some(reference) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    let db = TestDb::empty(Backend::PgTimestamp).await.unwrap();
    let fixture = every_outcome();
    reference.load(&fixture).await;
    let expected = reference.reconcile(Scope::Full, now(), true).await.unwrap();
    let expected_one = reference
        .reconcile(Scope::Referrer(1), now(), true)
        .await
        .unwrap();

    db.exec(&format!(
        "CREATE SCHEMA app; CREATE SCHEMA rr;
         CREATE TYPE app.tier AS ENUM ('scout', 'trader', 'Trader', 'tycoon');
         CREATE TYPE app.sub_status AS ENUM ('active', 'past_due', 'canceled');
         SET search_path = app;
         {}
         {}
         ALTER TABLE subscriptions ALTER tier TYPE app.tier USING tier::app.tier,
                                   ALTER status TYPE app.sub_status USING status::app.sub_status;
         RESET search_path;
         CREATE VIEW rr.users AS SELECT * FROM app.users;
         CREATE VIEW rr.subscriptions AS SELECT * FROM app.subscriptions;
         CREATE VIEW rr.telemetry_events AS SELECT * FROM app.telemetry_events;
         CREATE VIEW rr.payments AS SELECT * FROM app.payments;",
        include_str!("../sql/reference/postgres.sql"),
        include_str!("../sql/reference/postgres_indexes.sql"),
    ))
    .await;
    let load = db.load_sql(&fixture, &mut |t| db.ts(t));
    db.exec(&format!("SET search_path = rr; {load} RESET search_path;"))
        .await;

    let url = format!("{}?options=-c%20search_path%3Drr", db.url);
    let copy = Store::connect(&url, &db.opts()).await.unwrap();
    let select = Store::connect(
        &url,
        &ConnectOptions {
            pg_binary_copy: false,
            ..db.opts()
        },
    )
    .await
    .unwrap();
    copy.migrate(false).await.unwrap();
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'rr' AND tablename = 'reward_runs'"
        )
        .await,
        1,
        "the job's tables go to the first schema of its search_path"
    );
    let cfg = Config::default();
    let run = |store: &'static Store, scope: Scope, dry_run: bool| {
        let cfg = cfg.clone();
        async move {
            engine::run(
                store,
                &cfg,
                RunRequest {
                    scope,
                    as_of: now(),
                    dry_run,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{scope:?} dry_run={dry_run}: {e}"))
        }
    };
    let copy: &'static Store = Box::leak(Box::new(copy));
    let select: &'static Store = Box::leak(Box::new(select));

    let dry = run(copy, Scope::Full, true).await;
    assert!(dry.computation.results.len() > 1);
    assert_eq!(dry.plan.digest, expected.plan.digest, "full dry run, COPY");
    let dry = run(select, Scope::Full, true).await;
    assert_eq!(
        dry.plan.digest, expected.plan.digest,
        "full dry run, SELECT"
    );
    // explain: one referrer's referrals and outcomes.
    let one = run(copy, Scope::Referrer(1), true).await;
    assert_eq!(
        one.computation.referrals,
        expected_one.computation.referrals
    );
    assert_eq!(one.plan.digest, expected_one.plan.digest);
    // A one-referrer apply that creates referrer 1's subscription through the view.
    let applied = run(select, Scope::Referrer(1), false).await;
    assert_eq!(applied.applied.unwrap().host_values_written, 1);
    assert_eq!(
        db.rows("SELECT tier::text, status::text, referral_bonus_domains::text FROM app.subscriptions WHERE user_id = 1")
            .await,
        [[Some("scout".into()), Some("active".into()), Some("15".into())]]
    );
    // The full apply, through the SELECT fallback, then COPY: nothing left to write.
    let full = run(select, Scope::Full, false).await;
    assert!(full.applied.unwrap().reward_rows_written > 0);
    let again = run(copy, Scope::Full, false).await;
    let a = again.applied.unwrap();
    assert_eq!((a.reward_rows_written, a.host_values_written), (0, 0));
    assert_eq!(
        db.scalar("SELECT count(*) FROM rr.reward_runs WHERE status = 'succeeded'")
            .await,
        3
    );
    // `check` sees the views, their enum columns, and says it cannot see their indexes.
    let dir = tempfile::tempdir().unwrap();
    let (code, v, e) = check_json(dir.path(), &url, &[]);
    assert_eq!(code, 0, "{v} {e}");
    assert_eq!(v["tables"][1]["kind"], "view", "{v}");
    assert_eq!(v["tables"][1]["columns"][2]["data_type"], "app.tier", "{v}");
    assert!(
        v["indexes"][0]["note"].as_str().unwrap().contains("view"),
        "{v}"
    );
}

/// Runs the body on an empty SQLite database and an empty PostgreSQL one (nothing migrated).
macro_rules! sqlite_and_pg {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(db) = TestDb::empty(Backend::Sqlite).await {
                    ($body)(db).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg() {
                if let Some(db) = TestDb::empty(Backend::PgTimestamp).await {
                    ($body)(db).await;
                }
            }
        }
    };
}

/// A host application's own sqlx migrator, with its first `n` migrations.
fn app_migrator(n: usize) -> sqlx::migrate::Migrator {
    use sqlx::SqlSafeStr;
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let all = [
        (
            20240101000000,
            "app things",
            "CREATE TABLE app_things (id BIGINT)",
        ),
        (
            20240201000000,
            "app more",
            "CREATE TABLE app_more (id BIGINT)",
        ),
    ];
    Migrator::with_migrations(
        all[..n]
            .iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    (*d).into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The job's migrations as versions before this one recorded them: in `_sqlx_migrations`.
fn legacy_job_migrator(db: &TestDb) -> sqlx::migrate::Migrator {
    match db.backend {
        Backend::Sqlite => sqlx::migrate!("sql/migrations/sqlite"),
        _ => sqlx::migrate!("sql/migrations/postgres"),
    }
}

async fn run_migrator(db: &TestDb, m: &sqlx::migrate::Migrator) -> Result<(), String> {
    match &db.admin {
        Admin::Sqlite(p) => m.run(p).await,
        Admin::Pg(p) => m.run(p).await,
    }
    .map_err(|e| e.to_string())
}

async fn versions(db: &TestDb, table: &str) -> Vec<i64> {
    db.rows(&format!(
        "SELECT CAST(version AS TEXT) FROM {table} ORDER BY version"
    ))
    .await
    .into_iter()
    .map(|r| r[0].as_ref().unwrap().parse().unwrap())
    .collect()
}

fn job_versions(db: &TestDb) -> Vec<i64> {
    legacy_job_migrator(db).iter().map(|m| m.version).collect()
}

sqlite_and_pg!(
    the_job_and_the_host_app_keep_separate_migration_histories,
    |db: TestDb| async move {
        run_migrator(&db, &app_migrator(1)).await.unwrap();
        let store = db.store().await;
        store.migrate(true).await.expect("ours after the app's");
        run_migrator(&db, &app_migrator(2))
            .await
            .expect("the app's after ours");
        store.migrate(false).await.expect("ours again");
        assert_eq!(
            versions(&db, "_sqlx_migrations").await,
            [20240101000000, 20240201000000]
        );
        assert_eq!(
            versions(&db, "referral_rewards_migrations").await,
            job_versions(&db)
        );
        let info = store.migration_info().await.unwrap();
        assert!(
            info.iter().all(|m| m.status == "applied"
                && m.recorded_in == Some("referral_rewards_migrations")
                && m.applied_at.is_some()),
            "{info:?}"
        );
        // The job works on it.
        db.load(&every_outcome()).await;
        db.reconcile(Scope::Full, now(), false).await.unwrap();
    }
);

sqlite_and_pg!(
    migrate_moves_the_jobs_rows_out_of_sqlx_migrations,
    |db: TestDb| async move {
        // An older job recorded its migrations in _sqlx_migrations; the app got along with
        // them only by ignoring what it did not know.
        run_migrator(&db, &legacy_job_migrator(&db)).await.unwrap();
        let mut app = app_migrator(1);
        app.set_ignore_missing(true);
        run_migrator(&db, &app).await.unwrap();
        let before = db
            .rows("SELECT CAST(version AS TEXT), CAST(installed_on AS TEXT) FROM _sqlx_migrations WHERE version < 1000 ORDER BY version")
            .await;
        assert_eq!(before.len(), job_versions(&db).len());

        let store = db.store().await;
        let info = store.migration_info().await.unwrap();
        assert!(
            info.iter()
                .all(|m| m.status == "applied" && m.recorded_in == Some("_sqlx_migrations")),
            "{info:?}"
        );
        store.migrate(false).await.expect("ours, moving its rows");
        assert_eq!(versions(&db, "_sqlx_migrations").await, [20240101000000]);
        assert_eq!(
            db.rows("SELECT CAST(version AS TEXT), CAST(installed_on AS TEXT) FROM referral_rewards_migrations ORDER BY version")
                .await,
            before,
            "moved as they were, with when they were applied"
        );
        // Each migrator now runs on its own history, without ignoring anything.
        run_migrator(&db, &app_migrator(2))
            .await
            .expect("the app's after ours");
        store.migrate(false).await.expect("ours again");
        assert_eq!(
            versions(&db, "_sqlx_migrations").await,
            [20240101000000, 20240201000000]
        );
        let info = store.migration_info().await.unwrap();
        assert!(
            info.iter()
                .all(|m| m.recorded_in == Some("referral_rewards_migrations")),
            "{info:?}"
        );
    }
);

#[test]
fn migrate_info_lists_pending_then_applied_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("rr.db").display());
    // An empty file is an empty SQLite database: nothing applied.
    std::fs::write(dir.path().join("rr.db"), b"").unwrap();
    let o = bin(
        dir.path(),
        &["--database-url", &url, "migrate", "--info"],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let text = out(&o);
    assert!(text.contains("job tables"), "{text}");
    assert!(
        text.lines().skip(1).all(|l| l.contains("pending")),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("rr.db")).unwrap().len(),
        0,
        "--info changes nothing"
    );
    let o = bin(dir.path(), &["--database-url", &url, "migrate"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let o = bin(
        dir.path(),
        &["--database-url", &url, "migrate", "--info"],
        &[],
    );
    let text = out(&o);
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert!(lines.len() >= 3, "{text}");
    for l in lines {
        assert!(
            l.contains("applied") && l.contains("referral_rewards_migrations") && l.contains('T'),
            "{l}"
        );
    }
}

each_backend!(
    referrals_of_a_user_without_invite_code_are_listed_with_their_reason,
    |db: TestDb| async move {
        use referral_rewards::program::slots::rules::Outcome;
        db.load(&every_outcome()).await;
        // User 40 holds no invite code and referred user 41.
        let one = db
            .reconcile(Scope::Referrer(40), now(), true)
            .await
            .unwrap();
        let listed = one.computation.listed();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(
            (
                listed[0].referrer_user_id,
                listed[0].referred_user_id,
                listed[0].outcome
            ),
            (40, 41, Outcome::ReferrerWithoutInviteCode)
        );
        assert!(one.computation.referrals.is_empty(), "counted nowhere");
        let cfg = referral_rewards::config::Config::default();
        let e = referral_rewards::explain::referrer(&one, &cfg, 40, None);
        assert!(!e.is_referrer);
        let text = referral_rewards::explain::referrer_text(&e, &cfg);
        assert!(
            text.contains("referrer_without_invite_code") && !text.contains("no referred users"),
            "{text}"
        );

        // The binary: explain, and the per-referral report of a full dry run.
        let dir = tempfile::tempdir().unwrap();
        let as_of = "2026-11-01T12:00:00Z";
        let o = bin(
            dir.path(),
            &[
                "--database-url",
                &db.url,
                "explain",
                "--referrer",
                "40",
                "--as-of",
                as_of,
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let text = out(&o);
        assert!(
            text.lines()
                .any(|l| l.contains("41") && l.contains("referrer_without_invite_code")),
            "{text}"
        );
        let o = bin(
            dir.path(),
            &[
                "--database-url",
                &db.url,
                "reconcile",
                "--dry-run",
                "--as-of",
                as_of,
                "--report",
                "audit.csv",
                "--per-referral",
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let rows = std::fs::read_to_string(dir.path().join("audit.referrals.csv")).unwrap();
        assert!(
            rows.lines()
                .any(|l| l.starts_with("40,41,referrer_without_invite_code,")),
            "{rows}"
        );
        // Listing them changes no count: the digest is the one of a run that does not.
        let full = db.reconcile(Scope::Full, now(), true).await.unwrap();
        assert!(full.computation.uncounted.is_empty());
        assert!(out(&o).contains(&full.plan.digest), "{}", out(&o));
        assert_eq!(
            rows.lines().count() - 1,
            full.computation.referrals.len() + 1,
            "every counted referral and the uncounted one"
        );
    }
);

/// `REFERRAL_REWARDS_<TABLE>__<KEY>` overrides a config key for the binary, and a bad value is
/// refused like a bad file value, naming the variable.
#[test]
fn environment_overrides_reach_the_binary_and_bad_values_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[database]\nurl = \"sqlite://from-file.db\"\n",
    )
    .unwrap();
    let url = format!("sqlite://{}", dir.path().join("from-env.db").display());
    let o = bin(
        dir.path(),
        &["migrate"],
        &[("REFERRAL_REWARDS_DATABASE__URL", &url)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(dir.path().join("from-env.db").exists());
    assert!(!dir.path().join("from-file.db").exists());

    let o = bin(
        dir.path(),
        &["runs"],
        &[("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS", "-3")],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = err(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains("rules.cooldown_days") && e.contains("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS"),
        "{e}"
    );
    let o = bin(
        dir.path(),
        &["runs"],
        &[("REFERRAL_REWARDS_HTTP__MAX_CONNECTION", "3")],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("REFERRAL_REWARDS_HTTP__MAX_CONNECTION"),
        "{}",
        err(&o)
    );
}

/// `check --format json` on `url` with `extra` global arguments (and `--audit`, put after the
/// command): the exit code, the report and stderr.
fn check_json(dir: &Path, url: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args = vec!["--database-url", url];
    args.extend(extra.iter().filter(|a| **a != "--audit"));
    args.extend(["check", "--format", "json"]);
    args.extend(extra.iter().filter(|a| **a == "--audit"));
    let o = bin(dir, &args, &[]);
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", out(&o), err(&o)));
    (o.status.code().unwrap(), v, err(&o))
}

/// config.toml with its two example grant programs enabled, in `dir`.
fn grants_config(dir: &Path) -> String {
    let text =
        referral_rewards::config::enable_grant_examples(include_str!("../config.toml")).unwrap();
    let path = dir.join("grants.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

sqlite_and_pg!(
    check_reports_a_healthy_database_a_missing_index_and_missing_payments,
    |db: TestDb| async move {
        let dir = tempfile::tempdir().unwrap();
        let o = bin(
            dir.path(),
            &[
                "--database-url",
                &db.url,
                "migrate",
                "--with-reference-schema",
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
        let (code, v, e) = check_json(dir.path(), &db.url, &[]);
        assert_eq!(code, 0, "{v} {e}");
        assert_eq!(v["ok"], true);
        assert_eq!(v["warnings"], serde_json::json!([]), "{v}");
        assert!(
            v["indexes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["present"].is_string()),
            "{v}"
        );
        let users = &v["tables"][0];
        assert_eq!(users["name"], "users");
        assert!(
            users["columns"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["verdict"] == "ok"),
            "{v}"
        );
        assert!(
            v["migrations"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["status"] == "applied")
        );
        if db.is_pg() {
            assert_eq!(users["columns"][0]["data_type"], "bigint", "{v}");
        }

        // A missing recommended index is a warning: still exit 0.
        db.exec("DROP INDEX users_referred_by").await;
        let (code, v, _) = check_json(dir.path(), &db.url, &[]);
        assert_eq!(code, 0, "{v}");
        let warnings = v["warnings"].to_string();
        assert!(
            warnings.contains("CREATE INDEX ON users (referred_by_user_id)"),
            "{v}"
        );
        let o = bin(dir.path(), &["--database-url", &db.url, "check"], &[]);
        assert_eq!(o.status.code(), Some(0));
        assert!(
            out(&o).contains("MISSING: CREATE INDEX ON users (referred_by_user_id);"),
            "{}",
            out(&o)
        );

        // A grant program reads payments: without the table, no run can succeed.
        let config = grants_config(dir.path());
        let (code, v, _) = check_json(dir.path(), &db.url, &["--config", &config]);
        assert_eq!(code, 0, "{v}");
        db.exec("DROP TABLE payments").await;
        let (code, v, e) = check_json(dir.path(), &db.url, &["--config", &config]);
        assert_eq!(code, 1, "{v}");
        assert_eq!(v["ok"], false);
        assert!(e.contains("payments: no such table"), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        let (code, _, e) = check_json(dir.path(), &db.url, &[]);
        assert_eq!(
            code, 0,
            "the slots program alone does not read payments: {e}"
        );
    }
);

/// The README's GRANT statements, run as they stand (with role names of this test): the job
/// role migrates, passes `check` and applies with grant programs; the read-only role passes
/// `check --audit`, fails `check` (it may not write), and runs dry runs and `runs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grants_are_what_check_wants_and_what_runs_need() {
    let Some(db) = TestDb::empty(Backend::PgTimestamp).await else {
        return;
    };
    let readme = include_str!("../README.md");
    let block = readme
        .split("<!-- grants:begin -->")
        .nth(1)
        .and_then(|r| r.split("<!-- grants:end -->").next())
        .expect("the README's grants block");
    let sql = block
        .trim()
        .trim_start_matches("```sql")
        .trim_end_matches("```");
    let tag = db
        .pg_name()
        .unwrap()
        .trim_start_matches("rr_test_")
        .to_owned();
    let (job, audit) = (format!("rr_job_{tag}"), format!("rr_audit_{tag}"));
    let sql = sql.replace("rr_job", &job).replace("rr_audit", &audit);
    let _roles = DropRoles {
        url: db.url.clone(),
        roles: [audit.clone(), job.clone()],
    };
    db.exec(&format!(
        "{}\n{}",
        include_str!("../sql/reference/postgres.sql"),
        include_str!("../sql/reference/postgres_indexes.sql")
    ))
    .await;
    db.exec(&sql).await;
    db.load(&every_outcome()).await;
    let as_role = |role: &str| {
        let mut u = url::Url::parse(&db.url).unwrap();
        u.set_username(role).unwrap();
        u.to_string()
    };
    let (job_url, audit_url) = (as_role(&job), as_role(&audit));
    let dir = tempfile::tempdir().unwrap();
    let config = grants_config(dir.path());
    let as_of = "2026-11-01T12:00:00Z";
    let run = |url: &str, args: &[&str]| {
        let mut all = vec!["--database-url", url, "--config", &config];
        all.extend_from_slice(args);
        bin(dir.path(), &all, &[])
    };

    let (code, v, e) = check_json(dir.path(), &job_url, &["--config", &config]);
    assert_eq!(code, 1, "not migrated yet: {v}");
    assert!(e.contains("run `referral-rewards migrate`"), "{e}");
    let o = run(&job_url, &["migrate"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'rewards' AND tablename = 'reward_runs'")
            .await,
        1
    );
    let (code, v, e) = check_json(dir.path(), &job_url, &["--config", &config]);
    assert_eq!(code, 0, "{v} {e}");
    assert!(v["connection"].as_str().unwrap().contains(&job), "{v}");
    let (code, v, e) = check_json(dir.path(), &audit_url, &["--config", &config]);
    assert_eq!(code, 1, "{v}");
    assert!(
        e.contains("UPDATE on subscriptions.referral_bonus_domains"),
        "{e}"
    );
    assert_eq!(v["audit_problems"], serde_json::json!([]), "{v}");
    let (code, v, e) = check_json(dir.path(), &audit_url, &["--config", &config, "--audit"]);
    assert_eq!(code, 0, "{v} {e}");

    let o = run(&audit_url, &["reconcile", "--dry-run", "--as-of", as_of]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let o = run(&job_url, &["reconcile", "--as-of", as_of]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let o = run(&audit_url, &["reconcile", "--as-of", as_of]);
    assert_eq!(o.status.code(), Some(1), "the auditor cannot apply");
    let o = run(&audit_url, &["runs"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("succeeded"), "{}", out(&o));
    assert_eq!(
        db.scalar("SELECT count(*) FROM public.subscriptions WHERE user_id = 1 AND tier = 'scout'")
            .await,
        1,
        "the job role created referrer 1's subscription"
    );
}

/// Drops the test's roles (cluster-wide objects) when the test ends, however it ends; declared
/// after the database, so that it runs while the database still exists.
struct DropRoles {
    url: String,
    roles: [String; 2],
}

impl Drop for DropRoles {
    fn drop(&mut self) {
        let (url, [a, b]) = (self.url.clone(), self.roles.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                    let sql = format!(
                        "DROP OWNED BY {a}; DROP OWNED BY {b}; DROP ROLE {a}; DROP ROLE {b};"
                    );
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}
