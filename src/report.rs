//! Audit reports (SPEC section 5): one row per referrer with current and desired values, and on
//! request one row per referred user with its outcome; CSV, JSON or Parquet, written with
//! polars. Also the saved plan that `--expect-digest` / `--plan` compare against.
//!
//! Writers are blocking: callers run them inside `spawn_blocking`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::instant::{self, Instant};
use crate::program::grants::plan::ProgramPlan;
use crate::program::slots::compute::ReferralOutcome;
use crate::program::slots::facts::ReferralFacts;
use crate::program::slots::plan::{HostBonus, Plan, PlanEntry};
use crate::program::slots::rewards::RewardResult;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Bad usage: exit 2.
    #[error("{0}")]
    Usage(String),
    #[error("writing {path}: {message}")]
    Write { path: String, message: String },
    #[error("reading the plan {path}: {message}")]
    ReadPlan { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Csv,
    Json,
    Parquet,
    /// The audit page (`src/audit_page.rs`): one self-contained HTML file.
    Html,
}

impl ReportFormat {
    /// The format named by `--format`, else the one the path's extension says.
    pub fn resolve(path: &Path, given: Option<ReportFormat>) -> Result<ReportFormat, ReportError> {
        if let Some(f) = given {
            return Ok(f);
        }
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Ok(ReportFormat::Csv),
            Some("json") => Ok(ReportFormat::Json),
            Some("parquet") | Some("pq") => Ok(ReportFormat::Parquet),
            Some("html") | Some("htm") => Ok(ReportFormat::Html),
            other => Err(ReportError::Usage(format!(
                "--report {}: cannot tell the format from the extension {}; use .csv, .json, .parquet or .html, or --format",
                path.display(),
                other.map_or_else(|| "(none)".to_owned(), |e| format!("{e:?}"))
            ))),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ReportFormat::Csv => "csv",
            ReportFormat::Json => "json",
            ReportFormat::Parquet => "parquet",
            ReportFormat::Html => "html",
        }
    }
}

/// Where `--per-referral` writes its rows: beside the report, `NAME.referrals.EXT`.
pub fn per_referral_path(report: &Path, format: ReportFormat) -> PathBuf {
    let stem = report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    report.with_file_name(format!("{stem}.referrals.{}", format.extension()))
}

/// Where `--per-referral` writes the grant programs' rows: `NAME.grants.EXT`.
pub fn grants_path(report: &Path, format: ReportFormat) -> PathBuf {
    beside(report, "grants", format)
}

/// Where a report's grant program figures go: `NAME.programs.EXT`, one row per program.
pub fn programs_path(report: &Path, format: ReportFormat) -> PathBuf {
    beside(report, "programs", format)
}

fn beside(report: &Path, what: &str, format: ReportFormat) -> PathBuf {
    let stem = report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    report.with_file_name(format!("{stem}.{what}.{}", format.extension()))
}

/// One report row per plan entry: docs/rules.md §5's eleven fields in that order, then four
/// audit columns: `current_badge` (the stored row's), `bonus_delta` (desired minus current bonus
/// slots), `is_referrer` (holds an invite code) and `as_of`. `referrers` are the run's referrers
/// ascending (the computation's results); `only_changes` keeps the referrers whose reward would
/// change (reward row or host value).
pub fn referrer_frame(
    plan: &Plan,
    referrers: &[RewardResult],
    as_of: Instant,
    only_changes: bool,
) -> PolarsResult<DataFrame> {
    let rows: Vec<&PlanEntry> = plan
        .entries
        .iter()
        .filter(|e| !only_changes || e.changes_anything())
        .collect();
    let int = |f: fn(&PlanEntry) -> i64| rows.iter().map(|e| f(e)).collect::<Vec<i64>>();
    let as_of = instant::to_rfc3339(as_of);
    df!(
        "referrer_user_id" => int(|e| e.desired.referrer_user_id),
        "referred_users_total" => int(|e| e.desired.referred_users_total),
        "qualified_referrals" => int(|e| e.desired.qualified_referrals),
        "disqualified_self_referral" => int(|e| e.desired.disqualified_self_referral),
        "disqualified_cooldown" => int(|e| e.desired.disqualified_cooldown),
        "disqualified_missing_ip" => int(|e| e.desired.disqualified_missing_ip),
        "disqualified_shared_ip" => int(|e| e.desired.disqualified_shared_ip),
        "disqualified_duplicate_ip" => int(|e| e.desired.disqualified_duplicate_ip),
        "bonus_slots" => int(|e| e.desired.bonus_slots),
        "badge" => rows.iter().map(|e| e.desired.badge.clone()).collect::<Vec<Option<String>>>(),
        "current_bonus_slots" => int(|e| e.current_bonus_slots()),
        "current_badge" => rows
            .iter()
            .map(|e| e.stored.as_ref().and_then(|s| s.badge.clone()))
            .collect::<Vec<Option<String>>>(),
        "bonus_delta" => int(|e| e.desired.bonus_slots - e.current_bonus_slots()),
        "is_referrer" => rows
            .iter()
            .map(|e| {
                referrers
                    .binary_search_by_key(&e.referrer_user_id(), |r| r.referrer_user_id)
                    .is_ok()
            })
            .collect::<Vec<bool>>(),
        "as_of" => vec![as_of.as_str(); rows.len()],
    )
}

