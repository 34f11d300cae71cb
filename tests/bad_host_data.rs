//! Host rows the job cannot read as SPEC describes them: every such cell fails the run with an
//! error naming the table, the row's own id, the column and the value; more than one
//! subscription row for a user is refused, naming the user and the rows. A failed run leaves
//! the database as it was, apart from its `failed` run row.

mod common;

use common::*;
use referral_rewards::engine::EngineError;
use referral_rewards::snapshot::Scope;

/// Runs an apply that must fail; checks that its message names every one of `parts`, that the
/// run row says `failed` with the same message, and that nothing else changed.
async fn fails_naming(db: &TestDb, parts: &[&str]) -> String {
    let before = db.state().await;
    let runs_before = db.scalar("SELECT COUNT(*) FROM reward_runs").await;
    let e = db.reconcile(Scope::Full, now(), false).await.unwrap_err();
    let EngineError::RunFailed { message, .. } = &e else {
        panic!("{e}")
    };
    for p in parts {
        assert!(message.contains(p), "{message:?} does not name {p:?}");
    }
    assert_eq!(db.state().await, before, "the failed run changed nothing");
    let runs = db
        .rows("SELECT status, error FROM reward_runs ORDER BY id")
        .await;
    assert_eq!(runs.len() as i64, runs_before + 1);
    let last = runs.last().unwrap();
    assert_eq!(last[0].as_deref(), Some("failed"));
    assert_eq!(last[1].as_deref(), Some(message.as_str()));
    // A dry run says the same.
    let e = db.reconcile(Scope::Full, now(), true).await.unwrap_err();
    for p in parts {
        assert!(e.to_string().contains(p), "{e}");
    }
    message.clone()
}

/// SQLite cannot drop a column's constraint: the table is rebuilt with `create` (which names
/// it `<table>_new`), keeping its rows.
async fn sqlite_rebuild(db: &TestDb, table: &str, create: &str) {
    db.exec(&format!(
        "PRAGMA foreign_keys = OFF; BEGIN; {create}; INSERT INTO {table}_new SELECT * FROM {table}; \
         DROP TABLE {table}; ALTER TABLE {table}_new RENAME TO {table}; COMMIT; PRAGMA foreign_keys = ON;"
    ))
    .await;
}

async fn sqlite_db() -> TestDb {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    db
}

/// A referrer's event with a bad time names the event's id (it used to name the referrer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bad_event_time_names_the_event() {
    let db = sqlite_db().await;
    db.exec(
        "INSERT INTO telemetry_events (id, user_id, event_name, ip_hash, created_at) \
         VALUES (7, 1, 'login', 'ip7', 'yesterday')",
    )
    .await;
    fails_naming(
        &db,
        &[
            "telemetry_events.created_at",
            "telemetry_events row with id 7:",
            "\"yesterday\"",
        ],
    )
    .await;
}

/// A time that is not text (a number, as a DATETIME column may hold one) is not skipped by the
/// window's text filter: it fails the run, naming the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_event_time_that_is_not_a_date_is_not_skipped() {
    let db = sqlite_db().await;
    db.exec(
        "INSERT INTO telemetry_events (id, user_id, event_name, ip_hash, created_at) \
         VALUES (8, 1, 'login', 'ip8', '1793000000')",
    )
    .await;
    fails_naming(
        &db,
        &[
            "telemetry_events.created_at",
            "row with id 8:",
            "\"1793000000\"",
        ],
    )
    .await;
}

/// A subscription's bad time names the subscription's id, not its user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bad_subscription_time_names_the_subscription() {
    let db = sqlite_db().await;
    let sub = db
        .scalar("SELECT id FROM subscriptions WHERE user_id = 7")
        .await;
    assert_ne!(sub, 7, "the fixture gives user 7 another subscription id");
    db.exec("UPDATE subscriptions SET started_at = '2026-02-30 10:00:00' WHERE user_id = 7")
        .await;
    fails_naming(
        &db,
        &[
            "subscriptions.started_at",
            &format!("subscriptions row with id {sub}:"),
            "\"2026-02-30 10:00:00\"",
        ],
    )
    .await;
}

