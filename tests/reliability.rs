//! The run lock fences the write; run rows tell the truth; contention happens where the test
//! puts it (a run paused at its write stage through its progress hook), never by chance.

mod common;

use std::time::Duration;

use common::*;
use referral_rewards::config::Config;
use referral_rewards::engine::{EngineError, RunRequest};
use referral_rewards::snapshot::Scope;
use sqlx::Connection;

fn apply_req(as_of: i64) -> RunRequest {
    RunRequest {
        scope: Scope::Full,
        as_of,
        dry_run: false,
    }
}

/// Ledger rows recorded twice for one referrer and field in one as-of: a double write.
async fn duplicated_ledger_rows(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT COUNT(*) FROM (SELECT c.referrer_user_id, c.field, c.new_value FROM reward_changes c \
         GROUP BY c.referrer_user_id, c.field, c.new_value HAVING COUNT(*) > 1) AS d",
    )
    .await
}

async fn run_rows(db: &TestDb) -> Vec<(String, Option<String>)> {
    db.rows("SELECT status, error FROM reward_runs ORDER BY id")
        .await
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone()))
        .collect()
}

/// The server closes the lock's connection mid-run (as `pg_terminate_backend`, an idle reaper
/// or a network drop would): a second run takes the lock and applies; the first must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_lock_connection_dies_cannot_write() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load(&every_outcome()).await;
    let (hook, mut pause) = Pause::at("writing", true);
    let first = spawn_run(
        db.url.clone(),
        db.opts(),
        Config::default(),
        apply_req(now()),
        Some(hook),
    );
    pause.reached().await;

    // The first run holds the lock on one connection: terminate that backend and wait for it.
    let killed = db
        .scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid, 10000) AS t FROM pg_locks \
             WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) AS k \
             WHERE t",
        )
        .await;
    assert_eq!(killed, 1, "the lock's backend was terminated");

    // The lock is free: a second run takes it and applies everything.
    let second = db.reconcile(Scope::Full, now(), false).await.unwrap();
    let written = second.applied.unwrap().ledger_rows_written as i64;
    assert!(written > 0);

    pause.resume();
    let e = first.await.unwrap().unwrap_err();
    let EngineError::RunFailed { message, .. } = &e else {
        panic!("{e}")
    };
    assert!(message.contains("run lock"), "{message}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM reward_changes").await,
        written,
        "only the second run recorded changes"
    );
    assert_eq!(duplicated_ledger_rows(&db).await, 0);
    let runs = run_rows(&db).await;
    assert_eq!(
        runs[0].0, "failed",
        "the first run says why it ended: {runs:?}"
    );
    assert!(runs[0].1.as_deref().unwrap().contains("run lock"));
    assert_eq!(runs[1].0, "succeeded");
}

/// `idle_session_timeout` on the database: the lock's connection, idle while the run reads and
/// computes, must not be closed under the run (it switches the timeout off for itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_session_timeout_does_not_free_the_lock_mid_run() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load(&every_outcome()).await;
    let name = db.pg_name().unwrap().to_owned();
    db.exec(&format!(
        "ALTER DATABASE {name} SET idle_session_timeout = '200ms'"
    ))
    .await;
    let (hook, mut pause) = Pause::at("writing", true);
    let first = spawn_run(
        db.url.clone(),
        db.opts(),
        Config::default(),
        apply_req(now()),
        Some(hook),
    );
    pause.reached().await;

    // Proof that the timeout is in force and has passed for the lock's connection: an idle
    // probe opened after the lock was taken gets closed by the server.
    let mut probe = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let probe_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut probe)
        .await
        .unwrap();
    let mut watcher = sqlx::PgConnection::connect(&db.url).await.unwrap();
    loop {
        let alive: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = $1")
            .bind(probe_pid)
            .fetch_one(&mut watcher)
            .await
            .unwrap();
        if alive == 0 {
            break;
        }
        // Polled well within the timeout, so the watcher itself never goes idle long enough.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let holders: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&mut watcher)
    .await
    .unwrap();
    assert_eq!(holders, 1, "the run still holds its lock");
    let _ = watcher.close().await;

    let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
    assert!(matches!(e, EngineError::Locked), "{e}");

    pause.resume();
    let report = first.await.unwrap().unwrap();
    assert!(report.applied.unwrap().ledger_rows_written > 0);
    assert_eq!(duplicated_ledger_rows(&db).await, 0);
    assert_eq!(run_rows(&db).await.len(), 1, "the refused run left no row");
}

