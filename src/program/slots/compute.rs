//! From a snapshot to per-referrer results: the rules give each referred user an outcome; the
//! outcomes are counted by referrer (one polars query on a large run, a plain pass on a small
//! one) and the reward rules applied to each referrer's counts.
//!
//! CPU-bound: callers run it on a blocking thread (`tokio::task::spawn_blocking`).

use crate::program::fraud;

use polars::prelude::*;
use polars_core::runtime::THREAD_POOL;
use rayon::prelude::*;

use crate::config::Config;
use crate::instant::Instant;
use crate::program::slots::facts::ReferralFacts;
use crate::program::slots::rewards::{self, RewardResult};
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

/// From how many referred users a run computes on every core and counts with polars (below,
/// the thread pool's hand-offs and polars' query cost more than they save: a one-referrer run
/// stays on its thread, in plain loops).
pub const PARALLEL_FROM: usize = 20_000;

/// `(a(), b())`, side by side when `parallel` (called on polars' pool).
fn both<A: Send, B: Send>(
    parallel: bool,
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if parallel {
        rayon::join(a, b)
    } else {
        (a(), b())
    }
}

/// Runs the rules of SPEC section 3 over a snapshot at instant `now`, recording each
/// referral's signup IP.
pub fn compute(snap: &Snapshot, cfg: &Config, now: Instant) -> PolarsResult<Computation> {
    compute_listing(snap, cfg, now, true)
}

/// [`compute`]; each [`ReferralOutcome::signup_ip`] is recorded only when `signup_ips` (the
/// runs that list their referrals: `explain`, the per-referral report). A run that counts and
/// plans does not need them: at 10M users they were 4M strings, 200 MB at the run's peak.
pub fn compute_listing(
    snap: &Snapshot,
    cfg: &Config,
    now: Instant,
    signup_ips: bool,
) -> PolarsResult<Computation> {
    if snap.referred.len() >= PARALLEL_FROM {
        // On a thread of polars' pool, its own steps and ours share the cores.
        THREAD_POOL.install(|| compute_with(snap, cfg, now, true, signup_ips))
    } else {
        compute_with(snap, cfg, now, false, signup_ips)
    }
}

