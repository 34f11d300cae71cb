//! What each command does: load the configuration, open the database the way the command
//! needs it, call the library, print.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use referral_rewards::config::{self, Config};
use referral_rewards::demo::DemoSpec;
use referral_rewards::engine::{self, EngineError, RunControl, RunRequest};
use referral_rewards::explain;
use referral_rewards::history;
use referral_rewards::instant;
use referral_rewards::program::grants::report as grant_report;
use referral_rewards::report::{self, ReportFormat};
use referral_rewards::serve;
use referral_rewards::snapshot::Scope;
use referral_rewards::store::{ChangeFilter, ConnectOptions, Store, Trigger, check, migrations};
use referral_rewards::summary::{self, RunJson, WrittenFile};

use super::args::{Cli, Command, Format, PlanCommand, RunsCommand};
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
    // `--database-url`, else `DATABASE_URL` (clap reads it; an empty one is no URL); either
    // wins over REFERRAL_REWARDS_DATABASE__URL.
    if let Some(url) = cli.database_url.as_ref().filter(|u| !u.is_empty()) {
        let source = if cli.database_url_from_env {
            "DATABASE_URL"
        } else {
            "--database-url"
        };
        config::validate_url(source, url)?;
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
        sqlite_mmap_bytes: d.sqlite_mmap_mb.saturating_mul(1 << 20),
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

/// Standard output, written and flushed as each piece is ready. A reader that went away
/// (`| head -1`) is not an error: output stops there and the command ends as it would have
/// (as git and ripgrep do). Any other write error (a full disk, `> /dev/full`) is returned.
#[derive(Default)]
struct Stdout {
    closed: bool,
}

impl Stdout {
    fn write(&mut self, text: &str) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }

    /// Writes, and makes a write error the command's failure (exit 1).
    fn print(&mut self, text: &str) -> Result<(), Failure> {
        self.write(text).map_err(|e| Failure {
            exit: Exit::RunFailed,
            message: format!("writing to standard output: {e}"),
        })
    }
}

/// Where `--report` and `--save-plan` will write, checked before the run starts: an apply must
/// not commit and then fail to leave its report behind for a reason known in advance.
struct Outputs {
    report: Option<(PathBuf, ReportFormat)>,
    /// The audit page (`--html`, or `--report PATH.html`).
    html: Option<PathBuf>,
    plan: Option<PathBuf>,
}

fn usage(message: String) -> Failure {
    Failure {
        exit: Exit::Usage,
        message,
    }
}

/// A file the command will create or overwrite: not a directory, in a directory that exists
/// and that this user may write into (or an existing file it may write).
fn check_writable(flag: &str, path: &Path) -> Result<(), Failure> {
    use std::os::unix::ffi::OsStrExt;
    let shown = path.display();
    if path.is_dir() {
        return Err(usage(format!("{flag} {shown}: is a directory")));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(usage(format!(
            "{flag} {shown}: the directory {} does not exist",
            dir.display()
        )));
    }
    let (target, mode) = if path.exists() {
        (path, libc::W_OK)
    } else {
        (dir, libc::W_OK | libc::X_OK)
    };
    let c = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| usage(format!("{flag} {shown}: the path holds a NUL byte")))?;
    // SAFETY: access(2) only reads the NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), mode) } != 0 {
        let why = std::io::Error::last_os_error();
        return Err(usage(format!(
            "{flag} {shown}: cannot write {}: {why}",
            target.display()
        )));
    }
    Ok(())
}

impl Outputs {
    fn check(
        report: Option<PathBuf>,
        format: Option<ReportFormat>,
        html: Option<PathBuf>,
        per_referral: bool,
        grants: bool,
        plan: Option<PathBuf>,
    ) -> Result<Outputs, Failure> {
        let mut report = report
            .map(|p| ReportFormat::resolve(&p, format).map(|f| (p, f)))
            .transpose()?;
        let mut html_flag = "--html";
        let html = match report.take() {
            Some((path, ReportFormat::Html)) => {
                html_flag = "--report";
                if html.is_some() {
                    return Err(usage(
                        "--report PATH.html and --html both ask for the audit page; give one"
                            .into(),
                    ));
                }
                if per_referral {
                    return Err(usage(format!(
                        "--per-referral {}: the per-referral rows are a table; give --report a .csv, .json or .parquet name (and --html for the page)",
                        path.display()
                    )));
                }
                Some(path)
            }
            other => {
                report = other;
                html
            }
        };
        if let Some(path) = &html {
            check_writable(html_flag, path)?;
        }
        if let Some((path, format)) = &report {
            check_writable("--report", path)?;
            let mut beside = vec![];
            if per_referral {
                beside.push(report::per_referral_path(path, *format));
                if grants {
                    beside.push(report::grants_path(path, *format));
                }
            }
            if grants {
                beside.push(report::programs_path(path, *format));
            }
            for p in beside {
                check_writable("--report", &p)?;
            }
        }
        if let Some(path) = &plan {
            let json = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("json"));
            if !json {
                return Err(usage(format!(
                    "--save-plan {}: a plan is JSON; give it a .json name",
                    path.display()
                )));
            }
            check_writable("--save-plan", path)?;
        }
        Ok(Outputs { report, html, plan })
    }
}