each_backend!(
    a_run_marked_abandoned_meanwhile_rolls_back_its_write,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let before = db.state().await;
        let (hook, mut pause) = Pause::at("writing", true);
        let run = spawn_run(
            db.url.clone(),
            db.opts(),
            Config::default(),
            apply_req(now()),
            Some(hook),
        );
        pause.reached().await;
        // What another run that took the lock would do to this run's row.
        db.exec("UPDATE reward_runs SET status = 'abandoned'").await;
        pause.resume();
        let e = run.await.unwrap().unwrap_err();
        let EngineError::RunFailed { message, .. } = &e else {
            panic!("{e}")
        };
        assert!(message.contains("no longer running"), "{message}");
        assert_eq!(db.state().await, before, "nothing of the run was committed");
        let runs = run_rows(&db).await;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, "failed", "{runs:?}");
    }
);

each_backend!(
    a_second_run_while_one_is_writing_is_refused,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        // Held inside its write transaction, after its first statement.
        let (hook, mut pause) = Pause::at("inside the write transaction", true);
        let first = spawn_run(
            db.url.clone(),
            db.opts(),
            Config::default(),
            apply_req(now()),
            Some(hook),
        );
        pause.reached().await;
        for scope in [
            Scope::Full,
            Scope::Referrer(1),
            Scope::Shard(referral_rewards::snapshot::Shard::parse("1/2").unwrap()),
        ] {
            let e = db.reconcile(scope, now(), false).await.unwrap_err();
            assert!(matches!(e, EngineError::Locked), "{scope:?}: {e}");
        }
        // A dry run needs no lock.
        db.reconcile(Scope::Full, now(), true).await.unwrap();
        pause.resume();
        let report = first.await.unwrap().unwrap();
        assert!(report.applied.unwrap().ledger_rows_written > 0);
        assert_eq!(
            run_rows(&db).await,
            [("succeeded".to_owned(), None)],
            "one run, the first; the refused ones left no row"
        );
    }
);

/// SQLite busy past the busy timeout: the run fails, and its row says so (the failure is
/// offered again until the database takes it), instead of staying `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_failing_on_a_busy_sqlite_database_records_its_failure() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let before = db.state().await;
    let (hook, mut writing) = Pause::at("writing", true);
    let (retry_hook, mut retrying) = Pause::at("recording the failure", true);
    let both: referral_rewards::engine::Progress = std::sync::Arc::new(move |m: &str| {
        hook(m);
        retry_hook(m);
    });
    let mut opts = db.opts();
    opts.busy_timeout = Duration::from_millis(100);
    let run = spawn_run(
        db.url.clone(),
        opts,
        Config::default(),
        apply_req(now()),
        Some(both),
    );
    writing.reached().await;
    // A host writer holds the database longer than the run's busy timeout.
    let mut host = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut host)
        .await
        .unwrap();
    writing.resume();
    // The write failed, and so did the first attempt to record it: the host lets go now.
    let said = retrying.reached().await;
    assert!(said.contains("busy"), "{said}");
    sqlx::query("COMMIT").execute(&mut host).await.unwrap();
    retrying.resume();

    let e = run.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("database is locked"), "{e}");
    assert_eq!(db.state().await, before);
    let runs = run_rows(&db).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, "failed", "{runs:?}");
    assert!(runs[0].1.as_deref().unwrap().contains("database is locked"));
}

/// The lock follows the file, not the path text: a symlink to the database and `dir/./x.db`
/// find the lock an ordinary path holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lock_is_keyed_on_the_file_not_the_path_text() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let path = db.url.strip_prefix("sqlite://").unwrap().to_owned();
    let path = std::path::Path::new(&path);
    let dir = path.parent().unwrap();
    let link = dir.join("link.db");
    std::os::unix::fs::symlink(path, &link).unwrap();
    let holder = db.store().await;
    let lock = holder.try_lock(Scope::Full).await.unwrap().expect("lock");
    for url in [
        format!("sqlite://{}", link.display()),
        format!(
            "sqlite://{}/./{}",
            dir.display(),
            path.file_name().unwrap().to_str().unwrap()
        ),
    ] {
        let other = referral_rewards::store::Store::connect(&url, &db.opts())
            .await
            .unwrap();
        assert!(
            other.try_lock(Scope::Full).await.unwrap().is_none(),
            "{url} got a second lock"
        );
        other.close().await;
    }
    holder.release(lock).await;
    holder.close().await;
}

