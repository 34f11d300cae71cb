//! The run history and the ledgers as the operator reads them: `runs`, `runs show`, `changes`
//! on the command line (text or `--format json`) and `GET /v1/runs`, `GET /v1/runs/{id}`,
//! `GET /v1/changes` over HTTP. One typed structure per view, serialized the same way by both.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::instant;
use crate::store::{ChangeFilter, RunRow, Store, StoreError};

/// A run of `reward_runs`, times in RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: i64,
    /// `full` (also for a shard run) or `referrer`.
    pub mode: String,
    pub referrer_user_id: Option<i64>,
    /// `K/N` for a shard run.
    pub shard: Option<String>,
    /// `cli`, `schedule` or `http`; null for runs recorded before the trigger was.
    pub trigger: Option<String>,
    /// `running`, `succeeded`, `failed` or `abandoned`.
    pub status: String,
    pub as_of: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// `finished_at - started_at`; null while it runs.
    pub duration_seconds: Option<f64>,
    pub referrers_processed: Option<i64>,
    pub rewards_up: Option<i64>,
    pub rewards_down: Option<i64>,
    pub bonus_delta: Option<i64>,
    pub reward_rows_written: Option<i64>,
    pub host_values_written: Option<i64>,
    pub conflicts: Option<i64>,
    /// Referred users by outcome (or reason for not being a candidate).
    pub outcome_counts: Option<BTreeMap<String, i64>>,
    /// The grant programs' counts and what the run wrote of them (docs/rules.md §7).
    pub programs: Option<serde_json::Value>,
    pub digest: Option<String>,
    pub error: Option<String>,
}

impl RunView {
    pub fn of(r: &RunRow) -> RunView {
        RunView {
            id: r.id,
            mode: r.mode.clone(),
            referrer_user_id: r.referrer_user_id,
            shard: r.shard.clone(),
            trigger: r.trigger.clone(),
            status: r.status.clone(),
            as_of: instant::to_rfc3339(r.as_of),
            started_at: instant::to_rfc3339(r.started_at),
            finished_at: r.finished_at.map(instant::to_rfc3339),
            duration_seconds: r.finished_at.map(|f| (f - r.started_at) as f64 / 1e6),
            referrers_processed: r.referrers_processed,
            rewards_up: r.rewards_up,
            rewards_down: r.rewards_down,
            bonus_delta: r.bonus_delta,
            reward_rows_written: r.reward_rows_written,
            host_values_written: r.host_values_written,
            conflicts: r.conflicts,
            outcome_counts: r
                .outcome_counts
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            programs: r
                .programs
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            digest: r.digest.clone(),
            error: r.error.clone(),
        }
    }

    /// What the run covered: `full`, `shard K/N` or `referrer ID`.
    pub fn scope(&self) -> String {
        match (&self.shard, self.referrer_user_id) {
            (Some(s), _) => format!("shard {s}"),
            (None, Some(id)) => format!("referrer {id}"),
            (None, None) => self.mode.clone(),
        }
    }
}

/// `runs --format json` and `GET /v1/runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunList {
    pub runs: Vec<RunView>,
}

/// `runs show ID` and `GET /v1/runs/{id}`: the run, how many ledger rows it wrote, and the
/// newest of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetail {
    pub run: RunView,
    pub ledger: LedgerCounts,
    pub changes: Changes,
}

/// Ledger rows a run wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCounts {
    /// `reward_changes` rows (the slots program).
    pub reward_changes: i64,
    /// `referral_grants` rows of kind `grant`, and of kind `reversal`.
    pub grants: i64,
    pub reversals: i64,
}

/// `changes` and `GET /v1/changes`: the ledgers, newest first, filtered by run and/or
/// referrer, at most `limit` rows of each; `*_more` says that older rows were left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    pub run: Option<i64>,
    pub referrer: Option<i64>,
    pub limit: i64,
    /// The slots program's ledger, `reward_changes`.
    pub reward_changes: Vec<RewardChange>,
    pub reward_changes_more: bool,
    /// The grant programs' ledger, `referral_grants`.
    pub grants: Vec<GrantChange>,
    pub grants_more: bool,
}