/// IP hashes that are blobs or text that is not UTF-8, in a registration event and in a
/// referrer's event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ip_hash_that_is_not_text() {
    for (event, value, shown) in [
        (2001, "x'01ff'", "x'01ff' (BLOB)"),
        (
            2002,
            "CAST(x'c328' AS TEXT)",
            "x'c328' (text that is not UTF-8)",
        ),
        (1001, "x'00'", "x'00' (BLOB)"),
        (
            1003,
            "CAST(x'ff' AS TEXT)",
            "x'ff' (text that is not UTF-8)",
        ),
    ] {
        let db = sqlite_db().await;
        db.exec(&format!(
            "UPDATE telemetry_events SET ip_hash = {value} WHERE id = {event}"
        ))
        .await;
        fails_naming(
            &db,
            &[
                "telemetry_events.ip_hash",
                &format!("telemetry_events row with id {event}:"),
                shown,
            ],
        )
        .await;
    }
}

/// Booleans are integers on SQLite: the text 'true' and NULL are refused, not guessed at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_booleans_that_are_not_integers() {
    let db = sqlite_db().await;
    db.exec("UPDATE users SET is_active = 'true' WHERE id = 5")
        .await;
    fails_naming(
        &db,
        &["users.is_active", "users row with id 5:", "\"true\""],
    )
    .await;

    // A host schema without NOT NULL.
    let db = sqlite_db().await;
    sqlite_rebuild(
        &db,
        "users",
        "CREATE TABLE users_new (id INTEGER PRIMARY KEY, email TEXT, created_at TEXT, \
         is_active INTEGER, is_verified INTEGER, invite_code TEXT UNIQUE, referred_by_user_id BIGINT, \
         credit_until TEXT, credit_cents BIGINT)",
    )
    .await;
    db.exec("UPDATE users SET is_verified = NULL WHERE id = 6")
        .await;
    fails_naming(
        &db,
        &["users.is_verified", "users row with id 6:", "NULL is not"],
    )
    .await;
    db.exec("UPDATE users SET is_verified = 1 WHERE id = 6; UPDATE users SET created_at = NULL WHERE id = 12")
        .await;
    fails_naming(
        &db,
        &[
            "users.created_at",
            "users row with id 12:",
            "NULL is not a time",
        ],
    )
    .await;
}

/// A host bonus that is not an integer names its subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bonus_that_is_not_an_integer() {
    let db = sqlite_db().await;
    let sub = db
        .scalar("SELECT id FROM subscriptions WHERE user_id = 40")
        .await;
    db.exec("UPDATE subscriptions SET referral_bonus_domains = 'ten' WHERE user_id = 40")
        .await;
    fails_naming(
        &db,
        &[
            "subscriptions.referral_bonus_domains",
            &format!("subscriptions row with id {sub}:"),
            "\"ten\"",
        ],
    )
    .await;
}

// PostgreSQL stores timestamps up to 294276 AD, but their epoch microseconds fit a bigint only
// up to 294247-01-10: such a time used to fail the whole read with "bigint out of range". A
// NULL in a boolean column (a host schema without NOT NULL) used to be named by no row.
each_pg_backend!(
    postgres_times_past_the_bigint_range_name_their_row,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let sub = db
            .scalar("SELECT id FROM subscriptions WHERE user_id = 7")
            .await;
        let literal = if db.backend == Backend::PgTimestamptz {
            "'294250-06-01 00:00:00+00'"
        } else {
            "'294250-06-01 00:00:00'"
        };
        db.exec(&format!(
            "UPDATE subscriptions SET started_at = {literal} WHERE user_id = 7"
        ))
        .await;
        for copy in [true, false] {
            let expected = [
                "subscriptions.started_at".to_owned(),
                format!("subscriptions row with id {sub}:"),
                "\"294250-06-01 00:00:00".to_owned(),
            ];
            let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
            fails_naming_with(&db, copy, &expected).await;
        }
        db.exec(&format!(
            "UPDATE subscriptions SET started_at = NULL WHERE user_id = 7; \
             UPDATE users SET created_at = {literal} WHERE id = 12"
        ))
        .await;
        for copy in [true, false] {
            fails_naming_with(
                &db,
                copy,
                &[
                    "users.created_at",
                    "users row with id 12:",
                    "\"294250-06-01",
                ],
            )
            .await;
        }
        db.exec(&format!(
            "UPDATE users SET created_at = {} WHERE id = 12; \
             ALTER TABLE users ALTER COLUMN is_active DROP NOT NULL; \
             UPDATE users SET is_active = NULL WHERE id = 5",
            db.ts(now() - 100 * DAY)
        ))
        .await;
        for copy in [true, false] {
            fails_naming_with(
                &db,
                copy,
                &["users.is_active", "users row with id 5:", "NULL is not"],
            )
            .await;
        }
    }
);