/// A typo'd SQLite path: an error naming it, and no file or lock file left behind.
#[tokio::test]
async fn a_missing_sqlite_database_is_not_created_by_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.db");
    let url = format!("sqlite://{}", path.display());
    for read_only in [false, true] {
        let opts = referral_rewards::store::ConnectOptions {
            read_only,
            ..Default::default()
        };
        let e = referral_rewards::store::Store::connect(&url, &opts)
            .await
            .err()
            .expect("refused");
        assert!(e.to_string().contains("no database file"), "{e}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The job never changes the host database's journal mode.
#[tokio::test]
async fn the_journal_mode_of_the_host_database_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.db");
    let url = format!("sqlite://{}", path.display());
    let create = referral_rewards::store::ConnectOptions {
        create: true,
        ..Default::default()
    };
    let store = referral_rewards::store::Store::connect(&url, &create)
        .await
        .unwrap();
    store.migrate(true).await.unwrap();
    store.close().await;
    let store = referral_rewards::store::Store::connect(&url, &Default::default())
        .await
        .unwrap();
    engine_apply(&store).await;
    store.close().await;
    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(mode, "delete");
    assert!(!dir.path().join("host.db-wal").exists());
}

async fn engine_apply(store: &referral_rewards::store::Store) {
    referral_rewards::engine::run(store, &Config::default(), apply_req(now()))
        .await
        .unwrap();
}

// A host transaction holds a subscriptions row the run must write: the run waits at most
// `database.lock_timeout_secs`, then fails saying so, with nothing written. (SQLite has no row
// locks; its busy timeout is tested above.)
each_pg_backend!(
    a_host_row_lock_fails_the_run_after_the_lock_timeout,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let before = db.state().await;
        let (hook, mut pause) = Pause::at("writing", true);
        let mut opts = db.opts();
        opts.lock_timeout = Duration::from_millis(200);
        let run = spawn_run(
            db.url.clone(),
            opts,
            Config::default(),
            apply_req(now()),
            Some(hook),
        );
        pause.reached().await;
        let mut host = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut host).await.unwrap();
        // User 30's bonus is one the run sets back to zero.
        sqlx::query("SELECT 1 FROM subscriptions WHERE user_id = 30 FOR UPDATE")
            .execute(&mut host)
            .await
            .unwrap();
        pause.resume();
        let e = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the run waited for the row lock forever")
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("database.lock_timeout_secs"), "{e}");
        sqlx::query("ROLLBACK").execute(&mut host).await.unwrap();
        assert_eq!(db.state().await, before);
        assert_eq!(run_rows(&db).await[0].0, "failed");
    }
);

// One referrer's bonus beyond the host column's INTEGER: that referrer is reported and left
// unwritten, everyone else is written, and the dry run shows it first.
each_backend!(
    a_bonus_beyond_integer_leaves_only_that_referrer_unwritten,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let mut cfg = Config::default();
        // Referrer 1 has 9 qualified referrals: 3 batches of 800M is beyond 2^31 - 1.
        cfg.rewards.bonus_per_batch = 800_000_000;
        let dry = db
            .reconcile_with(&cfg, Scope::Full, now(), true)
            .await
            .unwrap();
        let errors = dry.plan.write_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, 1);
        assert!(errors[0].1.contains("2400000000"), "{}", errors[0].1);
        assert!(referral_rewards::summary::run_summary(&dry).contains("UNWRITABLE"));

        let applied = db
            .reconcile_with(&cfg, Scope::Full, now(), false)
            .await
            .unwrap();
        assert_eq!(applied.plan.write_errors(), errors);
        assert_eq!(db.reward_row(1).await, None, "referrer 1 left unwritten");
        assert_eq!(db.bonus(1).await, None, "no subscription created for it");
        assert_eq!(db.bonus(30).await, Some(0), "the others were written");
        assert_eq!(db.bonus(40).await, Some(0));
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM reward_changes WHERE referrer_user_id = 1")
                .await,
            0
        );
        let runs = run_rows(&db).await;
        assert_eq!(runs[0].0, "succeeded");
        assert!(
            runs[0].1.as_deref().unwrap().contains("referrer 1"),
            "{runs:?}"
        );
        // A one-referrer run for it says the same and writes nothing.
        let one = db
            .reconcile_with(&cfg, Scope::Referrer(1), now(), false)
            .await
            .unwrap();
        assert_eq!(one.plan.write_errors().len(), 1);
        assert_eq!(db.reward_row(1).await, None);
        // Its row records the same error, verbatim (on PostgreSQL a run that changes nothing
        // sends its end as text: see finish_run_and_release).
        let runs = run_rows(&db).await;
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1], runs[0]);
    }
);

