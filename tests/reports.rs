//! Audit reports, explanations and plan/apply with a digest (SPEC sections 4 and 5).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use polars::prelude::*;
use referral_rewards::report::{self, ReportFormat};
use referral_rewards::snapshot::Scope;
use referral_rewards::store::{ConnectOptions, Store};
use referral_rewards::summary;

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");

/// SPEC section 5's JSON field names, in order.
const SPEC_FIELDS: [&str; 11] = [
    "referrer_user_id",
    "referred_users_total",
    "qualified_referrals",
    "disqualified_self_referral",
    "disqualified_cooldown",
    "disqualified_missing_ip",
    "disqualified_shared_ip",
    "disqualified_duplicate_ip",
    "bonus_slots",
    "badge",
    "current_bonus_slots",
];

/// The audit columns after them.
const AUDIT_FIELDS: [&str; 4] = ["current_badge", "bonus_delta", "is_referrer", "as_of"];

fn cli(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--database-url", url];
    all.extend_from_slice(args);
    Command::new(BIN)
        .args(all)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap()
}

const AS_OF: &str = "2026-11-01T12:00:00Z";

#[tokio::test]
async fn three_formats_read_back_to_the_same_rows() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut frames = Vec::new();
    for ext in ["csv", "json", "parquet"] {
        let path = dir.path().join(format!("report.{ext}"));
        let o = cli(
            &db.url,
            &[
                "reconcile",
                "--dry-run",
                "--as-of",
                AS_OF,
                "--report",
                path.to_str().unwrap(),
                "--per-referral",
            ],
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let format = ReportFormat::resolve(&path, None).unwrap();
        // A column that is null throughout reads back as text from CSV and Parquet, but with
        // no type from JSON: give it the text type to compare.
        let typed = |df: DataFrame| {
            let names: Vec<String> = df
                .columns()
                .iter()
                .filter(|c| c.dtype() == &DataType::Null)
                .map(|c| c.name().to_string())
                .collect();
            let mut df = df;
            for n in &names {
                let c = df
                    .column(n.as_str())
                    .unwrap()
                    .cast(&DataType::String)
                    .unwrap();
                df.with_column(c).unwrap();
            }
            df
        };
        let referrers = typed(report::read(&path, format).unwrap());
        let referrals =
            typed(report::read(&report::per_referral_path(&path, format), format).unwrap());
        frames.push((ext, referrers, referrals));
    }
    let (_, first, first_referrals) = &frames[0];
    let names: Vec<&str> = first
        .get_column_names()
        .iter()
        .map(|n| n.as_str())
        .collect();
    assert_eq!(names[..11], SPEC_FIELDS, "SPEC's fields first, in order");
    assert_eq!(names[11..], AUDIT_FIELDS);
    assert_eq!(
        first.height(),
        3,
        "referrers 1 and 30, and user 40's revocation"
    );
    assert_eq!(
        first_referrals.height(),
        27,
        "25 + 1 counted, and user 41, referred by user 40 who holds no invite code"
    );
    // The facts behind the outcomes ride along: user 14 is a duplicate of user 2's IP, and user
    // 5's cooldown ends 7 days after its signup (one microsecond inside the cooldown).
    let cell = |id: i64, column: &str| -> AnyValue<'static> {
        let ids = first_referrals
            .column("referred_user_id")
            .unwrap()
            .i64()
            .unwrap();
        let i = ids.into_no_null_iter().position(|x| x == id).unwrap();
        first_referrals
            .column(column)
            .unwrap()
            .get(i)
            .unwrap()
            .into_static()
    };
    assert_eq!(cell(14, "ip_claimed_by"), AnyValue::Int64(2));
    assert_eq!(
        cell(5, "cooldown_ends_at"),
        AnyValue::StringOwned("2026-11-01T12:00:00.000001Z".into())
    );
    assert_eq!(cell(21, "tier"), AnyValue::StringOwned("Trader".into()));
    for (ext, referrers, referrals) in &frames {
        assert_eq!(referrers.schema(), first.schema(), "{ext}");
        assert!(
            referrers.equals_missing(first),
            "{ext}:\n{referrers}\n{first}"
        );
        assert_eq!(referrals.schema(), first_referrals.schema(), "{ext}");
        assert!(
            referrals.equals_missing(first_referrals),
            "{ext}:\n{referrals}\n{first_referrals}"
        );
    }
    // Types: integers, and the badge as text.
    for name in SPEC_FIELDS {
        let want = if name == "badge" {
            DataType::String
        } else {
            DataType::Int64
        };
        assert_eq!(first.column(name).unwrap().dtype(), &want, "{name}");
    }
    let r1 = first
        .filter(
            &first
                .column("referrer_user_id")
                .unwrap()
                .i64()
                .unwrap()
                .equal(1),
        )
        .unwrap();
    assert_eq!(
        r1.column("qualified_referrals")
            .unwrap()
            .i64()
            .unwrap()
            .get(0),
        Some(9)
    );
    assert_eq!(
        r1.column("badge").unwrap().str().unwrap().get(0),
        Some("verified_referrer")
    );
}

