//! One run, start to finish: lock → run row → snapshot → compute → plan → apply → run row.
//!
//! The CLI and the scheduler call [`run`]; everything here is orchestration, the decisions
//! live in `rules`, `rewards` and `plan`.

use std::time::{Duration, Instant as Clock};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::instant::{self, Instant};
use crate::program::grants::{self, plan::ProgramPlan, rules::Facts};
use crate::program::slots::compute::{self, Computation, PARALLEL_FROM};
use crate::program::slots::facts;
use crate::program::slots::plan::{Plan, PlanStats};
use crate::program::slots::rules;
use crate::snapshot::{GrantsRead, QueryTiming, Scope, Snapshot};
use crate::store::{ApplyOutcome, Begun, RunFinish, Store, StoreError, Trigger, Writes};

#[derive(Debug, Clone, Copy)]
pub struct RunRequest {
    pub scope: Scope,
    pub as_of: Instant,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Another run holds the lock: nothing was done.
    #[error("another run holds the lock; nothing was written (try again when it has finished)")]
    Locked,
    #[error("no user with id {0}")]
    UnknownReferrer(i64),
    /// The run started and failed; its row says `failed`, nothing else was written.
    #[error("run {run_id} failed and wrote nothing: {message}")]
    RunFailed { run_id: i64, message: String },
    #[error("aborted: the server is shutting down and the run outlived its grace period")]
    Aborted,
    /// Aborted while its commit was in flight, and the commit landed: the run's writes are in.
    #[error(
        "run {run_id} was aborted by the shutdown after its commit had landed: its writes are in and its row says succeeded"
    )]
    CommittedBeforeAbort { run_id: i64 },
    /// `--expect-digest` did not match: nothing was written.
    #[error("refused: the plan's digest is {}, not the expected {expected}; nothing was written", plan.digest)]
    DigestMismatch { expected: String, plan: Box<Plan> },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("computing rewards: {0}")]
    Compute(String),
    /// A bug: the run's work panicked. The run fails (its row says so); the process goes on.
    #[error("internal error (a bug; please report it): {0}")]
    Panicked(String),
}

/// The text of a panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Called by the stores inside the write transaction, after its first statement (the reward
/// rows, when there are any): where tests act on a run that is writing. It tells the progress
/// hook (`inside the write transaction`: in-process tests hold the run there); it honours
/// `REFERRAL_REWARDS_TEST_HOLD_FILE=PATH`, waiting while PATH exists and logging `test hold` once
/// (tests of the real binary: a signal, a kill, another tick); and the injected fault
/// `panic-in-write`. The wait is an await, so an abort ends it like any other.
pub(crate) async fn inside_write(progress: Option<&Progress>) {
    if let Some(p) = progress {
        p("inside the write transaction");
    }
    if crate::fault::fault("panic-in-write").is_some() {
        panic!("fault injected inside the write transaction");
    }
    test_hold(
        "REFERRAL_REWARDS_TEST_HOLD_FILE",
        "inside the write transaction",
    )
    .await;
}