/// One changed value of the slots program: `field` is a `referral_rewards` column or
/// `subscriptions.referral_bonus_domains`; `old_value` is null for a created row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewardChange {
    pub id: i64,
    pub run_id: i64,
    pub referrer_user_id: i64,
    pub field: String,
    pub old_value: Option<String>,
    pub new_value: Option<String>,
}

/// One grant or reversal of a grant program (amounts negative for a reversal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantChange {
    pub id: i64,
    pub run_id: i64,
    pub program: String,
    /// `grant` or `reversal`.
    pub kind: String,
    /// `referrer` or `referred`.
    pub party: String,
    pub referrer_user_id: i64,
    pub referred_user_id: i64,
    pub credited_user_id: i64,
    pub grant_seq: i64,
    pub credit_days: Option<i64>,
    pub credit_cents: Option<i64>,
    pub payment_id: Option<i64>,
}

/// `runs`: the newest `limit` runs.
pub async fn runs(store: &Store, limit: i64) -> Result<RunList, StoreError> {
    Ok(RunList {
        runs: store.runs(limit).await?.iter().map(RunView::of).collect(),
    })
}

/// `runs show`: one run with its ledger counts and its newest `limit` ledger rows of each
/// ledger; `None` when there is no such run.
pub async fn run_detail(
    store: &Store,
    id: i64,
    limit: i64,
) -> Result<Option<RunDetail>, StoreError> {
    let Some(row) = store.run(id).await? else {
        return Ok(None);
    };
    let counts = store.run_ledger_counts(id).await?;
    let changes = changes(
        store,
        ChangeFilter {
            run: Some(id),
            referrer: None,
            limit,
        },
    )
    .await?;
    Ok(Some(RunDetail {
        run: RunView::of(&row),
        ledger: LedgerCounts {
            reward_changes: counts.reward_changes,
            grants: counts.grants,
            reversals: counts.reversals,
        },
        changes,
    }))
}

/// `changes`: both ledgers through one filter.
pub async fn changes(store: &Store, filter: ChangeFilter) -> Result<Changes, StoreError> {
    let limit = usize::try_from(filter.limit).unwrap_or(0);
    let mut rewards = store.reward_changes(&filter).await?;
    let mut grants = store.grant_changes(&filter).await?;
    let reward_changes_more = rewards.len() > limit;
    let grants_more = grants.len() > limit;
    rewards.truncate(limit);
    grants.truncate(limit);
    Ok(Changes {
        run: filter.run,
        referrer: filter.referrer,
        limit: filter.limit,
        reward_changes: rewards
            .into_iter()
            .map(
                |(id, run_id, referrer_user_id, field, old_value, new_value)| RewardChange {
                    id,
                    run_id,
                    referrer_user_id,
                    field,
                    old_value,
                    new_value,
                },
            )
            .collect(),
        reward_changes_more,
        grants: grants
            .into_iter()
            .map(|g| GrantChange {
                id: g.0,
                run_id: g.1,
                program: g.2,
                kind: g.3,
                party: g.4,
                referrer_user_id: g.5,
                referred_user_id: g.6,
                credited_user_id: g.7,
                grant_seq: g.8,
                credit_days: g.9,
                credit_cents: g.10,
                payment_id: g.11,
            })
            .collect(),
        grants_more,
    })
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// A duration in seconds as the tables show it.
fn duration(d: Option<f64>) -> String {
    d.map_or_else(|| "-".into(), |s| format!("{s:.3} s"))
}

/// The `runs` table: newest first, one line per run.
pub fn runs_text(list: &RunList) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>6}  {:<15}  {:<8}  {:<10}  {:<27}  {:<27}  {:>10}  {:>9}  {:>5}  {:>5}  {:>7}  {:>9}  error",
        "id",
        "scope",
        "trigger",
        "status",
        "as_of",
        "started_at",
        "duration",
        "referrers",
        "up",
        "down",
        "delta",
        "conflicts"
    );
    for r in &list.runs {
        let _ = writeln!(
            s,
            "{:>6}  {:<15}  {:<8}  {:<10}  {:<27}  {:<27}  {:>10}  {:>9}  {:>5}  {:>5}  {:>7}  {:>9}  {}",
            r.id,
            r.scope(),
            r.trigger.as_deref().unwrap_or("-"),
            r.status,
            r.as_of,
            r.started_at,
            duration(r.duration_seconds),
            opt(r.referrers_processed),
            opt(r.rewards_up),
            opt(r.rewards_down),
            opt(r.bonus_delta),
            opt(r.conflicts),
            r.error.as_deref().unwrap_or("")
        );
    }
    s
}