/// Writes the report (and the files beside it) and the plan, on a blocking thread; returns what
/// it wrote, for the summary.
async fn write_outputs(
    run: std::sync::Arc<engine::RunReport>,
    config: Config,
    outputs: Outputs,
    per_referral: bool,
    only_changes: bool,
) -> Result<Vec<WrittenFile>, Failure> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut push = |kind, path: &Path, rows, started: std::time::Instant| {
            out.push(WrittenFile {
                kind,
                path: path.display().to_string(),
                rows,
                seconds: started.elapsed().as_secs_f64(),
            })
        };
        if let Some((path, format)) = &outputs.report {
            let (path, format) = (path.as_path(), *format);
            let started = std::time::Instant::now();
            let mut frame = report::referrer_frame(
                &run.plan,
                &run.computation.results,
                run.request.as_of,
                only_changes,
            )
            .map_err(polars_failure)?;
            report::write(&mut frame, path, format)?;
            push("report", path, frame.height(), started);
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
                let mut rows = report::referral_frame(
                    &run.computation.listed(),
                    &run.computation.facts,
                    run.request.as_of,
                    keep.as_ref(),
                )
                .map_err(polars_failure)?;
                let beside = report::per_referral_path(path, format);
                report::write(&mut rows, &beside, format)?;
                push("per_referral", &beside, rows.height(), started);
                if !run.grants.is_empty() {
                    let started = std::time::Instant::now();
                    let mut rows = grant_report::referral_frame(&run.grants, |d| {
                        !only_changes || !d.changes.is_empty()
                    })
                    .map_err(polars_failure)?;
                    let beside = report::grants_path(path, format);
                    report::write(&mut rows, &beside, format)?;
                    push("grants", &beside, rows.height(), started);
                }
            }
            if !run.grants.is_empty() {
                let started = std::time::Instant::now();
                let mut frame = grant_report::program_frame(&run.grants).map_err(polars_failure)?;
                let beside = report::programs_path(path, format);
                report::write(&mut frame, &beside, format)?;
                push("programs", &beside, frame.height(), started);
            }
        }
        // The page shows the diff of the plan `--save-plan` saves: built once for both.
        let saved = (outputs.html.is_some() || outputs.plan.is_some())
            .then(|| report::saved_plan(&run.plan, &run.grants, run.request.as_of));
        if let (Some(path), Some(saved)) = (&outputs.html, &saved) {
            let started = std::time::Instant::now();
            let diff = referral_rewards::diff::diff(saved);
            let page = referral_rewards::audit_page::render(&run, &config, &diff);
            report::write_page(&page, path)?;
            push("audit_page", path, diff.totals.changed as usize, started);
        }
        if let (Some(path), Some(saved)) = (&outputs.plan, &saved) {
            let started = std::time::Instant::now();
            report::save_plan(saved, path)?;
            push("plan", path, saved.referrers.len(), started);
        }
        Ok(out)
    })
    .await
    .map_err(|e| Failure {
        exit: Exit::RunFailed,
        message: format!("writing the report: {e}"),
    })?
}