/// A host value above INTEGER (SQLite stores any integer) is only compared: it no longer
/// blocks every apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_host_value_beyond_integer_does_not_block_applies() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    db.exec("UPDATE subscriptions SET referral_bonus_domains = 5000000000 WHERE user_id = 40")
        .await;
    let r = db.reconcile(Scope::Full, now(), false).await.unwrap();
    assert!(r.plan.write_errors().is_empty());
    assert_eq!(db.bonus(40).await, Some(0), "revoked from 5000000000");
    assert_eq!(
        db.rows(
            "SELECT old_value, new_value FROM reward_changes WHERE referrer_user_id = 40 \
             AND field = 'subscriptions.referral_bonus_domains'"
        )
        .await,
        [[Some("5000000000".to_owned()), Some("0".to_owned())]]
    );
}

/// A managed PostgreSQL requires TLS: `sslmode=require` works, every connection of the run is
/// encrypted, and a certificate that cannot be verified is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_over_tls() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    let on: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(match &db.admin {
            Admin::Pg(p) => p,
            Admin::Sqlite(_) => unreachable!(),
        })
        .await
        .unwrap();
    assert_eq!(on, "on", "the test server must have TLS turned on");
    db.load(&every_outcome()).await;
    let url = format!("{}?sslmode=require", db.url);
    let (hook, mut pause) = Pause::at("writing", true);
    let run = spawn_run(
        url.clone(),
        db.opts(),
        Config::default(),
        apply_req(now()),
        Some(hook),
    );
    pause.reached().await;
    let plain = db
        .scalar(
            "SELECT COUNT(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'referral-rewards' AND a.datname = current_database() \
             AND NOT s.ssl",
        )
        .await;
    let encrypted = db
        .scalar(
            "SELECT COUNT(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'referral-rewards' AND a.datname = current_database() \
             AND s.ssl",
        )
        .await;
    assert_eq!(plain, 0);
    assert!(encrypted >= 1, "the run's lock connection is encrypted");
    pause.resume();
    assert!(
        run.await
            .unwrap()
            .unwrap()
            .applied
            .unwrap()
            .ledger_rows_written
            > 0
    );

    // A root certificate that did not sign the server's: refused, naming the problem.
    let dir = tempfile::tempdir().unwrap();
    let wrong_root = dir.path().join("root.pem");
    std::fs::write(&wrong_root, include_str!("data/unrelated-ca.pem")).unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        wrong_root.display()
    );
    let e = referral_rewards::store::Store::connect(&url, &db.opts())
        .await
        .err()
        .expect("an unverifiable server is refused");
    let e = e.to_string();
    assert!(
        e.contains("certificate") || e.contains("tls") || e.contains("TLS"),
        "{e}"
    );
}

/// Makes every commit that marks a run `succeeded` wait (a deferred trigger) on advisory lock
/// 4242, and returns the connection to take and release it on.
async fn hold_commits(db: &TestDb) -> sqlx::PgConnection {
    db.exec(
        "CREATE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_advisory_lock(4242); PERFORM pg_advisory_unlock(4242); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER wait_at_commit AFTER UPDATE ON reward_runs \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'succeeded') \
         EXECUTE FUNCTION wait_at_commit();",
    )
    .await;
    sqlx::PgConnection::connect(&db.url).await.unwrap()
}

