//! `serve` as a real process: the schedule, the HTTP API over real sockets, shutdown, and a
//! killed process's orphaned run. On SQLite and PostgreSQL.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use referral_rewards::snapshot::Scope;

const BIN: &str = env!("CARGO_BIN_EXE_referral-rewards");
const TOKEN: &str = "t0ken-for-tests";

/// Demo data anchored long ago: every rule gives the same answer at any "now" of the test.
async fn demo_db(backend: Backend) -> Option<TestDb> {
    let db = TestDb::new(backend).await?;
    db.load_demo(2000, 5, at("2020-01-01 00:00:00")).await;
    Some(db)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// More for a server: `http` is appended to the `[http]` table, `config` after it (more
/// tables), `nofile` caps the process's descriptors, `env` adds environment variables.
#[derive(Default)]
struct Extra {
    http: &'static str,
    config: &'static str,
    /// Appended to the `[schedule]` table.
    schedule: &'static str,
    nofile: Option<u64>,
    env: Vec<(&'static str, String)>,
}

struct Server {
    child: Child,
    pub base: String,
    dir: PathBuf,
}

impl Server {
    fn start(db: &TestDb, dir: &Path, cron: &str, run_on_start: bool, grace_secs: u64) -> Server {
        Self::start_with(db, dir, cron, run_on_start, grace_secs, Extra::default())
    }

    fn start_with(
        db: &TestDb,
        dir: &Path,
        cron: &str,
        run_on_start: bool,
        grace_secs: u64,
        extra: Extra,
    ) -> Server {
        let Extra {
            http,
            config: more,
            schedule,
            nofile,
            env,
        } = extra;
        let port = free_port();
        let config = dir.join(format!("serve-{port}.toml"));
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{}\"\n[schedule]\ncron = \"{cron}\"\nrun_on_start = {run_on_start}\n\
                 shutdown_grace_secs = {grace_secs}\n{schedule}\n[http]\nbind = \"127.0.0.1:{port}\"\n{http}\n{more}\n",
                db.url
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("serve-{port}.log"))).unwrap();
        let mut command = Command::new(BIN);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env("REFERRAL_REWARDS_API_TOKEN", TOKEN)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("DATABASE_URL")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir: dir.join(format!("serve-{port}.log")),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(&self.dir).map(|mut f| f.read_to_string(&mut s));
        s
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit and returns its exit code.
    fn wait(mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn wait_for(db: &TestDb, sql: &str, at_least: i64, within: Duration) {
    let deadline = Instant::now() + within;
    while db.scalar(sql).await < at_least {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {sql} >= {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs' [started, finished] intervals never overlap.
async fn assert_no_overlap(db: &TestDb) {
    let overlaps = db
        .scalar(
            "SELECT COUNT(*) FROM reward_runs a JOIN reward_runs b ON a.id < b.id \
             WHERE a.started_at < COALESCE(b.finished_at, b.started_at) \
               AND b.started_at < COALESCE(a.finished_at, a.started_at)",
        )
        .await;
    assert_eq!(overlaps, 0, "two runs overlapped");
}

/// A file whose existence holds every applying run of a server inside its write transaction
/// (the engine's test hold), and the environment that tells the server about it.
fn hold_file(dir: &Path) -> (PathBuf, Vec<(&'static str, String)>) {
    let path = dir.join("hold");
    std::fs::write(&path, b"").unwrap();
    let env = vec![(
        "REFERRAL_REWARDS_TEST_HOLD_FILE",
        path.display().to_string(),
    )];
    (path, env)
}

each_backend!(
    http_auth_errors_metrics_and_one_referrer_recompute,
    |db: TestDb| async move {
        let Some(db) = demo_db(db.backend).await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // A schedule that never fires during the test.
        let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
        let http = client();
        let url = |p: &str| format!("{}{p}", server.base);

        // Health and metrics need no token.
        let health: serde_json::Value = http
            .get(url("/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["status"], "ok");

        // Auth: none, wrong, right.
        let r = http.get(url("/v1/runs")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = http
            .get(url("/v1/runs"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = http
            .get(url("/v1/runs"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);

        // Bad input: 400 with a JSON error, 404 for an unknown referrer, never a 500.
        for (path, status) in [
            ("/v1/referrers/abc", 400),
            ("/v1/referrers/1.5", 400),
            ("/v1/referrers/99999999999999999999", 400),
            ("/v1/referrers/987654321", 404),
            ("/v1/runs?limit=0", 400),
            ("/v1/runs?limit=x", 400),
            ("/nope", 404),
        ] {
            let r = http.get(url(path)).bearer_auth(TOKEN).send().await.unwrap();
            assert_eq!(r.status(), status, "{path}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(body["error"].is_string(), "{path}: {body}");
        }
        let r = http
            .post(url("/v1/referrers/11/reconcile?dry_run=maybe"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let long = format!("/v1/referrers/{}", "1".repeat(3000));
        assert_eq!(
            http.get(url(&long))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .status(),
            414
        );
        let r = http
            .post(url("/v1/referrers/11/reconcile"))
            .bearer_auth(TOKEN)
            .body(vec![b'x'; 64 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);

        // The one-referrer recompute over HTTP equals the full run's row, for several referrers.
        let full = db
            .reconcile(
                Scope::Full,
                referral_rewards::instant::from_datetime(chrono::Utc::now()),
                true,
            )
            .await
            .unwrap();
        for entry in full
            .plan
            .entries
            .iter()
            .filter(|e| e.desired.referred_users_total > 0)
            .take(5)
        {
            let id = entry.referrer_user_id();
            let r = http
                .post(url(&format!("/v1/referrers/{id}/reconcile")))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let got: serde_json::Value = r.json().await.unwrap();
            let want = serde_json::to_value(&entry.desired).unwrap();
            for (k, v) in want.as_object().unwrap() {
                assert_eq!(&got[k], v, "referrer {id} field {k}");
            }
            assert_eq!(got["current_bonus_slots"], entry.current_bonus_slots());
            assert!(got["run_id"].is_i64(), "{got}");
            assert_eq!(db.bonus(id).await.unwrap_or(0), entry.desired.bonus_slots);
        }

        // The explanation lists every referred user with an outcome.
        let id = full
            .plan
            .entries
            .iter()
            .find(|e| e.desired.referred_users_total > 2)
            .unwrap()
            .referrer_user_id();
        let r = http
            .get(url(&format!("/v1/referrers/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = r.json().await.unwrap();
        let referrals = body["referrals"].as_array().unwrap();
        assert_eq!(
            referrals.len() as i64,
            body["referred_users_total"].as_i64().unwrap()
        );
        assert!(referrals.iter().all(|r| r["outcome"].is_string()));

        // A busy lock is 409 for an apply; a dry run needs no lock.
        let store = db.store().await;
        let lock = store.try_lock(Scope::Full).await.unwrap().unwrap();
        let r = http
            .post(url(&format!("/v1/referrers/{id}/reconcile")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);
        let r = http
            .post(url(&format!("/v1/referrers/{id}/reconcile?dry_run=true")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        drop(lock);
        store.close().await;

        // /metrics parses as Prometheus text and counts the runs.
        let text = http
            .get(url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        let succeeded = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "referral_rewards_runs_total"
                    && s.labels.get("status") == Some("succeeded")
                    && s.labels.get("mode") == Some("referrer")
            })
            .expect("runs by kind and status");
        assert!(
            matches!(succeeded.value, prometheus_parse::Value::Counter(v) if v >= 5.0),
            "{text}"
        );
        for name in [
            "referral_rewards_last_run_duration_seconds",
            "referral_rewards_last_run_timestamp_seconds",
            "referral_rewards_last_run_referrers_processed",
            "referral_rewards_last_run_rewards_changed",
            "referral_rewards_last_run_conflicts",
            "referral_rewards_last_run_outcomes",
        ] {
            assert!(
                scrape.samples.iter().any(|s| s.metric == name),
                "{name} missing:\n{text}"
            );
        }

        server.signal("-TERM");
        assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
    }
);

each_backend!(
    schedule_records_runs_never_overlapping_and_skips_busy_ticks,
    |db: TestDb| async move {
        let Some(db) = demo_db(db.backend).await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (hold, env) = hold_file(dir.path());
        let server = Server::start_with(
            &db,
            dir.path(),
            "* * * * * *",
            true,
            30,
            Extra {
                env,
                ..Extra::default()
            },
        );
        // The first run is held inside its write; the ticks meanwhile are skipped, not queued.
        wait_for_log(&server, "test hold", Duration::from_secs(30)).await;
        wait_for_log(
            &server,
            "tick skipped: the previous run is still going",
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM reward_runs").await,
            1,
            "the skipped ticks left no row"
        );
        std::fs::remove_file(&hold).unwrap();
        wait_for(
            &db,
            "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'",
            3,
            Duration::from_secs(30),
        )
        .await;
        server.signal("-TERM");
        assert_eq!(server.wait(Duration::from_secs(40)), Some(0));
        assert_no_overlap(&db).await;
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM reward_runs WHERE status <> 'succeeded'")
                .await,
            0
        );
    }
);

each_backend!(
    sigterm_during_a_run_exits_0_and_leaves_no_partial_state,
    |db: TestDb| async move {
        let Some(db) = demo_db(db.backend).await else {
            return;
        };
        let before = db.state().await;
        let dir = tempfile::tempdir().unwrap();
        let (hold, env) = hold_file(dir.path());
        // No grace: the run in flight is aborted at once, inside its write transaction.
        let server = Server::start_with(
            &db,
            dir.path(),
            "0 0 0 1 1 *",
            true,
            0,
            Extra {
                env,
                ..Extra::default()
            },
        );
        wait_for_log(&server, "test hold", Duration::from_secs(30)).await;
        server.signal("-TERM");
        let log_path = server.dir.clone();
        assert_eq!(server.wait(Duration::from_secs(60)), Some(0));
        let log = std::fs::read_to_string(log_path).unwrap();
        assert!(log.contains("a run outlived the grace period"), "{log}");
        std::fs::remove_file(&hold).unwrap();
        let runs = db.rows("SELECT status, error FROM reward_runs").await;
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0][0].as_deref(), Some("failed"), "{runs:?}");
        assert!(
            runs[0][1].as_deref().unwrap().contains("shutting down"),
            "{runs:?}"
        );
        assert_eq!(
            db.state().await,
            before,
            "nothing of the aborted run is left"
        );
    }
);

each_backend!(
    kill_9_then_restart_marks_the_orphan_abandoned,
    |db: TestDb| async move {
        let Some(db) = demo_db(db.backend).await else {
            return;
        };
        let before = db.state().await;
        let dir = tempfile::tempdir().unwrap();
        let (hold, env) = hold_file(dir.path());
        let server = Server::start_with(
            &db,
            dir.path(),
            "0 0 0 1 1 *",
            true,
            5,
            Extra {
                env,
                ..Extra::default()
            },
        );
        // Killed inside its write transaction.
        wait_for_log(&server, "test hold", Duration::from_secs(30)).await;
        server.signal("-KILL");
        server.wait(Duration::from_secs(10));
        std::fs::remove_file(&hold).unwrap();
        assert_eq!(
            db.state().await,
            before,
            "nothing of the killed run is left"
        );

        let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", true, 5);
        wait_for(
            &db,
            "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'",
            1,
            Duration::from_secs(60),
        )
        .await;
        server.signal("-TERM");
        assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
        assert_eq!(
            db.rows("SELECT status FROM reward_runs ORDER BY id").await,
            [[Some("abandoned".into())], [Some("succeeded".into())]]
        );
    }
);

each_backend!(
    run_history_and_ledgers_over_http_match_the_cli_and_each_run_records_its_trigger,
    |db: TestDb| async move {
        let Some(db) = demo_db(db.backend).await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with(
            &db,
            dir.path(),
            "0 0 0 1 1 *",
            true,
            5,
            Extra {
                config: "[[grants]]\nname = \"paid_access\"\nreferrer = { credit_days = 45 }\n",
                ..Extra::default()
            },
        );
        // Run 1: the scheduler's (run_on_start); run 2: an HTTP recompute; run 3: the CLI's.
        wait_for(
            &db,
            "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'",
            1,
            Duration::from_secs(60),
        )
        .await;
        let referrer = db
            .scalar("SELECT MIN(referrer_user_id) FROM referral_grants WHERE run_id = 1")
            .await;
        let http = client();
        let get = |path: String| {
            let (http, url) = (http.clone(), format!("{}{path}", server.base));
            async move {
                let r = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<serde_json::Value>().await.unwrap())
            }
        };
        let r = http
            .post(format!("{}/v1/referrers/{referrer}/reconcile", server.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cli = |args: &[&str]| {
            let o = Command::new(BIN)
                .args(["--database-url", &db.url])
                .args(args)
                .current_dir(dir.path())
                .env_remove("DATABASE_URL")
                .output()
                .unwrap();
            assert_eq!(
                o.status.code(),
                Some(0),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            o.stdout
        };
        let r = referrer.to_string();
        cli(&["reconcile", "--referrer", &r]);
        assert_eq!(
            db.rows("SELECT CAST(trigger AS TEXT) FROM reward_runs ORDER BY id")
                .await,
            [
                [Some("schedule".to_owned())],
                [Some("http".to_owned())],
                [Some("cli".to_owned())]
            ]
        );
        let (status, runs) = get("/v1/runs".into()).await;
        assert_eq!(status, 200);
        let triggers: Vec<&str> = runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["trigger"].as_str().unwrap())
            .collect();
        assert_eq!(triggers, ["cli", "http", "schedule"]);
        assert_eq!(runs["runs"][1]["referrer_user_id"], referrer);
        let json = |bytes: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&bytes).unwrap();
        assert_eq!(
            runs,
            json(cli(&["runs", "--format", "json"])),
            "one structure"
        );

        // One run: the same answer as `runs show`, with the ledger counts.
        let (status, show) = get("/v1/runs/1".into()).await;
        assert_eq!(status, 200);
        assert_eq!(show, json(cli(&["runs", "show", "1", "--format", "json"])));
        assert_eq!(show["run"]["trigger"], "schedule");
        assert_eq!(
            show["ledger"]["reward_changes"],
            db.scalar("SELECT COUNT(*) FROM reward_changes WHERE run_id = 1")
                .await
        );
        let grants = db
            .scalar("SELECT COUNT(*) FROM referral_grants WHERE run_id = 1 AND kind = 'grant'")
            .await;
        assert!(grants > 0);
        assert_eq!(show["ledger"]["grants"], grants);

        // The ledgers by run and referrer: the same as `changes`.
        let path = format!("/v1/changes?run=1&referrer={referrer}");
        let (status, changes) = get(path).await;
        assert_eq!(status, 200);
        assert_eq!(
            changes,
            json(cli(&[
                "changes",
                "--run",
                "1",
                "--referrer",
                &r,
                "--format",
                "json"
            ]))
        );
        let rows = changes["grants"].as_array().unwrap();
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|g| g["run_id"] == 1
            && g["referrer_user_id"] == referrer
            && g["program"] == "paid_access"));
        let (_, page) = get("/v1/changes?limit=2".into()).await;
        assert_eq!(page["reward_changes"].as_array().unwrap().len(), 2);
        assert_eq!(page["reward_changes_more"], true);
        assert_eq!(page["grants"].as_array().unwrap().len(), 2);
        assert_eq!(page["grants_more"], true);

        // Bad input is 400, an unknown run 404, no token 401: each with a JSON error.
        for (path, want) in [
            ("/v1/runs/abc", 400),
            ("/v1/runs/1?limit=0", 400),
            ("/v1/runs/999999", 404),
            ("/v1/changes?run=x", 400),
            ("/v1/changes?referrer=1.5", 400),
            ("/v1/changes?limit=1001", 400),
        ] {
            let (status, body) = get(path.into()).await;
            assert_eq!(status, want, "{path}");
            assert!(body["error"].is_string(), "{path}: {body}");
        }
        for path in ["/v1/runs/1", "/v1/changes"] {
            let r = http
                .get(format!("{}{path}", server.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{path}");
        }
        server.signal("-TERM");
        assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
    }
);

/// `/healthz` answers 503 once the database is gone, and the server stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_when_the_database_is_unreachable() {
    let Some(db) = demo_db(Backend::PgTimestamp).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
    let http = client();
    let health =
        |http: reqwest::Client, url: String| async move { http.get(url).send().await.unwrap() };
    assert_eq!(
        health(http.clone(), format!("{}/healthz", server.base))
            .await
            .status(),
        200
    );
    let name = url::Url::parse(&db.url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    let base = pg_available().await.unwrap();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let r = health(http.clone(), format!("{}/healthz", server.base)).await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    server.signal("-TERM");
    assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
}

/// Two servers on one PostgreSQL database never apply at the same time: while one holds a run
/// inside its write, the other's ticks find the lock taken and skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_never_apply_together() {
    let Some(db) = demo_db(Backend::PgTimestamp).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (hold, env) = hold_file(dir.path());
    let a = Server::start_with(
        &db,
        dir.path(),
        "* * * * * *",
        true,
        10,
        Extra {
            env,
            ..Extra::default()
        },
    );
    wait_for_log(&a, "test hold", Duration::from_secs(30)).await;
    let b = Server::start(&db, dir.path(), "* * * * * *", true, 10);
    wait_for_log(
        &b,
        "tick skipped: another run holds the run lock",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(db.scalar("SELECT COUNT(*) FROM reward_runs").await, 1);
    std::fs::remove_file(&hold).unwrap();
    wait_for(
        &db,
        "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'",
        6,
        Duration::from_secs(40),
    )
    .await;
    a.signal("-TERM");
    b.signal("-TERM");
    assert_eq!(a.wait(Duration::from_secs(20)), Some(0));
    assert_eq!(b.wait(Duration::from_secs(20)), Some(0));
    assert_no_overlap(&db).await;
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM reward_runs WHERE status <> 'succeeded'")
            .await,
        0
    );
}

/// Waits until the server's log has a line containing `needle` (a handshake, not a guess).
async fn wait_for_log(server: &Server, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = server.log();
        if let Some(line) = log.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no {needle:?} in the log: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tick that fails before its run row exists (the lock file cannot be opened) is logged,
/// counted, and turns `/healthz` to 503; the next good tick turns it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_failing_before_its_run_row_is_logged_counted_and_unhealthy() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let path = PathBuf::from(db.url.strip_prefix("sqlite://").unwrap());
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    std::fs::create_dir(&lock).unwrap(); // a directory where the lock file should be
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "* * * * * *", false, 5);
    let line = wait_for_log(
        &server,
        "tick failed before its run started",
        Duration::from_secs(30),
    )
    .await;
    assert!(line.contains("lock"), "{line}");
    assert_eq!(db.scalar("SELECT COUNT(*) FROM reward_runs").await, 0);
    let http = client();
    let r = http
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "failing", "{body}");
    assert!(
        body["last_scheduled_run"]["error"]
            .as_str()
            .unwrap()
            .contains("lock")
    );
    let metrics = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("referral_rewards_tick_failures_total "))
        .expect("the counter")
        .parse::<f64>()
        .unwrap();
    assert!(failures >= 1.0, "{metrics}");

    std::fs::remove_dir(&lock).unwrap();
    wait_for(
        &db,
        "SELECT COUNT(*) FROM reward_runs WHERE status = 'succeeded'",
        1,
        Duration::from_secs(30),
    )
    .await;
    // The tick that recorded that run has finished once its row says succeeded; ask until the
    // server has taken note (its in-memory record is written right after the run returns).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still unhealthy after a good run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SQLite locked by a writer is busy, not down: `/healthz` says `busy` with 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_busy_not_unavailable_while_sqlite_is_locked() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    // A rollback-journal database, where a writer's exclusive lock keeps readers out.
    db.exec("PRAGMA journal_mode = DELETE").await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
    let http = client();
    let health = || async {
        let r = http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(health().await.1["status"], "ok");
    let mut writer = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut writer)
        .await
        .unwrap();
    let (code, body) = health().await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("busy")),
        "{body}"
    );
    sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    assert_eq!(health().await.1["status"], "ok");
}

/// `GET /v1/users/{id}` is `explain --user --format json`: the same structure, from the same
/// code; an unknown user is a 404 and a bad id a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referred_user_is_explained_over_http_as_on_the_command_line() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
    let http = client();
    let user = db
        .scalar("SELECT MIN(id) FROM users WHERE referred_by_user_id IS NOT NULL")
        .await;
    let referrer = db
        .scalar(&format!(
            "SELECT referred_by_user_id FROM users WHERE id = {user}"
        ))
        .await;
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{}{path}", server.base);
        async move {
            let r = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (code, mut body) = get(format!("/v1/users/{user}")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["referred_by"], referrer);
    assert_eq!(body["slots"]["referred_user_id"], user);
    assert!(
        body["slots"]["reason"].as_str().unwrap().len() > 10,
        "{body}"
    );
    // The command line at the same as-of gives the same object.
    let as_of = body["as_of"].as_str().unwrap().to_owned();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_referral-rewards"))
        .args([
            "--database-url",
            &db.url,
            "explain",
            "--user",
            &user.to_string(),
        ])
        .args(["--as-of", &as_of, "--format", "json"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut cli: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    body.as_object_mut().unwrap().remove("as_of");
    cli.as_object_mut().unwrap().remove("as_of");
    assert_eq!(body, cli);
    assert_eq!(get("/v1/users/999999999".into()).await.0, 404);
    assert_eq!(get("/v1/users/abc".into()).await.0, 400);
}

/// `GET /v1/audit` serves the audit page of a full dry run at now, behind the token like the
/// rest: self-contained HTML whose data counts every referrer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_page_is_served_behind_the_token() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
    let http = client();
    let url = format!("{}/v1/audit", server.base);
    let denied = http.get(&url).send().await.unwrap();
    assert_eq!(denied.status().as_u16(), 401);
    let r = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/html; charset=utf-8"
    );
    let page = r.text().await.unwrap();
    assert!(page.starts_with("<!doctype html>"));
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
    let start = page
        .find(r#"<script type="application/json" id="data">"#)
        .unwrap();
    let json = &page[start..];
    let json = &json[json.find('>').unwrap() + 1..json.find("</script>").unwrap()];
    let data: serde_json::Value = serde_json::from_str(json).unwrap();
    let referrers = db
        .scalar("SELECT COUNT(*) FROM users WHERE invite_code IS NOT NULL")
        .await;
    assert_eq!(data["referrers"], referrers);
    assert!(data["dry_run"].as_bool().unwrap());
    // Nothing was written: no run row.
    assert_eq!(db.scalar("SELECT COUNT(*) FROM reward_runs").await, 0);
}

/// `GET /v1/referrers/{id}` pages its referrals; the pages together are every referral once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_over_http_is_paged() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
    let http = client();
    // The referrer with the most referrals.
    let id = db
        .scalar(
            "SELECT referred_by_user_id FROM users WHERE referred_by_user_id IS NOT NULL \
             GROUP BY referred_by_user_id ORDER BY COUNT(*) DESC, referred_by_user_id LIMIT 1",
        )
        .await;
    let total = db
        .scalar(&format!(
            "SELECT COUNT(*) FROM users WHERE referred_by_user_id = {id}"
        ))
        .await;
    assert!(total >= 3, "{total}");
    let get = |query: String| {
        let http = http.clone();
        let url = format!("{}/v1/referrers/{id}{query}", server.base);
        async move {
            let r = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let mut seen = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let q = match cursor {
            Some(c) => format!("?limit=2&cursor={c}"),
            None => "?limit=2".into(),
        };
        let (code, page) = get(q).await;
        assert_eq!(code, 200, "{page}");
        assert_eq!(page["referrals_total"], total);
        let rows = page["referrals"].as_array().unwrap();
        assert!(rows.len() <= 2);
        seen.extend(rows.iter().map(|r| r["referred_user_id"].as_i64().unwrap()));
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seen, sorted, "ascending, each once");
    assert_eq!(seen.len() as i64, total);
    let (code, default) = get(String::new()).await;
    assert_eq!(code, 200);
    assert!(default["referrals"].as_array().unwrap().len() <= 100);
    for bad in ["?limit=0", "?limit=1001", "?limit=x", "?cursor=abc"] {
        assert_eq!(get(bad.into()).await.0, 400, "{bad}");
    }
}

/// Idle connections are closed after the header timeout, at most `max_connections` are served
/// at once, and a server short of descriptors keeps a reserve for its runs: a one-referrer run
/// still succeeds behind 300 idle connections under a 256-descriptor limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_server() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &db,
        dir.path(),
        "0 0 0 1 1 *",
        false,
        5,
        Extra {
            http: "header_timeout_secs = 1\n",
            nofile: Some(256),
            ..Extra::default()
        },
    );
    let warned = wait_for_log(
        &server,
        "http.max_connections lowered",
        Duration::from_secs(10),
    )
    .await;
    assert!(warned.contains("cap=128"), "{warned}");
    let addr = server.base.strip_prefix("http://").unwrap().to_owned();
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // A real request behind them: served once idle ones are timed out.
    let id = db
        .scalar("SELECT MIN(id) FROM users WHERE invite_code IS NOT NULL")
        .await;
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .post(format!("{}/v1/referrers/{id}/reconcile", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", server.log());
    // Every idle connection the server took was closed by it (EOF), none left hanging.
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => closed += 1,
            Ok(_) => closed += 1, // an error response before closing
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(e) => panic!("an idle connection was never closed: {e}"),
        }
    }
    assert_eq!(closed, 300);
    let log = server.log();
    assert!(!log.contains("Too many open files"), "{log}");
}

/// A run that panics fails that run only: its request gets a 500 and its row says `failed`;
/// the next runs in the same process succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_run_fails_only_itself() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let ids: Vec<i64> = db
        .rows(
            "SELECT CAST(id AS TEXT) FROM users WHERE invite_code IS NOT NULL ORDER BY id LIMIT 2",
        )
        .await
        .into_iter()
        .map(|r| r[0].as_ref().unwrap().parse().unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &db,
        dir.path(),
        "0 0 0 1 1 *",
        false,
        5,
        Extra {
            env: vec![(
                "REFERRAL_REWARDS_FAULT",
                format!("panic-compute-referrer={}", ids[0]),
            )],
            ..Extra::default()
        },
    );
    let http = client();
    let post = |id: i64| {
        http.post(format!("{}/v1/referrers/{id}/reconcile", server.base))
            .bearer_auth(TOKEN)
            .send()
    };
    for _ in 0..2 {
        let r = post(ids[0]).await.unwrap();
        assert_eq!(r.status(), 500);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("internal error"),
            "{body}"
        );
        assert_eq!(
            post(ids[1]).await.unwrap().status(),
            200,
            "{}",
            server.log()
        );
    }
    assert_eq!(
        db.rows("SELECT status FROM reward_runs ORDER BY id").await,
        [
            [Some("failed".into())],
            [Some("succeeded".into())],
            [Some("failed".into())],
            [Some("succeeded".into())]
        ]
    );
    assert_eq!(
        server.log().matches("a task panicked").count(),
        2,
        "one log line per panic: {}",
        server.log()
    );
}

/// A token read from a file with its trailing newline is the token without it, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_trailing_newline_is_trimmed() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &db,
        dir.path(),
        "0 0 0 1 1 *",
        false,
        5,
        Extra {
            env: vec![("REFERRAL_REWARDS_API_TOKEN", format!("{TOKEN}\n"))],
            ..Extra::default()
        },
    );
    let http = client();
    let get = |token: &'static str| {
        http.get(format!("{}/v1/runs", server.base))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(get(TOKEN).await.unwrap().status(), 200);
    assert_eq!(get("wrong").await.unwrap().status(), 401);
}

/// A scheduled run that panics before its run row exists is a failed tick all the same: counted
/// and unhealthy, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_panics_before_its_run_is_counted_and_unhealthy() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &db,
        dir.path(),
        "0 0 0 1 1 *",
        true,
        5,
        Extra {
            env: vec![("REFERRAL_REWARDS_FAULT", "panic-before-run".into())],
            ..Extra::default()
        },
    );
    wait_for_log(&server, "a task panicked", Duration::from_secs(30)).await;
    let http = client();
    // The tick records its failure right after the panic is caught.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let r = http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still healthy: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["status"], "failing");
    assert_eq!(body["tick_failures_total"], 1);
    assert!(
        body["last_scheduled_run"]["error"]
            .as_str()
            .unwrap()
            .contains("fault injected")
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM reward_runs").await, 0);
}

/// `/metrics` as (metric, sorted labels) -> value.
async fn scrape(server: &Server) -> std::collections::BTreeMap<(String, String), f64> {
    let text = client()
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let v = match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("{other:?}"),
            };
            ((s.metric, labels.join(",")), v)
        })
        .collect()
}

fn utc_now() -> referral_rewards::instant::Instant {
    referral_rewards::instant::from_datetime(chrono::Utc::now())
}

/// A referrer with referred users, from a full dry run.
async fn some_referrer(db: &TestDb) -> i64 {
    let full = db.reconcile(Scope::Full, utc_now(), true).await.unwrap();
    full.computation
        .results
        .iter()
        .find(|r| r.referred_users_total > 2)
        .unwrap()
        .referrer_user_id
}

/// The last-run gauges are per kind of run: a one-referrer recompute sets the `referrer` ones
/// and leaves every `full` one (and the last success of the full runs) as it was.
async fn one_referrer_run_leaves_the_full_run_metrics(backend: Backend) {
    let Some(db) = demo_db(backend).await else {
        return;
    };
    db.reconcile(Scope::Full, utc_now(), false).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&db, dir.path(), "0 0 0 1 1 *", false, 5);
    let before = scrape(&server).await;
    let get = |m: &std::collections::BTreeMap<(String, String), f64>, name: &str, labels: &str| {
        m.get(&(name.to_owned(), labels.to_owned())).copied()
    };
    assert_eq!(
        get(
            &before,
            "referral_rewards_build_info",
            &format!("version={}", env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );
    assert!(
        get(
            &before,
            "referral_rewards_last_run_referrers_processed",
            "mode=full"
        )
        .unwrap()
            > 10.0
    );
    assert_eq!(
        get(&before, "referral_rewards_last_run_succeeded", "mode=full"),
        Some(1.0)
    );
    assert_eq!(
        get(
            &before,
            "referral_rewards_runs_total",
            "mode=full,status=succeeded"
        ),
        Some(1.0)
    );
    let success = get(
        &before,
        "referral_rewards_last_success_timestamp_seconds",
        "",
    )
    .unwrap();
    assert!(
        (success - utc_now() as f64 / 1e6).abs() < 600.0,
        "{success}"
    );
    assert!(
        !before
            .keys()
            .any(|(n, l)| n.starts_with("referral_rewards_last_run") && l.contains("mode=referrer")),
        "no referrer run yet: {before:?}"
    );

    let id = some_referrer(&db).await;
    let r = client()
        .post(format!("{}/v1/referrers/{id}/reconcile", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = scrape(&server).await;
    for ((name, labels), v) in &before {
        if labels.contains("mode=full") || name.contains("last_success") {
            assert_eq!(
                after.get(&(name.clone(), labels.clone())),
                Some(v),
                "{name}{{{labels}}}"
            );
        }
    }
    assert_eq!(
        get(
            &after,
            "referral_rewards_last_run_referrers_processed",
            "mode=referrer"
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            &after,
            "referral_rewards_last_run_succeeded",
            "mode=referrer"
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            &after,
            "referral_rewards_runs_total",
            "mode=referrer,status=succeeded"
        ),
        Some(1.0)
    );
    assert!(
        get(
            &after,
            "referral_rewards_last_run_timestamp_seconds",
            "mode=referrer"
        )
        .unwrap()
            >= get(
                &after,
                "referral_rewards_last_run_timestamp_seconds",
                "mode=full"
            )
            .unwrap()
    );
    server.signal("-TERM");
    assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_referrer_run_leaves_the_full_run_metrics_sqlite() {
    one_referrer_run_leaves_the_full_run_metrics(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_referrer_run_leaves_the_full_run_metrics_pg() {
    one_referrer_run_leaves_the_full_run_metrics(Backend::PgTimestamp).await;
}

/// `/healthz` judges the full runs: stale once the last successful one is older than
/// `schedule.stale_after_secs`, failing when the last one failed; a one-referrer run changes
/// neither; a fresh successful full run makes it healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_judges_the_last_full_run_and_its_age() {
    let db = demo_db(Backend::Sqlite).await.unwrap();
    db.reconcile(Scope::Full, utc_now(), false).await.unwrap();
    db.exec("UPDATE reward_runs SET started_at = '2020-01-01 00:00:00', finished_at = '2020-01-01 00:01:00'")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &db,
        dir.path(),
        "0 0 0 1 1 *",
        false,
        5,
        Extra {
            schedule: "stale_after_secs = 3600",
            ..Extra::default()
        },
    );
    let http = client();
    let health = || async {
        let r = http
            .get(format!("{}/healthz", server.base))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json::<serde_json::Value>().await.unwrap())
    };
    let (code, body) = health().await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("stale")),
        "{body}"
    );
    assert!(
        body["last_success_age_seconds"].as_f64().unwrap() > 3600.0,
        "{body}"
    );
    assert_eq!(body["stale_after_seconds"], 3600);

    let id = some_referrer(&db).await;
    let r = http
        .post(format!("{}/v1/referrers/{id}/reconcile", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, body) = health().await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("stale")),
        "a one-referrer run is no full run: {body}"
    );

    db.reconcile(Scope::Full, utc_now(), false).await.unwrap();
    let (code, body) = health().await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")), "{body}");
    assert!(
        body["last_success_age_seconds"].as_f64().unwrap() < 600.0,
        "{body}"
    );

    // A failed full run after it: failing, whatever the one-referrer runs do.
    db.exec("INSERT INTO reward_runs (mode, as_of, started_at, finished_at, status, error) \
             VALUES ('full', '2026-01-01 00:00:00', '2026-01-01 00:00:00', '2026-01-01 00:00:01', 'failed', 'boom')")
        .await;
    let r = http
        .post(format!("{}/v1/referrers/{id}/reconcile", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, body) = health().await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("failing")),
        "{body}"
    );
    assert_eq!(body["last_full_run"]["error"], "boom");
    server.signal("-TERM");
    assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
}

/// Under systemd's `Type=notify`: READY=1 once serving, WATCHDOG=1 at half of `WATCHDOG_USEC`,
/// STOPPING=1 at SIGTERM, each a datagram to `$NOTIFY_SOCKET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_notifies_systemd_ready_watchdog_and_stopping() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let server = Server::start_with(
        &db,
        dir.path(),
        "0 0 0 1 1 *",
        false,
        5,
        Extra {
            env: vec![
                ("NOTIFY_SOCKET", socket_path.display().to_string()),
                ("WATCHDOG_USEC", "200000".into()),
            ],
            ..Extra::default()
        },
    );
    let recv = || {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert_eq!(recv(), "WATCHDOG=1");
    server.signal("-TERM");
    loop {
        let m = recv();
        if m.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
}
