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
    let mut by_referrer: std::collections::BTreeMap<i64, u64> = Default::default();
    for d in &plan.referrals {
        if d.outcome == Outcome::Granted {
            *by_referrer.entry(d.referrer_id).or_default() += 1;
        }
    }
    let mut top: Vec<TopReferrer> = by_referrer
        .into_iter()
        .map(|(referrer_user_id, granted)| TopReferrer {
            referrer_user_id,
            granted,
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

/// A referral's live grants once this run's changes are in, by party.
pub fn after_run(d: &Decided) -> Vec<(Party, Amount)> {
    let mut live: Vec<(Party, Amount)> = d
        .held
        .iter()
        .filter(|h| !d.changes.iter().any(|c| c.reversal && c.party == h.party))
        .map(|h| (h.party, h.amount))
        .collect();
    live.extend(
        d.changes
            .iter()
            .filter(|c| !c.reversal)
            .map(|c| (c.party, c.amount)),
    );
    live
}

/// One row per (program, referral): `NAME.grants.EXT`.
pub fn referral_frame<'a>(
    plans: impl IntoIterator<Item = &'a ProgramPlan>,
    keep: impl Fn(&Decided) -> bool,
) -> PolarsResult<DataFrame> {
    let rows: Vec<(&str, &Decided)> = plans
        .into_iter()
        .flat_map(|p| p.referrals.iter().map(move |d| (p.name.as_str(), d)))
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
        "program" => rows.iter().map(|(p, _)| *p).collect::<Vec<&str>>(),
        "referrer_user_id" => rows.iter().map(|(_, d)| d.referrer_id).collect::<Vec<i64>>(),
        "referred_user_id" => rows.iter().map(|(_, d)| d.user_id).collect::<Vec<i64>>(),
        "outcome" => rows.iter().map(|(_, d)| d.outcome.as_str()).collect::<Vec<&str>>(),
        "cause" => rows.iter().map(|(_, d)| d.cause.map(Outcome::as_str)).collect::<Vec<Option<&str>>>(),
        "conversion_payment_id" => rows.iter().map(|(_, d)| d.conversion.map(|c| c.payment_id)).collect::<Vec<Option<i64>>>(),
        "converted_at" => rows.iter().map(|(_, d)| d.conversion.map(|c| instant::to_rfc3339(c.at))).collect::<Vec<Option<String>>>(),
        "position" => rows.iter().map(|(_, d)| d.position.map(i64::from)).collect::<Vec<Option<i64>>>(),
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
    match (a, days) {
        (Amount::Days(d), true) => Some(d),
        (Amount::Cents(c), false) => Some(c),
        _ => None,
    }
}