/// Where tests of the real binary hold a run: while the file named by the environment variable
/// `var` exists, waits, having logged `test hold: waiting <at>` once.
pub(crate) async fn test_hold(var: &str, at: &str) {
    let Some(path) = std::env::var_os(var) else {
        return;
    };
    let path = std::path::PathBuf::from(path);
    if path.exists() {
        tracing::info!(path = %path.display(), "test hold: waiting {at}");
    }
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fault_injection(scope: Scope) {
    if let Scope::Referrer(id) = scope
        && crate::fault::for_referrer("panic-compute-referrer", id)
    {
        panic!("fault injected for referrer {id}");
    }
}

/// What a run did (or, for a dry run, would do).
#[derive(Debug, Clone)]
pub struct RunReport {
    pub request: RunRequest,
    pub backend: &'static str,
    pub run_id: Option<i64>,
    /// The slots program's plan; its `digest` is the run's, over every program.
    pub plan: Plan,
    /// The grant programs' plans, in config order.
    pub grants: Vec<ProgramPlan>,
    pub computation: Computation,
    pub stats: PlanStats,
    /// `None` for a dry run.
    pub applied: Option<ApplyOutcome>,
    pub abandoned_runs: u64,
    pub stages: Stages,
    pub elapsed: Duration,
}

fn now() -> Instant {
    instant::from_datetime(chrono::Utc::now())
}

/// Where a run's time went.
#[derive(Debug, Clone, Default)]
pub struct Stages {
    pub snapshot: Duration,
    /// Each snapshot query: rows and time.
    pub queries: Vec<QueryTiming>,
    pub compute: Duration,
    pub plan: Duration,
    /// The apply transaction; zero for a dry run.
    pub write: Duration,
}

/// A computed plan and what it took.
pub struct Planned {
    /// The slots program's plan; its `digest` is the run's, over every program.
    pub plan: Plan,
    /// The grant programs' plans, in config order.
    pub grants: Vec<ProgramPlan>,
    pub computation: Computation,
    pub stages: Stages,
}

/// Reads, computes and plans, without writing anything. Logs a line per stage.
pub async fn plan(
    store: &Store,
    cfg: &Config,
    req: RunRequest,
    progress: Option<&Progress>,
) -> Result<Planned, EngineError> {
    plan_listing(store, cfg, req, progress, false).await
}

/// [`plan`], with `uncounted`: a full or shard run also reads the referrals whose referrer holds
/// no invite code, for the per-referral report ([`Computation::uncounted`]).
async fn plan_listing(
    store: &Store,
    cfg: &Config,
    req: RunRequest,
    progress: Option<&Progress>,
    uncounted: bool,
) -> Result<Planned, EngineError> {
    let window = rules::ip_window(req.as_of, cfg.rules.ip_window_days);
    let started = Clock::now();
    if let Some(p) = progress {
        p("reading the snapshot")
    }
    let snapshot = store
        .snapshot_listing(req.scope, window, grants_read(cfg), uncounted)
        .await?;
    plan_snapshot(snapshot, started.elapsed(), cfg, req, progress, uncounted).await
}

/// [`plan_listing`] from a snapshot read already (in `read_time`).
async fn plan_snapshot(
    mut snapshot: Snapshot,
    read_time: Duration,
    cfg: &Config,
    req: RunRequest,
    progress: Option<&Progress>,
    uncounted: bool,
) -> Result<Planned, EngineError> {
    let say = |what: &str| {
        if let Some(p) = progress {
            p(what)
        }
    };
    let mut stages = Stages {
        snapshot: read_time,
        queries: std::mem::take(&mut snapshot.timings),
        ..Stages::default()
    };
    tracing::info!(
        stage = "snapshot",
        ms = stages.snapshot.as_millis() as u64,
        referred_users = snapshot.referred.len(),
        "stage finished"
    );
    say(&format!(
        "computing {} referred users",
        snapshot.referred.len()
    ));
    let cfg = cfg.clone();
    let work = move || {
        fault_injection(req.scope);
        let t = Clock::now();
        let grants_snapshot = snapshot.grants.take();
        // The grant programs decide on a thread of their own beside the slots program's
        // computation: they share nothing but the (read-only) configuration.
        let slots = || {
            compute::compute_listing(&snapshot, &cfg, req.as_of, uncounted).map(|mut c| {
                // The facts behind each outcome, for the people who read a listing (not
                // for every one-referrer apply: that is a hot path).
                if uncounted {
                    let params = rules::RuleParams::new(&cfg.rules, req.as_of);
                    c.facts = facts::referral_facts(&snapshot, &c.listed(), &params);
                }
                c
            })
        };
        let (computation, grants) = match &grants_snapshot {
            None => (slots(), vec![]),
            Some(g) => std::thread::scope(|s| {
                let grants = s.spawn(|| {
                    let facts = Facts::new(g, Some(&snapshot));
                    let build = |p| ProgramPlan::build(p, &cfg.rules, &facts, req.as_of, req.scope);
                    // A large run decides each program on a thread of its own: they read the
                    // same facts and nothing else (for a few referrals a thread costs more).
                    if g.referrals.len() < PARALLEL_FROM || cfg.grants.len() < 2 {
                        return cfg.grants.iter().map(build).collect::<Vec<ProgramPlan>>();
                    }
                    std::thread::scope(|t| {
                        let threads: Vec<_> = cfg
                            .grants
                            .iter()
                            .map(|p| t.spawn(move || build(p)))
                            .collect();
                        threads
                            .into_iter()
                            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                            .collect()
                    })
                });
                let computation = slots();
                let grants = grants
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                (computation, grants)
            }),
        };
        let mut computation = computation.map_err(|e| EngineError::Compute(e.to_string()))?;
        let compute_time = t.elapsed();
        let t = Clock::now();
        // The plan reads only the stored rewards and the host values: the rest of the snapshot
        // (most of a large run's memory) goes before it is built, where the run's peak was.
        drop((
            std::mem::take(&mut snapshot.referred),
            std::mem::take(&mut snapshot.registrations),
            std::mem::take(&mut snapshot.referrer_events),
            std::mem::take(&mut snapshot.uncounted),
        ));
        // The results move into the plan and are copied back from it once it is built: a copy
        // made before would live beside the stored rewards' index, the run's peak at 10M users.
        let results = std::mem::take(&mut computation.results);
        let ids: Vec<i64> = results.iter().map(|r| r.referrer_user_id).collect();
        let mut plan = Plan::build(
            results,
            snapshot.stored_rewards,
            &snapshot.host_bonus,
            req.scope,
        );
        computation.results = plan.desired_of(&ids);
        // One digest over every program's plan (the slots digest alone without grants).
        plan.digest = grants::plan::digest(&plan.digest, &grants);
        Ok::<_, EngineError>((plan, grants, computation, compute_time, t.elapsed()))
    };
    // CPU-bound, and polars blocks in place (tokio's `block_in_place`) while it plans: a
    // blocking thread, even for one user's few rows.
    let (plan, grants, computation, compute_time, plan_time) = tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(payload) => EngineError::Panicked(panic_message(&*payload)),
            Err(e) => EngineError::Compute(e.to_string()),
        })??;
    stages.compute = compute_time;
    stages.plan = plan_time;
    tracing::info!(
        stage = "compute",
        ms = (compute_time + plan_time).as_millis() as u64,
        referrers = plan.entries.len(),
        "stage finished"
    );
    Ok(Planned {
        plan,
        grants,
        computation,
        stages,
    })
}