/// The text lines that tell what [`write_outputs`] wrote.
fn written_text(files: &[WrittenFile], digest: &str) -> String {
    let mut s = String::new();
    for f in files {
        let line = match f.kind {
            "report" => format!(
                "report: {} rows to {} in {:.2} s",
                f.rows, f.path, f.seconds
            ),
            "per_referral" => format!(
                "per-referral report: {} rows to {} in {:.2} s",
                f.rows, f.path, f.seconds
            ),
            "grants" => format!(
                "per-referral grants report: {} rows to {} in {:.2} s",
                f.rows, f.path, f.seconds
            ),
            "programs" => format!("grant programs report: {} rows to {}", f.rows, f.path),
            "audit_page" => format!(
                "audit page: {} changed referrers to {} in {:.2} s",
                f.rows, f.path, f.seconds
            ),
            _ => format!("plan saved to {} (digest {digest})", f.path),
        };
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// `--diff`: the plan as `--save-plan` would save it, diffed like `plan show`.
/// At most `DIFF_LIMIT` entries per group, as `plan show`'s default (the totals count all).
fn run_diff(run: &engine::RunReport) -> referral_rewards::diff::PlanDiff {
    let saved = report::saved_plan(&run.plan, &run.grants, run.request.as_of);
    referral_rewards::diff::diff(&saved).truncated(DIFF_LIMIT)
}

/// `plan show --limit`'s default, and `--diff`'s limit.
pub const DIFF_LIMIT: usize = 100;

/// `plan show`: a saved plan's changes; reads the file only (no configuration, no database).
pub fn plan_command(command: &PlanCommand) -> Result<(), Failure> {
    let PlanCommand::Show {
        path,
        limit,
        format,
    } = command;
    let saved = report::load_plan(path)?;
    let d = referral_rewards::diff::diff(&saved).truncated(*limit);
    Stdout::default().print(&match format {
        Format::Text => referral_rewards::diff::text(&d),
        Format::Json => json(&d),
    })
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

fn json(v: &impl serde::Serialize) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("plain data");
    s.push('\n');
    s
}

/// `completions` and `man`: generated from the argument definitions, without configuration
/// or database.
pub fn generate(cli: &mut Cli) -> Result<(), Failure> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_owned();
    let mut buf = Vec::new();
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, name, &mut buf);
        }
        Command::Man { dir: Some(dir) } => {
            return std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(cmd, dir))
                .map_err(|e| Failure {
                    exit: Exit::RunFailed,
                    message: format!("writing the man pages into {}: {e}", dir.display()),
                });
        }
        Command::Man { dir: None } => {
            clap_mangen::Man::new(cmd)
                .render(&mut buf)
                .map_err(|e| Failure {
                    exit: Exit::RunFailed,
                    message: format!("rendering the man page: {e}"),
                })?;
        }
        _ => unreachable!("only completions and man are generated"),
    }
    Stdout::default().print(&String::from_utf8_lossy(&buf))
}

