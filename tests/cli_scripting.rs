//! The binary as scripts and operators use it: clap's whole usage errors, help texts and the
//! version, stdout that is closed or full, report and plan paths checked before a run, exit 5
//! for a committed run whose report could not be written, `--plan` misuse, the run history
//! (`runs`, `runs show`, `changes`, JSON output), completions, man pages and the Makefile.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");
const AS_OF: &str = "2026-11-01T00:00:00Z";

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().expect("run the binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// No panic, no backtrace, no "internal error" on stderr.
fn assert_no_panic(o: &Output) {
    let err = stderr(o);
    for bad in ["panicked", "backtrace", "internal error"] {
        assert!(!err.contains(bad), "{bad:?} in {err:?}");
    }
}

/// One line on stderr naming `needle`, with the exit code wanted.
fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    assert_code(o, code);
    assert_no_panic(o);
    let err = stderr(o);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

/// A small demo database in `dir` (SQLite), migrated and filled; its URL.
fn demo_db(dir: &Path) -> String {
    let url = format!("sqlite://{}", dir.join("rr.db").display());
    for args in [
        &["migrate", "--with-reference-schema"][..],
        &["demo-data", "--users", "500", "--seed", "1"][..],
    ] {
        let o = run(dir, &[&["--database-url", &url][..], args].concat());
        assert_code(&o, 0);
    }
    url
}

/// `--database-url URL` then `args`.
fn with_url<'a>(url: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    [&["--database-url", url][..], args].concat()
}

fn sql_count(dir: &Path, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(dir.join("rr.db")).unwrap();
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn file_hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

/// config.toml with its two example grant programs enabled, as `make demo` does.
fn grants_config(dir: &Path) {
    let enabled =
        referral_rewards::config::enable_grant_examples(include_str!("../config.toml")).unwrap();
    std::fs::write(dir.join("config.toml"), enabled).unwrap();
}

// ---- 1. clap's messages, whole -------------------------------------------------------------

#[test]
fn usage_errors_are_clap_s_whole_message_with_usage_and_tips_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for (args, wanted) in [
        (
            &["explain"][..],
            &["required arguments", "--referrer <ID>", "Usage:"][..],
        ),
        (
            &["recon"][..],
            &["'recon'", "tip:", "'reconcile'", "Usage:"][..],
        ),
        (
            &["reconcile", "--dryrun"][..],
            &["'--dryrun'", "tip:", "'--dry-run'", "Usage:"][..],
        ),
        (
            &["reconcile", "--referrer", "abc"][..],
            &["--referrer <ID>", "abc", "invalid digit"][..],
        ),
    ] {
        let o = run(dir.path(), args);
        assert_code(&o, 2);
        assert_no_panic(&o);
        assert!(o.stdout.is_empty(), "{args:?}: {}", stdout(&o));
        let err = stderr(&o);
        for w in wanted {
            assert!(err.contains(w), "{args:?}: {w:?} not in {err}");
        }
    }
}

#[test]
fn help_and_version_exit_0_on_stdout_with_the_git_revision() {
    let dir = tempfile::tempdir().unwrap();
    // DATABASE_URL shows as where the URL can come from, never its value (a password).
    let o = command(dir.path(), &["--help"])
        .env("DATABASE_URL", "postgres://u:s3cret@db/app")
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert!(o.stderr.is_empty());
    let help = stdout(&o);
    assert!(help.contains("[env: DATABASE_URL]"), "{help}");
    assert!(!help.contains("s3cret"), "{help}");
    for sub in ["reconcile", "runs", "changes", "completions", "man"] {
        assert!(help.contains(sub), "{sub} in {help}");
    }
    assert!(help.contains("Exit codes:"), "{help}");

    let o = run(dir.path(), &["--version"]);
    assert_code(&o, 0);
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        stdout(&o).trim(),
        format!("referral-rewards {} ({rev})", env!("CARGO_PKG_VERSION"))
    );
}