/// What the grant programs need read, if any is configured.
pub fn grants_read(cfg: &Config) -> Option<GrantsRead> {
    (!cfg.grants.is_empty()).then(|| GrantsRead {
        fraud: cfg.grants.iter().any(|g| g.fraud_checks),
        statuses: cfg
            .grants
            .iter()
            .flat_map(|g| g.payment_statuses.iter().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        min_payment_cents: cfg
            .grants
            .iter()
            .map(|g| g.min_payment_cents)
            .min()
            .unwrap_or(1),
    })
}

/// The run row's `programs`: each grant program's counts; `None` without grant programs.
pub fn programs_json(grants: &[ProgramPlan]) -> Option<serde_json::Value> {
    (!grants.is_empty()).then(|| {
        serde_json::json!({
            "grants": grants.iter().map(|p| p.stats()).collect::<Vec<_>>(),
        })
    })
}

pub async fn run(store: &Store, cfg: &Config, req: RunRequest) -> Result<RunReport, EngineError> {
    run_controlled(store, cfg, req, &RunControl::default()).await
}

/// Told what a run is doing, stage by stage (a terminal progress display).
pub type Progress = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// How a caller steers an applying run.
#[derive(Clone, Default)]
pub struct RunControl {
    /// Cancelled: the run stops at once, its transaction rolls back and its row is marked
    /// `failed` with the reason (a server shutting down past its grace period).
    pub abort: CancellationToken,
    /// Apply only if the freshly computed plan has this digest (SPEC section 4); otherwise
    /// refuse before writing anything, not even a run row.
    pub expect_digest: Option<String>,
    pub progress: Option<Progress>,
    /// What started the run, recorded in its row (`None`: not said, recorded as unknown).
    pub trigger: Option<Trigger>,
    /// The per-referral listing: also read the referrals whose referrer holds no invite code
    /// (one more query in a full or shard run) and derive each referral's facts
    /// ([`Computation::facts`]); a one-user run reads those referrals anyway, and derives the
    /// facts only when asked (`explain`).
    pub list_uncounted: bool,
}

impl std::fmt::Debug for RunControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunControl")
            .field("expect_digest", &self.expect_digest)
            .field("progress", &self.progress.is_some())
            .field("trigger", &self.trigger)
            .finish_non_exhaustive()
    }
}

