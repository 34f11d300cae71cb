//! What users see of a grant program (docs/rules.md §7.5): its analytics for the summary and
//! the report, its per-referral rows (`NAME.grants.EXT`) and its part of `explain`.

use polars::prelude::*;
use serde::Serialize;

use crate::instant::{self, MICROS_PER_DAY};

use super::plan::{GrantStats, ProgramPlan, Totals};
use super::rules::{Decided, Outcome};
use super::{Amount, Party};

/// A program's figures in a run: the summary's and the report's.
#[derive(Debug, Clone, Serialize)]
pub struct Analytics {
    #[serde(flatten)]
    pub stats: GrantStats,
    /// Conversions per referral; `None` without referrals.
    pub conversion_rate: Option<f64>,
    /// The median time from signup to conversion, in days.
    pub median_days_to_conversion: Option<f64>,
    /// The live grants once this run's changes are in, by party: what the program has paid.
    pub paid_out_referrer: Totals,
    pub paid_out_referred: Totals,
    /// The ten referrers with the most granted referrals (ties by id).
    pub top_referrers: Vec<TopReferrer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopReferrer {
    pub referrer_user_id: i64,
    pub granted: u64,
}

pub fn analytics(plan: &ProgramPlan) -> Analytics {
    let stats = plan.stats();
    let mut waits: Vec<i64> = plan
        .referrals
        .iter()
        .filter_map(|d| d.conversion.map(|c| c.at.saturating_sub(d.signed_up_at)))
        .collect();
    waits.sort_unstable();
    let median = match waits.len() {
        0 => None,
        n if n % 2 == 1 => Some(waits[n / 2] as f64),
        n => Some((waits[n / 2 - 1] as f64 + waits[n / 2] as f64) / 2.0),
    };
    let (mut paid_referrer, mut paid_referred) = (Totals::default(), Totals::default());
    for d in &plan.referrals {
        for (party, amount) in after_run(d) {
            match party {
                Party::Referrer => paid_referrer.add(amount),
                Party::Referred => paid_referred.add(amount),
            }
        }
    }
    // The referrals come by referrer: one count per run of them.
    let mut top: Vec<TopReferrer> = plan
        .referrals
        .chunk_by(|a, b| a.referrer_id == b.referrer_id)
        .filter_map(|run| {
            let granted = run.iter().filter(|d| d.outcome == Outcome::Granted).count() as u64;
            (granted > 0).then(|| TopReferrer {
                referrer_user_id: run[0].referrer_id,
                granted,
            })
        })
        .collect();
    top.sort_by(|a, b| {
        b.granted
            .cmp(&a.granted)
            .then(a.referrer_user_id.cmp(&b.referrer_user_id))
    });
    top.truncate(10);
    Analytics {
        conversion_rate: (stats.referrals > 0)
            .then(|| stats.conversions as f64 / stats.referrals as f64),
        median_days_to_conversion: median.map(|m| m / MICROS_PER_DAY as f64),
        stats,
        paid_out_referrer: paid_referrer,
        paid_out_referred: paid_referred,
        top_referrers: top,
    }
}

/// A referral's live grants once this run's changes are in, by party (an iterator: called for
/// every referral of a large run).
pub fn after_run(d: &Decided) -> impl Iterator<Item = (Party, Amount)> + '_ {
    d.held
        .iter()
        .filter(|h| !d.changes.iter().any(|c| c.reversal && c.party == h.party))
        .map(|h| (h.party, h.amount))
        .chain(
            d.changes
                .iter()
                .filter(|c| !c.reversal)
                .map(|c| (c.party, c.amount)),
        )
}

