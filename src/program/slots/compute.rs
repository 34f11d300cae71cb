//! From a snapshot to per-referrer results: the rules give each referred user an outcome, and
//! one polars query groups them by referrer, counts outcomes and applies the reward rules.
//!
//! CPU-bound: callers run it on a blocking thread (`tokio::task::spawn_blocking`).

use std::collections::HashSet;

use polars::prelude::*;

use crate::config::Config;
use crate::instant::Instant;
use crate::program::slots::facts::ReferralFacts;
use crate::program::slots::rewards::{RewardResult, badge_expr, bonus_slots_expr};
use crate::program::slots::rules::{self, Outcome, ReferredFacts, RuleParams};
use crate::snapshot::Snapshot;

/// One referred user's outcome: the per-referral view behind `explain` and the reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferralOutcome {
    pub referrer_user_id: i64,
    pub referred_user_id: i64,
    pub outcome: Outcome,
    /// Rank in the referrer's claim order (`started_at`, NULL last, then id), from 1;
    /// candidates only.
    pub position: Option<u32>,
    pub signup_ip: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Computation {
    /// One per referrer in the snapshot, ascending by id.
    pub results: Vec<RewardResult>,
    /// One per referred user, by referrer then referred user id.
    pub referrals: Vec<ReferralOutcome>,
    /// The referrals whose referrer holds no invite code, as far as the snapshot read them
    /// ([`Snapshot::uncounted`]), each `referrer_without_invite_code`; by referrer then referred
    /// user id. Counted nowhere.
    pub uncounted: Vec<ReferralOutcome>,
    /// The facts of each referral of [`Computation::listed`], in its order; empty unless the
    /// run lists its referrals (`explain`, the per-referral report: `RunControl::list_uncounted`).
    pub facts: Vec<ReferralFacts>,
}

impl Computation {
    /// Every referral to list in the per-referral report and `explain`: the counted ones and
    /// those whose referrer holds no invite code, by referrer then referred user id.
    pub fn listed(&self) -> std::borrow::Cow<'_, [ReferralOutcome]> {
        if self.uncounted.is_empty() {
            return std::borrow::Cow::Borrowed(&self.referrals);
        }
        let mut all: Vec<ReferralOutcome> = self
            .referrals
            .iter()
            .chain(&self.uncounted)
            .cloned()
            .collect();
        all.sort_by_key(|r| (r.referrer_user_id, r.referred_user_id));
        std::borrow::Cow::Owned(all)
    }

    /// How many referred users got each outcome.
    pub fn outcome_counts(&self) -> Vec<(Outcome, u64)> {
        let mut counts = [0u64; Outcome::ALL.len()];
        for r in &self.referrals {
            counts[r.outcome.code() as usize] += 1;
        }
        Outcome::ALL
            .iter()
            .map(|o| (*o, counts[o.code() as usize]))
            .collect()
    }
}

/// Runs the rules of SPEC section 3 over a snapshot at instant `now`.
pub fn compute(snap: &Snapshot, cfg: &Config, now: Instant) -> PolarsResult<Computation> {
    let params = RuleParams::new(&cfg.rules, now);
    let signup = crate::program::fraud::signup_ips(&snap.registrations);
    let referrer_ips = crate::program::fraud::referrer_ips_by_referrer(&snap.referrer_events);
    let empty = HashSet::new();

    let mut order: Vec<usize> = (0..snap.referred.len()).collect();
    order.sort_unstable_by_key(|&i| (snap.referred[i].referrer_id, snap.referred[i].id));

    let mut referrals = Vec::with_capacity(order.len());
    for group in
        order.chunk_by(|&a, &b| snap.referred[a].referrer_id == snap.referred[b].referrer_id)
    {
        let referrer = snap.referred[group[0]].referrer_id;
        let facts: Vec<ReferredFacts> = group
            .iter()
            .map(|&i| {
                let user = &snap.referred[i];
                ReferredFacts {
                    user,
                    signup_ip: signup.get(&user.id).copied(),
                }
            })
            .collect();
        let ips = referrer_ips.get(&referrer).unwrap_or(&empty);
        let outcomes = rules::classify_referrer(referrer, &facts, ips, &params);
        for (f, (outcome, position)) in facts.iter().zip(outcomes) {
            referrals.push(ReferralOutcome {
                referrer_user_id: referrer,
                referred_user_id: f.user.id,
                outcome,
                position,
                signup_ip: f.signup_ip.map(str::to_owned),
            });
        }
    }

    let results = per_referrer(&snap.referrers, &referrals, cfg)?;
    let mut uncounted: Vec<ReferralOutcome> = snap
        .uncounted
        .iter()
        .map(|&(referrer, user)| ReferralOutcome {
            referrer_user_id: referrer,
            referred_user_id: user,
            outcome: Outcome::ReferrerWithoutInviteCode,
            position: None,
            signup_ip: signup.get(&user).map(|ip| ip.to_string()),
        })
        .collect();
    uncounted.sort_by_key(|r| (r.referrer_user_id, r.referred_user_id));
    Ok(Computation {
        results,
        referrals,
        uncounted,
        facts: vec![],
    })
}

const COUNTED: [(&str, Outcome); 6] = [
    ("qualified_referrals", Outcome::Qualified),
    ("disqualified_self_referral", Outcome::SelfReferral),
    ("disqualified_cooldown", Outcome::Cooldown),
    ("disqualified_missing_ip", Outcome::MissingIp),
    ("disqualified_shared_ip", Outcome::SharedIp),
    ("disqualified_duplicate_ip", Outcome::DuplicateIp),
];

