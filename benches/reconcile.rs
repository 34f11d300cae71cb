//! `make bench`: the speed and memory figures of SPEC's three ways to run, on SQLite and
//! PostgreSQL, at 100k and 1M users. Prints a table per backend; asserts nothing.
//!
//! Datasets are generated once by `demo-data` and cached (SQLite files under target/bench/,
//! PostgreSQL databases `rr_bench3_<users>` with a marker file under target/bench/). Cold-process
//! figures come from the release binary under `/usr/bin/time -v`; the stage breakdown and the
//! one-referrer latencies are measured in-process through the library.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use referral_rewards::config::Config;
use referral_rewards::engine::{self, RunReport, RunRequest};
use referral_rewards::instant;
use referral_rewards::program::slots::rules;
use referral_rewards::report::{self, ReportFormat};
use referral_rewards::snapshot::Scope;
use referral_rewards::store::{ConnectOptions, Store};

// The audit page's load time in headless Chromium (the browser test's DevTools client).
#[path = "../tests/cdp/mod.rs"]
mod cdp;

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");
const ANCHOR: &str = "2026-11-01T00:00:00Z";
const SEED: &str = "42";

fn bench_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sizes() -> Vec<i64> {
    std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("BENCH_SIZES: comma-separated user counts")
        })
        .collect()
}

/// `/usr/bin/time -v` of one cold process: (wall seconds, peak RSS in MiB, stdout).
fn timed(url: &str, args: &[&str]) -> (f64, f64, String) {
    let (wall, rss, stdout, _) = timed_with_log(url, args);
    (wall, rss, stdout)
}

/// As [`timed`], with the process's log lines (stderr, `RUST_LOG=referral_rewards=info`).
fn timed_with_log(url: &str, args: &[&str]) -> (f64, f64, String, String) {
    let out = Command::new("/usr/bin/time")
        .env("RUST_LOG", "referral_rewards=info")
        .arg("-v")
        .arg(BIN)
        .args(["--database-url", url])
        .args(args)
        .output()
        .expect("/usr/bin/time");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {err}");
    let field = |name: &str| -> &str {
        err.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} not in /usr/bin/time output"))
            .trim()
    };
    let wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss):");
    let secs = wall
        .split(':')
        .fold(0.0, |acc, part| acc * 60.0 + part.parse::<f64>().unwrap());
    let rss_kb: f64 = field("Maximum resident set size (kbytes):")
        .parse()
        .unwrap();
    (
        secs,
        rss_kb / 1024.0,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err.into_owned(),
    )
}