/// Waits until a commit in this test's database waits on lock 4242, which `holder` holds
/// (other tests hold theirs in their own databases).
async fn until_a_commit_waits(holder: &mut sqlx::PgConnection) {
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND objid = 4242 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut *holder)
        .await
        .unwrap();
        if waiting == 1 {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// A shutdown's abort that lands while the commit is in flight, and the commit completes: the
/// run says its writes are in (not "wrote nothing"). The commit is held by a deferred trigger
/// waiting on an advisory lock the test holds, so the abort happens exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abort_during_a_commit_that_lands_is_reported_as_landed() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load(&every_outcome()).await;
    let mut holder = hold_commits(&db).await;
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    let abort = tokio_util::sync::CancellationToken::new();
    let (url, opts, token) = (db.url.clone(), db.opts(), abort.clone());
    let run = tokio::spawn(async move {
        let store = referral_rewards::store::Store::connect(&url, &opts)
            .await
            .unwrap();
        let ctl = referral_rewards::engine::RunControl {
            abort: token,
            ..Default::default()
        };
        let r = referral_rewards::engine::run_controlled(
            &store,
            &Config::default(),
            apply_req(now()),
            &ctl,
        )
        .await;
        store.close().await;
        r
    });
    until_a_commit_waits(&mut holder).await;
    abort.cancel();
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    let e = run.await.unwrap().unwrap_err();
    assert!(matches!(e, EngineError::CommittedBeforeAbort { .. }), "{e}");
    assert_eq!(run_rows(&db).await[0].0, "succeeded");
    assert!(db.scalar("SELECT COUNT(*) FROM reward_changes").await > 0);
}
/// Makes every binary COPY that reads `users` fail with `code`: `users` becomes a view over the
/// table that calls a guard raising it when the statement is a COPY. An IMMUTABLE guard is
/// evaluated while the COPY is planned, so the COPY statement itself is refused (before any
/// data); a VOLATILE one on the first row, in the middle of the data. `only_after_probe` spares
/// the job's probe (`… LIMIT 0) TO STDOUT`), so that the COPY statement proper is refused. The
/// same queries as SELECTs pass.
async fn guard_copy(db: &TestDb, code: &str, volatility: &str, only_after_probe: bool) {
    let probe = if only_after_probe {
        r" AND current_query() !~ 'LIMIT 0\) TO STDOUT'"
    } else {
        ""
    };
    db.exec(&format!(
        r#"CREATE OR REPLACE FUNCTION rr_copy_guard() RETURNS boolean LANGUAGE plpgsql {volatility} AS $$
           BEGIN
             IF current_query() ~* '^\s*COPY'{probe} THEN
               RAISE EXCEPTION 'COPY is not allowed to read users' USING ERRCODE = '{code}';
             END IF;
             RETURN true;
           END $$;
           DO $$ BEGIN
             IF to_regclass('users_t') IS NULL THEN
               ALTER TABLE users RENAME TO users_t;
             ELSE
               DROP VIEW users;
             END IF;
           END $$;
           CREATE VIEW users AS SELECT * FROM users_t WHERE rr_copy_guard();"#
    ))
    .await;
}

async fn unguard_copy(db: &TestDb) {
    db.exec(
        "CREATE OR REPLACE FUNCTION rr_copy_guard() RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'",
    )
    .await;
}

async fn pg_store(db: &TestDb, copy: bool) -> referral_rewards::store::Store {
    let mut opts = db.opts();
    opts.pg_binary_copy = copy;
    referral_rewards::store::Store::connect(&db.url, &opts)
        .await
        .unwrap()
}

fn window() -> (i64, i64) {
    referral_rewards::program::slots::rules::ip_window(now(), 30)
}

