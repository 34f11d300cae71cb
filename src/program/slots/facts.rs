//! The facts behind each referred user's outcome, for the people who read them (`explain`,
//! the per-referral report, the audit page): what the rules looked at, and the instants that
//! would change the outcome. Pure: derived from the snapshot and the outcomes, after the rules
//! ran; nothing here decides anything.

use serde::Serialize;

use crate::instant::{self, Instant, MICROS_PER_DAY};
use crate::program::Fast;
use crate::program::slots::compute::ReferralOutcome;
use crate::program::slots::rules::{Outcome, RuleParams};
use crate::snapshot::{ReferredUser, Snapshot};

/// How much of an IP hash support sees: enough to tell two apart, not the whole hash.
pub const IP_SHORT: usize = 8;

/// One referred user's facts in the slots program. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ReferralFacts {
    pub is_active: Option<bool>,
    pub is_verified: Option<bool>,
    pub signed_up_at: Option<String>,
    pub tier: Option<String>,
    pub status: Option<String>,
    pub subscribed_at: Option<String>,
    pub expires_at: Option<String>,
    /// When neither the signup nor the subscription start is within the cooldown any more;
    /// `None` when `rules.cooldown_days` is 0.
    pub cooldown_ends_at: Option<String>,
    /// The first [`IP_SHORT`] characters of the signup IP hash.
    pub signup_ip_short: Option<String>,
    /// `duplicate_ip`: the referred user of the same referrer that qualified from this IP.
    pub ip_claimed_by: Option<i64>,
    /// `shared_ip`: the referrer's last use of this IP inside the IP window (filled by the
    /// callers that read it: `explain`; `None` elsewhere).
    pub referrer_last_used_ip_at: Option<String>,
    /// `shared_ip`: when that use leaves the IP window, unless the referrer uses it again.
    pub shared_ip_until: Option<String>,
    /// `cooldown` and `shared_ip`: the outcome once that rule stops applying, all else as now
    /// (the IP rules still follow: a user in cooldown may then be `missing_ip`, `shared_ip` or
    /// `duplicate_ip`; of several referrals sharing the referrer's IP only the first in claim
    /// order would qualify).
    pub then_outcome: Option<&'static str>,
}

/// Shortens an IP hash for display (on a character boundary).
pub fn short_ip(ip: &str) -> String {
    ip.chars().take(IP_SHORT).collect()
}

/// The instant the cooldown ends for a user: the later of signup and subscription start, plus
/// the cooldown. Exactly at that instant the user is out of cooldown (the rule is strict).
pub fn cooldown_ends(
    created_at: Instant,
    started_at: Option<Instant>,
    p: &RuleParams,
) -> Option<Instant> {
    (p.cooldown_days > 0).then(|| {
        created_at
            .max(started_at.unwrap_or(created_at))
            .saturating_add(p.cooldown_days * MICROS_PER_DAY)
    })
}