/// One row per (program, referral): `NAME.grants.EXT`, with the facts `explain` shows (the
/// conversion, the hold's end, the position against the program's cap).
pub fn referral_frame<'a>(
    plans: impl IntoIterator<Item = &'a ProgramPlan>,
    keep: impl Fn(&Decided) -> bool,
) -> PolarsResult<DataFrame> {
    let rows: Vec<(&ProgramPlan, &Decided)> = plans
        .into_iter()
        .flat_map(|p| p.referrals.iter().map(move |d| (p, d)))
        .filter(|(_, d)| keep(d))
        .collect();
    let held = |party: Party, days: bool| -> Vec<Option<i64>> {
        rows.iter()
            .map(|(_, d)| {
                d.held
                    .iter()
                    .find(|h| h.party == party)
                    .and_then(|h| pick(h.amount, days))
            })
            .collect()
    };
    let change = |party: Party, days: bool| -> Vec<Option<i64>> {
        rows.iter()
            .map(|(_, d)| {
                d.changes
                    .iter()
                    .filter(|c| c.party == party)
                    .filter_map(|c| pick(c.amount, days))
                    .reduce(|a, b| a + b)
            })
            .collect()
    };
    df!(
        "program" => rows.iter().map(|(p, _)| p.name.as_str()).collect::<Vec<&str>>(),
        "referrer_user_id" => rows.iter().map(|(_, d)| d.referrer_id).collect::<Vec<i64>>(),
        "referred_user_id" => rows.iter().map(|(_, d)| d.user_id).collect::<Vec<i64>>(),
        "outcome" => rows.iter().map(|(_, d)| d.outcome.as_str()).collect::<Vec<&str>>(),
        "cause" => rows.iter().map(|(_, d)| d.cause.map(Outcome::as_str)).collect::<Vec<Option<&str>>>(),
        "conversion_payment_id" => rows.iter().map(|(_, d)| d.conversion.map(|c| c.payment_id)).collect::<Vec<Option<i64>>>(),
        "converted_at" => rows.iter().map(|(_, d)| d.conversion.map(|c| instant::to_rfc3339_or_infinite(c.at))).collect::<Vec<Option<String>>>(),
        "hold_ends_at" => rows.iter().map(|(p, d)| d.conversion.filter(|_| p.hold_days > 0).map(|c| instant::to_rfc3339_or_infinite(c.at.saturating_add(p.hold_days * MICROS_PER_DAY)))).collect::<Vec<Option<String>>>(),
        "position" => rows.iter().map(|(_, d)| d.position.map(i64::from)).collect::<Vec<Option<i64>>>(),
        "cap" => rows.iter().map(|(p, _)| (p.cap > 0).then_some(p.cap)).collect::<Vec<Option<i64>>>(),
        "referrer_held_days" => held(Party::Referrer, true),
        "referrer_held_cents" => held(Party::Referrer, false),
        "referrer_change_days" => change(Party::Referrer, true),
        "referrer_change_cents" => change(Party::Referrer, false),
        "referred_held_days" => held(Party::Referred, true),
        "referred_held_cents" => held(Party::Referred, false),
        "referred_change_days" => change(Party::Referred, true),
        "referred_change_cents" => change(Party::Referred, false),
    )
}

/// An amount's days or cents column: the other kind reads as null.
fn pick(a: Amount, days: bool) -> Option<i64> {
    if days {
        a.credit_days()
    } else {
        a.credit_cents()
    }
}

