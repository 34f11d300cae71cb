//! The binary, black-box: exit codes, one-line errors, and a demo round trip.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .output()
        .expect("run the binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One line, no panic, no backtrace, and the exit code wanted.
fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// A usage error clap found: its whole message (the problem, tips, where to read more), exit 2.
fn assert_usage_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(err.contains("For more information, try '--help'"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("rr.db").display())
}

#[test]
fn bad_config_value_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[rules]\ncooldown_days = -1\n",
    )
    .unwrap();
    let o = run(dir.path(), &["runs"]);
    assert_one_line_error(&o, 2, "rules.cooldown_days");
}

#[test]
fn unknown_config_key_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("custom.toml"),
        "[rewards]\nbatch_sise = 3\n",
    )
    .unwrap();
    let o = run(dir.path(), &["--config", "custom.toml", "runs"]);
    assert_one_line_error(&o, 2, "batch_sise");
}

#[test]
fn missing_named_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dir.path(), &["--config", "nope.toml", "runs"]);
    assert_one_line_error(&o, 2, "nope.toml");
}

#[test]
fn invalid_cron_exits_2_naming_the_key_and_showing_the_form() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[schedule]\ncron = \"0 61 * * * *\"\n",
    )
    .unwrap();
    let o = run(dir.path(), &["serve"]);
    assert_one_line_error(&o, 2, "schedule.cron");
    assert!(stderr(&o).contains("0 0 * * * *"));
}

#[test]
fn serve_without_token_refuses_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    std::fs::write(
        dir.path().join("config.toml"),
        "[http]\nbind = \"0.0.0.0:0\"\n",
    )
    .unwrap();
    let o = Command::new(BIN)
        .args(["--database-url", &url, "serve"])
        .current_dir(dir.path())
        .env_remove("REFERRAL_REWARDS_API_TOKEN")
        .output()
        .unwrap();
    assert_one_line_error(&o, 2, "without an API token");
}

#[test]
fn malformed_database_url_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        dir.path(),
        &["--database-url", "mysql://localhost/x", "runs"],
    );
    assert_one_line_error(&o, 2, "--database-url");
}

#[test]
fn non_numeric_referrer_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dir.path(), &["reconcile", "--referrer", "abc"]);
    assert_usage_error(&o, "--referrer");
}

#[test]
fn as_of_that_is_not_a_time_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dir.path(), &["reconcile", "--as-of", "next tuesday"]);
    assert_usage_error(&o, "--as-of");
}

#[test]
fn unreachable_database_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        dir.path(),
        &[
            "--database-url",
            "postgres://postgres@127.0.0.1:1/nothing",
            "reconcile",
            "--dry-run",
        ],
    );
    assert_one_line_error(&o, 1, "cannot connect");
}

#[test]
fn missing_tables_exit_1_and_say_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--dry-run"],
    );
    assert_one_line_error(&o, 1, "no database file");
    // The job's tables exist, the host's do not.
    assert_eq!(
        run(dir.path(), &["--database-url", &url, "migrate"])
            .status
            .code(),
        Some(0)
    );
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--dry-run"],
    );
    assert_one_line_error(&o, 1, "no such table: users");
    assert!(stderr(&o).contains("migrate"));
    // A database the job's newer migrations have not reached (a column of a later one gone).
    let path = dir.path().join("rr.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE reward_runs DROP COLUMN trigger")
        .unwrap();
    let o = run(dir.path(), &["--database-url", &url, "runs"]);
    assert_one_line_error(&o, 1, "no such column: trigger");
    assert!(stderr(&o).contains("run `referral-rewards migrate`"));
}