/// The facts of each listed referral, in the order of `listed`: users the snapshot read get
/// their account and subscription; the duplicate IP's first claimant is the qualified referral
/// of the same referrer with the same signup IP (only a qualified candidate claims its IP).
/// A referral whose referrer holds no invite code has no facts: the snapshot reads neither its
/// user row nor its registration.
pub fn referral_facts(
    snap: &Snapshot,
    listed: &[ReferralOutcome],
    p: &RuleParams,
) -> Vec<ReferralFacts> {
    let users: Fast<i64, &ReferredUser> = snap.referred.iter().map(|u| (u.id, u)).collect();
    // (R, IP) → the qualified referral that claimed it: (user, claim position).
    let mut claimed: Fast<(i64, &str), (i64, u32)> = Fast::default();
    // (R, IP) → the first `shared_ip` referral in claim order.
    let mut first_shared: Fast<(i64, &str), u32> = Fast::default();
    for r in listed {
        let (Some(ip), Some(pos)) = (r.signup_ip.as_deref(), r.position) else {
            continue;
        };
        let key = (r.referrer_user_id, ip);
        match r.outcome {
            Outcome::Qualified => {
                claimed.insert(key, (r.referred_user_id, pos));
            }
            Outcome::SharedIp => {
                let e = first_shared.entry(key).or_insert(pos);
                *e = (*e).min(pos);
            }
            _ => {}
        }
    }
    let referrer_ips = crate::program::fraud::referrer_ips_by_referrer(&snap.referrer_events);
    // A candidate's outcome once its cooldown is over: the IP rules, in order.
    let after_cooldown = |r: &ReferralOutcome| -> (&'static str, Option<i64>) {
        let Some(ip) = r.signup_ip.as_deref() else {
            return if p.require_ip_hash {
                (Outcome::MissingIp.as_str(), None)
            } else {
                (Outcome::Qualified.as_str(), None)
            };
        };
        if referrer_ips
            .get(&r.referrer_user_id)
            .is_some_and(|ips| ips.contains(ip))
        {
            return (Outcome::SharedIp.as_str(), None);
        }
        match claimed.get(&(r.referrer_user_id, ip)) {
            Some(&(user, pos)) if r.position.is_some_and(|mine| pos < mine) => {
                (Outcome::DuplicateIp.as_str(), Some(user))
            }
            _ => (Outcome::Qualified.as_str(), None),
        }
    };
    let t = |i: Option<Instant>| i.map(instant::to_rfc3339_or_infinite);
    listed
        .iter()
        .map(|r| {
            let u = users.get(&r.referred_user_id).copied();
            let s = u.and_then(|u| u.subscription.as_ref());
            ReferralFacts {
                is_active: u.map(|u| u.is_active),
                is_verified: u.map(|u| u.is_verified),
                signed_up_at: t(u.map(|u| u.created_at)),
                tier: s.map(|s| s.tier.to_string()),
                status: s.map(|s| s.status.to_string()),
                subscribed_at: t(s.and_then(|s| s.started_at)),
                expires_at: t(s.and_then(|s| s.expires_at)),
                cooldown_ends_at: t(
                    u.and_then(|u| cooldown_ends(u.created_at, s.and_then(|s| s.started_at), p))
                ),
                signup_ip_short: r.signup_ip.as_deref().map(short_ip),
                ip_claimed_by: match r.outcome {
                    Outcome::DuplicateIp => r
                        .signup_ip
                        .as_deref()
                        .and_then(|ip| claimed.get(&(r.referrer_user_id, ip)))
                        .map(|c| c.0),
                    Outcome::Cooldown => after_cooldown(r).1,
                    _ => None,
                },
                referrer_last_used_ip_at: None,
                shared_ip_until: None,
                then_outcome: match r.outcome {
                    Outcome::Cooldown => Some(after_cooldown(r).0),
                    Outcome::SharedIp => {
                        let first = r
                            .signup_ip
                            .as_deref()
                            .and_then(|ip| first_shared.get(&(r.referrer_user_id, ip)));
                        Some(if first.is_some_and(|&f| Some(f) < r.position) {
                            Outcome::DuplicateIp.as_str()
                        } else {
                            Outcome::Qualified.as_str()
                        })
                    }
                    _ => None,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::instant::parse_sql_text;
    use crate::program::slots::compute::compute;
    use crate::snapshot::Subscription;
    use std::sync::Arc;

    fn now() -> Instant {
        parse_sql_text("2026-11-01 00:00:00").unwrap()
    }

    fn user(id: i64, created_days_ago: i64, started_days_ago: Option<i64>) -> ReferredUser {
        ReferredUser {
            id,
            referrer_id: 10,
            created_at: now() - created_days_ago * MICROS_PER_DAY,
            is_active: true,
            is_verified: true,
            subscription: Some(Subscription {
                tier: Arc::from("trader"),
                status: Arc::from("active"),
                started_at: started_days_ago.map(|d| now() - d * MICROS_PER_DAY),
                expires_at: None,
            }),
        }
    }

    #[test]
    fn facts_name_the_cooldown_end_and_the_first_claimant() {
        let cfg = Config::default();
        let p = RuleParams::new(&cfg.rules, now());
        let snap = Snapshot {
            referrers: vec![10],
            referred: vec![
                user(1, 100, Some(90)),
                user(2, 100, Some(2)),
                user(3, 100, Some(80)),
            ],
            registrations: vec![
                (1, "abcdef0123456789".into()),
                (2, "u2".into()),
                (3, "abcdef0123456789".into()),
            ],
            ..Default::default()
        };
        let c = compute(&snap, &cfg, now()).unwrap();
        let outcomes: Vec<_> = c.referrals.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [Outcome::Qualified, Outcome::Cooldown, Outcome::DuplicateIp]
        );
        let f = referral_facts(&snap, &c.referrals, &p);
        // Subscribed 2 days ago, cooldown 7 days: counts 5 days from now.
        assert_eq!(
            f[1].cooldown_ends_at.as_deref(),
            Some(instant::to_rfc3339(now() + 5 * MICROS_PER_DAY).as_str())
        );
        assert_eq!(f[2].ip_claimed_by, Some(1));
        assert_eq!(f[0].ip_claimed_by, None);
        assert_eq!(f[2].signup_ip_short.as_deref(), Some("abcdef01"));
        assert_eq!(f[0].tier.as_deref(), Some("trader"));
    }

    /// What `explain` promises once the cooldown or the referrer's use of an IP is over: the IP
    /// rules still apply, in claim order.
    #[test]
    fn the_outcome_after_the_cooldown_or_the_shared_ip_follows_the_ip_rules() {
        let cfg = Config::default();
        let p = RuleParams::new(&cfg.rules, now());
        let snap = Snapshot {
            referrers: vec![10],
            referred: vec![
                user(1, 100, Some(90)), // qualified from "a"
                user(2, 100, Some(2)),  // cooldown, same IP "a", later in claim order
                user(3, 100, Some(1)),  // cooldown, the referrer's IP "r"
                user(4, 100, Some(3)),  // cooldown, its own IP "d"
                user(5, 100, Some(80)), // shared "r", first
                user(6, 100, Some(70)), // shared "r", second
            ],
            registrations: vec![
                (1, "a".into()),
                (2, "a".into()),
                (3, "r".into()),
                (4, "d".into()),
                (5, "r".into()),
                (6, "r".into()),
            ],
            referrer_events: vec![(10, "r".into())],
            ..Default::default()
        };
        let c = compute(&snap, &cfg, now()).unwrap();
        let f = referral_facts(&snap, &c.referrals, &p);
        let then: Vec<Option<&str>> = f.iter().map(|f| f.then_outcome).collect();
        assert_eq!(
            then,
            [
                None,
                Some("duplicate_ip"),
                Some("shared_ip"),
                Some("qualified"),
                Some("qualified"),
                Some("duplicate_ip")
            ]
        );
        assert_eq!(f[1].ip_claimed_by, Some(1));
    }

    #[test]
    fn no_cooldown_end_when_the_cooldown_is_off() {
        let mut cfg = Config::default();
        cfg.rules.cooldown_days = 0;
        let p = RuleParams::new(&cfg.rules, now());
        assert_eq!(cooldown_ends(now(), None, &p), None);
    }
}