/// `runs show ID`: the run's fields, one per line, then its ledger rows.
pub fn run_detail_text(d: &RunDetail) -> String {
    let r = &d.run;
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<22} {v}");
    };
    line("run", r.id.to_string());
    line("scope", r.scope());
    line("trigger", r.trigger.clone().unwrap_or_else(|| "-".into()));
    line("status", r.status.clone());
    line("as_of", r.as_of.clone());
    line("started_at", r.started_at.clone());
    line("finished_at", opt(r.finished_at.as_ref()));
    line("duration", duration(r.duration_seconds));
    line("referrers processed", opt(r.referrers_processed));
    line(
        "rewards up / down",
        format!("{} / {}", opt(r.rewards_up), opt(r.rewards_down)),
    );
    line("total bonus delta", opt(r.bonus_delta));
    line(
        "written",
        format!(
            "{} referral_rewards rows, {} host values",
            opt(r.reward_rows_written),
            opt(r.host_values_written)
        ),
    );
    line("conflicts", opt(r.conflicts));
    if let Some(counts) = &r.outcome_counts {
        let all: Vec<String> = counts.iter().map(|(o, n)| format!("{o} {n}")).collect();
        line("outcomes", all.join(", "));
    }
    if let Some(list) = r.programs.as_ref().and_then(|p| p["grants"].as_array()) {
        let names: Vec<&str> = list.iter().filter_map(|p| p["program"].as_str()).collect();
        line("grant programs", names.join(", "));
    }
    line("digest", r.digest.clone().unwrap_or_else(|| "-".into()));
    if let Some(e) = &r.error {
        line("error", e.clone());
    }
    line(
        "ledger",
        format!(
            "{} reward_changes rows, {} grants, {} reversals",
            d.ledger.reward_changes, d.ledger.grants, d.ledger.reversals
        ),
    );
    s.push('\n');
    s.push_str(&changes_text(&d.changes));
    s
}

/// `changes`: each ledger as a table, newest first.
pub fn changes_text(c: &Changes) -> String {
    let mut s = String::new();
    let more = |more: bool| {
        if more {
            format!(" (the newest {}; --limit shows more)", c.limit)
        } else {
            String::new()
        }
    };
    let _ = writeln!(
        s,
        "reward_changes: {} rows{}",
        c.reward_changes.len(),
        more(c.reward_changes_more)
    );
    if !c.reward_changes.is_empty() {
        let _ = writeln!(
            s,
            "{:>8}  {:>6}  {:>12}  {:<40}  {:>12}  {:>12}",
            "id", "run", "referrer", "field", "old", "new"
        );
        for r in &c.reward_changes {
            let _ = writeln!(
                s,
                "{:>8}  {:>6}  {:>12}  {:<40}  {:>12}  {:>12}",
                r.id,
                r.run_id,
                r.referrer_user_id,
                r.field,
                r.old_value.as_deref().unwrap_or("NULL"),
                r.new_value.as_deref().unwrap_or("NULL")
            );
        }
    }
    let _ = writeln!(
        s,
        "referral_grants: {} rows{}",
        c.grants.len(),
        more(c.grants_more)
    );
    if !c.grants.is_empty() {
        let _ = writeln!(
            s,
            "{:>8}  {:>6}  {:<24}  {:<8}  {:<8}  {:>12}  {:>12}  {:>12}  {:>4}  {:>8}  {:>8}  {:>12}",
            "id",
            "run",
            "program",
            "kind",
            "party",
            "referrer",
            "referred",
            "credited",
            "seq",
            "days",
            "cents",
            "payment"
        );
        for g in &c.grants {
            let _ = writeln!(
                s,
                "{:>8}  {:>6}  {:<24}  {:<8}  {:<8}  {:>12}  {:>12}  {:>12}  {:>4}  {:>8}  {:>8}  {:>12}",
                g.id,
                g.run_id,
                g.program,
                g.kind,
                g.party,
                g.referrer_user_id,
                g.referred_user_id,
                g.credited_user_id,
                g.grant_seq,
                opt(g.credit_days),
                opt(g.credit_cents),
                opt(g.payment_id)
            );
        }
    }
    s
}