/// One row per grant program: the figures of [`analytics`], flat (`NAME.programs.EXT`).
pub fn program_frame(plans: &[ProgramPlan]) -> PolarsResult<DataFrame> {
    let a: Vec<Analytics> = plans.iter().map(analytics).collect();
    let n = |f: &dyn Fn(&Analytics) -> u64| a.iter().map(|x| f(x) as i64).collect::<Vec<i64>>();
    let i = |f: &dyn Fn(&Analytics) -> i64| a.iter().map(f).collect::<Vec<i64>>();
    let outcome = |o: Outcome| {
        a.iter()
            .map(|x| x.stats.outcomes.get(o.as_str()).copied().unwrap_or(0) as i64)
            .collect::<Vec<i64>>()
    };
    let mut df = df!(
        "program" => a.iter().map(|x| x.stats.program.clone()).collect::<Vec<String>>(),
        "referrals" => n(&|x| x.stats.referrals),
        "conversions" => n(&|x| x.stats.conversions),
        "conversion_rate" => a.iter().map(|x| x.conversion_rate).collect::<Vec<Option<f64>>>(),
        "median_days_to_conversion" => a.iter().map(|x| x.median_days_to_conversion).collect::<Vec<Option<f64>>>(),
        "grants_referrer" => n(&|x| x.stats.grants_referrer.count),
        "grants_referrer_days" => i(&|x| x.stats.grants_referrer.days),
        "grants_referrer_cents" => i(&|x| x.stats.grants_referrer.cents),
        "grants_referred" => n(&|x| x.stats.grants_referred.count),
        "grants_referred_days" => i(&|x| x.stats.grants_referred.days),
        "grants_referred_cents" => i(&|x| x.stats.grants_referred.cents),
        "reversals_referrer" => n(&|x| x.stats.reversals_referrer.count),
        "reversals_referrer_days" => i(&|x| x.stats.reversals_referrer.days),
        "reversals_referrer_cents" => i(&|x| x.stats.reversals_referrer.cents),
        "reversals_referred" => n(&|x| x.stats.reversals_referred.count),
        "reversals_referred_days" => i(&|x| x.stats.reversals_referred.days),
        "reversals_referred_cents" => i(&|x| x.stats.reversals_referred.cents),
        "paid_out_referrer_days" => i(&|x| x.paid_out_referrer.days),
        "paid_out_referrer_cents" => i(&|x| x.paid_out_referrer.cents),
        "paid_out_referred_days" => i(&|x| x.paid_out_referred.days),
        "paid_out_referred_cents" => i(&|x| x.paid_out_referred.cents),
        "top_referrers" => a.iter().map(|x| x.top_referrers.iter().map(|t| format!("{}:{}", t.referrer_user_id, t.granted)).collect::<Vec<_>>().join(" ")).collect::<Vec<String>>(),
    )?;
    for o in Outcome::ALL {
        df.with_column(Column::new(o.as_str().into(), outcome(o)))?;
    }
    Ok(df)
}

