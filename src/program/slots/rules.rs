//! SPEC section 3, one function per rule, in SPEC order. Pure: plain data in, outcomes out.
//!
//! Two predicates run inside the store's queries because they only select rows and have no
//! boundary subtleties: "a user is a referrer when `invite_code IS NOT NULL`" (an empty-string
//! code is a code) and "a referred user is one with `referred_by_user_id = R`". The IP window's
//! bounds are computed here ([`ip_window`]) and handed to the store.

use crate::config::RulesConfig;
use crate::instant::{Instant, MICROS_PER_DAY};
use crate::program::fraud::{Claims, Verdict};
use crate::snapshot::{ReferredUser, Subscription};

/// The outcome of one referred user. The first six are SPEC's outcomes for candidates; the
/// rest say why a referred user is not a candidate, in SPEC's reporting order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Qualified,
    SelfReferral,
    Cooldown,
    MissingIp,
    SharedIp,
    DuplicateIp,
    Inactive,
    Unverified,
    NoSubscription,
    Tier,
    Status,
    Expired,
    /// The referrer holds no invite code: the referral counts for nobody in the slots program.
    /// Not an outcome of the rules (not in [`Outcome::ALL`], never counted): the reports and
    /// `explain` list such referrals with it, so that they are not missing.
    ReferrerWithoutInviteCode,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Qualified,
        Outcome::SelfReferral,
        Outcome::Cooldown,
        Outcome::MissingIp,
        Outcome::SharedIp,
        Outcome::DuplicateIp,
        Outcome::Inactive,
        Outcome::Unverified,
        Outcome::NoSubscription,
        Outcome::Tier,
        Outcome::Status,
        Outcome::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Qualified => "qualified",
            Outcome::SelfReferral => "self_referral",
            Outcome::Cooldown => "cooldown",
            Outcome::MissingIp => "missing_ip",
            Outcome::SharedIp => "shared_ip",
            Outcome::DuplicateIp => "duplicate_ip",
            Outcome::Inactive => "inactive",
            Outcome::Unverified => "unverified",
            Outcome::NoSubscription => "no_subscription",
            Outcome::Tier => "tier",
            Outcome::Status => "status",
            Outcome::Expired => "expired",
            Outcome::ReferrerWithoutInviteCode => "referrer_without_invite_code",
        }
    }

    /// Candidates get one of the first six outcomes; the others mean "not a candidate".
    pub fn is_candidate(self) -> bool {
        (self as u8) <= (Outcome::DuplicateIp as u8)
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The rule parameters of a run: the config's rules at one instant `now` (the run's as-of).
#[derive(Debug, Clone)]
pub struct RuleParams {
    pub now: Instant,
    pub cooldown_days: i64,
    pub ip_window_days: i64,
    pub require_ip_hash: bool,
    pub qualifying_tiers: Vec<String>,
    pub qualifying_statuses: Vec<String>,
}

impl RuleParams {
    pub fn new(rules: &RulesConfig, now: Instant) -> Self {
        Self {
            now,
            cooldown_days: rules.cooldown_days,
            ip_window_days: rules.ip_window_days,
            require_ip_hash: rules.require_ip_hash,
            qualifying_tiers: rules.qualifying_tiers.clone(),
            qualifying_statuses: rules.qualifying_statuses.clone(),
        }
    }
}

// The IP facts and fraud rules 1, 3, 4 and 5 are shared with grant programs.
pub use crate::program::fraud::{
    in_ip_window, ip_window, is_blank, is_missing_ip, is_self_referral, is_shared_ip, referrer_ips,
    signup_ip,
};

/// Candidacy: "U.is_active, U.is_verified, and U has a subscription S with S.tier in
/// qualifying_tiers, S.status in qualifying_statuses, and S.expires_at IS NULL OR
/// S.expires_at >= now". Returns the first reason that fails, in SPEC's reporting order
/// (`inactive`, `unverified`, `no_subscription`, `tier`, `status`, `expired`), or `None` for a
/// candidate. Tiers and statuses are compared exactly.
pub fn non_candidate_reason(u: &ReferredUser, p: &RuleParams) -> Option<Outcome> {
    if !u.is_active {
        return Some(Outcome::Inactive);
    }
    if !u.is_verified {
        return Some(Outcome::Unverified);
    }
    let Some(s) = &u.subscription else {
        return Some(Outcome::NoSubscription);
    };
    if !p.qualifying_tiers.iter().any(|t| **t == *s.tier) {
        return Some(Outcome::Tier);
    }
    if !p.qualifying_statuses.iter().any(|t| **t == *s.status) {
        return Some(Outcome::Status);
    }
    if s.expires_at.is_some_and(|e| e < p.now) {
        return Some(Outcome::Expired);
    }
    None
}