/// Every flag of every subcommand has a help text in `-h` (the short help puts it on the
/// flag's own line).
#[test]
fn every_flag_of_every_subcommand_has_a_help_text() {
    let dir = tempfile::tempdir().unwrap();
    let subcommands = [
        "migrate",
        "demo-data",
        "reconcile",
        "explain",
        "serve",
        "runs",
        "runs show",
        "changes",
        "completions",
        "man",
    ];
    for sub in subcommands {
        let mut args: Vec<&str> = sub.split(' ').collect();
        args.push("-h");
        let o = run(dir.path(), &args);
        assert_code(&o, 0);
        let help = stdout(&o);
        let options = help.split("Options:").nth(1).expect("an options section");
        for line in options.lines().filter(|l| l.trim_start().starts_with('-')) {
            // `  --flag <VALUE>  Text`: something after the flag and its value.
            let spec_end = line.find(">  ").map(|i| i + 1).or_else(|| {
                let trimmed = line.trim_start();
                let start = line.len() - trimmed.len();
                trimmed.find("  ").map(|i| start + i)
            });
            let text = spec_end.map_or("", |i| line[i..].trim());
            assert!(!text.is_empty(), "{sub}: no help text in {line:?}");
        }
    }
    // The subcommands themselves, in the top-level help.
    let o = run(dir.path(), &["-h"]);
    let top = stdout(&o);
    let commands = top.split("Commands:").nth(1).unwrap();
    let commands = commands.split("Options:").next().unwrap();
    for line in commands.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.trim().split_once("  ").is_some(),
            "no help text: {line:?}"
        );
    }
}

#[test]
fn a_bad_database_url_from_the_environment_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let o = command(dir.path(), &["runs"])
        .env("DATABASE_URL", "mysql://localhost/x")
        .output()
        .unwrap();
    assert_one_line_error(&o, 2, "DATABASE_URL");
}

// ---- 2. closed and full stdout, paths checked first -----------------------------------------

/// A pipe whose reader is gone before the command writes anything (`| head -0`).
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

#[test]
fn a_closed_stdout_ends_quietly_and_the_report_and_plan_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    let o = command(
        d,
        &with_url(
            &url,
            &[
                "reconcile",
                "--dry-run",
                "--as-of",
                AS_OF,
                "--report",
                "r.csv",
                "--per-referral",
                "--save-plan",
                "p.json",
            ],
        ),
    )
    .stdout(closed_pipe())
    .output()
    .unwrap();
    assert_code(&o, 0);
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    for f in ["r.csv", "r.referrals.csv", "p.json"] {
        assert!(d.join(f).is_file(), "{f} written");
    }
    // The plan is whole: an apply takes it.
    let o = command(d, &with_url(&url, &["reconcile", "--plan", "p.json"]))
        .stdout(closed_pipe())
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    assert_eq!(
        sql_count(
            d,
            "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'"
        ),
        1
    );
    for args in [
        &["runs"][..],
        &["runs", "show", "1"][..],
        &["changes"][..],
        &["explain", "--referrer", "11", "--as-of", AS_OF][..],
        &["reconcile", "--dry-run", "--output", "json"][..],
    ] {
        let o = command(d, &with_url(&url, args))
            .stdout(closed_pipe())
            .output()
            .unwrap();
        assert_code(&o, 0);
        assert!(o.stderr.is_empty(), "{args:?}: {}", stderr(&o));
    }
    for args in [&["completions", "bash"][..], &["man"][..], &["--help"][..]] {
        let o = command(d, args).stdout(closed_pipe()).output().unwrap();
        assert_code(&o, 0);
        assert_no_panic(&o);
    }
}