// A server that refuses binary COPY (here with feature_not_supported, at the COPY statement
// itself or in the middle of its data): the snapshot falls back to SELECT on the same
// connection and transaction, with the same results as through COPY, and COPY stays off for the
// rest of the process. It used to leave the connection out of step ("expected ParseComplete,
// got ReadyForQuery") when the statement itself was refused.
each_pg_backend!(
    a_refused_copy_falls_back_to_select,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let store = pg_store(&db, true).await;
        assert!(
            store
                .snapshot(Scope::Full, window(), None)
                .await
                .unwrap()
                .via_copy
        );
        let expected = referral_rewards::engine::run(
            &store,
            &Config::default(),
            RunRequest {
                dry_run: true,
                ..apply_req(now())
            },
        )
        .await
        .unwrap()
        .plan
        .digest;
        store.close().await;

        for (volatility, only_after_probe) in [
            ("IMMUTABLE", false),
            ("IMMUTABLE", true),
            ("VOLATILE", false),
        ] {
            guard_copy(&db, "0A000", volatility, only_after_probe).await;
            let store = pg_store(&db, true).await;
            let why = format!("{volatility}, only after the probe: {only_after_probe}");
            let snap = store.snapshot(Scope::Full, window(), None).await.unwrap();
            assert!(!snap.via_copy, "{why}");
            assert!(!snap.referred.is_empty(), "{why}");
            // The store keeps reading with SELECT, including a one-referrer run.
            let dry = referral_rewards::engine::run(
                &store,
                &Config::default(),
                RunRequest {
                    dry_run: true,
                    ..apply_req(now())
                },
            )
            .await
            .unwrap();
            assert_eq!(dry.plan.digest, expected, "{why}");
            let snap = store.snapshot(Scope::Full, window(), None).await.unwrap();
            assert!(!snap.via_copy, "{why}");
            store
                .snapshot(Scope::Referrer(1), window(), None)
                .await
                .unwrap();
            store.close().await;
        }

        // An applying run through the fallback writes what the COPY snapshot planned.
        let store = pg_store(&db, true).await;
        let applied = referral_rewards::engine::run(&store, &Config::default(), apply_req(now()))
            .await
            .unwrap();
        store.close().await;
        assert_eq!(applied.plan.digest, expected);
        assert_eq!(
            db.reward_row(1).await.unwrap(),
            row(
                ["25", "9", "0", "2", "3", "3", "2", "15"],
                Some("verified_referrer")
            )
        );
        assert_eq!(run_rows(&db).await, [("succeeded".to_owned(), None)]);
    }
);

// A COPY error that is not a refusal (a failing function, at the statement or in the data)
// fails the snapshot and the run, with a clear message, and does not switch COPY off: once the
// cause is gone, the same store reads with COPY again.
each_pg_backend!(
    a_copy_error_that_is_no_refusal_fails_the_run_and_keeps_copy,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        for volatility in ["IMMUTABLE", "VOLATILE"] {
            guard_copy(&db, "P0001", volatility, false).await;
            let before = db.state().await;
            let store = pg_store(&db, true).await;
            let e = referral_rewards::engine::run(&store, &Config::default(), apply_req(now()))
                .await
                .unwrap_err();
            let EngineError::RunFailed { message, .. } = &e else {
                panic!("{e}")
            };
            assert!(
                message.contains("binary COPY failed")
                    && message.contains("COPY is not allowed to read users")
                    && message.contains("P0001"),
                "{volatility}: {message}"
            );
            assert_eq!(db.state().await, before, "{volatility}");
            assert_eq!(run_rows(&db).await.last().unwrap().0, "failed");

            unguard_copy(&db).await;
            let snap = store.snapshot(Scope::Full, window(), None).await.unwrap();
            assert!(snap.via_copy, "{volatility}: COPY is still on");
            store.close().await;
        }
    }
);