/// One row per referred user: referrer, referred user, outcome, claiming position (candidates
/// only) and signup IP hash, then the facts behind the outcome when the run derived them
/// (`facts`, in the order of `referrals`; see [`ReferralFacts`]) and `as_of`. `referrers`,
/// when given, keeps only those referrers' rows.
pub fn referral_frame(
    referrals: &[ReferralOutcome],
    facts: &[ReferralFacts],
    as_of: Instant,
    referrers: Option<&HashSet<i64>>,
) -> PolarsResult<DataFrame> {
    let keep: Vec<usize> = (0..referrals.len())
        .filter(|&i| referrers.is_none_or(|k| k.contains(&referrals[i].referrer_user_id)))
        .collect();
    let rows: Vec<&ReferralOutcome> = keep.iter().map(|&i| &referrals[i]).collect();
    let none = ReferralFacts::default();
    let f: Vec<&ReferralFacts> = keep
        .iter()
        .map(|&i| facts.get(i).unwrap_or(&none))
        .collect();
    let text = |g: fn(&ReferralFacts) -> &Option<String>| {
        f.iter()
            .map(|x| g(x).clone())
            .collect::<Vec<Option<String>>>()
    };
    let flag = |g: fn(&ReferralFacts) -> Option<bool>| f.iter().map(|x| g(x)).collect::<Vec<_>>();
    let as_of = instant::to_rfc3339(as_of);
    df!(
        "referrer_user_id" => rows.iter().map(|r| r.referrer_user_id).collect::<Vec<i64>>(),
        "referred_user_id" => rows.iter().map(|r| r.referred_user_id).collect::<Vec<i64>>(),
        "outcome" => rows.iter().map(|r| r.outcome.as_str()).collect::<Vec<&str>>(),
        "position" => rows.iter().map(|r| r.position.map(i64::from)).collect::<Vec<Option<i64>>>(),
        "signup_ip" => rows.iter().map(|r| r.signup_ip.clone()).collect::<Vec<Option<String>>>(),
        "is_active" => flag(|x| x.is_active),
        "is_verified" => flag(|x| x.is_verified),
        "signed_up_at" => text(|x| &x.signed_up_at),
        "tier" => text(|x| &x.tier),
        "status" => text(|x| &x.status),
        "subscribed_at" => text(|x| &x.subscribed_at),
        "expires_at" => text(|x| &x.expires_at),
        "cooldown_ends_at" => text(|x| &x.cooldown_ends_at),
        "ip_claimed_by" => f.iter().map(|x| x.ip_claimed_by).collect::<Vec<Option<i64>>>(),
        "as_of" => vec![as_of.as_str(); rows.len()],
    )
}

/// Writes a frame; JSON is one array of row objects.
pub fn write(df: &mut DataFrame, path: &Path, format: ReportFormat) -> Result<(), ReportError> {
    let err = |e: String| ReportError::Write {
        path: path.display().to_string(),
        message: e,
    };
    let file = File::create(path).map_err(|e| err(e.to_string()))?;
    let result = match format {
        ReportFormat::Csv => CsvWriter::new(file).include_header(true).finish(df),
        ReportFormat::Json => JsonWriter::new(file)
            .with_json_format(JsonFormat::Json)
            .finish(df),
        ReportFormat::Parquet => ParquetWriter::new(file).finish(df).map(|_| ()),
        ReportFormat::Html => return Err(err("a table is not written as HTML".into())),
    };
    result.map_err(|e| err(e.to_string()))
}

/// Reads a report back (tests, and operators' scripts in Rust).
pub fn read(path: &Path, format: ReportFormat) -> PolarsResult<DataFrame> {
    match format {
        ReportFormat::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .try_into_reader_with_file_path(Some(path.to_path_buf()))?
            .finish(),
        ReportFormat::Json => JsonReader::new(File::open(path)?).finish(),
        ReportFormat::Parquet => ParquetReader::new(File::open(path)?).finish(),
        ReportFormat::Html => Err(PolarsError::InvalidOperation(
            "the audit page is not read back as a table".into(),
        )),
    }
}

/// The plan a dry run saves with `--save-plan`, for `--plan` to compare against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPlan {
    pub format: String,
    pub as_of: String,
    pub digest: String,
    pub referrers: Vec<ReportRow>,
    /// The grant programs (format 2): per program, the referrals granted now or changing in
    /// this run, as the digest covers them. Absent in format 1 files.
    #[serde(default)]
    pub programs: Vec<SavedProgram>,
    /// The current state of each referrer the plan changes (format 3), for `plan show`'s old
    /// values. Absent in format 1 and 2 files, where only `current_bonus_slots` is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Vec<CurrentRow>>,
}