/// The `write` stage's milliseconds in a run's log lines.
fn write_stage_ms(log: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("stage finished") && l.contains("stage=\"write\""))
        .find_map(|l| {
            l.split("ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// The median wall time of three cold processes, and their largest peak RSS.
fn median_of_three(url: &str, args: &[&str]) -> (f64, f64) {
    let mut runs: Vec<(f64, f64)> = (0..3)
        .map(|_| {
            let (wall, rss, _) = timed(url, args);
            (wall, rss)
        })
        .collect();
    let rss = runs.iter().map(|r| r.1).fold(0.0, f64::max);
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    (runs[1].0, rss)
}

/// The shipped config.toml with its two example grant programs enabled (as `make demo` does).
fn grants_config() -> String {
    let enabled = referral_rewards::config::enable_grant_examples(include_str!("../config.toml"))
        .expect("config.toml carries the grant examples");
    let path = bench_dir().join("grants.toml");
    std::fs::write(&path, enabled).unwrap();
    path.display().to_string()
}

fn run_cli(url: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["--database-url", url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Dataset {
    backend: Backend,
    users: i64,
    url: String,
    /// "recommended" (README) or "typical" (`sql/reference/typical_indexes.sql`).
    indexes: &'static str,
}

fn pg_base() -> String {
    std::env::var("REFERRAL_REWARDS_BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-XAtq", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A fresh working copy of the dataset: the pristine one is generated once and cached, and
/// every benchmark run starts from a copy of it.
fn dataset(backend: Backend, users: i64, indexes: &'static str) -> Dataset {
    let dir = bench_dir();
    // Version 2: the grant programs' host state (payments, balances) is in the data; PostgreSQL
    // version 3: its rows loaded frozen (as after a vacuum).
    let marker = dir.join(if backend == Backend::Sqlite {
        format!("sqlite-{users}-v2.ok")
    } else {
        format!("pg-{users}-v3.ok")
    });
    let pristine_db = format!("rr_bench3_{users}");
    let pristine_path = dir.join(format!("sqlite2-{users}.db"));
    let pg_url = |db: &str| {
        let mut u = url::Url::parse(&pg_base()).unwrap();
        u.set_path(&format!("/{db}"));
        u.to_string()
    };
    let exists = marker.exists()
        && match backend {
            Backend::Sqlite => pristine_path.exists(),
            Backend::Postgres => {
                psql(
                    &pg_base(),
                    &format!("SELECT count(*) FROM pg_database WHERE datname = '{pristine_db}'"),
                ) == "1"
            }
        };
    if !exists {
        eprintln!(
            "generating the {users}-user dataset on {} (once; cached)…",
            name(backend)
        );
        let url = match backend {
            Backend::Sqlite => {
                for ext in ["", "-wal", "-shm", ".lock"] {
                    let _ = std::fs::remove_file(format!("{}{ext}", pristine_path.display()));
                }
                format!("sqlite://{}", pristine_path.display())
            }
            Backend::Postgres => {
                psql(
                    &pg_base(),
                    &format!("DROP DATABASE IF EXISTS {pristine_db}"),
                );
                psql(&pg_base(), &format!("CREATE DATABASE {pristine_db}"));
                pg_url(&pristine_db)
            }
        };
        let t = Instant::now();
        run_cli(
            &url,
            &[
                "demo-data",
                "--users",
                &users.to_string(),
                "--seed",
                SEED,
                "--anchor",
                ANCHOR,
            ],
        );
        run_cli(&url, &["migrate"]);
        eprintln!("  demo-data: {:.1} s", t.elapsed().as_secs_f64());
        if backend == Backend::Sqlite {
            // One self-contained file to copy.
            let out = Command::new("sqlite3")
                .args([
                    pristine_path.to_str().unwrap(),
                    "PRAGMA wal_checkpoint(TRUNCATE);",
                ])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        std::fs::write(&marker, "ok").unwrap();
    }
    let url = match backend {
        Backend::Sqlite => {
            let work = dir.join(format!("sqlite-{users}-work.db"));
            for ext in ["", "-wal", "-shm", ".lock"] {
                let _ = std::fs::remove_file(format!("{}{ext}", work.display()));
            }
            std::fs::copy(&pristine_path, &work).unwrap();
            format!("sqlite://{}", work.display())
        }
        Backend::Postgres => {
            let work = format!("{pristine_db}_work");
            psql(&pg_base(), &format!("DROP DATABASE IF EXISTS {work}"));
            psql(
                &pg_base(),
                &format!("CREATE DATABASE {work} TEMPLATE {pristine_db}"),
            );
            psql(&pg_url(&work), "ANALYZE");
            pg_url(&work)
        }
    };
    // A dataset cached by an older version lacks the job's newer migrations.
    run_cli(&url, &["migrate"]);
    let d = Dataset {
        backend,
        users,
        url,
        indexes,
    };
    if indexes == "typical" {
        let t = Instant::now();
        // Without its comment lines: sqlite3 takes an argument starting with "--" for an option.
        let statements: String = include_str!("../sql/reference/typical_indexes.sql")
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        sql_exec(&d, &format!("{statements}\nANALYZE;"));
        eprintln!(
            "  the typical index set: {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    d
}

/// Waits until the work of the steps before (a copied database's pages, a previous part's
/// applies) is off the machine, so that what follows measures the job: the dirty pages written
/// out (PostgreSQL `CHECKPOINT`, SQLite `sync`) and, on a server with autovacuum on, no
/// autovacuum worker left (the applies' dead rows start one, which takes a core for a while).
/// Without it, the PostgreSQL typical part once began under the load of the applies before it
/// and of the copy it had just made (`CREATE DATABASE` writes the copy through the WAL): load
/// average 3.1, its parallel read ceiling 2.34 s against 1.33-1.38 s in three other runs.
fn quiesce(d: &Dataset) {
    let t = Instant::now();
    let mut note = "";
    match d.backend {
        Backend::Postgres => {
            psql(&d.url, "CHECKPOINT");
            let busy = || {
                psql(
                    &d.url,
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
                ) != "0"
            };
            // A bench harness may poll: up to five minutes, then it goes on and says so.
            while busy() {
                if t.elapsed() > std::time::Duration::from_secs(300) {
                    note = " (autovacuum still running after 300 s)";
                    break;
                }
                note = " (waited for autovacuum)";
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            if !note.is_empty() {
                psql(&d.url, "CHECKPOINT");
            }
        }
        Backend::Sqlite => {
            sql_exec(d, "PRAGMA wal_checkpoint(TRUNCATE)");
            let _ = Command::new("sync").status();
        }
    }
    eprintln!("  quiet after {:.1} s{note}", t.elapsed().as_secs_f64());
}

fn name(b: Backend) -> &'static str {
    match b {
        Backend::Sqlite => "SQLite",
        Backend::Postgres => "PostgreSQL",
    }
}

async fn store(url: &str, read_only: bool) -> Store {
    Store::connect(
        url,
        &ConnectOptions {
            read_only,
            busy_timeout: Duration::from_secs(30),
            ..ConnectOptions::default()
        },
    )
    .await
    .unwrap()
}

fn anchor() -> i64 {
    instant::parse_as_of(ANCHOR).unwrap()
}

/// The bare read of the snapshot's rows: each snapshot query through the database's own shell
/// into /dev/null (binary COPY on PostgreSQL), one after the other; and on PostgreSQL also as the
/// job reads them, on three connections at once (the referrers and stored rewards; the users and
/// registration scans; the subscription scan and the referrer events).
fn read_ceiling(d: &Dataset) -> (Duration, Option<Duration>) {
    let window = rules::ip_window(anchor(), Config::default().rules.ip_window_days);
    let groups: Vec<Vec<String>> = match d.backend {
        Backend::Postgres => {
            // Untyped, as the job binds them (scan_events.sql).
            let ts = |t| format!("'{}'", instant::to_rfc3339(t));
            [
                &[
                    include_str!("../sql/queries/postgres/referrers.sql"),
                    include_str!("../sql/queries/postgres/stored_rewards.sql"),
                ][..],
                &[
                    include_str!("../sql/queries/postgres/scan_users.sql"),
                    include_str!("../sql/queries/postgres/scan_registrations.sql"),
                ][..],
                &[
                    include_str!("../sql/queries/postgres/scan_subscriptions.sql"),
                    include_str!("../sql/queries/postgres/scan_events.sql"),
                ][..],
            ]
            .iter()
            .map(|g| {
                g.iter()
                    .map(|q| q.replace("$1", &ts(window.0)).replace("$2", &ts(window.1)))
                    .collect()
            })
            .collect()
        }
        Backend::Sqlite => {
            let date = |t| format!("'{}'", instant::date_text(t));
            vec![
                [
                    include_str!("../sql/queries/sqlite/referrers.sql"),
                    include_str!("../sql/queries/sqlite/scan_users.sql"),
                    include_str!("../sql/queries/sqlite/scan_subscriptions.sql"),
                    include_str!("../sql/queries/sqlite/scan_registrations.sql"),
                    include_str!("../sql/queries/sqlite/referrer_events.sql"),
                    include_str!("../sql/queries/sqlite/stored_rewards.sql"),
                ]
                .iter()
                .map(|q| {
                    q.replace("$1", &date(window.0 - instant::MICROS_PER_DAY))
                        .replace("$2", &date(window.1 + 2 * instant::MICROS_PER_DAY))
                })
                .collect(),
            ]
        }
    };
    let body = |q: &str| -> String {
        q.lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let spawn = |qs: &[String]| -> std::process::Child {
        match d.backend {
            Backend::Postgres => {
                let copies: String = qs
                    .iter()
                    .map(|q| format!("COPY ({}) TO STDOUT (FORMAT binary); ", body(q)))
                    .collect();
                Command::new("psql")
                    .args([
                        &d.url,
                        "-XAtq",
                        "-c",
                        // No parallel workers, as the job's scans (scan.rs).
                        &format!(
                            "SET TIME ZONE 'UTC'; SET max_parallel_workers_per_gather = 0; {copies}"
                        ),
                    ])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            }
            Backend::Sqlite => {
                let all: String = qs.iter().map(|q| format!("{};\n", body(q))).collect();
                Command::new("sqlite3")
                    .args([d.url.trim_start_matches("sqlite://"), &all])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            }
        }
    };
    let t = Instant::now();
    for g in &groups {
        assert!(spawn(g).wait().unwrap().success());
    }
    let sequential = t.elapsed();
    let parallel = (groups.len() > 1).then(|| {
        let t = Instant::now();
        let children: Vec<_> = groups.iter().map(|g| spawn(g)).collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        t.elapsed()
    });
    (sequential, parallel)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// p50 and p99 of 1,000 one-referrer runs, and the p50 of each stage (snapshot, compute,
/// plan, write, and the rest: the id check, the lock and the run row).
async fn one_referrer_latencies(d: &Dataset, dry_run: bool) -> (Duration, Duration, String) {
    let store = store(&d.url, dry_run).await;
    let cfg = Config::default();
    // 1,000 referrers spread over the id range (demo referrers are ids ≡ 1 mod 10).
    let referrers = (d.users / 10).max(1);
    let mut samples = Vec::new();
    let mut stages: [Vec<Duration>; 5] = Default::default();
    for k in 0..1000i64 {
        let id = ((k * 7919) % referrers) * 10 + 1;
        let req = RunRequest {
            scope: Scope::Referrer(id),
            as_of: anchor(),
            dry_run,
        };
        let t = Instant::now();
        let r = engine::run(&store, &cfg, req).await.unwrap();
        let total = t.elapsed();
        samples.push(total);
        let s = &r.stages;
        let known = s.snapshot + s.compute + s.plan + s.write;
        for (i, v) in [
            s.snapshot,
            s.compute,
            s.plan,
            s.write,
            total.saturating_sub(known),
        ]
        .into_iter()
        .enumerate()
        {
            stages[i].push(v);
        }
    }
    store.close().await;
    samples.sort();
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        percentile(v, 0.5)
    };
    let names = ["snapshot", "compute", "plan", "write", "rest"];
    let breakdown = names
        .iter()
        .zip(stages.iter_mut())
        .map(|(n, v)| format!("{n} {:.2}", p50(v).as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ");
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        breakdown,
    )
}

async fn in_process_dry_run(d: &Dataset) -> RunReport {
    let store = store(&d.url, true).await;
    let r = engine::run(
        &store,
        &Config::default(),
        RunRequest {
            scope: Scope::Full,
            as_of: anchor(),
            dry_run: true,
        },
    )
    .await
    .unwrap();
    store.close().await;
    r
}

/// Changes about 1% of referrers: a referred user of each loses verification, and the host
/// column of as many others drifts.
fn change_one_percent(d: &Dataset) {
    let sql = "UPDATE users SET is_verified = NOT is_verified WHERE id IN \
                 (SELECT min(id) FROM users WHERE referred_by_user_id % 500 = 1 GROUP BY referred_by_user_id); \
               UPDATE subscriptions SET referral_bonus_domains = referral_bonus_domains + 1 WHERE user_id % 2000 = 1001;";
    match d.backend {
        Backend::Sqlite => sql_exec(d, &sql.replace("NOT is_verified", "1 - is_verified")),
        Backend::Postgres => sql_exec(d, sql),
    };
}

/// Runs SQL on the dataset through the database's own shell; its output, trimmed.
fn sql_exec(d: &Dataset, sql: &str) -> String {
    match d.backend {
        Backend::Sqlite => {
            let out = Command::new("sqlite3")
                .args([d.url.trim_start_matches("sqlite://"), sql])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
        Backend::Postgres => psql(&d.url, sql),
    }
}

fn written(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with("written"))
        .map(|l| {
            l.trim_start()
                .trim_start_matches("written")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

async fn bench(d: &Dataset) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n## {} — {} users, {} indexes (load average before: {})",
        name(d.backend),
        d.users,
        d.indexes,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Cold processes: a warm-up, then the median of three dry runs.
    timed(&d.url, &["reconcile", "--dry-run", "--as-of", ANCHOR]);
    let (dry_wall, dry_rss) =
        median_of_three(&d.url, &["reconcile", "--dry-run", "--as-of", ANCHOR]);

    // Where the time goes, in-process.
    let r = in_process_dry_run(d).await;
    let ceiling = read_ceiling(d);
    println!("| step | rows | time | rows/s |");
    println!("| --- | ---: | ---: | ---: |");
    for q in &r.stages.queries {
        let rate = q.rows as f64 / q.elapsed.as_secs_f64().max(1e-9);
        println!(
            "| query {} | {} | {} | {:.0} |",
            q.query,
            q.rows,
            ms(q.elapsed),
            rate
        );
    }
    println!("| snapshot (all queries) | | {} | |", ms(r.stages.snapshot));
    println!(
        "| compute (rules + polars) | {} | {} | |",
        r.computation.referrals.len(),
        ms(r.stages.compute)
    );
    println!(
        "| plan + digest | {} | {} | |",
        r.plan.entries.len(),
        ms(r.stages.plan)
    );
    let (ceiling, parallel) = ceiling;
    println!(
        "| read ceiling (bare read of the same queries, one after the other) | | {} | |",
        ms(ceiling)
    );
    println!(
        "| **snapshot / read ceiling** | | **{:.2}×** | |",
        r.stages.snapshot.as_secs_f64() / ceiling.as_secs_f64()
    );
    if let Some(p) = parallel {
        println!(
            "| read ceiling, on three connections at once as the job reads | | {} | |",
            ms(p)
        );
        println!(
            "| **snapshot / parallel read ceiling** | | **{:.2}×** | |",
            r.stages.snapshot.as_secs_f64() / p.as_secs_f64()
        );
    }

    // Reports of the full run, written with polars.
    let dir = bench_dir().join("reports");
    std::fs::create_dir_all(&dir).unwrap();
    for format in [ReportFormat::Csv, ReportFormat::Json, ReportFormat::Parquet] {
        let ext = format!("{format:?}").to_lowercase();
        let path = dir.join(format!("report-{}-{}.{ext}", d.users, name(d.backend)));
        let t = Instant::now();
        let mut referrers =
            report::referrer_frame(&r.plan, &r.computation.results, r.request.as_of, false)
                .unwrap();
        report::write(&mut referrers, &path, format).unwrap();
        let mut referrals = report::referral_frame(
            &r.computation.listed(),
            &r.computation.facts,
            r.request.as_of,
            None,
        )
        .unwrap();
        report::write(
            &mut referrals,
            &report::per_referral_path(&path, format),
            format,
        )
        .unwrap();
        println!(
            "| report {ext} ({} referrers + {} referrals) | | {} | |",
            referrers.height(),
            referrals.height(),
            ms(t.elapsed())
        );
    }

    // Applies, cold processes: the first (everything is new); then ~1% changed and nothing
    // changed, each against a dry run of the same state (the stored rewards it reads differ).
    let (first_wall, _, first) = timed(&d.url, &["reconcile", "--as-of", ANCHOR]);
    change_one_percent(d);
    let (dry_changed, _) = median_of_three(&d.url, &["reconcile", "--dry-run", "--as-of", ANCHOR]);
    let (one_pct_wall, one_pct_rss, one_pct) = timed(&d.url, &["reconcile", "--as-of", ANCHOR]);
    let (dry_same, _) = median_of_three(&d.url, &["reconcile", "--dry-run", "--as-of", ANCHOR]);
    let (_, _, again) = timed(&d.url, &["reconcile", "--as-of", ANCHOR]);
    let (again_wall, _) = median_of_three(&d.url, &["reconcile", "--as-of", ANCHOR]);

    // The applies above leave dirty pages that the server writes out in the background (a
    // spread checkpoint): their I/O slows every commit for a while. Written out first, so that
    // the latencies are the job's, not the last step's.
    match d.backend {
        Backend::Postgres => psql(&d.url, "CHECKPOINT"),
        Backend::Sqlite => sql_exec(d, "PRAGMA wal_checkpoint(TRUNCATE)"),
    };
    let (dry_p50, dry_p99, dry_stages) = one_referrer_latencies(d, true).await;
    let (apply_p50, apply_p99, apply_stages) = one_referrer_latencies(d, false).await;

    println!();
    println!("| cold process | wall | peak RSS | written |");
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| full dry run (median of 3) | {dry_wall:.2} s (**{:.2}×** the read ceiling{}) | {dry_rss:.0} MiB | nothing |",
        dry_wall / ceiling.as_secs_f64(),
        parallel.map_or(String::new(), |p| format!(
            ", **{:.2}×** the parallel one",
            dry_wall / p.as_secs_f64()
        ))
    );
    println!(
        "| first apply (all new) | {first_wall:.2} s | | {} |",
        written(&first)
    );
    println!(
        "| apply, ~1% changed | {one_pct_wall:.2} s ({:+.2} s vs its dry run, {dry_changed:.2} s) | {one_pct_rss:.0} MiB | {} |",
        one_pct_wall - dry_changed,
        written(&one_pct)
    );
    println!(
        "| apply, nothing changed (median of 3) | {again_wall:.2} s ({:+.2} s vs its dry run, {dry_same:.2} s) | | {} |",
        again_wall - dry_same,
        written(&again)
    );
    println!();
    println!(
        "| one referrer, in-process, 1,000 referrers | p50 | p99 | stages, p50 of each (ms) |"
    );
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| dry run (`reconcile --referrer ID --dry-run`) | {} | {} | {dry_stages} |",
        ms(dry_p50),
        ms(dry_p99)
    );
    println!(
        "| apply (`reconcile --referrer ID`), nothing to change | {} | {} | {apply_stages} |",
        ms(apply_p50),
        ms(apply_p99)
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "(load average after: {})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// About 1% of the referred users (those with `id % 100 = batch` and no payment yet) make a
/// first purchase. An anti-join, not `NOT EXISTS`: SQLite runs a correlated `NOT EXISTS` as a
/// scan of `payments` per user where the typical index set has no index on `payments.user_id`
/// (minutes at 1M); for a join it builds an automatic index.
fn new_conversions(d: &Dataset, batch: i64) {
    let sql = format!(
        "INSERT INTO payments (id, user_id, amount_cents, currency, status, created_at) \
         SELECT {} + u.id, u.id, 2000, 'USD', 'succeeded', '2026-10-01 00:00:00' \
         FROM users u LEFT JOIN payments p ON p.user_id = u.id \
         WHERE u.referred_by_user_id IS NOT NULL AND u.id % 100 = {batch} AND p.user_id IS NULL",
        (9000 + batch) * 1_000_000_000
    );
    sql_exec(d, &sql);
}

fn grants_written(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with("grants written"))
        .map(|l| {
            l.trim_start()
                .trim_start_matches("grants written")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The grant programs of config.toml's examples beside the slots program, on the same state:
/// a full dry run against the slots program alone, the first apply (every grant new), and an
/// apply after ~1% new conversions against its dry run.
async fn bench_grants(d: &Dataset) {
    let cfg = grants_config();
    let slots_only = ["reconcile", "--dry-run", "--as-of", ANCHOR];
    let with_grants = [
        "--config",
        cfg.as_str(),
        "reconcile",
        "--dry-run",
        "--as-of",
        ANCHOR,
    ];
    timed(&d.url, &with_grants);
    // Five pairs, each a run with and one without the grant programs back to back: a cold
    // process varies by ±0.5 s here and the machine's load drifts over a minute, so the two
    // sides are measured side by side rather than three of one, then three of the other.
    // The order alternates from pair to pair: neither side always runs after the other.
    let mut pairs: Vec<(f64, f64, f64, f64)> = (0..5)
        .map(|i| {
            let (a, a_rss, b, b_rss);
            if i % 2 == 0 {
                (a, a_rss, _) = timed(&d.url, &slots_only);
                (b, b_rss, _) = timed(&d.url, &with_grants);
            } else {
                (b, b_rss, _) = timed(&d.url, &with_grants);
                (a, a_rss, _) = timed(&d.url, &slots_only);
            }
            (a, a_rss, b, b_rss)
        })
        .collect();
    let median = |xs: &mut Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let alone = median(&mut pairs.iter().map(|p| p.0).collect());
    let both = median(&mut pairs.iter().map(|p| p.2).collect());
    let pair_ratio = median(&mut pairs.iter().map(|p| p.2 / p.0).collect());
    let alone_rss = pairs.iter().map(|p| p.1).fold(0.0, f64::max);
    let both_rss = pairs.iter().map(|p| p.3).fold(0.0, f64::max);
    pairs.sort_by(|a, b| (a.2 / a.0).total_cmp(&(b.2 / b.0)));
    let ratios: Vec<String> = pairs.iter().map(|p| format!("{:.2}", p.2 / p.0)).collect();
    let payments = sql_exec(d, "SELECT count(*) FROM payments");
    let apply = ["--config", cfg.as_str(), "reconcile", "--as-of", ANCHOR];
    let (first_wall, _, first) = timed(&d.url, &apply);
    // Three batches of new conversions, each apply against a dry run of its own state: a single
    // cold process varies by ±0.5 s here, more than what is measured.
    let mut batches = vec![];
    for batch in [7, 17, 27] {
        new_conversions(d, batch);
        let (dry, _) = median_of_three(&d.url, &with_grants);
        let (wall, _, out, log) = timed_with_log(&d.url, &apply);
        batches.push((wall - dry, wall, dry, write_stage_ms(&log), out));
    }
    batches.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (_, new_wall, dry_new, write_ms, new) = batches[1].clone();
    let extra: Vec<String> = batches.iter().map(|b| format!("{:+.2}", b.0)).collect();
    let (again_wall, _, again) = timed(&d.url, &apply);
    println!();
    println!(
        "| grant programs ({payments} payments; {} indexes) | wall | peak RSS | written |",
        d.indexes
    );
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| full dry run, slots program alone (median of 5) | {alone:.2} s | {alone_rss:.0} MiB | |"
    );
    println!(
        "| full dry run, slots + 2 grant programs (median of 5) | {both:.2} s (**{:.2}×**; median of the 5 pairs' ratios {pair_ratio:.2}×: {}) | {both_rss:.0} MiB | |",
        both / alone,
        ratios.join(" / ")
    );
    println!(
        "| first apply with grants (all new) | {first_wall:.2} s | | {} |",
        grants_written(&first)
    );
    println!(
        "| apply after ~1% new conversions (median of 3 batches: {} s) | {new_wall:.2} s (**{:+.2} s** vs its dry run, {dry_new:.2} s; write stage {} ms) | | {} |",
        extra.join(" / "),
        new_wall - dry_new,
        write_ms.map_or("?".into(), |m| m.to_string()),
        grants_written(&new)
    );
    println!(
        "| apply again | {again_wall:.2} s | | {} |",
        grants_written(&again)
    );
}

/// The audit page of a full dry run with the grant programs, on the dataset as generated (no run
/// applied yet: every referrer changes, the page's worst case): the extra time and memory of
/// writing it, its size, and its load time in headless Chromium (median of three loads).
fn bench_audit(d: &Dataset) {
    let cfg = grants_config();
    let page = bench_dir().join(format!("audit-{}-{}.html", d.users, name(d.backend)));
    let plain = [
        "--config",
        cfg.as_str(),
        "reconcile",
        "--dry-run",
        "--as-of",
        ANCHOR,
    ];
    let mut with_page = plain.to_vec();
    let page_arg = page.display().to_string();
    with_page.extend(["--html", page_arg.as_str()]);
    let (without, without_rss) = median_of_three(&d.url, &plain);
    let (with, with_rss) = median_of_three(&d.url, &with_page);
    let bytes = std::fs::metadata(&page).unwrap().len();
    println!();
    println!("| audit page ({} indexes) | wall | peak RSS | |", d.indexes);
    println!("| --- | ---: | ---: | --- |");
    println!("| dry run with grant programs | {without:.2} s | {without_rss:.0} MiB | |");
    println!(
        "| the same with --html | {with:.2} s | {with_rss:.0} MiB | page {:.1} MB |",
        bytes as f64 / 1e6
    );
    let Some(chromium) = cdp::find_chromium() else {
        println!("| load in Chromium | | | no Chromium here |");
        return;
    };
    let (_browser, ws) = cdp::launch(&chromium);
    let mut c = cdp::Cdp::connect(&ws);
    c.open_page();
    let url = format!("file://{}", std::fs::canonicalize(&page).unwrap().display());
    let mut loads: Vec<f64> = (0..3).map(|_| c.load(&url)).collect();
    loads.sort_by(f64::total_cmp);
    let rows = c.eval("JSON.parse(document.getElementById('data').textContent).changes.length");
    println!(
        "| load in headless Chromium (median of 3) | {:.0} ms | | {rows} table rows |",
        loads[1]
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    println!(
        "# referral-rewards benchmark ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let only = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    // BENCH_INDEXES=recommended or =typical: one of the two index sets.
    let index_sets =
        std::env::var("BENCH_INDEXES").unwrap_or_else(|_| "recommended,typical".into());
    for users in sizes() {
        for (backend, indexes) in [Backend::Sqlite, Backend::Postgres]
            .into_iter()
            .flat_map(|b| [(b, "recommended"), (b, "typical")])
        {
            if !index_sets.split(',').any(|x| x.trim() == indexes) {
                continue;
            }
            let key = if backend == Backend::Sqlite {
                "sqlite"
            } else {
                "postgres"
            };
            if !only.split(',').any(|b| b.trim() == key) {
                continue;
            }
            let d = dataset(backend, users, indexes);
            // BENCH_PARTS=audit, =slots or =grants: one of the three tables. The audit page
            // comes first, before any apply: its worst case.
            let parts =
                std::env::var("BENCH_PARTS").unwrap_or_else(|_| "audit,slots,grants".into());
            let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
            if part("audit") {
                quiesce(&d);
                bench_audit(&d);
            }
            if part("slots") {
                quiesce(&d);
                bench(&d).await;
            }
            if part("grants") {
                quiesce(&d);
                bench_grants(&d).await;
            }
        }
    }
}