/// Rule 2, `cooldown`: "cooldown_days > 0 and (U.created_at > now - cooldown_days or
/// S.started_at > now - cooldown_days); a NULL time does not trigger it." Exactly at the
/// cutoff is not cooldown.
pub fn in_cooldown(created_at: Instant, started_at: Option<Instant>, p: &RuleParams) -> bool {
    if p.cooldown_days == 0 {
        return false;
    }
    let cutoff = p.now - p.cooldown_days * MICROS_PER_DAY;
    created_at > cutoff || started_at.is_some_and(|s| s > cutoff)
}

/// Rule 5's order: "Candidates are taken in order of S.started_at ascending (NULL last), then
/// U.id ascending, so the earliest subscriber keeps the IP."
pub fn claim_order_key(started_at: Option<Instant>, user_id: i64) -> (bool, Instant, i64) {
    (started_at.is_none(), started_at.unwrap_or(0), user_id)
}

/// What [`classify_referrer`] needs of one referred user.
#[derive(Debug, Clone, Copy)]
pub struct ReferredFacts<'a> {
    pub user: &'a ReferredUser,
    pub signup_ip: Option<&'a str>,
}

/// The outcome of each referred user of referrer `referrer_id`, in input order, with the
/// claiming position of each candidate (its rank in the claim order among candidates, from 1).
///
/// Each candidate gets the first of `self_referral`, `cooldown`, `missing_ip`, `shared_ip`,
/// `duplicate_ip`, `qualified` that applies. Rule 5, `duplicate_ip`: "an earlier candidate of
/// R with the same signup IP already qualified"; only a qualified candidate claims its IP, and
/// a candidate without a signup IP (require_ip_hash off) skips rules 4 and 5.
pub fn classify_referrer(
    referrer_id: i64,
    referred: &[ReferredFacts<'_>],
    referrer_ips: &crate::program::fraud::IpSet<'_>,
    p: &RuleParams,
) -> Vec<(Outcome, Option<u32>)> {
    let mut out: Vec<(Outcome, Option<u32>)> = referred
        .iter()
        .map(|f| {
            (
                non_candidate_reason(f.user, p).unwrap_or(Outcome::Qualified),
                None,
            )
        })
        .collect();
    let mut candidates: Vec<usize> = (0..referred.len())
        .filter(|&i| out[i].0 == Outcome::Qualified)
        .collect();
    candidates.sort_by_key(|&i| {
        let u = referred[i].user;
        claim_order_key(started_at(&u.subscription), u.id)
    });
    // Rules 1, 3, 4, 5 are the shared fraud rules; rule 2 (cooldown) is this program's own,
    // between rules 1 and 3.
    let mut claims = Claims::new(referrer_id, referrer_ips, p.require_ip_hash);
    for (position, &i) in candidates.iter().enumerate() {
        let f = &referred[i];
        let u = f.user;
        let cooldown = in_cooldown(u.created_at, started_at(&u.subscription), p);
        let outcome = match claims.judge(u.id, f.signup_ip, cooldown) {
            Verdict::SelfReferral => Outcome::SelfReferral,
            Verdict::Held => Outcome::Cooldown,
            Verdict::MissingIp => Outcome::MissingIp,
            Verdict::SharedIp => Outcome::SharedIp,
            Verdict::DuplicateIp => Outcome::DuplicateIp,
            Verdict::Pass => Outcome::Qualified,
        };
        out[i] = (outcome, Some(position as u32 + 1));
    }
    out
}

fn started_at(s: &Option<Subscription>) -> Option<Instant> {
    s.as_ref().and_then(|s| s.started_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RulesConfig;
    use crate::instant::parse_sql_text;
    use std::sync::Arc;

    const NOW: &str = "2026-11-01 12:00:00";

    fn now() -> Instant {
        parse_sql_text(NOW).unwrap()
    }

    fn params() -> RuleParams {
        RuleParams::new(&RulesConfig::default(), now())
    }

    fn days_ago(d: i64) -> Instant {
        now() - d * MICROS_PER_DAY
    }

    fn user(id: i64, referrer: i64) -> ReferredUser {
        ReferredUser {
            id,
            referrer_id: referrer,
            created_at: days_ago(100),
            is_active: true,
            is_verified: true,
            subscription: Some(Subscription {
                tier: Arc::from("trader"),
                status: Arc::from("active"),
                started_at: Some(days_ago(90)),
                expires_at: None,
            }),
        }
    }

    fn with_sub(mut u: ReferredUser, f: impl FnOnce(&mut Subscription)) -> ReferredUser {
        f(u.subscription.as_mut().unwrap());
        u
    }

    fn classify(users: &[(ReferredUser, Option<&str>)], referrer_ips: &[&str]) -> Vec<Outcome> {
        let facts: Vec<_> = users
            .iter()
            .map(|(u, ip)| ReferredFacts {
                user: u,
                signup_ip: *ip,
            })
            .collect();
        let ips: crate::program::fraud::IpSet = referrer_ips.iter().copied().collect();
        classify_referrer(1, &facts, &ips, &params())
            .into_iter()
            .map(|(o, _)| o)
            .collect()
    }

    // Candidacy.

    #[test]
    fn inactive_comes_before_every_other_reason() {
        let mut u = user(2, 1);
        u.is_active = false;
        u.is_verified = false;
        u.subscription = None;
        assert_eq!(non_candidate_reason(&u, &params()), Some(Outcome::Inactive));
    }

    #[test]
    fn unverified_then_no_subscription() {
        let mut u = user(2, 1);
        u.is_verified = false;
        assert_eq!(
            non_candidate_reason(&u, &params()),
            Some(Outcome::Unverified)
        );
        let mut u = user(2, 1);
        u.subscription = None;
        assert_eq!(
            non_candidate_reason(&u, &params()),
            Some(Outcome::NoSubscription)
        );
    }

    #[test]
    fn tier_and_status_are_compared_exactly() {
        let u = with_sub(user(2, 1), |s| s.tier = Arc::from("Trader"));
        assert_eq!(non_candidate_reason(&u, &params()), Some(Outcome::Tier));
        let u = with_sub(user(2, 1), |s| s.status = Arc::from("canceled"));
        assert_eq!(non_candidate_reason(&u, &params()), Some(Outcome::Status));
        let u = with_sub(user(2, 1), |s| {
            s.tier = Arc::from("tycoon");
            s.status = Arc::from("past_due")
        });
        assert_eq!(non_candidate_reason(&u, &params()), None);
    }

    #[test]
    fn expires_exactly_now_is_a_candidate() {
        let u = with_sub(user(2, 1), |s| s.expires_at = Some(now()));
        assert_eq!(non_candidate_reason(&u, &params()), None);
    }

    #[test]
    fn expires_one_microsecond_before_now_is_expired() {
        let u = with_sub(user(2, 1), |s| s.expires_at = Some(now() - 1));
        assert_eq!(non_candidate_reason(&u, &params()), Some(Outcome::Expired));
    }

    // Signup and referrer IPs.

    #[test]
    fn blank_and_empty_ip_hashes_are_missing() {
        assert!(is_blank(""));
        assert!(is_blank("   "));
        assert!(is_blank("\t\u{3000}\u{a0}\n"));
        assert!(!is_blank(" a "));
        assert_eq!(signup_ip(["", " \u{2003}"]), None);
    }

    #[test]
    fn signup_ip_is_the_greatest_by_byte_order() {
        // 'B' (0x42) < 'a' (0x61) in bytes, though a case-insensitive collation says otherwise.
        assert_eq!(signup_ip(["a1", "B2", " "]), Some("a1"));
        // 'é' (0xC3 0xA9) is greater than any ASCII byte.
        assert_eq!(signup_ip(["z", "é"]), Some("é"));
        // Not trimmed: " z" is compared with its leading space.
        assert_eq!(signup_ip([" z", "a"]), Some("a"));
    }

    #[test]
    fn window_includes_both_ends_and_nothing_outside() {
        let w = ip_window(now(), 30);
        assert!(in_ip_window(now(), w));
        assert!(in_ip_window(days_ago(30), w));
        assert!(!in_ip_window(days_ago(30) - 1, w));
        assert!(!in_ip_window(now() + 1, w));
    }

    #[test]
    fn referrer_ips_drop_blanks() {
        let ips = referrer_ips(["x", " ", "", "x", "y"]);
        assert_eq!(ips.len(), 2);
    }

    // Rule 1.

    #[test]
    fn self_referral_comes_first() {
        // Also in cooldown and without IP: self_referral still wins.
        let mut u = user(1, 1);
        u.created_at = now();
        assert_eq!(classify(&[(u, None)], &[]), [Outcome::SelfReferral]);
    }

    // Rule 2.

    #[test]
    fn cooldown_not_triggered_exactly_at_cutoff() {
        let mut u = user(2, 1);
        u.created_at = days_ago(7);
        let u = with_sub(u, |s| s.started_at = Some(days_ago(7)));
        assert!(!in_cooldown(u.created_at, Some(days_ago(7)), &params()));
        assert_eq!(classify(&[(u, Some("ip"))], &[]), [Outcome::Qualified]);
    }

    #[test]
    fn cooldown_triggered_one_microsecond_after_cutoff() {
        assert!(in_cooldown(days_ago(7) + 1, None, &params()));
        assert!(in_cooldown(days_ago(100), Some(days_ago(7) + 1), &params()));
        let u = with_sub(user(2, 1), |s| s.started_at = Some(days_ago(7) + 1));
        assert_eq!(classify(&[(u, Some("ip"))], &[]), [Outcome::Cooldown]);
    }

    #[test]
    fn null_started_at_never_triggers_cooldown() {
        assert!(!in_cooldown(days_ago(100), None, &params()));
    }

    #[test]
    fn zero_cooldown_days_disables_cooldown() {
        let mut p = params();
        p.cooldown_days = 0;
        assert!(!in_cooldown(now(), Some(now()), &p));
    }

    // Rule 3.

    #[test]
    fn missing_ip_when_required() {
        assert_eq!(classify(&[(user(2, 1), None)], &[]), [Outcome::MissingIp]);
    }

    #[test]
    fn no_ip_qualifies_without_claiming_when_not_required() {
        let mut p = params();
        p.require_ip_hash = false;
        let (a, b) = (user(2, 1), user(3, 1));
        let facts = [
            ReferredFacts {
                user: &a,
                signup_ip: None,
            },
            ReferredFacts {
                user: &b,
                signup_ip: None,
            },
        ];
        let got = classify_referrer(1, &facts, &["x"].into_iter().collect(), &p);
        assert_eq!(got[0].0, Outcome::Qualified);
        assert_eq!(got[1].0, Outcome::Qualified);
    }

    // Rule 4.

    #[test]
    fn shared_ip_with_the_referrer() {
        assert_eq!(
            classify(&[(user(2, 1), Some("r-ip"))], &["r-ip"]),
            [Outcome::SharedIp]
        );
    }

    // Rule 5.

    #[test]
    fn earliest_subscriber_keeps_the_ip() {
        let late = with_sub(user(2, 1), |s| s.started_at = Some(days_ago(10)));
        let early = with_sub(user(3, 1), |s| s.started_at = Some(days_ago(20)));
        assert_eq!(
            classify(&[(late, Some("ip")), (early, Some("ip"))], &[]),
            [Outcome::DuplicateIp, Outcome::Qualified]
        );
    }

    #[test]
    fn null_started_at_sorts_last() {
        let null = with_sub(user(2, 1), |s| s.started_at = None);
        let dated = with_sub(user(3, 1), |s| s.started_at = Some(days_ago(20)));
        assert_eq!(
            classify(&[(null, Some("ip")), (dated, Some("ip"))], &[]),
            [Outcome::DuplicateIp, Outcome::Qualified]
        );
    }

    #[test]
    fn ties_in_started_at_go_to_the_lower_id() {
        let a = user(5, 1);
        let b = user(4, 1);
        assert_eq!(
            classify(&[(a, Some("ip")), (b, Some("ip"))], &[]),
            [Outcome::DuplicateIp, Outcome::Qualified]
        );
    }

    #[test]
    fn only_a_qualified_candidate_claims_its_ip() {
        // The earliest has the IP but is in cooldown: it claims nothing, the next qualifies.
        let mut cooling = with_sub(user(2, 1), |s| s.started_at = Some(days_ago(300)));
        cooling.created_at = now();
        let later = user(3, 1);
        assert_eq!(
            classify(&[(cooling, Some("ip")), (later, Some("ip"))], &[]),
            [Outcome::Cooldown, Outcome::Qualified]
        );
    }

    #[test]
    fn non_candidates_claim_nothing_and_get_no_position() {
        let mut inactive = user(2, 1);
        inactive.is_active = false;
        let other = user(3, 1);
        let facts = [
            ReferredFacts {
                user: &inactive,
                signup_ip: Some("ip"),
            },
            ReferredFacts {
                user: &other,
                signup_ip: Some("ip"),
            },
        ];
        let got = classify_referrer(1, &facts, &Default::default(), &params());
        assert_eq!(
            got,
            [(Outcome::Inactive, None), (Outcome::Qualified, Some(1))]
        );
    }
}