pub async fn run_controlled(
    store: &Store,
    cfg: &Config,
    req: RunRequest,
    ctl: &RunControl,
) -> Result<RunReport, EngineError> {
    let started = Clock::now();
    // An applying run without an expected digest checks the id as it starts (`begin_run`).
    if let Scope::Referrer(id) = req.scope
        && (req.dry_run || ctl.expect_digest.is_some())
    {
        check_known(store, cfg, req, id).await?;
    }
    if req.dry_run {
        let Planned {
            plan,
            grants,
            computation,
            stages,
        } = plan_listing(store, cfg, req, ctl.progress.as_ref(), ctl.list_uncounted).await?;
        if let Some(expected) = &ctl.expect_digest
            && plan.digest != *expected
        {
            return Err(EngineError::DigestMismatch {
                expected: expected.clone(),
                plan: Box::new(plan),
            });
        }
        let report = RunReport {
            request: req,
            backend: store.backend(),
            run_id: None,
            stats: plan.stats(),
            plan,
            grants,
            computation,
            applied: None,
            abandoned_runs: 0,
            stages,
            elapsed: started.elapsed(),
        };
        log_run(&report);
        return Ok(report);
    }

    if crate::fault::fault("panic-before-run").is_some() {
        panic!("fault injected before the run");
    }
    // With an expected digest the plan comes first, under the lock, so that a refusal writes
    // nothing; otherwise the run row comes first, so that a failing snapshot is recorded too.
    let (mut lock, planned, abandoned_runs, run_id) = match &ctl.expect_digest {
        Some(expected) => {
            let lock = store
                .try_lock(req.scope)
                .await?
                .ok_or(EngineError::Locked)?;
            let planned =
                plan_listing(store, cfg, req, ctl.progress.as_ref(), ctl.list_uncounted).await?;
            if planned.plan.digest != *expected {
                return Err(EngineError::DigestMismatch {
                    expected: expected.clone(),
                    plan: Box::new(planned.plan),
                });
            }
            let (abandoned, run_id) = store
                .start_locked(&lock, req.scope, req.as_of, now(), ctl.trigger)
                .await?;
            (lock, Some(Ready::Planned(planned)), abandoned, run_id)
        }
        None => {
            let t = Clock::now();
            let (begun, read) = match req.scope {
                // One referrer of the slots program alone: its snapshot may come with the
                // run's start, in the same round trip (PostgreSQL).
                Scope::Referrer(id) if cfg.grants.is_empty() => {
                    let window = rules::ip_window(req.as_of, cfg.rules.ip_window_days);
                    store
                        .begin_run_reading(id, req.as_of, now(), ctl.trigger, window)
                        .await?
                }
                _ => {
                    let begun = store
                        .begin_run(
                            req.scope,
                            req.scope.referrer(),
                            req.as_of,
                            now(),
                            ctl.trigger,
                        )
                        .await?;
                    (begun, None)
                }
            };
            let read = read.map(|snapshot| (snapshot, t.elapsed()));
            match begun {
                Begun::Locked => return Err(EngineError::Locked),
                Begun::Started {
                    lock,
                    abandoned,
                    run_id,
                } => (lock, read.map(Ready::Read), abandoned, run_id),
                // Not a user: a run only revokes what it still holds.
                Begun::UnknownUser(lock) => {
                    let known = match req.scope {
                        Scope::Referrer(id) => holds_reward(store, cfg, req, id).await,
                        _ => Ok(()),
                    };
                    let started = match known {
                        Ok(()) => store
                            .start_locked(&lock, req.scope, req.as_of, now(), ctl.trigger)
                            .await
                            .map_err(EngineError::from),
                        Err(e) => Err(e),
                    };
                    match started {
                        Ok((abandoned, run_id)) => (lock, None, abandoned, run_id),
                        Err(e) => {
                            store.release(lock).await;
                            return Err(e);
                        }
                    }
                }
            }
        }
    };
    let work = async {
        let Planned {
            plan,
            grants,
            computation,
            mut stages,
        } = match planned {
            Some(Ready::Planned(p)) => p,
            Some(Ready::Read((snapshot, read_time))) => {
                let progress = ctl.progress.as_ref();
                plan_snapshot(snapshot, read_time, cfg, req, progress, ctl.list_uncounted).await?
            }
            None => {
                plan_listing(store, cfg, req, ctl.progress.as_ref(), ctl.list_uncounted).await?
            }
        };
        let stats = plan.stats();
        let finish = RunFinish {
            stats: stats.clone(),
            outcome_counts: outcome_counts_json(&computation),
            digest: plan.digest.clone(),
            error: write_errors_text(&plan),
            programs: programs_json(&grants),
        };
        if let Some(p) = &ctl.progress {
            p(&format!(
                "writing {} reward rows and {} host values",
                stats.reward_rows_to_write, stats.host_values_to_write
            ));
        }
        let t = Clock::now();
        let writes = Writes {
            plan: &plan,
            grants: &grants,
            run_id,
            as_of: req.as_of,
            new_subscription: &cfg.new_subscription,
            finish: &finish,
            progress: ctl.progress.as_ref(),
        };
        let applied = store.apply(&mut lock, &writes).await?;
        stages.write = t.elapsed();
        tracing::info!(
            stage = "write",
            ms = stages.write.as_millis() as u64,
            "stage finished"
        );
        Ok::<_, EngineError>((plan, grants, computation, stats, applied, stages))
    };
    // A panic in the run's own async work fails this run like any error (its row says so).
    let work = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work));
    let work = futures_util::FutureExt::map(work, |r| {
        r.unwrap_or_else(|p| Err(EngineError::Panicked(panic_message(&*p))))
    });
    // Dropping `work` drops its open transaction, which rolls back.
    // Biased: once the abort is signalled, the work makes no further step.
    let result = tokio::select! {
        biased;
        _ = ctl.abort.cancelled() => Err(EngineError::Aborted),
        r = work => r,
    };
    let outcome = match result {
        Ok((plan, grants, computation, stats, applied, stages)) => Ok(RunReport {
            request: req,
            backend: store.backend(),
            run_id: Some(run_id),
            plan,
            grants,
            computation,
            stats,
            applied: Some(applied),
            abandoned_runs,
            stages,
            elapsed: started.elapsed(),
        }),
        Err(e) => {
            // First end what is left of the write (an in-flight commit completes or not).
            store.settle(&mut lock).await;
            let message = e.to_string();
            // Still under the lock, so no other run can mistake this row for an orphan.
            match record_failure(store, run_id, &message, ctl).await {
                // The failure (an abort, a lost connection) raced the commit and lost: the
                // writes are in; say so, not "wrote nothing".
                Recorded::AlreadySucceeded => {
                    tracing::warn!(run_id, error = %message, "the run's commit had landed");
                    Err(EngineError::CommittedBeforeAbort { run_id })
                }
                Recorded::Failed | Recorded::Lost => {
                    Err(EngineError::RunFailed { run_id, message })
                }
            }
        }
    };
    store.release(lock).await;
    match &outcome {
        Ok(r) => log_run(r),
        Err(e) => tracing::warn!(run_id, mode = req.scope.mode(), error = %e, "run failed"),
    }
    outcome
}