#[tokio::test]
async fn json_report_has_exactly_specs_field_names_and_types() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.json");
    let o = cli(
        &db.url,
        &[
            "reconcile",
            "--dry-run",
            "--as-of",
            AS_OF,
            "--report",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let rows: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let names: Vec<&str> = row.keys().map(String::as_str).collect();
        let mut want = SPEC_FIELDS.to_vec();
        want.extend(AUDIT_FIELDS);
        want.sort();
        let mut got = names.clone();
        got.sort();
        assert_eq!(got, want);
        for (k, v) in row {
            if ["badge", "current_badge"].contains(&k.as_str()) {
                assert!(v.is_null() || v.is_string(), "{k}: {v}");
            } else if k == "as_of" {
                assert_eq!(v, "2026-11-01T12:00:00.000000Z");
            } else if k == "is_referrer" {
                assert!(v.is_boolean(), "{k}: {v}");
            } else {
                assert!(v.is_i64(), "{k}: {v}");
            }
        }
    }
    let r30 = rows.iter().find(|r| r["referrer_user_id"] == 30).unwrap();
    assert_eq!(r30["badge"], serde_json::Value::Null);
    assert_eq!(r30["current_bonus_slots"], 99);
    assert_eq!(r30["disqualified_self_referral"], 1);
}