#[test]
fn a_full_stdout_is_a_clear_error_and_a_committed_run_says_it_committed() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    for args in [&["runs"][..], &["reconcile", "--dry-run"][..]] {
        let o = command(d, &with_url(&url, args))
            .stdout(full())
            .output()
            .unwrap();
        assert_one_line_error(&o, 1, "writing to standard output");
        assert!(stderr(&o).contains("No space left"), "{}", stderr(&o));
    }
    let o = command(
        d,
        &with_url(&url, &["reconcile", "--as-of", AS_OF, "--report", "r.json"]),
    )
    .stdout(full())
    .output()
    .unwrap();
    assert_one_line_error(&o, 5, "run 1 succeeded and its writes are in");
    assert!(stderr(&o).contains("standard output"), "{}", stderr(&o));
    assert!(d.join("r.json").is_file(), "the report comes first");
    assert_eq!(
        sql_count(
            d,
            "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'"
        ),
        1
    );
}

#[test]
fn report_and_plan_paths_are_checked_before_the_run_starts() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    std::fs::create_dir(d.join("adir.csv")).unwrap();
    let before = file_hash(&d.join("rr.db"));
    for (args, needle) in [
        (&["--report", "nodir/r.csv"][..], "does not exist"),
        (&["--report", "adir.csv"][..], "is a directory"),
        (&["--report", "r.txt"][..], "extension"),
        (&["--save-plan", "p.txt"][..], ".json"),
        (&["--save-plan", "nodir/p.json"][..], "does not exist"),
        (
            &[
                "--report",
                "r.csv",
                "--per-referral",
                "--save-plan",
                "nodir/p.json",
            ][..],
            "--save-plan",
        ),
    ] {
        for dry in [false, true] {
            let mut all = with_url(&url, &["reconcile"]);
            if dry {
                all.push("--dry-run");
            }
            all.extend_from_slice(args);
            let o = run(d, &all);
            assert_one_line_error(&o, 2, needle);
        }
    }
    assert_eq!(file_hash(&d.join("rr.db")), before, "no run row, nothing");
    assert!(!d.join("r.csv").exists());
}

/// The report's directory disappears while the apply is inside its write transaction (held
/// there by the engine's test hold): the run commits, the report cannot be written, and the
/// command says the run succeeded, with exit code 5, never 1.
#[test]
fn a_report_that_fails_after_the_commit_exits_5_and_says_the_run_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    std::fs::create_dir(d.join("out")).unwrap();
    let hold = d.join("hold");
    std::fs::write(&hold, b"").unwrap();
    let mut child = command(
        d,
        &with_url(
            &url,
            &[
                "reconcile",
                "--as-of",
                AS_OF,
                "--report",
                "out/r.csv",
                "--output",
                "json",
            ],
        ),
    )
    .env("REFERRAL_REWARDS_TEST_HOLD_FILE", &hold)
    .env("RUST_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the run reaches its write transaction");
        if line.contains("test hold") {
            break;
        }
    }
    std::fs::remove_dir(d.join("out")).unwrap();
    std::fs::remove_file(&hold).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(out.status.code(), Some(5), "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("error: run 1 succeeded and its writes are in")
            && last.contains("out/r.csv"),
        "{err}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["run_id"], 1);
    assert!(
        summary["output_errors"][0]
            .as_str()
            .unwrap()
            .contains("out/r.csv")
    );
    assert_eq!(
        sql_count(
            d,
            "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'"
        ),
        1
    );
}

// ---- 4. --plan --------------------------------------------------------------------------------

#[test]
fn plan_with_as_of_referrer_or_expect_digest_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for other in [
        &["--as-of", AS_OF][..],
        &["--referrer", "11"][..],
        &["--expect-digest", "abc"][..],
    ] {
        let o = run(
            dir.path(),
            &[&["reconcile", "--plan", "p.json"][..], other].concat(),
        );
        assert_code(&o, 2);
        let err = stderr(&o);
        assert!(err.contains("cannot be used with"), "{err}");
        assert!(err.contains(other[0]), "{err}");
    }
}