fn compute_with(
    snap: &Snapshot,
    cfg: &Config,
    now: Instant,
    parallel: bool,
    record_ips: bool,
) -> PolarsResult<Computation> {
    // Positions are kept as u32 (as in `IdIndex`).
    assert!(
        u32::try_from(snap.referred.len()).is_ok(),
        "more than 2^32 referred users"
    );
    let params = RuleParams::new(&cfg.rules, now);
    // The IP facts and the referrers' order are independent: side by side on a large run.
    let ((signup, referrer_ips), order) = both(
        parallel,
        || {
            both(
                parallel,
                || signup_ips_of_referred(snap),
                || crate::program::fraud::referrer_ips_by_referrer(&snap.referrer_events),
            )
        },
        || {
            // Each key beside its position: a key read through the position missed the cache
            // twice a comparison (the referred users are 96 bytes each, 400 MB at 10M users).
            // The position orders equal keys (a test's user with two subscription rows).
            let mut order: Vec<(i64, i64, u32)> = snap
                .referred
                .iter()
                .enumerate()
                .map(|(i, u)| (u.referrer_id, u.id, i as u32))
                .collect();
            if parallel {
                order.par_sort_unstable();
            } else {
                order.sort_unstable();
            }
            order
        },
    );
    let empty = fraud::IpSet::default();

    // Each referrer's referrals are judged on their own (the rules look at one referrer at a
    // time), so a large run spreads the referrers over the cores; the order stays the same.
    let groups: Vec<&[(i64, i64, u32)]> = order.chunk_by(|a, b| a.0 == b.0).collect();
    let judge = |group: &&[(i64, i64, u32)]| -> Vec<ReferralOutcome> {
        let referrer = group[0].0;
        let facts: Vec<ReferredFacts> = group
            .iter()
            .map(|&(_, _, i)| ReferredFacts {
                user: &snap.referred[i as usize],
                signup_ip: signup[i as usize],
            })
            .collect();
        let ips = referrer_ips.get(&referrer).unwrap_or(&empty);
        let outcomes = rules::classify_referrer(referrer, &facts, ips, &params);
        facts
            .iter()
            .zip(outcomes)
            .map(|(f, (outcome, position))| ReferralOutcome {
                referrer_user_id: referrer,
                referred_user_id: f.user.id,
                outcome,
                position,
                signup_ip: f.signup_ip.filter(|_| record_ips).map(str::to_owned),
            })
            .collect()
    };
    let referrals: Vec<ReferralOutcome> = if parallel {
        groups.par_iter().flat_map_iter(judge).collect()
    } else {
        groups.iter().flat_map(judge).collect()
    };

    drop(groups);
    drop((order, signup));
    let results = per_referrer(&snap.referrers, &referrals, cfg, parallel)?;
    // The users referred by someone without an invite code are not in `snap.referred`: their
    // signup IPs from a map of their own (a listing's few).
    let uncounted_ips = if snap.uncounted.is_empty() || !record_ips {
        Default::default()
    } else {
        let users: crate::program::FastSet<i64> = snap.uncounted.iter().map(|u| u.1).collect();
        fraud::signup_ips(snap.registrations.iter().filter(|r| users.contains(&r.0)))
    };
    let mut uncounted: Vec<ReferralOutcome> = snap
        .uncounted
        .iter()
        .map(|&(referrer, user)| ReferralOutcome {
            referrer_user_id: referrer,
            referred_user_id: user,
            outcome: Outcome::ReferrerWithoutInviteCode,
            position: None,
            signup_ip: uncounted_ips.get(&user).map(|ip| ip.to_string()),
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

/// Each referred user's signup IP, by its position in `snap.referred` ([`fraud::signup_ips_at`]).
fn signup_ips_of_referred(snap: &Snapshot) -> Vec<Option<&str>> {
    let index = crate::ids::IdIndex::of(&snap.referred, |u| u.id);
    fraud::signup_ips_at(
        &index,
        snap.referred.iter().map(|u| u.id),
        &snap.registrations,
    )
}

const COUNTED: [(&str, Outcome); 6] = [
    ("qualified_referrals", Outcome::Qualified),
    ("disqualified_self_referral", Outcome::SelfReferral),
    ("disqualified_cooldown", Outcome::Cooldown),
    ("disqualified_missing_ip", Outcome::MissingIp),
    ("disqualified_shared_ip", Outcome::SharedIp),
    ("disqualified_duplicate_ip", Outcome::DuplicateIp),
];

/// Groups outcomes by referrer and applies the reward rules ([`rewards::bonus_slots`],
/// [`rewards::badge`]); every referrer gets a row, with zeros if nobody it referred. Ascending
/// by referrer.
fn per_referrer(
    referrers: &[i64],
    referrals: &[ReferralOutcome],
    cfg: &Config,
    parallel: bool,
) -> PolarsResult<Vec<RewardResult>> {
    let mut results = if parallel {
        counts_in_polars(referrers, referrals)?
    } else {
        counts_in_place(referrers, referrals)
    };
    for r in &mut results {
        r.bonus_slots = rewards::bonus_slots(r.qualified_referrals, &cfg.rewards);
        r.badge = rewards::badge(r.qualified_referrals, &cfg.rewards).map(str::to_owned);
    }
    Ok(results)
}

/// A large run's counts: one polars query (a group-by joined to the referrers).
fn counts_in_polars(
    referrers: &[i64],
    referrals: &[ReferralOutcome],
) -> PolarsResult<Vec<RewardResult>> {
    let mut by = Column::new(
        "referrer_user_id".into(),
        referrals
            .iter()
            .map(|r| r.referrer_user_id)
            .collect::<Vec<_>>(),
    );
    // The rules give the referrals by referrer: flagged so, polars groups them as runs of the
    // column (slices) instead of hashing each key into a list of row indexes, then gathering
    // through those lists for each count (at 10M users, 4M referrals in 1M lists). Checked, as
    // a wrong flag would count wrong.
    if referrals.is_sorted_by_key(|r| r.referrer_user_id) {
        by.set_sorted_flag(polars_core::series::IsSorted::Ascending);
    }
    let outcomes = DataFrame::new_infer_height(vec![
        by,
        Column::new(
            "outcome".into(),
            referrals
                .iter()
                .map(|r| r.outcome.code() as u32)
                .collect::<Vec<_>>(),
        ),
    ])?;
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
    Ok((0..ids.len())
        .map(|i| {
            let mut r = RewardResult::zero(ids[i]);
            r.referred_users_total = total[i];
            for (k, (_, outcome)) in COUNTED.iter().enumerate() {
                if let Some(c) = count_of(&mut r, *outcome) {
                    *c = counted[k][i];
                }
            }
            r
        })
        .collect())
}

/// A small run's counts (a one-referrer run's few rows): a plain pass, where polars' query
/// was nearly all of the computation (0.30 ms; 1.6 µs without it, on the 2-core development
/// machine). The same counts as [`counts_in_polars`] (a test compares them).
fn counts_in_place(referrers: &[i64], referrals: &[ReferralOutcome]) -> Vec<RewardResult> {
    let mut sorted = referrers.to_vec();
    sorted.sort_unstable();
    let mut results: Vec<RewardResult> = sorted.into_iter().map(RewardResult::zero).collect();
    // As the polars join: a referrer listed twice gets a row each, both counted.
    for r in referrals {
        let first = results.partition_point(|x| x.referrer_user_id < r.referrer_user_id);
        for res in results[first..]
            .iter_mut()
            .take_while(|x| x.referrer_user_id == r.referrer_user_id)
        {
            res.referred_users_total += 1;
            if let Some(c) = count_of(res, r.outcome) {
                *c += 1;
            }
        }
    }
    results
}

/// The counter of `outcome` ([`COUNTED`]'s), or `None`: the other outcomes count only in
/// `referred_users_total`.
fn count_of(r: &mut RewardResult, outcome: Outcome) -> Option<&mut i64> {
    Some(match outcome {
        Outcome::Qualified => &mut r.qualified_referrals,
        Outcome::SelfReferral => &mut r.disqualified_self_referral,
        Outcome::Cooldown => &mut r.disqualified_cooldown,
        Outcome::MissingIp => &mut r.disqualified_missing_ip,
        Outcome::SharedIp => &mut r.disqualified_shared_ip,
        Outcome::DuplicateIp => &mut r.disqualified_duplicate_ip,
        _ => return None,
    })
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

    /// The parallel path (large runs) and the single-threaded one (small runs) give the same
    /// computation, on a snapshot with every outcome in it.
    #[test]
    fn parallel_and_single_threaded_paths_agree() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut snap = Snapshot::default();
        let referrers: Vec<i64> = (0..2_000).map(|r| r * 10 + 1).collect();
        snap.referrers = referrers.clone();
        for id in 100_000..112_000i64 {
            let referrer = referrers[next(2_000) as usize];
            let mut u = referred(id, if next(50) == 0 { id } else { referrer });
            u.is_active = next(20) != 0;
            u.is_verified = next(20) != 0;
            u.created_at = now() - next(40) as i64 * MICROS_PER_DAY;
            let sub = u.subscription.as_mut().unwrap();
            match next(14) {
                0 => u.subscription = None,
                1 => sub.tier = Arc::from("free"),
                2 => sub.started_at = None,
                3 => sub.status = Arc::from("canceled"),
                4 => sub.expires_at = Some(now() - MICROS_PER_DAY),
                _ => {}
            }
            snap.referred.push(u);
            // A few IPs per referrer, so that referrals share them (duplicate_ip) and with
            // the referrer (shared_ip).
            match next(8) {
                0 => {}
                1 => snap.registrations.push((id, " ".into())),
                _ => snap
                    .registrations
                    .push((id, format!("{referrer}-{}", next(12)))),
            }
        }
        for &r in &referrers {
            snap.referrer_events.push((r, format!("{r}-{}", next(12))));
        }
        snap.uncounted = vec![(7, 8), (7, 9)];
        let cfg = Config::default();
        let a = THREAD_POOL
            .install(|| compute_with(&snap, &cfg, now(), true, true))
            .unwrap();
        let b = compute_with(&snap, &cfg, now(), false, true).unwrap();
        assert_eq!(a.results, b.results);
        assert_eq!(a.referrals, b.referrals);
        assert_eq!(a.uncounted, b.uncounted);
        let counts = a.outcome_counts();
        assert!(counts.iter().all(|(_, n)| *n > 0), "{counts:?}");
    }

    // Polars counts referrals given by referrer (flagged sorted: grouped as runs) and the same
    // referrals in any other order (grouped by hashing) alike, and as the plain pass does.
    #[test]
    fn polars_counts_the_same_whatever_the_referrals_order() {
        let outcome = |i: i64| Outcome::ALL[(i * 7 % Outcome::ALL.len() as i64) as usize];
        let referral = |referrer: i64, user: i64| ReferralOutcome {
            referrer_user_id: referrer,
            referred_user_id: user,
            outcome: outcome(user),
            position: None,
            signup_ip: None,
        };
        let referrers: Vec<i64> = (1..=300).map(|r| r * 3).collect();
        let mut sorted: Vec<ReferralOutcome> = vec![];
        for (k, &r) in referrers.iter().enumerate() {
            // Referrer k has k % 9 referrals; some have none.
            for j in 0..(k as i64 % 9) {
                sorted.push(referral(r, r * 1_000 + j));
            }
        }
        // Interleaved: every other referral moved to the end, so no run of one referrer.
        let (even, odd): (Vec<_>, Vec<_>) = sorted
            .iter()
            .cloned()
            .enumerate()
            .partition(|(i, _)| i % 2 == 0);
        let shuffled: Vec<ReferralOutcome> = even.into_iter().chain(odd).map(|(_, r)| r).collect();
        assert!(!shuffled.is_sorted_by_key(|r| r.referrer_user_id));
        let expected = counts_in_place(&referrers, &sorted);
        assert!(expected.iter().any(|r| r.qualified_referrals > 0));
        assert!(expected.iter().any(|r| r.referred_users_total == 0));
        assert_eq!(counts_in_polars(&referrers, &sorted).unwrap(), expected);
        assert_eq!(counts_in_polars(&referrers, &shuffled).unwrap(), expected);
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

    /// A user read twice (two subscription rows) has its signup IP at both of its positions;
    /// a run that does not list its referrals records no IP and counts the same.
    #[test]
    fn signup_ips_by_position_and_only_when_listing() {
        let mut snap = Snapshot {
            referrers: vec![10],
            ..Default::default()
        };
        let mut twice = referred(2, 10);
        twice.subscription.as_mut().unwrap().tier = Arc::from("free");
        snap.referred = vec![referred(2, 10), referred(1, 10), twice];
        snap.registrations = vec![
            (2, "b".into()),
            (1, "a".into()),
            (2, "c".into()),
            (2, " ".into()),
        ];
        assert_eq!(
            signup_ips_of_referred(&snap),
            [Some("c"), Some("a"), Some("c")]
        );

        let listed = compute(&snap, &Config::default(), now()).unwrap();
        let ips: Vec<_> = listed
            .referrals
            .iter()
            .map(|r| r.signup_ip.as_deref())
            .collect();
        assert_eq!(ips, [Some("a"), Some("c"), Some("c")]);
        let counted = compute_listing(&snap, &Config::default(), now(), false).unwrap();
        assert!(counted.referrals.iter().all(|r| r.signup_ip.is_none()));
        assert_eq!(counted.results, listed.results);
        let outcomes = |c: &Computation| c.referrals.iter().map(|r| r.outcome).collect::<Vec<_>>();
        assert_eq!(outcomes(&counted), outcomes(&listed));
    }
}

/// The fixed cost of a one-referrer computation (`cargo test --release --lib one_referrer_cost
/// -- --ignored --nocapture`): a figure to read, not a test of speed.
#[cfg(test)]
#[test]
#[ignore]
fn one_referrer_cost() {
    use crate::instant::parse_sql_text;
    let now = parse_sql_text("2026-11-01 00:00:00").unwrap();
    let mut snap = Snapshot {
        referrers: vec![10],
        ..Default::default()
    };
    for id in 1..=4 {
        snap.referred.push(crate::snapshot::ReferredUser {
            id,
            referrer_id: 10,
            created_at: now - 100 * crate::instant::MICROS_PER_DAY,
            is_active: true,
            is_verified: true,
            subscription: None,
        });
        snap.registrations.push((id, format!("ip{id}")));
    }
    let cfg = Config::default();
    let mut times = vec![];
    for _ in 0..2000 {
        let t = std::time::Instant::now();
        let c = compute(&snap, &cfg, now).unwrap();
        times.push(t.elapsed());
        assert_eq!(c.results.len(), 1);
    }
    times.sort();
    eprintln!(
        "one referrer: compute p50 {:?}, p99 {:?}",
        times[1000], times[1980]
    );
}
