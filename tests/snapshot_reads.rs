//! The snapshot's read paths. It does not depend on the host's indexes: on the indexes a
//! typical application has (`sql/reference/typical_indexes.sql`) a full run reads exactly the
//! rows it reads on the recommended ones, and computes the same digest. On PostgreSQL, the
//! scans read on connections of their own see the snapshot, not a later commit.

mod common;

use common::*;
use referral_rewards::config::Config;
use referral_rewards::engine::{self, RunRequest};
use referral_rewards::program::slots::rules;
use referral_rewards::snapshot::{Scope, Snapshot};

/// config.toml with its example grant programs enabled, as `make demo` does.
fn grants_config() -> Config {
    let text = referral_rewards::config::enable_grant_examples(include_str!("../config.toml"))
        .expect("config.toml's grant examples");
    let cfg = Config::parse(&text).unwrap();
    assert_eq!(cfg.grants.len(), 2);
    cfg
}

/// The snapshot's rows in one order, without its timings and read path.
fn canonical(mut s: Snapshot) -> String {
    s.referrers.sort_unstable();
    s.referred.sort_by_key(|u| u.id);
    s.registrations.sort();
    s.referrer_events.sort();
    s.stored_rewards.sort_by_key(|r| r.referrer_user_id);
    s.host_bonus.sort_unstable();
    s.uncounted.sort_unstable();
    if let Some(g) = s.grants.as_mut() {
        g.referrals.sort_by_key(|r| (r.referrer_id, r.user_id));
        g.registrations.sort();
        g.referrer_events.sort();
        g.payments.sort_by_key(|p| p.id);
        g.ledger
            .sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    }
    s.timings.clear();
    s.via_copy = false;
    s.side_read = false;
    format!("{s:#?}")
}

/// The names of the indexes on the host tables.
async fn index_names(db: &TestDb) -> Vec<String> {
    let sql = if db.is_pg() {
        "SELECT indexname FROM pg_indexes WHERE tablename IN \
         ('users', 'subscriptions', 'telemetry_events', 'payments') ORDER BY 1"
    } else {
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN \
         ('users', 'subscriptions', 'telemetry_events', 'payments') ORDER BY 1"
    };
    db.rows(sql)
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect()
}

each_backend!(
    typical_indexes_read_the_same_snapshot_as_the_recommended_ones,
    |db: TestDb| async move {
        let cfg = grants_config();
        db.load_demo(4000, 12, now()).await;
        // Stored rewards and ledger rows to read as well, then a change for the next run.
        db.reconcile_with(&cfg, Scope::Full, now(), false)
            .await
            .unwrap();
        db.exec("UPDATE users SET is_verified = NOT is_verified WHERE id % 7 = 3")
            .await;

        let window = rules::ip_window(now(), cfg.rules.ip_window_days);
        let read = engine::grants_read(&cfg);
        let snapshot = |db: &TestDb| {
            let read = read.clone();
            let url = db.url.clone();
            let opts = db.opts();
            async move {
                let store = referral_rewards::store::Store::connect(&url, &opts)
                    .await
                    .unwrap();
                let s = store
                    .snapshot_listing(Scope::Full, window, read, true)
                    .await
                    .unwrap();
                store.close().await;
                s
            }
        };
        let recommended = snapshot(&db).await;
        assert!(recommended.referred.len() > 1000 && !recommended.registrations.is_empty());
        assert!(!recommended.stored_rewards.is_empty());
        assert!(!recommended.grants.as_ref().unwrap().ledger.is_empty());
        let digest = db
            .reconcile_with(&cfg, Scope::Full, now(), true)
            .await
            .unwrap()
            .plan
            .digest;

        let before = index_names(&db).await;
        assert!(before.contains(&"telemetry_events_registration".to_owned()));
        db.exec(include_str!("../sql/reference/typical_indexes.sql"))
            .await;
        db.exec("ANALYZE").await;
        let after = index_names(&db).await;
        assert!(!after.contains(&"telemetry_events_registration".to_owned()));
        assert!(!after.contains(&"payments_user_time".to_owned()));
        assert!(after.contains(&"telemetry_events_user_event".to_owned()));

        let typical = snapshot(&db).await;
        assert_eq!(canonical(typical), canonical(recommended));
        let again = db
            .reconcile_with(&cfg, Scope::Full, now(), true)
            .await
            .unwrap()
            .plan
            .digest;
        assert_eq!(again, digest);
    }
);

/// `qualified_referrals` of `referrer` in a per-referrer JSON report.
fn qualified(report: &std::path::Path, referrer: i64) -> i64 {
    let text = std::fs::read_to_string(report).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    rows.iter()
        .find(|r| r["referrer_user_id"] == referrer)
        .unwrap_or_else(|| panic!("no row of referrer {referrer} in {text}"))["qualified_referrals"]
        .as_i64()
        .unwrap()
}