/// [`fails_naming`] through a store that reads with binary COPY or with SELECT.
async fn fails_naming_with(db: &TestDb, copy: bool, parts: &[&str]) {
    let before = db.state().await;
    let mut opts = db.opts();
    opts.pg_binary_copy = copy;
    let store = referral_rewards::store::Store::connect(&db.url, &opts)
        .await
        .unwrap();
    let window = referral_rewards::program::slots::rules::ip_window(now(), 30);
    let e = store.snapshot(Scope::Full, window, None).await.unwrap_err();
    for p in parts {
        assert!(e.to_string().contains(p), "copy {copy}: {e}");
    }
    let e = referral_rewards::engine::run(
        &store,
        &referral_rewards::config::Config::default(),
        referral_rewards::engine::RunRequest {
            scope: Scope::Full,
            as_of: now(),
            dry_run: false,
        },
    )
    .await
    .unwrap_err();
    let EngineError::RunFailed { message, .. } = &e else {
        panic!("{e}")
    };
    for p in parts {
        assert!(message.contains(p), "copy {copy}: {message}");
    }
    store.close().await;
    assert_eq!(db.state().await, before, "the failed run changed nothing");
    let last = db
        .rows("SELECT status, error FROM reward_runs ORDER BY id DESC LIMIT 1")
        .await;
    assert_eq!(last[0][0].as_deref(), Some("failed"));
    assert_eq!(last[0][1].as_deref(), Some(message.as_str()));
}

// A host subscriptions table without UNIQUE (user_id): a referred user with two rows used to
// be counted twice. The run refuses, naming the users and their subscription rows: a referred
// user (2) and a referrer (30, read for its host bonus).
each_backend!(
    duplicate_subscriptions_are_refused,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        if db.is_pg() {
            db.exec("ALTER TABLE subscriptions DROP CONSTRAINT subscriptions_user_id_key")
                .await;
        } else {
            sqlite_rebuild(
                &db,
                "subscriptions",
                "CREATE TABLE subscriptions_new (id INTEGER PRIMARY KEY, user_id BIGINT NOT NULL \
                 REFERENCES users(id), tier TEXT NOT NULL, status TEXT NOT NULL, \
                 max_domains INTEGER NOT NULL DEFAULT 5, referral_bonus_domains INTEGER NOT NULL DEFAULT 0, \
                 started_at TEXT, expires_at TEXT)",
            )
            .await;
        }
        let before = db.state().await;
        // Nothing to refuse yet.
        db.reconcile(Scope::Full, now(), true).await.unwrap();
        assert_eq!(db.state().await, before);

        let s2 = db
            .scalar("SELECT id FROM subscriptions WHERE user_id = 2")
            .await;
        let s30 = db
            .scalar("SELECT id FROM subscriptions WHERE user_id = 30")
            .await;
        db.exec(&format!(
            "INSERT INTO subscriptions (id, user_id, tier, status, referral_bonus_domains, started_at) \
             VALUES (900, 2, 'trader', 'active', 0, {t}), (901, 30, 'scout', 'active', 7, {t})",
            t = db.ts(now() - 90 * DAY)
        ))
        .await;
        let message = fails_naming(
            &db,
            &[
                &format!("user 2 has subscriptions with ids {s2}, 900"),
                &format!("user 30 has subscriptions with ids {s30}, 901"),
            ],
        )
        .await;
        assert!(message.contains("subscriptions.user_id"), "{message}");
        // A one-referrer run for referrer 1 reads user 2: refused too.
        let e = db
            .reconcile(Scope::Referrer(1), now(), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("user 2 has subscriptions"), "{e}");
    }
);