/// Every finished run leaves a dead entry in the partial index of `running` rows until a
/// vacuum. A run's start checks that index for orphans: read as a bitmap scan it would visit
/// each dead row in the table on every start (3 ms after 12,000 runs with autovacuum off) and
/// mark none; read as a plain index scan it marks them dead once, and later scans skip them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_start_marks_the_dead_entries_of_finished_runs() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load(&every_outcome()).await;
    // 6,000 finished runs, as one-referrer runs leave them, and no vacuum to clean up.
    db.exec("ALTER TABLE reward_runs SET (autovacuum_enabled = false)")
        .await;
    db.exec(
        "INSERT INTO reward_runs (mode, as_of, started_at, status) \
         SELECT 'referrer', now(), now(), 'running' FROM generate_series(1, 6000)",
    )
    .await;
    db.exec("UPDATE reward_runs SET status = 'succeeded', finished_at = now()")
        .await;
    let heap_pages = db
        .scalar("SELECT pg_relation_size('reward_runs') / current_setting('block_size')::int")
        .await;
    assert!(heap_pages >= 60, "{heap_pages} pages");

    // The blocks a bitmap scan of the index reads: the index's few, and the table's block of
    // every entry not yet marked dead (a bitmap scan skips marked entries but marks none).
    let unmarked_blocks = || async {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let plan: Vec<String> = sqlx::raw_sql(
            "SET enable_indexscan = off; SET enable_seqscan = off; \
             EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM reward_runs WHERE status = 'running'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get(r, 0))
        .collect();
        assert!(
            plan[0].contains("Bitmap Heap Scan on reward_runs"),
            "{plan:?}"
        );
        // The top node's line, its child's included: "Buffers: shared hit=N read=M".
        let buffers = plan.iter().find(|l| l.contains("Buffers: shared")).unwrap();
        buffers
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| ["hit", "read"].contains(k))
            .map(|(_, v)| v.parse::<i64>().unwrap())
            .sum::<i64>()
    };
    let before = unmarked_blocks().await;
    assert!(before >= 60, "{before} blocks");

    // An entry is marked once its row is dead to every transaction on the server; those of
    // tests running beside this one can delay that, so a few runs may be needed. With a bitmap
    // scan at the start no number of runs would mark them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for runs in 1.. {
        db.reconcile(Scope::Referrer(1), now(), false)
            .await
            .expect("one-referrer apply");
        let after = unmarked_blocks().await;
        if after < 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{runs} runs' starts left the dead entries unmarked: a scan still reads {after} blocks"
        );
    }
}

/// A run that changes nothing ends in one message: its run row, committed, then the lock
/// released. The release must follow the commit: while the commit waits (a deferred trigger
/// on a lock the test holds), the run lock is still held, so no other run can start and read
/// the state before this run's end is in. Once the run returns, the lock is free, and the next
/// run starts on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_that_changes_nothing_releases_its_lock_after_its_commit() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load(&every_outcome()).await;
    let store = db.store().await;
    let one = || RunRequest {
        scope: Scope::Referrer(1),
        as_of: now(),
        dry_run: false,
    };
    referral_rewards::engine::run(&store, &Config::default(), one())
        .await
        .unwrap();
    let mut holder = hold_commits(&db).await;
    let run_lock_holders = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                            AND NOT (classid = 0 AND objid = 4242) AND database = \
                            (SELECT oid FROM pg_database WHERE datname = current_database())";
    let store = std::sync::Arc::new(store);
    let mut lock_backends = vec![];
    for _ in 0..2 {
        sqlx::query("SELECT pg_advisory_lock(4242)")
            .execute(&mut holder)
            .await
            .unwrap();
        let run = {
            let (store, req) = (store.clone(), one());
            tokio::spawn(async move {
                referral_rewards::engine::run(&store, &Config::default(), req).await
            })
        };
        // The run's end is committing, held by the trigger.
        until_a_commit_waits(&mut holder).await;
        let holders: Vec<i32> = sqlx::query_scalar(run_lock_holders)
            .fetch_all(&mut holder)
            .await
            .unwrap();
        assert_eq!(
            holders.len(),
            1,
            "the run lock was released before the run's end committed"
        );
        lock_backends.push(holders[0]);
        sqlx::query("SELECT pg_advisory_unlock(4242)")
            .execute(&mut holder)
            .await
            .unwrap();
        let r = run.await.unwrap().unwrap();
        assert_eq!(
            r.applied.unwrap().reward_rows_written,
            0,
            "nothing to change"
        );
        let holders: Vec<i32> = sqlx::query_scalar(run_lock_holders)
            .fetch_all(&mut holder)
            .await
            .unwrap();
        assert!(holders.is_empty(), "the lock is held after the run");
    }
    assert_eq!(
        lock_backends[0], lock_backends[1],
        "the next run starts on the same connection"
    );
    assert_eq!(
        run_rows(&db)
            .await
            .iter()
            .map(|r| r.0.as_str())
            .collect::<Vec<_>>(),
        ["succeeded"; 3]
    );
}