// A full run reads the referred users, subscriptions and IPs as scans on two more connections
// that import the first one's snapshot. The real binary holds them before the import
// (`REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE`) and says so in its log; the test then commits a
// change to a referred user that the scans read: the run does not see it, the next one does.
each_pg_backend!(
    the_scan_connections_read_the_snapshot_not_a_later_commit,
    |db: TestDb| async move {
        use std::time::Duration;
        db.load(&every_outcome()).await;
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("r.json");
        let run = |hold: Option<&std::path::Path>| {
            let mut c = dry_run_binary(&db.url);
            c.arg("--report")
                .arg(&report)
                .env("RUST_LOG", "referral_rewards=info")
                .env_remove("REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE")
                .stdout(std::process::Stdio::null());
            if let Some(h) = hold {
                c.env("REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE", h);
            }
            c.spawn().unwrap()
        };
        let status = run(None).wait().unwrap();
        assert!(status.success());
        let before = qualified(&report, 1);
        assert!(before > 0);

        let hold = dir.path().join("hold");
        std::fs::write(&hold, "").unwrap();
        let mut child = run(Some(&hold));
        let reader = wait_for_test_hold(
            &mut child,
            Duration::from_secs(120),
            "the run reaches the hold of its scan connections",
        );
        // User 16 (qualified, its IP its own) loses its verification: it no longer counts.
        db.exec("UPDATE users SET is_verified = false WHERE id = 16")
            .await;
        std::fs::remove_file(&hold).unwrap();
        let status = child.wait().unwrap();
        let log = reader.join().unwrap();
        assert!(status.success(), "{log}");
        assert_eq!(
            qualified(&report, 1),
            before,
            "the change committed after the snapshot is not in it"
        );

        let status = run(None).wait().unwrap();
        assert!(status.success());
        assert_eq!(qualified(&report, 1), before - 1, "the next run sees it");
    }
);

// A one-referrer snapshot of the slots program reads in one round trip on PostgreSQL
// (`one_referrer` in its timings); with a grant program it reads query by query. Both read the
// same rows, for a referrer, a user with an empty invite code, a non-referrer holding a bonus,
// a referred user and an unknown id.
each_backend!(
    a_one_referrer_snapshot_reads_the_same_rows_in_one_round_trip,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        // Stored rewards to read too.
        db.reconcile(Scope::Full, now(), false).await.unwrap();
        let store = db.store().await;
        let window = rules::ip_window(now(), Config::default().rules.ip_window_days);
        let with_grants = referral_rewards::snapshot::GrantsRead {
            fraud: false,
            statuses: vec!["succeeded".into()],
            min_payment_cents: 1,
        };
        for id in [1, 30, 40, 41, 999] {
            let fast = store
                .snapshot(Scope::Referrer(id), window, None)
                .await
                .unwrap();
            assert_eq!(
                fast.timings.iter().any(|t| t.query == "one_referrer"),
                db.is_pg(),
                "{id}: {:?}",
                fast.timings
            );
            let mut slow = store
                .snapshot(Scope::Referrer(id), window, Some(with_grants.clone()))
                .await
                .unwrap();
            assert!(!slow.timings.iter().any(|t| t.query == "one_referrer"));
            slow.grants = None;
            if id == 1 {
                assert!(!fast.referred.is_empty() && !fast.stored_rewards.is_empty());
                assert!(!fast.registrations.is_empty() && !fast.referrer_events.is_empty());
            }
            assert_eq!(canonical(fast), canonical(slow), "{id}");
        }
        store.close().await;
    }
);

/// A one-referrer apply on PostgreSQL reads its snapshot in the message that starts the run, on
/// the run lock's connection: a store's first run (whose connection prepares the statements
/// first) and the next ones (on the kept connection) alike. Each computes what a full run
/// computes for that referrer, and a run that finds the lock taken writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_referrer_apply_reads_with_its_start() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    let cfg = Config::default();
    db.load_demo(3000, 5, now()).await;
    db.reconcile(Scope::Full, now(), false).await.unwrap();
    // Half the referrers below have a reward to change, half not.
    db.exec("UPDATE users SET is_verified = NOT is_verified WHERE referred_by_user_id % 20 = 1")
        .await;
    let full = db.reconcile(Scope::Full, now(), true).await.unwrap();
    let changed = full.stats.reward_rows_to_write;
    assert!(changed > 0, "the update changes some rewards");

    let store = db.store().await;
    let one = |id| RunRequest {
        scope: Scope::Referrer(id),
        as_of: now(),
        dry_run: false,
    };
    let mut written = 0;
    for id in [1, 11, 21, 31, 41, 51] {
        let r = engine::run(&store, &cfg, one(id)).await.unwrap();
        let queries: Vec<&str> = r.stages.queries.iter().map(|q| q.query).collect();
        assert_eq!(
            queries,
            ["one_referrer_with_the_run_start"],
            "referrer {id}: read with the run's start"
        );
        let expected: Vec<_> = full
            .computation
            .results
            .iter()
            .filter(|x| x.referrer_user_id == id)
            .cloned()
            .collect();
        assert_eq!(r.computation.results, expected, "referrer {id}");
        written += r.applied.unwrap().reward_rows_written;
    }
    assert!(
        written > 0,
        "some of these referrers had a reward to change"
    );

    // The lock taken by someone else: the run's start says so, and the read beside it changes
    // nothing; the next run reads with its start again.
    let runs = db.scalar("SELECT count(*) FROM reward_runs").await;
    let other = db.store().await;
    let held = other
        .try_lock(Scope::Full)
        .await
        .unwrap()
        .expect("the lock is free");
    let locked = engine::run(&store, &cfg, one(61)).await;
    assert!(
        matches!(locked, Err(engine::EngineError::Locked)),
        "{locked:?}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM reward_runs").await, runs);
    other.release(held).await;
    other.close().await;
    let r = engine::run(&store, &cfg, one(61)).await.unwrap();
    assert_eq!(
        r.stages.queries.iter().map(|q| q.query).collect::<Vec<_>>(),
        ["one_referrer_with_the_run_start"]
    );
    written += r.applied.unwrap().reward_rows_written;
    assert_eq!(
        db.scalar("SELECT count(*) FROM reward_runs").await,
        runs + 1
    );
    store.close().await;

    // What the one-referrer applies wrote is what the full run would have.
    let after = db.reconcile(Scope::Full, now(), true).await.unwrap();
    assert_eq!(
        after.stats.reward_rows_to_write + written,
        changed,
        "the one-referrer applies wrote their referrers' changes, no more"
    );
}