/// What an applying run has in hand once it has started: its plan (made under the lock before
/// the run's row, for an expected digest), or its snapshot (read with the run's start).
enum Ready {
    Planned(Planned),
    Read((Snapshot, Duration)),
}

/// How many times a failure is offered to a busy SQLite database (each attempt waits up to the
/// busy timeout) before giving up and leaving the row to the next run's orphan check.
const RECORD_FAILURE_ATTEMPTS: u32 = 5;

/// What became of a failed run's row.
enum Recorded {
    Failed,
    /// Its commit landed after all (the row says `succeeded`).
    AlreadySucceeded,
    /// The database would not take the failure; the next run marks the row `abandoned`.
    Lost,
}

/// Marks the run `failed` with its error. A run that failed because SQLite was busy finds it
/// busy again here: keep trying for a while rather than leave a `running` row that a later run
/// would have to guess about. A row that no longer says `running` (nor `abandoned`) was
/// committed: that is reported, not overwritten.
async fn record_failure(store: &Store, run_id: i64, message: &str, ctl: &RunControl) -> Recorded {
    for attempt in 1..=RECORD_FAILURE_ATTEMPTS {
        match store.fail_run(run_id, message, now()).await {
            Ok(true) => return Recorded::Failed,
            Ok(false) => {
                return match store.run_status(run_id).await {
                    Ok(Some(s)) if s == "succeeded" => Recorded::AlreadySucceeded,
                    _ => Recorded::Failed,
                };
            }
            Err(e) if e.is_busy() && attempt < RECORD_FAILURE_ATTEMPTS => {
                tracing::warn!(run_id, attempt, error = %e, "recording the failure: the database is busy; trying again");
                if let Some(p) = &ctl.progress {
                    p("recording the failure: the database is busy, trying again");
                }
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            }
            Err(e) => {
                tracing::error!(run_id, error = %e, "could not mark the run failed; the next run will mark it abandoned");
                return Recorded::Lost;
            }
        }
    }
    Recorded::Lost
}