#[test]
fn demo_round_trip_then_lock_held_exits_3_then_failed_run_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let ok = |args: &[&str]| {
        let mut all = vec!["--database-url", &url];
        all.extend_from_slice(args);
        let o = run(dir.path(), &all);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    ok(&["migrate", "--with-reference-schema"]);
    ok(&["demo-data", "--users", "3000", "--seed", "1"]);
    let as_of = "2026-11-01T00:00:00Z";
    let dry = ok(&["reconcile", "--dry-run", "--as-of", as_of]);
    assert!(dry.contains("dry run") && dry.contains("digest"), "{dry}");
    let applied = ok(&["reconcile", "--as-of", as_of]);
    assert!(
        applied.contains("run                  1 succeeded"),
        "{applied}"
    );
    let digest = |s: &str| s.lines().find(|l| l.contains("digest")).unwrap().to_owned();
    assert_eq!(digest(&dry), digest(&applied));
    let explained = ok(&["explain", "--referrer", "11", "--as-of", as_of]);
    assert!(explained.contains("referrer 11 as of"), "{explained}");
    let one = ok(&["reconcile", "--referrer", "11", "--as-of", as_of]);
    assert!(
        one.contains("written              0 referral_rewards rows"),
        "{one}"
    );
    let runs = ok(&["runs"]);
    assert!(runs.contains("succeeded"), "{runs}");
    // JSON log lines, one per run, when asked.
    let o = Command::new(BIN)
        .args([
            "--database-url",
            &url,
            "--log-format",
            "json",
            "reconcile",
            "--dry-run",
            "--as-of",
            as_of,
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&o.stderr)
        .lines()
        .find(|l| l.contains("run finished"))
        .map(str::to_owned)
        .expect("a run line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["mode"], "full");
    assert!(v["fields"]["duration_ms"].is_u64(), "{line}");

    // Another run holds the lock: refused with exit 3, nothing recorded.
    let lock = std::fs::File::create(dir.path().join("rr.db.lock")).unwrap();
    lock.try_lock().unwrap();
    let o = run(dir.path(), &["--database-url", &url, "reconcile"]);
    assert_one_line_error(&o, 3, "lock");
    drop(lock);

    // A run that fails exits 1.
    let unknown = run(
        dir.path(),
        &[
            "--database-url",
            &url,
            "reconcile",
            "--referrer",
            "99999999",
        ],
    );
    assert_one_line_error(&unknown, 2, "no user with id 99999999");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::raw_sql(
            "CREATE TRIGGER boom BEFORE INSERT ON reward_changes BEGIN SELECT RAISE(ABORT, 'boom'); END;
             UPDATE users SET invite_code = NULL WHERE id = 11;",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    });
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--as-of", as_of],
    );
    assert_one_line_error(&o, 1, "boom");
    let runs = ok(&["runs"]);
    assert!(runs.contains("failed"), "{runs}");
}

/// A small demo database in `dir`, migrated and filled.
fn demo_db(dir: &Path) -> String {
    let url = sqlite_url(dir);
    for args in [
        &["migrate", "--with-reference-schema"][..],
        &["demo-data", "--users", "500", "--seed", "1"][..],
    ] {
        let mut all = vec!["--database-url", &url];
        all.extend_from_slice(args);
        let o = run(dir, &all);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }
    url
}

fn file_hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

#[test]
fn as_of_beyond_the_year_9999_exits_2_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let before = file_hash(&dir.path().join("rr.db"));
    for as_of in [
        "+262000-01-01T00:00:00Z",
        "+10000-01-01T00:00:00Z",
        "9999-12-31T23:00:00-02:00",
        "-0001-06-01T00:00:00Z",
        "+262143-12-31T23:59:59Z",
    ] {
        let flag = format!("--as-of={as_of}");
        for args in [
            &["reconcile", &flag][..],
            &["reconcile", "--dry-run", &flag][..],
            &["explain", "--referrer", "11", &flag][..],
        ] {
            let mut all = vec!["--database-url", url.as_str()];
            all.extend_from_slice(args);
            let o = run(dir.path(), &all);
            assert_usage_error(&o, "--as-of");
        }
    }
    assert_eq!(
        file_hash(&dir.path().join("rr.db")),
        before,
        "nothing written"
    );
}

#[test]
fn a_panicking_run_exits_1_with_one_line_and_records_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let o = Command::new(BIN)
        .args(["--database-url", &url, "reconcile", "--referrer", "11"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("REFERRAL_REWARDS_FAULT", "panic-compute-referrer=11")
        .output()
        .unwrap();
    assert_one_line_error(&o, 1, "internal error");
    assert!(stderr(&o).contains("fault injected"), "{}", stderr(&o));
    let runs = run(dir.path(), &["--database-url", &url, "runs"]);
    let table = String::from_utf8_lossy(&runs.stdout);
    assert!(table.contains("failed"), "{table}");
    assert!(!table.contains("running"), "{table}");
}

#[test]
fn unwritable_referrers_exit_4_after_writing_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    std::fs::write(
        dir.path().join("config.toml"),
        "[rewards]\nbatch_size = 1\nbonus_per_batch = 1500000000\n",
    )
    .unwrap();
    for dry in [true, false] {
        let mut args = vec!["--database-url", url.as_str(), "reconcile"];
        if dry {
            args.push("--dry-run");
        }
        let o = run(dir.path(), &args);
        assert_one_line_error(&o, 4, "unwritten, everyone else written");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.contains("UNWRITABLE"), "{out}");
        if !dry {
            assert!(out.contains("succeeded"), "{out}");
        }
    }
}