/// What a changing referrer holds now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRow {
    pub referrer_user_id: i64,
    /// The `referral_rewards` row; `null` when there is none (it reads as zeros).
    pub stored: Option<RewardResult>,
    /// Whether the referrer has a subscription row: without one, an apply creates it.
    pub has_subscription: bool,
    /// Why an apply cannot write this referrer (left unwritten), if it cannot.
    pub write_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedProgram {
    pub program: String,
    pub referrals: Vec<SavedReferral>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReferral {
    pub referrer_user_id: i64,
    pub referred_user_id: i64,
    pub outcome: String,
    pub cause: Option<String>,
    /// `[party, credited user, days, cents]` per grant or reversal this run makes.
    pub changes: Vec<(String, i64, Option<i64>, Option<i64>)>,
}

/// A SPEC section 5 report row: the result's fields, then `current_bonus_slots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRow {
    #[serde(flatten)]
    pub result: RewardResult,
    pub current_bonus_slots: i64,
}

impl ReportRow {
    pub fn of(e: &PlanEntry) -> Self {
        ReportRow {
            result: e.desired.clone(),
            current_bonus_slots: e.current_bonus_slots(),
        }
    }
}

/// Format 2 adds the grant programs, format 3 the current state of the referrers that change;
/// format 1 and 2 files still load.
const PLAN_FORMAT: &str = "referral-rewards-plan/3";
const PLAN_FORMATS: [&str; 3] = [
    "referral-rewards-plan/1",
    "referral-rewards-plan/2",
    PLAN_FORMAT,
];

pub fn saved_plan(plan: &Plan, grants: &[ProgramPlan], as_of: Instant) -> SavedPlan {
    use crate::program::grants::rules::Outcome;
    SavedPlan {
        format: PLAN_FORMAT.into(),
        as_of: instant::to_rfc3339(as_of),
        digest: plan.digest.clone(),
        referrers: plan.entries.iter().map(ReportRow::of).collect(),
        programs: grants
            .iter()
            .map(|p| SavedProgram {
                program: p.name.clone(),
                referrals: p
                    .referrals
                    .iter()
                    .filter(|d| d.outcome == Outcome::Granted || !d.changes.is_empty())
                    .map(|d| SavedReferral {
                        referrer_user_id: d.referrer_id,
                        referred_user_id: d.user_id,
                        outcome: d.outcome.as_str().into(),
                        cause: d.cause.map(|c| c.as_str().into()),
                        changes: d
                            .changes
                            .iter()
                            .map(|c| {
                                (
                                    c.party.as_str().into(),
                                    c.credited_user_id,
                                    c.amount.credit_days(),
                                    c.amount.credit_cents(),
                                )
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        current: Some(
            plan.entries
                .iter()
                .filter(|e| e.changes_anything())
                .map(|e| CurrentRow {
                    referrer_user_id: e.referrer_user_id(),
                    stored: e.stored.clone(),
                    has_subscription: e.host != HostBonus::NoSubscription,
                    write_error: e.write_error(),
                })
                .collect(),
        ),
    }
}

pub fn save_plan(plan: &SavedPlan, path: &Path) -> Result<(), ReportError> {
    let err = |e: String| ReportError::Write {
        path: path.display().to_string(),
        message: e,
    };
    let file = File::create(path).map_err(|e| err(e.to_string()))?;
    serde_json::to_writer(std::io::BufWriter::new(file), plan).map_err(|e| err(e.to_string()))
}

pub fn load_plan(path: &Path) -> Result<SavedPlan, ReportError> {
    let err = |e: String| ReportError::ReadPlan {
        path: path.display().to_string(),
        message: e,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let plan: SavedPlan =
        serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| err(e.to_string()))?;
    if !PLAN_FORMATS.contains(&plan.format.as_str()) {
        return Err(err(format!(
            "format {:?}, expected {PLAN_FORMAT:?}",
            plan.format
        )));
    }
    Ok(plan)
}

/// How many referrers' rows differ between an audited plan and a fresh one (present in one
/// only, or with any field different).
pub fn count_differences(audited: &SavedPlan, fresh: &Plan) -> usize {
    let old: BTreeMap<i64, &ReportRow> = audited
        .referrers
        .iter()
        .map(|r| (r.result.referrer_user_id, r))
        .collect();
    let new: BTreeMap<i64, ReportRow> = fresh
        .entries
        .iter()
        .map(|e| (e.referrer_user_id(), ReportRow::of(e)))
        .collect();
    let ids: std::collections::BTreeSet<i64> = old.keys().chain(new.keys()).copied().collect();
    ids.into_iter()
        .filter(|id| old.get(id).copied() != new.get(id))
        .count()
}

/// Writes the audit page (`--report PATH.html`, `--html PATH`).
pub fn write_page(html: &str, path: &Path) -> Result<(), ReportError> {
    std::fs::write(path, html).map_err(|e| ReportError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}
