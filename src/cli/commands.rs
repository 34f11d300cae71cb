//! What each command does: load the configuration, open the database the way the command
//! needs it, call the library, print.

use std::path::PathBuf;
use std::time::Duration;

use referral_rewards::config::{self, Config};
use referral_rewards::demo::DemoSpec;
use referral_rewards::engine::{self, EngineError, RunControl, RunRequest};
use referral_rewards::instant;
use referral_rewards::program::grants::report as grant_report;
use referral_rewards::report::{self, ReportFormat};
use referral_rewards::serve;
use referral_rewards::snapshot::Scope;
use referral_rewards::store::{ConnectOptions, Store, check, migrations};
use referral_rewards::summary;

use super::args::{Cli, Command, ExplainFormat};
use super::exit::{Exit, Failure};

fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.toml"), false),
    };
    // REFERRAL_REWARDS_<TABLE>__<KEY> overrides (a value that is not UTF-8 arrives mangled,
    // and is refused by its key's validation, naming the variable).
    let vars = std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    });
    let mut config = Config::load_with_env(&path, required, vars)?;
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.is_empty()
    {
        config::validate_url("DATABASE_URL", &url)?;
        config.database.url = url;
    }
    if let Some(url) = &cli.database_url {
        config::validate_url("--database-url", url)?;
        config.database.url = url.clone();
    }
    Ok(config)
}

/// How a command opens the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Dry runs, `explain`, `runs`: never writes (SQLite `mode=ro`).
    ReadOnly,
    /// Applies and `serve`: writes, but never creates a missing SQLite file (a typo'd path
    /// must not leave an empty database behind).
    Write,
    /// `migrate` and `demo-data`: may create the SQLite file.
    Create,
}

async fn connect(config: &Config, access: Access) -> Result<Store, Failure> {
    let d = &config.database;
    let secs = |s: i64| Duration::from_secs(s as u64);
    let opts = ConnectOptions {
        read_only: access == Access::ReadOnly,
        busy_timeout: secs(d.busy_timeout_secs),
        pg_binary_copy: d.pg_binary_copy,
        lock_timeout: secs(d.lock_timeout_secs),
        statement_timeout: secs(d.statement_timeout_secs),
        create: access == Access::Create,
    };
    Ok(Store::connect(&config.database.url, &opts).await?)
}

/// A spinner with the run's stage on a terminal; nothing otherwise (the stages are log lines).
fn progress_spinner() -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    Some(bar)
}