/// A grant program as one referrer's stats page shows it (`explain`, `GET /v1/referrers/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferrerView {
    pub program: String,
    /// R's referrals granted.
    pub uses: u64,
    /// `None`: no limit.
    pub cap: Option<i64>,
    /// Uses left under the cap; `None` when unlimited.
    pub remaining: Option<i64>,
    /// What R has earned as referrer in this program, this run's changes included.
    pub earned_days: i64,
    pub earned_cents: i64,
    pub referrals: Vec<ReferralView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferralView {
    pub referred_user_id: i64,
    pub outcome: &'static str,
    pub cause: Option<&'static str>,
    pub conversion_payment_id: Option<i64>,
    pub converted_at: Option<String>,
    /// When the conversion's hold ends (`converted_at + hold_days`); `None` without a
    /// conversion or a hold.
    pub hold_ends_at: Option<String>,
    /// Rank in R's conversion order, from 1: the referral's place against the cap.
    pub position: Option<u32>,
    /// The live grants the ledger holds for the referral.
    pub held: Vec<GrantView>,
    /// The grants and reversals this run makes (negative amounts for reversals).
    pub changes: Vec<GrantView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantView {
    pub party: &'static str,
    pub credited_user_id: i64,
    pub credit_days: Option<i64>,
    pub credit_cents: Option<i64>,
}

impl GrantView {
    pub fn new(party: Party, credited_user_id: i64, amount: Amount) -> Self {
        GrantView {
            party: party.as_str(),
            credited_user_id,
            credit_days: amount.credit_days(),
            credit_cents: amount.credit_cents(),
        }
    }
}

/// A grant's amount for people: `45 days` or `1000 cents` (negative for a reversal).
pub fn amount_text(days: Option<i64>, cents: Option<i64>) -> String {
    match (days, cents) {
        (Some(d), _) => format!("{d} days"),
        (_, Some(c)) => format!("{c} cents"),
        _ => "-".into(),
    }
}

/// Referrer `id`'s view of a program: its referrals (by referred user id) and its figures.
pub fn referrer_view(plan: &ProgramPlan, id: i64) -> ReferrerView {
    let mine: Vec<&Decided> = plan
        .referrals
        .iter()
        .filter(|d| d.referrer_id == id)
        .collect();
    let uses = mine
        .iter()
        .filter(|d| d.outcome == Outcome::Granted)
        .count() as u64;
    let (mut days, mut cents) = (0, 0);
    for d in &mine {
        for (party, amount) in after_run(d) {
            if party == Party::Referrer {
                days += amount.days();
                cents += amount.cents();
            }
        }
    }
    let cap = (plan.cap > 0).then_some(plan.cap);
    ReferrerView {
        program: plan.name.clone(),
        uses,
        cap,
        remaining: cap.map(|c| (c - uses as i64).max(0)),
        earned_days: days,
        earned_cents: cents,
        referrals: mine
            .iter()
            .map(|d| ReferralView {
                referred_user_id: d.user_id,
                outcome: d.outcome.as_str(),
                cause: d.cause.map(Outcome::as_str),
                conversion_payment_id: d.conversion.map(|c| c.payment_id),
                converted_at: d.conversion.map(|c| instant::to_rfc3339_or_infinite(c.at)),
                hold_ends_at: d.conversion.filter(|_| plan.hold_days > 0).map(|c| {
                    instant::to_rfc3339_or_infinite(
                        c.at.saturating_add(plan.hold_days * MICROS_PER_DAY),
                    )
                }),
                position: d.position,
                held: d
                    .held
                    .iter()
                    .map(|h| GrantView::new(h.party, h.credited_user_id, h.amount))
                    .collect(),
                changes: d
                    .changes
                    .iter()
                    .map(|c| GrantView::new(c.party, c.credited_user_id, c.amount))
                    .collect(),
            })
            .collect(),
    }
}

/// The text form of [`referrer_view`], for `explain`.
pub fn referrer_text(v: &ReferrerView) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let limit = match (v.cap, v.remaining) {
        (Some(c), Some(r)) => format!("cap {c}, {r} remaining"),
        _ => "no cap".into(),
    };
    let mut earned = vec![];
    if v.earned_days != 0 {
        earned.push(format!("{} days", v.earned_days));
    }
    if v.earned_cents != 0 {
        earned.push(format!("{} cents", v.earned_cents));
    }
    let earned = if earned.is_empty() {
        "nothing".to_owned()
    } else {
        earned.join(", ")
    };
    let _ = writeln!(
        s,
        "grant program {}: {} granted ({limit}); earned as referrer: {earned}",
        v.program, v.uses
    );
    if v.referrals.is_empty() {
        let _ = writeln!(s, "  no referrals");
        return s;
    }
    let _ = writeln!(
        s,
        "{:>14}  {:<26}  {:>8}  {:<28}  grants",
        "referred_user", "outcome", "position", "converted_at (payment)"
    );
    let show = |g: &GrantView| {
        format!(
            "{} {} {}",
            g.party,
            g.credited_user_id,
            amount_text(g.credit_days, g.credit_cents)
        )
    };
    for r in &v.referrals {
        let outcome = match r.cause {
            Some(c) => format!("{} ({c})", r.outcome),
            None => r.outcome.to_owned(),
        };
        let conv = match (&r.converted_at, r.conversion_payment_id) {
            (Some(t), Some(p)) => format!("{t} ({p})"),
            _ => "-".into(),
        };
        let mut grants: Vec<String> = r.held.iter().map(|g| format!("held {}", show(g))).collect();
        grants.extend(r.changes.iter().map(|g| format!("now {}", show(g))));
        let _ = writeln!(
            s,
            "{:>14}  {:<26}  {:>8}  {:<28}  {}",
            r.referred_user_id,
            outcome,
            r.position
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            conv,
            if grants.is_empty() {
                "-".into()
            } else {
                grants.join("; ")
            }
        );
    }
    s
}