pub async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let config = load_config(&cli)?;
    let mut out = Stdout::default();
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
            let backend = store.backend();
            store.close().await;
            out.print(&format!(
                "migrated {backend} database{}\n",
                if with_reference_schema {
                    " (with the reference host schema)"
                } else {
                    ""
                }
            ))?;
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
            let backend = store.backend();
            store.close().await;
            out.print(&format!(
                "loaded {} users, {} subscriptions, {} telemetry events, {} payments into {backend} in {:.1} s (seed {seed}, anchor {})\n",
                n.users,
                n.subscriptions,
                n.events,
                n.payments,
                started.elapsed().as_secs_f64(),
                instant::to_rfc3339(anchor)
            ))?;
        }
        Command::Reconcile {
            referrer,
            shard,
            dry_run,
            as_of,
            report,
            html,
            format,
            per_referral,
            only_changes,
            save_plan,
            expect_digest,
            plan,
            diff,
            output,
        } => {
            // Usage problems first, before touching the database: a run must not start (let
            // alone commit) when its report or plan cannot be written where asked.
            let outputs = Outputs::check(
                report,
                format,
                html,
                per_referral,
                !config.grants.is_empty(),
                save_plan,
            )?;
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
                trigger: Some(Trigger::Cli),
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
            let result = match result {
                Err(EngineError::DigestMismatch { expected, plan }) => {
                    // An audited plan applied once is not applied again: say by which run.
                    let applied_by = store.run_with_digest(&expected).await.ok().flatten();
                    store.close().await;
                    return Err(refusal(
                        &config,
                        audited.as_ref(),
                        &expected,
                        &plan,
                        applied_by,
                    ));
                }
                other => other,
            };
            store.close().await;
            let run = std::sync::Arc::new(result?);
            // The files first: a reader of the summary that goes away (`| head -1`) must not
            // keep them from being written.
            let mut files = vec![];
            let mut output_errors = vec![];
            match write_outputs(
                run.clone(),
                config.clone(),
                outputs,
                per_referral,
                only_changes,
            )
            .await
            {
                Ok(written) => files = written,
                Err(f) if run.run_id.is_none() => return Err(f),
                Err(f) => output_errors.push(f.message),
            }
            let printed = match output {
                Format::Text => {
                    let mut text = summary::run_summary(&run);
                    if run.request.scope == Scope::Full && run.request.dry_run {
                        text.push_str(&summary::program_analytics(&run));
                    }
                    text.push_str(&written_text(&files, &run.plan.digest));
                    if diff {
                        text.push('\n');
                        text.push_str(&referral_rewards::diff::text(&run_diff(&run)));
                    }
                    out.write(&text)
                }
                Format::Json => {
                    let mut v = RunJson::of(&run);
                    v.files = files;
                    v.output_errors = output_errors.clone();
                    v.diff = diff.then(|| run_diff(&run));
                    out.write(&json(&v))
                }
            };
            if let Err(e) = printed {
                output_errors.push(format!("writing to standard output: {e}"));
            }
            let unwritable = engine::write_errors_text(&run.plan);
            if let Some(run_id) = run.run_id
                && !output_errors.is_empty()
            {
                let also = unwritable
                    .map(|t| format!("; also: {t}"))
                    .unwrap_or_default();
                return Err(Failure {
                    exit: Exit::CommittedOutputFailed,
                    message: format!(
                        "run {run_id} succeeded and its writes are in, but afterwards: {}{also}",
                        output_errors.join("; ")
                    ),
                });
            }
            if let Some(e) = output_errors.into_iter().next() {
                // A dry run: nothing was committed; its output is all it had to give.
                return Err(Failure {
                    exit: Exit::RunFailed,
                    message: e,
                });
            }
            if let Some(text) = unwritable {
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
            user,
            as_of,
            format,
        } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let as_of = as_of.unwrap_or_else(now);
            let text = match (referrer, user) {
                (Some(id), _) => {
                    let e = explain::explain_referrer(&store, &config, id, as_of, None).await;
                    store.close().await;
                    let e = e?;
                    if format == Format::Json {
                        return out.print(&json(&e));
                    }
                    explain::referrer_text(&e, &config)
                }
                (None, Some(id)) => {
                    let e = explain::explain_user(&store, &config, id, as_of).await;
                    store.close().await;
                    let e = e?;
                    if format == Format::Json {
                        return out.print(&json(&e));
                    }
                    explain::user_text(&e)
                }
                (None, None) => unreachable!("clap requires --referrer or --user"),
            };
            out.print(&text)?;
        }
        Command::Check { audit, format } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let report = check::check(&store, &config).await;
            store.close().await;
            let report = report?;
            if format == Format::Json {
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
        Command::Runs {
            show: None,
            limit,
            format,
        } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let list = history::runs(&store, limit).await;
            store.close().await;
            let list = list?;
            out.print(&match format {
                Format::Text => history::runs_text(&list),
                Format::Json => json(&list),
            })?;
        }
        Command::Runs {
            show: Some(RunsCommand::Show { id, limit, format }),
            ..
        } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let detail = history::run_detail(&store, id, limit).await;
            store.close().await;
            let Some(detail) = detail? else {
                return Err(usage(format!("runs show: no run with id {id}")));
            };
            out.print(&match format {
                Format::Text => history::run_detail_text(&detail),
                Format::Json => json(&detail),
            })?;
        }
        Command::Changes {
            run,
            referrer,
            limit,
            format,
        } => {
            let store = connect(&config, Access::ReadOnly).await?;
            let filter = ChangeFilter {
                run,
                referrer,
                limit,
            };
            let changes = history::changes(&store, filter).await;
            store.close().await;
            let changes = changes?;
            out.print(&match format {
                Format::Text => history::changes_text(&changes),
                Format::Json => json(&changes),
            })?;
        }
        Command::Completions { .. } | Command::Man { .. } | Command::Plan { .. } => {
            unreachable!("done before any configuration is read")
        }
    }
    Ok(())
}

/// A plan whose digest is not the expected one (exit 3): which run applied it already, or how
/// many referrers differ from the audited plan.
fn refusal(
    config: &Config,
    audited: Option<&report::SavedPlan>,
    expected: &str,
    plan: &referral_rewards::program::slots::plan::Plan,
    applied_by: Option<i64>,
) -> Failure {
    let message = match applied_by {
        Some(run) => format!(
            "refused: {} was already applied by run {run} (`referral-rewards runs show {run}`); the plan's digest is now {}; nothing was written",
            if audited.is_some() {
                "this plan"
            } else {
                "the expected digest"
            },
            plan.digest
        ),
        None => {
            let differ = audited
                .map(|a| match report::count_differences(a, plan) {
                    0 if !config.grants.is_empty() => {
                        "; the slots results match the audited plan, so the grant programs' differ"
                            .to_owned()
                    }
                    n => format!("; {n} referrers differ from the audited plan"),
                })
                .unwrap_or_default();
            format!(
                "refused: the plan's digest is {}, not the expected {expected}{differ}; nothing was written",
                plan.digest
            )
        }
    };
    Failure {
        exit: Exit::Refused,
        message,
    }
}