/// A read that fails after the run's start committed (on a host table the test holds locked,
/// past the run's `lock_timeout`) fails that run: recorded once as `failed`, not started again
/// on another connection. The run lock is free after it, and the next run reads with its start
/// on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_failing_after_the_run_start_fails_that_run_once() {
    use sqlx::Connection;
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load_demo(1000, 3, now()).await;
    let cfg = Config::default();
    let opts = referral_rewards::store::ConnectOptions {
        lock_timeout: std::time::Duration::from_millis(300),
        ..db.opts()
    };
    let store = referral_rewards::store::Store::connect(&db.url, &opts)
        .await
        .unwrap();
    let one = |id| RunRequest {
        scope: Scope::Referrer(id),
        as_of: now(),
        dry_run: false,
    };
    let statuses = || async {
        db.rows("SELECT status FROM reward_runs ORDER BY id")
            .await
            .into_iter()
            .map(|r| r[0].clone().unwrap())
            .collect::<Vec<String>>()
    };
    // A first run leaves its connection kept, its statements prepared.
    engine::run(&store, &cfg, one(1)).await.unwrap();

    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE telemetry_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let e = engine::run(&store, &cfg, one(11)).await.unwrap_err();
    assert!(
        matches!(e, engine::EngineError::RunFailed { .. })
            && e.to_string().contains("database.lock_timeout_secs"),
        "{e}"
    );
    assert_eq!(statuses().await, ["succeeded", "failed"]);
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();

    let r = engine::run(&store, &cfg, one(11)).await.unwrap();
    assert_eq!(
        r.stages.queries.iter().map(|q| q.query).collect::<Vec<_>>(),
        ["one_referrer_with_the_run_start"]
    );
    assert_eq!(statuses().await, ["succeeded", "failed", "succeeded"]);
    store.close().await;
}

/// A panic decoding the snapshot that came with the run's start (injected into the real binary)
/// happens before the engine's own guard covers the run: it is caught where it happens, logged
/// as a bug, and the run reads its referrer again the usual way and succeeds. Uncaught, it ended
/// the process with the run's row left `running`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_decoding_the_read_with_the_start_leaves_no_run_running() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load_demo(1000, 3, now()).await;
    // A referrer the apply has something to write for.
    let full = db.reconcile(Scope::Full, now(), true).await.unwrap();
    let id = full
        .computation
        .results
        .iter()
        .find(|r| r.qualified_referrals > 0)
        .expect("a referrer with a qualified referral")
        .referrer_user_id;
    let before = db
        .reconcile(Scope::Referrer(id), now(), true)
        .await
        .unwrap();
    assert!(before.stats.reward_rows_to_write > 0);

    // Its own directory: no config.toml of the repository's.
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_referral-rewards"))
        .current_dir(dir.path())
        .args(["--database-url", &db.url, "reconcile", "--referrer"])
        .arg(id.to_string())
        .arg("--as-of")
        .arg(referral_rewards::instant::to_rfc3339(now()))
        .env_remove("RUST_LOG")
        .env(
            "REFERRAL_REWARDS_FAULT",
            format!("panic-decoding-referrer={id}"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // Caught twice: decoding the read with the start, then the pool's pipelined read of the
    // same rows; the indexed queries read the referrer.
    assert_eq!(
        stderr
            .matches(&format!("fault injected decoding referrer {id}"))
            .count(),
        2,
        "the caught panics are logged: {stderr}"
    );
    assert_eq!(
        db.rows("SELECT status FROM reward_runs ORDER BY id").await,
        [[Some("succeeded".to_owned())]]
    );
    let after = db
        .reconcile(Scope::Referrer(id), now(), true)
        .await
        .unwrap();
    assert_eq!(
        after.stats.reward_rows_to_write, 0,
        "the apply wrote its plan"
    );
    assert_eq!(after.computation.results, before.computation.results);
}