/// A read-only user (another uid; the file 0444 in a 0555 directory, owned by root) can audit:
/// dry run, explain and runs work, and nothing beside the database appears.
#[test]
fn a_read_only_user_can_run_a_dry_run_explain_and_runs() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED: switching to another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    // A run so that `runs` has a row to show.
    let o = run(dir.path(), &["--database-url", &url, "reconcile"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let db = dir.path().join("rr.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let hash = file_hash(&db);
    for args in [
        &["reconcile", "--dry-run"][..],
        &["explain", "--referrer", "11"][..],
        &["runs"][..],
    ] {
        let mut command = Command::new(BIN);
        command
            .args(["--database-url", &url])
            .args(args)
            .current_dir("/")
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG");
        // SAFETY: setgid/setuid only, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let o = command.output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "no -wal, -shm or lock file appeared");
    assert_eq!(file_hash(&db), hash);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_panic_inside_the_write_transaction_rolls_back_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let would_write = |url: &str| {
        let o = run(
            dir.path(),
            &["--database-url", url, "reconcile", "--dry-run"],
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains("would write"))
            .unwrap()
            .to_owned()
    };
    let before = would_write(&url);
    let o = Command::new(BIN)
        .args(["--database-url", &url, "reconcile"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .env("REFERRAL_REWARDS_FAULT", "panic-in-write")
        .output()
        .unwrap();
    assert_one_line_error(&o, 1, "fault injected inside the write transaction");
    assert_eq!(would_write(&url), before, "nothing of the run was written");
    let runs = run(dir.path(), &["--database-url", &url, "runs"]);
    let table = String::from_utf8_lossy(&runs.stdout);
    assert!(
        table.contains("failed") && !table.contains("running"),
        "{table}"
    );
}

#[test]
fn grant_programs_are_validated_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let good = "[[grants]]\nname = \"paid_access\"\nreferrer = { credit_days = 45 }\n\n\
                [[grants]]\nname = \"credit\"\nmin_payment_cents = 1000\nreferred = { credit_cents = 1000 }\n";
    std::fs::write(
        dir.path().join("config.toml"),
        good.replace("1000\nreferred", "0\nreferred"),
    )
    .unwrap();
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--dry-run"],
    );
    assert_one_line_error(&o, 2, "grants[1].min_payment_cents");
    std::fs::write(dir.path().join("config.toml"), good).unwrap();
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--dry-run"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("paid_access") && out.contains("credit"),
        "each grant program has its summary: {out}"
    );
}

/// config.toml with its two example grant programs enabled, as `make demo` does.
fn grants_config(dir: &Path) {
    let enabled =
        referral_rewards::config::enable_grant_examples(include_str!("../config.toml")).unwrap();
    std::fs::write(dir.join("config.toml"), enabled).unwrap();
}

#[test]
fn grant_programs_through_the_cli_audit_plan_apply_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    grants_config(dir.path());
    // A qualifying first purchase for a third of the referred users (ids clear of any others).
    let db = rusqlite::Connection::open(dir.path().join("rr.db")).unwrap();
    db.execute_batch(
        "INSERT INTO payments (id, user_id, amount_cents, currency, status, created_at)
         SELECT 5000000000 + id, id, 2000, 'USD', 'succeeded', '2026-10-01 00:00:00'
         FROM users WHERE referred_by_user_id IS NOT NULL AND id % 3 = 0",
    )
    .unwrap();
    drop(db);
    let as_of = "2026-11-01T00:00:00Z";
    let o = run(
        dir.path(),
        &[
            "--database-url",
            &url,
            "reconcile",
            "--dry-run",
            "--as-of",
            as_of,
            "--report",
            "r.json",
            "--per-referral",
            "--save-plan",
            "plan.json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("grant program paid_access")
            && out.contains("grant program first_purchase_credit"),
        "{out}"
    );

    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
    };
    let rows = read("r.grants.json");
    let rows = rows.as_array().unwrap();
    let referred: i64 = {
        let db = rusqlite::Connection::open(dir.path().join("rr.db")).unwrap();
        db.query_row(
            "SELECT COUNT(*) FROM users WHERE referred_by_user_id IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(
        rows.len() as i64,
        2 * referred,
        "one row per program and referral"
    );
    for key in [
        "program",
        "referrer_user_id",
        "referred_user_id",
        "outcome",
        "cause",
        "conversion_payment_id",
        "converted_at",
        "hold_ends_at",
        "position",
        "cap",
        "referrer_change_days",
        "referred_change_cents",
    ] {
        assert!(rows[0].get(key).is_some(), "column {key} in {}", rows[0]);
    }
    let granted = rows.iter().filter(|r| r["outcome"] == "granted").count();
    assert!(granted > 0, "the demo population converts");
    // No hold in either example; the second caps at 10 per referrer.
    assert!(rows.iter().all(|r| r["hold_ends_at"].is_null()));
    for r in rows {
        let cap = if r["program"] == "first_purchase_credit" {
            serde_json::json!(10)
        } else {
            serde_json::Value::Null
        };
        assert_eq!(r["cap"], cap, "{r}");
    }
    let programs = read("r.programs.json");
    assert_eq!(programs.as_array().unwrap().len(), 2);
    let plan = read("plan.json");
    assert_eq!(plan["format"], "referral-rewards-plan/3");
    let planned: usize = plan["programs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["referrals"].as_array().unwrap())
        .map(|r| r["changes"].as_array().unwrap().len())
        .sum();
    assert!(planned > 0);

    // The audited plan is applied as it is: its grants land, once.
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--plan", "plan.json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let db = rusqlite::Connection::open(dir.path().join("rr.db")).unwrap();
    let ledger: i64 = db
        .query_row("SELECT COUNT(*) FROM referral_grants", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ledger as usize, planned);
    let o = run(
        dir.path(),
        &["--database-url", &url, "reconcile", "--as-of", as_of],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("grants written       0 grants, 0 reversals"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let again: i64 = db
        .query_row("SELECT COUNT(*) FROM referral_grants", [], |r| r.get(0))
        .unwrap();
    assert_eq!(again, ledger, "nothing granted twice");

    // explain shows each program's stats page for a referrer who earned something.
    let referrer: i64 = db
        .query_row(
            "SELECT referrer_user_id FROM referral_grants WHERE party = 'referrer' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let o = run(
        dir.path(),
        &[
            "--database-url",
            &url,
            "explain",
            "--referrer",
            &referrer.to_string(),
            "--as-of",
            as_of,
            "--format",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let progs = v["grant_programs"].as_array().unwrap();
    assert_eq!(progs.len(), 2);
    assert!(progs.iter().any(|p| p["uses"].as_u64().unwrap() > 0));
    let first = progs
        .iter()
        .find(|p| p["uses"].as_u64().unwrap() > 0)
        .unwrap();
    assert!(
        first["earned_days"].as_i64().unwrap() > 0 || first["earned_cents"].as_i64().unwrap() > 0
    );
}
