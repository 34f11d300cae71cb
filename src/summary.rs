//! Human-readable output: the run summary, program analytics and `runs` (`explain` is `explain.rs`).

use std::fmt::Write;

use crate::engine::RunReport;
use crate::instant;
use crate::program::grants::{self, plan::ProgramPlan, plan::Totals, report as grant_report};
use crate::program::slots::plan::PlanEntry;
use crate::program::slots::rules::Outcome;
use crate::snapshot::Scope;

/// The summary a run prints: referrers processed, rewards up / down, total bonus delta, counts
/// per outcome, conflicts, the digest and the elapsed time.
pub fn run_summary(r: &RunReport) -> String {
    let mut s = String::new();
    let req = &r.request;
    let what = match req.scope {
        Scope::Full => "full run".to_owned(),
        Scope::Referrer(id) => format!("referrer {id}"),
        Scope::Shard(s) => format!("shard {s}"),
    };
    let mode = if req.dry_run {
        "dry run, nothing written"
    } else {
        "apply"
    };
    let _ = writeln!(
        s,
        "reconcile {what} ({mode}) on {} as of {}",
        r.backend,
        instant::to_rfc3339(req.as_of)
    );
    let st = &r.stats;
    let _ = writeln!(s, "  referrers processed  {}", st.referrers);
    let _ = writeln!(
        s,
        "  rewards up / down    {} / {}",
        st.rewards_up, st.rewards_down
    );
    let _ = writeln!(s, "  total bonus delta    {:+}", st.bonus_delta);
    let counts = r.computation.outcome_counts();
    let line = |candidates: bool| {
        counts
            .iter()
            .filter(|(o, _)| o.is_candidate() == candidates)
            .map(|(o, n)| format!("{} {n}", o.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(s, "  outcomes             {}", line(true));
    let _ = writeln!(s, "  not candidates       {}", line(false));
    for (id, why) in r.plan.write_errors().iter().take(10) {
        let _ = writeln!(s, "  UNWRITABLE           referrer {id}: {why}");
    }
    if st.unwritable > 10 {
        let _ = writeln!(s, "  UNWRITABLE           … {} more", st.unwritable - 10);
    }
    match &r.applied {
        None => {
            let _ = writeln!(
                s,
                "  would write          {} referral_rewards rows, {} host values",
                st.reward_rows_to_write, st.host_values_to_write
            );
        }
        Some(a) => {
            let _ = writeln!(
                s,
                "  written              {} referral_rewards rows, {} host values, {} ledger rows",
                a.reward_rows_written, a.host_values_written, a.ledger_rows_written
            );
            let _ = writeln!(s, "  conflicts            {}", a.conflicts.len());
            if !a.conflicts.is_empty() {
                let shown: Vec<String> =
                    a.conflicts.iter().take(10).map(|c| c.to_string()).collect();
                let _ = writeln!(
                    s,
                    "                       host column changed since the snapshot, left for the next run: {}{}",
                    shown.join(", "),
                    if a.conflicts.len() > 10 { ", …" } else { "" }
                );
            }
        }
    }
    for p in &r.grants {
        s.push_str(&grant_summary(p, r.applied.is_some()));
    }
    if let Some(a) = &r.applied
        && !r.grants.is_empty()
    {
        let g = &a.grants;
        let _ = writeln!(
            s,
            "  grants written       {} grants, {} reversals, {} users' balances; {} already written by another run",
            g.grants_written, g.reversals_written, g.balances_written, g.conflicts
        );
    }
    if r.abandoned_runs > 0 {
        let _ = writeln!(
            s,
            "  abandoned runs       {} marked abandoned",
            r.abandoned_runs
        );
    }
    let _ = writeln!(s, "  digest               {}", r.plan.digest);
    if let Some(id) = r.run_id {
        let _ = writeln!(s, "  run                  {id} succeeded");
    }
    let _ = writeln!(s, "  elapsed              {:.3} s", r.elapsed.as_secs_f64());
    if req.scope.referrer().is_some() {
        for e in &r.plan.entries {
            s.push_str(&entry_line(e));
        }
    }
    s
}

/// A grant program's part of the summary (docs/rules.md §7.5): referrals, conversions,
/// the grants and reversals to make by party, on hold, over the cap, the median time to
/// conversion and the top referrers. `applied`: whether the run wrote (else "to make").
pub fn grant_summary(p: &ProgramPlan, applied: bool) -> String {
    let a = grant_report::analytics(p);
    let st = &a.stats;
    let mut s = String::new();
    let n = |o: &str| st.outcomes.get(o).copied().unwrap_or(0);
    let _ = writeln!(s, "  grant program {}", p.name);
    let _ = writeln!(
        s,
        "    referrals          {} ({} converted{})",
        st.referrals,
        st.conversions,
        a.conversion_rate
            .map(|r| format!(", {:.1}%", r * 100.0))
            .unwrap_or_default()
    );
    let outcomes: Vec<String> = grants::rules::Outcome::ALL
        .iter()
        .map(|o| format!("{} {}", o.as_str(), n(o.as_str())))
        .collect();
    let _ = writeln!(s, "    outcomes           {}", outcomes.join(", "));
    let verb = if applied { "made" } else { "to make" };
    for (what, t) in [
        ("grants to referrers", st.grants_referrer),
        ("grants to referred", st.grants_referred),
        ("reversals referrers", st.reversals_referrer),
        ("reversals referred", st.reversals_referred),
    ] {
        let _ = writeln!(s, "    {what:<20}{} {verb}{}", t.count, totals(&t));
    }
    let _ = writeln!(
        s,
        "    paid out           referrers{}, referred{}",
        totals(&a.paid_out_referrer),
        totals(&a.paid_out_referred)
    );
    let _ = writeln!(
        s,
        "    on hold / capped   {} / {}",
        n("on_hold"),
        n("cap_reached")
    );
    if let Some(m) = a.median_days_to_conversion {
        let _ = writeln!(s, "    median to convert  {m:.1} days from signup");
    }
    if !a.top_referrers.is_empty() {
        let top: Vec<String> = a
            .top_referrers
            .iter()
            .map(|t| format!("{} ({})", t.referrer_user_id, t.granted))
            .collect();
        let _ = writeln!(s, "    top referrers      {}", top.join(", "));
    }
    s
}

fn totals(t: &Totals) -> String {
    let mut parts = vec![];
    if t.days != 0 {
        parts.push(format!("{} days", t.days));
    }
    if t.cents != 0 {
        parts.push(format!("{} cents", t.cents));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// One referrer's result against its current state.
pub fn entry_line(e: &PlanEntry) -> String {
    let d = &e.desired;
    format!(
        "  referrer {}: referred {}, qualified {}, self_referral {}, cooldown {}, missing_ip {}, \
         shared_ip {}, duplicate_ip {}; bonus_slots {} (current {}), badge {}\n",
        d.referrer_user_id,
        d.referred_users_total,
        d.qualified_referrals,
        d.disqualified_self_referral,
        d.disqualified_cooldown,
        d.disqualified_missing_ip,
        d.disqualified_shared_ip,
        d.disqualified_duplicate_ip,
        d.bonus_slots,
        e.current_bonus_slots(),
        d.badge.as_deref().unwrap_or("none")
    )
}

/// What a program owner asks of a full run: who refers best, what the rules catch, what the
/// program grants.
pub fn program_analytics(r: &RunReport) -> String {
    let mut s = String::new();
    let counts = r.computation.outcome_counts();
    let candidates: u64 = counts
        .iter()
        .filter(|(o, _)| o.is_candidate())
        .map(|(_, n)| n)
        .sum();
    let referred: u64 = counts.iter().map(|(_, n)| n).sum();
    let _ = writeln!(s, "program analytics");
    let _ = writeln!(
        s,
        "  candidates           {candidates} of {referred} referred users"
    );
    let share = |n: u64| {
        if candidates == 0 {
            0.0
        } else {
            100.0 * n as f64 / candidates as f64
        }
    };
    let disqualified: Vec<String> = counts
        .iter()
        .filter(|(o, _)| o.is_candidate() && *o != Outcome::Qualified)
        .map(|(o, n)| format!("{} {:.1}%", o.as_str(), share(*n)))
        .collect();
    let _ = writeln!(s, "  disqualified share   {}", disqualified.join(", "));
    let granted: i64 = r.plan.entries.iter().map(|e| e.desired.bonus_slots).sum();
    let current: i64 = r.plan.entries.iter().map(|e| e.current_bonus_slots()).sum();
    let _ = writeln!(s, "  bonus slots granted  {granted} (now {current})");
    let mut badges: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for e in r.plan.entries.iter().filter(|e| {
        r.computation
            .results
            .binary_search_by_key(&e.referrer_user_id(), |x| x.referrer_user_id)
            .is_ok()
    }) {
        *badges
            .entry(e.desired.badge.as_deref().unwrap_or("none"))
            .or_default() += 1;
    }
    let by_badge: Vec<String> = badges.iter().map(|(b, n)| format!("{b} {n}")).collect();
    let _ = writeln!(s, "  referrers by badge   {}", by_badge.join(", "));
    let mut top: Vec<&PlanEntry> = r
        .plan
        .entries
        .iter()
        .filter(|e| e.desired.qualified_referrals > 0)
        .collect();
    top.sort_by_key(|e| {
        (
            std::cmp::Reverse(e.desired.qualified_referrals),
            e.referrer_user_id(),
        )
    });
    if !top.is_empty() {
        let _ = writeln!(s, "  top referrers by qualified referrals");
        let _ = writeln!(
            s,
            "    {:>12}  {:>9}  {:>8}  {:>11}  badge",
            "referrer", "qualified", "referred", "bonus_slots"
        );
        for e in top.iter().take(10) {
            let d = &e.desired;
            let _ = writeln!(
                s,
                "    {:>12}  {:>9}  {:>8}  {:>11}  {}",
                d.referrer_user_id,
                d.qualified_referrals,
                d.referred_users_total,
                d.bonus_slots,
                d.badge.as_deref().unwrap_or("-")
            );
        }
    }
    s
}

/// `reconcile --output json`: the run summary as one JSON object on stdout, for scripts (the
/// text summary is not printed then).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunJson {
    /// `null` for a dry run.
    pub run_id: Option<i64>,
    pub dry_run: bool,
    /// `full` (also for a shard) or `referrer`.
    pub mode: &'static str,
    pub referrer_user_id: Option<i64>,
    /// `K/N` for a shard run.
    pub shard: Option<String>,
    pub backend: &'static str,
    pub as_of: String,
    pub digest: String,
    pub elapsed_seconds: f64,
    /// Referrers, rewards up / down, bonus delta, what an apply writes, unwritable referrers.
    pub stats: crate::program::slots::plan::PlanStats,
    /// Referred users by outcome (or reason for not being a candidate).
    pub outcomes: std::collections::BTreeMap<&'static str, u64>,
    /// Referrers whose values the host cannot store (exit code 4), with why.
    pub unwritable: Vec<Unwritable>,
    /// What the apply wrote; `null` for a dry run.
    pub written: Option<Written>,
    /// Each grant program's counts (docs/rules.md §7.5).
    pub grant_programs: Vec<grants::plan::GrantStats>,
    pub abandoned_runs: u64,
    /// A one-referrer run: the referrer's report row (docs/rules.md §5).
    pub referrers: Vec<crate::report::ReportRow>,
    /// The reports and plan written (by the command line).
    pub files: Vec<WrittenFile>,
    /// What could not be written after the run committed (exit code 5).
    pub output_errors: Vec<String>,
    /// `--diff`: what the plan changes (`plan show`'s structure); absent without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<crate::diff::PlanDiff>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Unwritable {
    pub referrer_user_id: i64,
    pub error: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub reward_rows: u64,
    pub host_values: u64,
    pub ledger_rows: u64,
    /// Users whose host value changed under the run, left for the next one.
    pub conflicts: Vec<i64>,
    pub grants: crate::store::GrantsApplied,
}

/// A file a run left behind: `report`, `per_referral`, `grants`, `programs` or `plan`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenFile {
    pub kind: &'static str,
    pub path: String,
    /// Rows written (the plan: its referrers).
    pub rows: usize,
    pub seconds: f64,
}

impl RunJson {
    pub fn of(r: &RunReport) -> RunJson {
        let req = &r.request;
        RunJson {
            run_id: r.run_id,
            dry_run: req.dry_run,
            mode: req.scope.mode(),
            referrer_user_id: req.scope.referrer(),
            shard: req.scope.shard().map(|s| s.to_string()),
            backend: r.backend,
            as_of: instant::to_rfc3339(req.as_of),
            digest: r.plan.digest.clone(),
            elapsed_seconds: r.elapsed.as_secs_f64(),
            stats: r.stats.clone(),
            outcomes: r
                .computation
                .outcome_counts()
                .into_iter()
                .map(|(o, n)| (o.as_str(), n))
                .collect(),
            unwritable: r
                .plan
                .write_errors()
                .into_iter()
                .map(|(referrer_user_id, error)| Unwritable {
                    referrer_user_id,
                    error,
                })
                .collect(),
            written: r.applied.as_ref().map(|a| Written {
                reward_rows: a.reward_rows_written,
                host_values: a.host_values_written,
                ledger_rows: a.ledger_rows_written,
                conflicts: a.conflicts.clone(),
                grants: a.grants,
            }),
            grant_programs: r.grants.iter().map(|p| p.stats()).collect(),
            abandoned_runs: r.abandoned_runs,
            referrers: match req.scope {
                Scope::Referrer(_) => r
                    .plan
                    .entries
                    .iter()
                    .map(crate::report::ReportRow::of)
                    .collect(),
                _ => vec![],
            },
            files: vec![],
            output_errors: vec![],
            diff: None,
        }
    }
}