#[test]
fn re_applying_an_applied_plan_says_which_run_applied_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    let o = run(
        d,
        &with_url(
            &url,
            &[
                "reconcile",
                "--dry-run",
                "--as-of",
                AS_OF,
                "--save-plan",
                "p.json",
            ],
        ),
    );
    assert_code(&o, 0);
    let o = run(d, &with_url(&url, &["reconcile", "--plan", "p.json"]));
    assert_code(&o, 0);
    let before = file_hash(&d.join("rr.db"));
    let o = run(d, &with_url(&url, &["reconcile", "--plan", "p.json"]));
    assert_one_line_error(&o, 3, "already applied by run 1");
    assert!(stderr(&o).contains("nothing was written"), "{}", stderr(&o));
    assert_eq!(file_hash(&d.join("rr.db")), before);
    // The same digest through --expect-digest.
    let digest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("p.json")).unwrap()).unwrap();
    let o = run(
        d,
        &with_url(
            &url,
            &[
                "reconcile",
                "--as-of",
                AS_OF,
                "--expect-digest",
                digest["digest"].as_str().unwrap(),
            ],
        ),
    );
    assert_one_line_error(&o, 3, "already applied by run 1");
}

// ---- 5, 6. the run history and the ledgers ----------------------------------------------------

#[test]
fn runs_show_scope_trigger_and_duration_in_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    for args in [
        &["reconcile", "--shard", "1/2", "--as-of", AS_OF][..],
        &["reconcile", "--shard", "2/2", "--as-of", AS_OF][..],
        &["reconcile", "--referrer", "11", "--as-of", AS_OF][..],
        &["reconcile", "--as-of", AS_OF][..],
    ] {
        assert_code(&run(d, &with_url(&url, args)), 0);
    }
    // A run recorded before the trigger was: unknown.
    let db = rusqlite::Connection::open(d.join("rr.db")).unwrap();
    db.execute("UPDATE reward_runs SET trigger = NULL WHERE id = 4", [])
        .unwrap();
    drop(db);

    let o = run(d, &with_url(&url, &["runs"]));
    assert_code(&o, 0);
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("scope") && lines[0].contains("trigger") && lines[0].contains("duration")
    );
    let row = |id: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap()
    };
    let cols = |id: &str| {
        row(id)
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(cols("1")[1..4], ["shard", "1/2", "cli"], "{text}");
    assert_eq!(cols("2")[1..4], ["shard", "2/2", "cli"], "{text}");
    assert_eq!(cols("3")[1..4], ["referrer", "11", "cli"], "{text}");
    assert_eq!(cols("4")[1..3], ["full", "-"], "{text}");
    assert!(row("1").contains(" s "), "a duration: {text}");

    let o = run(
        d,
        &with_url(&url, &["runs", "--format", "json", "--limit", "10"]),
    );
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    let by_id = |id: i64| runs.iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(by_id(1)["shard"], "1/2");
    assert_eq!(by_id(1)["trigger"], "cli");
    assert_eq!(by_id(3)["referrer_user_id"], 11);
    assert!(by_id(4)["trigger"].is_null());
    assert!(by_id(4)["shard"].is_null());
    for r in runs {
        assert!(r["duration_seconds"].as_f64().unwrap() >= 0.0, "{r}");
        assert_eq!(r["status"], "succeeded");
    }
}