/// Writes the report (and the per-referral rows beside it) on a blocking thread; returns what
/// it wrote, for the summary.
async fn write_reports(
    run: std::sync::Arc<engine::RunReport>,
    path: PathBuf,
    format: ReportFormat,
    per_referral: bool,
    only_changes: bool,
) -> Result<Vec<String>, Failure> {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let mut frame = report::referrer_frame(&run.plan, only_changes).map_err(polars_failure)?;
        report::write(&mut frame, &path, format)?;
        out.push(format!(
            "report: {} rows to {} in {:.2} s",
            frame.height(),
            path.display(),
            started.elapsed().as_secs_f64()
        ));
        if per_referral {
            let started = std::time::Instant::now();
            let keep: Option<std::collections::HashSet<i64>> = only_changes.then(|| {
                run.plan
                    .entries
                    .iter()
                    .filter(|e| e.changes_anything())
                    .map(|e| e.referrer_user_id())
                    .collect()
            });
            let mut rows = report::referral_frame(&run.computation.listed(), keep.as_ref())
                .map_err(polars_failure)?;
            let beside = report::per_referral_path(&path, format);
            report::write(&mut rows, &beside, format)?;
            out.push(format!(
                "per-referral report: {} rows to {} in {:.2} s",
                rows.height(),
                beside.display(),
                started.elapsed().as_secs_f64()
            ));
            if !run.grants.is_empty() {
                let started = std::time::Instant::now();
                let mut rows = grant_report::referral_frame(&run.grants, |d| {
                    !only_changes || !d.changes.is_empty()
                })
                .map_err(polars_failure)?;
                let beside = report::grants_path(&path, format);
                report::write(&mut rows, &beside, format)?;
                out.push(format!(
                    "per-referral grants report: {} rows to {} in {:.2} s",
                    rows.height(),
                    beside.display(),
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        if !run.grants.is_empty() {
            let mut frame = grant_report::program_frame(&run.grants).map_err(polars_failure)?;
            let beside = report::programs_path(&path, format);
            report::write(&mut frame, &beside, format)?;
            out.push(format!(
                "grant programs report: {} rows to {}",
                frame.height(),
                beside.display()
            ));
        }
        Ok(out)
    })
    .await
    .map_err(|e| Failure {
        exit: Exit::RunFailed,
        message: format!("writing the report: {e}"),
    })?
}

fn polars_failure(e: polars::prelude::PolarsError) -> Failure {
    Failure {
        exit: Exit::RunFailed,
        message: format!("building the report: {e}"),
    }
}

fn now() -> instant::Instant {
    instant::from_datetime(chrono::Utc::now())
}

pub async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let config = load_config(&cli)?;
    match cli.command {
        Command::Migrate { info: true, .. } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let info = store.migration_info().await;
            store.close().await;
            print!("{}", migrations::info_text(&info?));
        }
        Command::Migrate {
            with_reference_schema,
            info: false,
        } => {
            let store = connect(&config, Access::Create).await?;
            store.migrate(with_reference_schema).await?;
            println!(
                "migrated {} database{}",
                store.backend(),
                if with_reference_schema {
                    " (with the reference host schema)"
                } else {
                    ""
                }
            );
            store.close().await;
        }
        Command::DemoData {
            users,
            seed,
            anchor,
        } => {
            let store = connect(&config, Access::Create).await?;
            store.migrate(false).await?;
            let started = std::time::Instant::now();
            let n = store
                .load_demo(&DemoSpec {
                    users,
                    seed,
                    anchor,
                })
                .await?;
            println!(
                "loaded {} users, {} subscriptions, {} telemetry events, {} payments into {} in {:.1} s (seed {seed}, anchor {})",
                n.users,
                n.subscriptions,
                n.events,
                n.payments,
                store.backend(),
                started.elapsed().as_secs_f64(),
                instant::to_rfc3339(anchor)
            );
            store.close().await;
        }
        Command::Reconcile {
            referrer,
            shard,
            dry_run,
            as_of,
            report,
            format,
            per_referral,
            only_changes,
            save_plan,
            expect_digest,
            plan,
        } => {
            // Usage problems first, before touching the database.
            let target = report
                .map(|p| ReportFormat::resolve(&p, format).map(|f| (p, f)))
                .transpose()?;
            let audited = plan.as_deref().map(report::load_plan).transpose()?;
            let audited_as_of = match &audited {
                Some(a) => Some(instant::parse_as_of(&a.as_of).map_err(|e| Failure {
                    exit: Exit::Usage,
                    message: format!("--plan: as_of {e}"),
                })?),
                None => None,
            };
            let spinner = progress_spinner();
            let control = RunControl {
                expect_digest: expect_digest.or_else(|| audited.as_ref().map(|a| a.digest.clone())),
                progress: spinner.clone().map(|bar| {
                    std::sync::Arc::new(move |what: &str| bar.set_message(what.to_owned()))
                        as engine::Progress
                }),
                list_uncounted: per_referral,
                ..RunControl::default()
            };
            let access = if dry_run {
                Access::ReadOnly
            } else {
                Access::Write
            };
            let store = connect(&config, access).await?;
            let req = RunRequest {
                scope: match (referrer, shard) {
                    (Some(id), _) => Scope::Referrer(id),
                    (None, Some(s)) => Scope::Shard(s),
                    (None, None) => Scope::Full,
                },
                as_of: as_of.or(audited_as_of).unwrap_or_else(now),
                dry_run,
            };
            let result = engine::run_controlled(&store, &config, req, &control).await;
            if let Some(bar) = spinner {
                bar.finish_and_clear();
            }
            store.close().await;
            let run = match result {
                Err(EngineError::DigestMismatch { expected, plan }) => {
                    let differ = audited
                        .as_ref()
                        .map(|a| match report::count_differences(a, &plan) {
                            0 if !config.grants.is_empty() => {
                                "; the slots results match the audited plan, so the grant programs' differ".to_owned()
                            }
                            n => format!("; {n} referrers differ from the audited plan"),
                        })
                        .unwrap_or_default();
                    return Err(Failure {
                        exit: Exit::Refused,
                        message: format!(
                            "refused: the plan's digest is {}, not the expected {expected}{differ}; nothing was written",
                            plan.digest
                        ),
                    });
                }
                other => other?,
            };
            print!("{}", summary::run_summary(&run));
            if run.request.scope == Scope::Full && run.request.dry_run {
                print!("{}", summary::program_analytics(&run));
            }
            let run = std::sync::Arc::new(run);
            if let Some((path, format)) = target {
                let written =
                    write_reports(run.clone(), path, format, per_referral, only_changes).await?;
                for line in written {
                    println!("{line}");
                }
            }
            if let Some(path) = save_plan {
                let saved = report::saved_plan(&run.plan, &run.grants, run.request.as_of);
                report::save_plan(&saved, &path)?;
                println!("plan saved to {} (digest {})", path.display(), saved.digest);
            }
            if let Some(text) = engine::write_errors_text(&run.plan) {
                return Err(Failure {
                    exit: Exit::Partial,
                    message: if run.request.dry_run {
                        format!("an apply would leave {}", text.replacen("left ", "", 1))
                    } else {
                        text
                    },
                });
            }
        }
        Command::Explain {
            referrer,
            as_of,
            format,
        } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let req = RunRequest {
                scope: Scope::Referrer(referrer),
                as_of: as_of.unwrap_or_else(now),
                dry_run: true,
            };
            let report = engine::run(&store, &config, req).await;
            store.close().await;
            let report = report?;
            if format == ExplainFormat::Json {
                let v = serve::explanation_json(&report, referrer);
                println!("{}", serde_json::to_string_pretty(&v).expect("plain data"));
                return Ok(());
            }
            let entry = report
                .plan
                .entries
                .iter()
                .find(|e| e.referrer_user_id() == referrer);
            print!(
                "{}",
                summary::explain(
                    entry,
                    !report.computation.results.is_empty(),
                    &report.computation.listed(),
                    referrer
                )
            );
            for p in &report.grants {
                print!(
                    "{}",
                    grant_report::referrer_text(&grant_report::referrer_view(p, referrer))
                );
            }
        }
        Command::Check { audit, format } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let report = check::check(&store, &config).await;
            store.close().await;
            let report = report?;
            if format == ExplainFormat::Json {
                let mut v = serde_json::to_value(&report).expect("plain data");
                v["ok"] = report.ok(audit).into();
                println!("{}", serde_json::to_string_pretty(&v).expect("plain data"));
            } else {
                print!("{}", check::text(&report, audit));
            }
            if !report.ok(audit) {
                let problems = if audit {
                    &report.audit_problems
                } else {
                    &report.apply_problems
                };
                return Err(Failure {
                    exit: Exit::RunFailed,
                    message: format!(
                        "check: {} cannot succeed here: {}",
                        if audit {
                            "a dry run"
                        } else {
                            "an applying run"
                        },
                        problems.join("; ")
                    ),
                });
            }
        }
        Command::Serve => {
            let settings = serve::settings(&config)?;
            let store = connect(&config, Access::Write).await?;
            serve::serve(config, store, settings).await?;
        }
        Command::Runs { limit } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let runs = store.runs(limit).await;
            store.close().await;
            print!("{}", summary::runs_table(&runs?));
        }
    }
    Ok(())
}