#[tokio::test]
async fn only_changes_keeps_the_referrers_that_change() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    db.reconcile(Scope::Full, now(), false).await.unwrap();
    // One referrer changes: user 2 stops qualifying.
    db.exec("UPDATE users SET is_active = 0 WHERE id = 2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.csv");
    let o = cli(
        &db.url,
        &[
            "reconcile",
            "--dry-run",
            "--as-of",
            AS_OF,
            "--report",
            path.to_str().unwrap(),
            "--only-changes",
            "--per-referral",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let df = report::read(&path, ReportFormat::Csv).unwrap();
    assert_eq!(
        df.column("referrer_user_id")
            .unwrap()
            .i64()
            .unwrap()
            .into_no_null_iter()
            .collect::<Vec<_>>(),
        [1]
    );
    let referrals = report::read(
        &report::per_referral_path(&path, ReportFormat::Csv),
        ReportFormat::Csv,
    )
    .unwrap();
    assert_eq!(referrals.height(), 25);
    let outcome = referrals
        .filter(
            &referrals
                .column("referred_user_id")
                .unwrap()
                .i64()
                .unwrap()
                .equal(2),
        )
        .unwrap();
    assert_eq!(
        outcome.column("outcome").unwrap().str().unwrap().get(0),
        Some("inactive")
    );
}

#[tokio::test]
async fn unknown_report_extension_exits_2() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let o = cli(
        &db.url,
        &["reconcile", "--dry-run", "--report", "/tmp/x.xlsx"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("xlsx"));
}

each_backend!(
    digest_is_stable_and_the_same_on_every_backend,
    |db: TestDb| async move {
        db.load(&every_outcome()).await;
        let a = db
            .reconcile(Scope::Full, now(), true)
            .await
            .unwrap()
            .plan
            .digest;
        let b = db
            .reconcile(Scope::Full, now(), true)
            .await
            .unwrap()
            .plan
            .digest;
        assert_eq!(a, b);
        // The same fixture on SQLite gives the same digest as on this backend.
        let sqlite = TestDb::new(Backend::Sqlite).await.unwrap();
        sqlite.load(&every_outcome()).await;
        assert_eq!(
            sqlite
                .reconcile(Scope::Full, now(), true)
                .await
                .unwrap()
                .plan
                .digest,
            a
        );
        // Any one referrer's result changing changes it.
        db.exec("UPDATE users SET is_verified = FALSE WHERE id = 41")
            .await; // not counted anywhere
        assert_eq!(
            db.reconcile(Scope::Full, now(), true)
                .await
                .unwrap()
                .plan
                .digest,
            a
        );
        db.exec(&format!(
            "UPDATE users SET is_verified = {} WHERE id = 3",
            db.bool(false)
        ))
        .await;
        assert_ne!(
            db.reconcile(Scope::Full, now(), true)
                .await
                .unwrap()
                .plan
                .digest,
            a
        );
    }
);

#[tokio::test]
async fn stale_expected_digest_exits_3_and_changes_nothing() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let o = cli(
        &db.url,
        &[
            "reconcile",
            "--dry-run",
            "--as-of",
            AS_OF,
            "--save-plan",
            plan.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    // The world moves on after the audit: two referrers' results change. And a killed process
    // left a `running` row: a refused run must not even mark it abandoned.
    db.exec("UPDATE users SET is_active = 0 WHERE id IN (2, 30)")
        .await;
    let store = db.store().await;
    store
        .start_run(Scope::Full, now(), now(), None)
        .await
        .unwrap();
    store.close().await;
    let before = db.state().await;
    let o = cli(&db.url, &["reconcile", "--plan", plan.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("2 referrers differ from the audited plan"),
        "{err}"
    );
    assert_eq!(db.state().await, before);
    assert_eq!(
        db.rows("SELECT status FROM reward_runs").await,
        [[Some("running".to_owned())]],
        "no run row of its own, and the orphan untouched"
    );
    let o = cli(
        &db.url,
        &["reconcile", "--as-of", AS_OF, "--expect-digest", "0000"],
    );
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(db.state().await, before);

    // Audit again, then the apply goes through with the audited digest and as-of.
    let o = cli(
        &db.url,
        &[
            "reconcile",
            "--dry-run",
            "--as-of",
            AS_OF,
            "--save-plan",
            plan.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    let o = cli(&db.url, &["reconcile", "--plan", plan.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(
        db.rows("SELECT status, digest FROM reward_runs ORDER BY id")
            .await,
        [
            [Some("abandoned".into()), None],
            [
                Some("succeeded".into()),
                Some(saved["digest"].as_str().unwrap().to_owned())
            ]
        ]
    );
}

fn file_hash(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

#[tokio::test]
async fn dry_run_on_a_read_only_sqlite_connection_writes_nothing() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    if let Admin::Sqlite(p) = &db.admin {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(p)
            .await
            .unwrap();
        p.close().await;
    }
    let path = db.url.trim_start_matches("sqlite://").to_owned();
    let before = file_hash(Path::new(&path));
    let o = cli(&db.url, &["reconcile", "--dry-run", "--as-of", AS_OF]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = cli(&db.url, &["explain", "--referrer", "1", "--as-of", AS_OF]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        file_hash(Path::new(&path)),
        before,
        "the database file is untouched"
    );
    // The connection a dry run uses refuses writes.
    let store = Store::connect(
        &db.url,
        &ConnectOptions {
            read_only: true,
            busy_timeout: std::time::Duration::from_secs(1),
            ..ConnectOptions::default()
        },
    )
    .await
    .unwrap();
    let e = store
        .start_run(Scope::Full, now(), now(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("readonly"), "{e}");
}

#[tokio::test]
async fn dry_run_as_a_select_only_postgres_role() {
    let Some(db) = TestDb::new(Backend::PgTimestamp).await else {
        return;
    };
    db.load(&every_outcome()).await;
    let role = format!("rr_reader_{}", std::process::id());
    db.exec(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA public TO {role};
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};"
    ))
    .await;
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    let before = db.state().await;
    let o = cli(url.as_str(), &["reconcile", "--dry-run", "--as-of", AS_OF]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("digest"));
    let o = cli(
        url.as_str(),
        &[
            "explain",
            "--referrer",
            "1",
            "--as-of",
            AS_OF,
            "--format",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    // An apply as that role is refused by the database and changes nothing.
    let o = cli(url.as_str(), &["reconcile", "--as-of", AS_OF]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"));
    assert_eq!(db.state().await, before);
    db.exec(&format!("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}; REVOKE USAGE ON SCHEMA public FROM {role};")).await;
    drop(db);
    if let Some(base) = pg_available().await {
        let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
            .await
            .unwrap();
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
            .execute(&mut c)
            .await;
    }
}

#[tokio::test]
async fn explain_json_lists_every_referred_user_with_outcome() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let o = cli(
        &db.url,
        &[
            "explain",
            "--referrer",
            "1",
            "--as-of",
            AS_OF,
            "--format",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["qualified_referrals"], 9);
    let referrals = v["referrals"].as_array().unwrap();
    assert_eq!(referrals.len(), 25);
    let by_id = |id: i64| {
        referrals
            .iter()
            .find(|r| r["referred_user_id"] == id)
            .unwrap()
    };
    assert_eq!(by_id(14)["outcome"], "duplicate_ip");
    assert_eq!(by_id(20)["outcome"], "no_subscription");
    assert_eq!(by_id(4)["signup_ip"], "a1");
}

/// Whole outputs as snapshots: a behaviour change shows as a diff.
#[tokio::test]
async fn snapshots_of_summary_analytics_and_explain() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let mut r = db.reconcile(Scope::Full, now(), true).await.unwrap();
    r.elapsed = std::time::Duration::ZERO;
    insta::assert_snapshot!("dry_run_summary", summary::run_summary(&r));
    insta::assert_snapshot!("program_analytics", summary::program_analytics(&r));
    let mut applied = db.reconcile(Scope::Full, now(), false).await.unwrap();
    applied.elapsed = std::time::Duration::ZERO;
    insta::assert_snapshot!("apply_summary", summary::run_summary(&applied));
}

/// `explain` from both sides, as text and JSON, over the fixture with every outcome: the facts
/// behind each outcome and what would change it. The store part (the referrer's last use of a
/// shared IP) is read too, so these go through `explain_referrer` and `explain_user`.
#[tokio::test]
async fn snapshots_of_explain_both_directions() {
    use referral_rewards::config::Config;
    use referral_rewards::explain;
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    db.load(&every_outcome()).await;
    let cfg = Config::default();
    let store = db.store().await;
    let r = explain::explain_referrer(&store, &cfg, 1, now(), None)
        .await
        .unwrap();
    insta::assert_snapshot!("explain_referrer_1", explain::referrer_text(&r, &cfg));
    insta::assert_json_snapshot!("explain_referrer_1_json", r);
    // A cooldown, a duplicate IP, a shared IP and an expired subscription, seen from the user.
    for user in [5, 14, 10, 17] {
        let u = explain::explain_user(&store, &cfg, user, now())
            .await
            .unwrap();
        insta::assert_snapshot!(format!("explain_user_{user}"), explain::user_text(&u));
        insta::assert_json_snapshot!(format!("explain_user_{user}_json"), u);
    }
    // Users nobody referred, and unknown users.
    let nobody = explain::explain_user(&store, &cfg, 1, now()).await.unwrap();
    assert_eq!((nobody.referred_by, nobody.slots.is_none()), (None, true));
    let unknown = explain::explain_user(&store, &cfg, 999_999, now()).await;
    assert!(
        matches!(
            unknown,
            Err(referral_rewards::engine::EngineError::UnknownReferrer(
                999_999
            ))
        ),
        "{unknown:?}"
    );
    store.close().await;
}

// The facts `explain` gives agree with the fixture's rows: the cooldown ends 7 days after the
// later of signup and subscription, a duplicate names the user that claimed the IP first, a
// shared IP names the referrer's last use of it, and that use plus the IP window is when it
// would count.
each_backend!(explain_facts_agree_with_the_rows, |db: TestDb| async move {
    use referral_rewards::config::Config;
    use referral_rewards::explain;
    use referral_rewards::instant::{MICROS_PER_DAY, to_rfc3339};
    let f = every_outcome();
    db.load(&f).await;
    let store = db.store().await;
    let cfg = Config::default();
    let e = explain::explain_referrer(&store, &cfg, 1, now(), None)
        .await
        .unwrap();
    store.close().await;
    let row = |id: i64| {
        e.referrals
            .iter()
            .find(|r| r.referred_user_id == id)
            .unwrap()
    };
    for r in &e.referrals {
        let u = f.users.iter().find(|u| u.id == r.referred_user_id).unwrap();
        assert_eq!(r.facts.signed_up_at, Some(to_rfc3339(u.created_at)));
        if r.outcome == "cooldown" {
            let s = f.subs.iter().find(|s| s.user_id == u.id).unwrap();
            let later = u.created_at.max(s.started_at.unwrap_or(u.created_at));
            assert_eq!(
                r.facts.cooldown_ends_at,
                Some(to_rfc3339(later + 7 * MICROS_PER_DAY)),
                "{r:?}"
            );
            assert!(
                r.would_change
                    .as_deref()
                    .unwrap()
                    .contains("7-day cooldown")
            );
        }
        if r.outcome == "duplicate_ip" {
            let first = row(r.facts.ip_claimed_by.unwrap());
            assert_eq!(first.outcome, "qualified");
            assert_eq!(first.signup_ip, r.signup_ip);
        }
        if r.outcome == "shared_ip" {
            let last = f
                .events
                .iter()
                .filter(|ev| ev.user_id == Some(1) && ev.ip_hash == r.signup_ip)
                .filter(|ev| ev.created_at >= now() - 30 * MICROS_PER_DAY && ev.created_at <= now())
                .map(|ev| ev.created_at)
                .max()
                .unwrap();
            assert_eq!(
                r.facts.referrer_last_used_ip_at,
                Some(to_rfc3339(last)),
                "{r:?}"
            );
            assert_eq!(
                r.facts.shared_ip_until,
                Some(to_rfc3339(last + 30 * MICROS_PER_DAY))
            );
        }
    }
    for outcome in ["cooldown", "shared_ip", "duplicate_ip"] {
        assert!(
            e.referrals.iter().any(|r| r.outcome == outcome),
            "{outcome}"
        );
    }
});