#[test]
fn runs_show_and_changes_read_both_ledgers() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    grants_config(d);
    let db = rusqlite::Connection::open(d.join("rr.db")).unwrap();
    db.execute_batch(
        "INSERT INTO payments (id, user_id, amount_cents, currency, status, created_at)
         SELECT 5000000000 + id, id, 2000, 'USD', 'succeeded', '2026-10-01 00:00:00'
         FROM users WHERE referred_by_user_id IS NOT NULL AND id % 3 = 0",
    )
    .unwrap();
    let o = run(d, &with_url(&url, &["reconcile", "--as-of", AS_OF]));
    assert_code(&o, 0);
    let count = |sql: &str| sql_count(d, sql);
    let changes = count("SELECT COUNT(*) FROM reward_changes WHERE run_id = 1");
    let grants = count("SELECT COUNT(*) FROM referral_grants WHERE run_id = 1 AND kind = 'grant'");
    assert!(changes > 3 && grants > 3, "{changes} {grants}");

    let json = |args: &[&str]| -> serde_json::Value {
        let o = run(d, &with_url(&url, args));
        assert_code(&o, 0);
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let show = json(&["runs", "show", "1", "--limit", "3", "--format", "json"]);
    assert_eq!(show["run"]["id"], 1);
    assert_eq!(show["run"]["trigger"], "cli");
    assert_eq!(show["ledger"]["reward_changes"], changes);
    assert_eq!(show["ledger"]["grants"], grants);
    assert_eq!(show["ledger"]["reversals"], 0);
    let listed = show["changes"]["reward_changes"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(show["changes"]["reward_changes_more"], true);
    assert_eq!(show["changes"]["grants"].as_array().unwrap().len(), 3);
    assert!(listed.iter().all(|c| c["run_id"] == 1));
    let ids: Vec<i64> = listed.iter().map(|c| c["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");

    // One referrer's rows, in both ledgers.
    let referrer: i64 = db
        .query_row(
            "SELECT referrer_user_id FROM referral_grants WHERE party = 'referrer' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let r = referrer.to_string();
    let all = json(&[
        "changes",
        "--referrer",
        &r,
        "--limit",
        "1000",
        "--format",
        "json",
    ]);
    let rc = all["reward_changes"].as_array().unwrap();
    let gc = all["grants"].as_array().unwrap();
    assert_eq!(
        rc.len() as i64,
        count(&format!(
            "SELECT COUNT(*) FROM reward_changes WHERE referrer_user_id = {r}"
        ))
    );
    assert_eq!(
        gc.len() as i64,
        count(&format!(
            "SELECT COUNT(*) FROM referral_grants WHERE referrer_user_id = {r}"
        ))
    );
    assert!(!gc.is_empty());
    assert!(gc.iter().all(|g| g["referrer_user_id"] == referrer
        && g["kind"] == "grant"
        && g["program"].is_string()));
    assert_eq!(all["reward_changes_more"], false);
    let one = json(&[
        "changes",
        "--run",
        "2",
        "--referrer",
        &r,
        "--format",
        "json",
    ]);
    assert!(
        one["reward_changes"].as_array().unwrap().is_empty(),
        "no run 2"
    );

    // Text: both tables.
    let o = run(d, &with_url(&url, &["changes", "--referrer", &r]));
    assert_code(&o, 0);
    let text = stdout(&o);
    assert!(
        text.contains("reward_changes:") && text.contains("referral_grants:"),
        "{text}"
    );
    assert!(
        text.contains("first_purchase_credit") || text.contains("paid_access"),
        "{text}"
    );
    let o = run(d, &with_url(&url, &["runs", "show", "1"]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("ledger"), "{}", stdout(&o));

    let o = run(d, &with_url(&url, &["runs", "show", "99"]));
    assert_one_line_error(&o, 2, "no run with id 99");
}

#[test]
fn reconcile_output_json_is_one_object_and_no_text() {
    let dir = tempfile::tempdir().unwrap();
    let url = demo_db(dir.path());
    let d = dir.path();
    let o = run(
        d,
        &with_url(
            &url,
            &[
                "reconcile",
                "--dry-run",
                "--as-of",
                AS_OF,
                "--output",
                "json",
                "--report",
                "r.parquet",
                "--save-plan",
                "p.json",
            ],
        ),
    );
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON alone");
    assert_eq!(v["dry_run"], true);
    assert!(v["run_id"].is_null());
    assert!(v["written"].is_null());
    assert!(v["stats"]["referrers"].as_u64().unwrap() > 0);
    assert!(v["outcomes"]["qualified"].as_u64().unwrap() > 0);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("p.json")).unwrap()).unwrap();
    assert_eq!(v["digest"], plan["digest"]);
    let kinds: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["report", "plan"]);

    let o = run(
        d,
        &with_url(
            &url,
            &[
                "reconcile",
                "--referrer",
                "11",
                "--as-of",
                AS_OF,
                "--output",
                "json",
            ],
        ),
    );
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["run_id"], 1);
    assert_eq!(v["mode"], "referrer");
    assert_eq!(v["referrers"][0]["referrer_user_id"], 11);
    assert!(v["written"]["reward_rows"].as_u64().is_some());
}