/// Groups outcomes by referrer; every referrer gets a row, with zeros if nobody it referred.
fn per_referrer(
    referrers: &[i64],
    referrals: &[ReferralOutcome],
    cfg: &Config,
) -> PolarsResult<Vec<RewardResult>> {
    let outcomes = df!(
        "referrer_user_id" => referrals.iter().map(|r| r.referrer_user_id).collect::<Vec<_>>(),
        "outcome" => referrals.iter().map(|r| r.outcome.code() as u32).collect::<Vec<_>>(),
    )?;
    let referrers = df!("referrer_user_id" => referrers)?;

    let mut aggs = vec![len().cast(DataType::Int64).alias("referred_users_total")];
    for (name, outcome) in COUNTED {
        aggs.push(
            col("outcome")
                .eq(lit(outcome.code() as u32))
                .sum()
                .cast(DataType::Int64)
                .alias(name),
        );
    }
    let mut count_cols = vec![col("referred_users_total")];
    count_cols.extend(COUNTED.iter().map(|(name, _)| col(*name)));

    let out = referrers
        .lazy()
        .left_join(
            outcomes
                .lazy()
                .group_by([col("referrer_user_id")])
                .agg(aggs),
            col("referrer_user_id"),
            col("referrer_user_id"),
        )
        .with_columns(
            count_cols
                .into_iter()
                .map(|c| c.fill_null(lit(0i64)))
                .collect::<Vec<_>>(),
        )
        .with_columns([
            bonus_slots_expr(col("qualified_referrals"), &cfg.rewards).alias("bonus_slots"),
            badge_expr(col("qualified_referrals"), &cfg.rewards).alias("badge"),
        ])
        .sort(["referrer_user_id"], SortMultipleOptions::default())
        .collect()?;

    let int = |name: &str| -> PolarsResult<Vec<i64>> {
        Ok(out.column(name)?.i64()?.into_no_null_iter().collect())
    };
    let ids = int("referrer_user_id")?;
    let total = int("referred_users_total")?;
    let counted: Vec<Vec<i64>> = COUNTED
        .iter()
        .map(|(name, _)| int(name))
        .collect::<PolarsResult<_>>()?;
    let bonus = int("bonus_slots")?;
    let badge: Vec<Option<String>> = out
        .column("badge")?
        .str()?
        .iter()
        .map(|b| b.map(str::to_owned))
        .collect();

    Ok((0..ids.len())
        .map(|i| RewardResult {
            referrer_user_id: ids[i],
            referred_users_total: total[i],
            qualified_referrals: counted[0][i],
            disqualified_self_referral: counted[1][i],
            disqualified_cooldown: counted[2][i],
            disqualified_missing_ip: counted[3][i],
            disqualified_shared_ip: counted[4][i],
            disqualified_duplicate_ip: counted[5][i],
            bonus_slots: bonus[i],
            badge: badge[i].clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instant::{MICROS_PER_DAY, parse_sql_text};
    use crate::snapshot::{ReferredUser, Subscription};
    use std::sync::Arc;

    fn now() -> Instant {
        parse_sql_text("2026-11-01 00:00:00").unwrap()
    }

    fn referred(id: i64, referrer: i64) -> ReferredUser {
        ReferredUser {
            id,
            referrer_id: referrer,
            created_at: now() - 100 * MICROS_PER_DAY,
            is_active: true,
            is_verified: true,
            subscription: Some(Subscription {
                tier: Arc::from("trader"),
                status: Arc::from("active"),
                started_at: Some(now() - 90 * MICROS_PER_DAY),
                expires_at: None,
            }),
        }
    }

    #[test]
    fn counts_outcomes_per_referrer_and_keeps_referrers_without_referrals() {
        let mut snap = Snapshot {
            referrers: vec![10, 20, 30],
            ..Default::default()
        };
        for id in 1..=4 {
            snap.referred.push(referred(id, 10));
            snap.registrations.push((id, format!("ip{id}")));
        }
        // A duplicate of user 1's IP, and one sharing referrer 10's IP.
        snap.referred.push(referred(5, 10));
        snap.registrations.push((5, "ip1".into()));
        snap.referred.push(referred(6, 10));
        snap.registrations.push((6, "r10".into()));
        snap.referrer_events.push((10, "r10".into()));
        // Referrer 20: one without IP.
        snap.referred.push(referred(7, 20));
        snap.registrations.push((7, "  ".into()));

        let c = compute(&snap, &Config::default(), now()).unwrap();
        assert_eq!(c.results.len(), 3);
        let r10 = &c.results[0];
        assert_eq!(r10.referrer_user_id, 10);
        assert_eq!(r10.referred_users_total, 6);
        assert_eq!(r10.qualified_referrals, 4);
        assert_eq!(r10.disqualified_duplicate_ip, 1);
        assert_eq!(r10.disqualified_shared_ip, 1);
        assert_eq!(r10.bonus_slots, 5);
        assert_eq!(r10.badge.as_deref(), Some("verified_referrer"));
        let r20 = &c.results[1];
        assert_eq!(r20.disqualified_missing_ip, 1);
        assert_eq!(r20.bonus_slots, 0);
        assert_eq!(r20.badge, None);
        assert_eq!(c.results[2], RewardResult::zero(30));
    }
}