/// One log line per run, for operators and log search.
fn log_run(r: &RunReport) {
    let a = r.applied.clone().unwrap_or_default();
    tracing::info!(
        run_id = r.run_id,
        mode = r.request.scope.mode(),
        referrer = r.request.scope.referrer(),
        dry_run = r.request.dry_run,
        duration_ms = r.elapsed.as_millis() as u64,
        referrers = r.stats.referrers,
        rewards_up = r.stats.rewards_up,
        rewards_down = r.stats.rewards_down,
        reward_rows_written = a.reward_rows_written,
        host_values_written = a.host_values_written,
        conflicts = a.conflicts.len(),
        digest = %r.plan.digest,
        "run finished"
    );
}

/// A one-referrer run on an id that is neither a user nor holds a stored reward is a mistake.
async fn check_known(
    store: &Store,
    cfg: &Config,
    req: RunRequest,
    id: i64,
) -> Result<(), EngineError> {
    if store.user_exists(id).await? {
        return Ok(());
    }
    holds_reward(store, cfg, req, id).await
}

/// An id that is not a user is known only if it still holds a stored reward or a bonus.
async fn holds_reward(
    store: &Store,
    cfg: &Config,
    req: RunRequest,
    id: i64,
) -> Result<(), EngineError> {
    let window = rules::ip_window(req.as_of, cfg.rules.ip_window_days);
    let snap = store.snapshot(req.scope, window, None).await?;
    if snap.stored_rewards.is_empty() && snap.host_bonus.is_empty() {
        return Err(EngineError::UnknownReferrer(id));
    }
    Ok(())
}

/// The referrers a plan cannot write, for the run row and the command line: `None` when all
/// can be written.
pub fn write_errors_text(plan: &Plan) -> Option<String> {
    let errors = plan.write_errors();
    let (id, first) = errors.first()?;
    Some(format!(
        "{} referrer(s) left unwritten, everyone else written; first: referrer {id}: {first}",
        errors.len()
    ))
}

/// `{"qualified": n, …}` for the run row.
pub fn outcome_counts_json(c: &Computation) -> String {
    let map: serde_json::Map<String, serde_json::Value> = c
        .outcome_counts()
        .into_iter()
        .map(|(o, n)| (o.as_str().to_owned(), n.into()))
        .collect();
    serde_json::Value::Object(map).to_string()
}