// ---- 7, 9. completions, man pages, the Makefile -------------------------------------------

const SUBCOMMANDS: [&str; 9] = [
    "migrate",
    "demo-data",
    "reconcile",
    "explain",
    "serve",
    "runs",
    "changes",
    "completions",
    "man",
];

#[test]
fn completions_and_man_pages_are_generated_from_the_definitions() {
    let dir = tempfile::tempdir().unwrap();
    // No configuration is read: a broken one does not matter.
    std::fs::write(dir.path().join("config.toml"), "not toml [").unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let o = run(dir.path(), &["completions", shell]);
        assert_code(&o, 0);
        let script = stdout(&o);
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: {sub}");
        }
        assert!(
            script.contains("dry-run") && script.contains("as-of"),
            "{shell}"
        );
    }
    let o = run(dir.path(), &["man"]);
    assert_code(&o, 0);
    let page = stdout(&o);
    assert!(page.contains(".TH referral-rewards 1"), "{page}");
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&sub.replace('-', "\\-")),
            "{sub} in the man page"
        );
    }
    assert!(page.contains("DATABASE_URL"), "{page}");

    let o = run(dir.path(), &["man", "--dir", "pages"]);
    assert_code(&o, 0);
    for sub in SUBCOMMANDS
        .iter()
        .map(|s| format!("-{s}"))
        .chain([String::new()])
    {
        let page = dir.path().join(format!("pages/referral-rewards{sub}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|_| panic!("{page:?}"));
        assert!(text.starts_with(".ie") && text.contains(".TH"), "{page:?}");
    }
    let reconcile =
        std::fs::read_to_string(dir.path().join("pages/referral-rewards-reconcile.1")).unwrap();
    assert!(reconcile.contains("\\-\\-dry\\-run"), "{reconcile}");
}

/// `make -n TARGET` in the repository: what make would run, without running it.
fn make_n(args: &[&str], target_dir: Option<&str>) -> String {
    let mut c = Command::new("make");
    c.arg("-n")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CARGO")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .env_remove("PREFIX")
        .env_remove("DESTDIR");
    match target_dir {
        Some(t) => c.env("CARGO_TARGET_DIR", t),
        None => c.env_remove("CARGO_TARGET_DIR"),
    };
    let o = c.output().expect("make");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn the_makefile_honours_cargo_target_dir_and_installs_under_destdir_prefix() {
    let demo = make_n(&["demo"], Some("/elsewhere/tgt"));
    assert!(
        demo.contains(
            "/elsewhere/tgt/debug/referral-rewards --config /elsewhere/tgt/demo/config.toml"
        ),
        "{demo}"
    );
    assert!(!demo.contains(" target/debug"), "{demo}");
    let demo = make_n(&["demo"], None);
    assert!(
        demo.contains("target/debug/referral-rewards --config target/demo/config.toml"),
        "{demo}"
    );

    let install = make_n(&["install", "DESTDIR=/stage", "PREFIX=/opt/rr"], Some("/t"));
    for line in [
        "cargo build --bin referral-rewards --profile release",
        "install -m 755 /t/release/referral-rewards /stage/opt/rr/bin/referral-rewards",
        "/t/release/referral-rewards man --dir /stage/opt/rr/share/man/man1",
        "/t/release/referral-rewards completions bash > /stage/opt/rr/share/bash-completion/completions/referral-rewards",
        "/t/release/referral-rewards completions zsh > /stage/opt/rr/share/zsh/site-functions/_referral-rewards",
        "/t/release/referral-rewards completions fish > /stage/opt/rr/share/fish/vendor_completions.d/referral-rewards.fish",
    ] {
        assert!(
            install.lines().any(|l| l.trim() == line),
            "{line:?} in\n{install}"
        );
    }
    let default = make_n(&["install"], None);
    assert!(
        default.contains(
            "install -m 755 target/release/referral-rewards /usr/local/bin/referral-rewards"
        ),
        "{default}"
    );
}
