//! SPEC section 3's fraud rules 1, 3, 4 and 5 and the IP facts they read, in one place for
//! every program that checks fraud. Each program takes its referrals in its own claim order
//! (the slots program: subscription start, then user id; a grant program: conversion order)
//! and may put a rule of its own between rules 1 and 3 (the slots program's cooldown, rule 2).
//! Pure: plain data in, verdicts out.

use crate::ids::IdIndex;
use crate::instant::{Instant, MICROS_PER_DAY};
use crate::program::{Fast, FastSet};

/// A set of IP hashes: foldhash rather than SipHash (a lookup per referral, and the hashes
/// are the host's, seeded per process).
pub type IpSet<'a> = FastSet<&'a str>;

/// "An empty or blank `ip_hash` counts as missing. Blank means made only of Unicode
/// White_Space characters (what Rust's `str::trim` removes)."
pub fn is_blank(ip_hash: &str) -> bool {
    // A hash that starts with a visible ASCII character is not blank: no trim for those.
    match ip_hash.as_bytes().first() {
        Some(b) if b.is_ascii_graphic() => false,
        _ => ip_hash.trim().is_empty(),
    }
}

/// "Signup IP of U: the greatest non-blank `ip_hash` among U's events with
/// `event_name = 'user_registered'`, or none. Greatest by plain byte order of the UTF-8 text."
/// Rust's `str` ordering is byte order, whatever the database collation.
pub fn signup_ip<'a>(registration_ip_hashes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    registration_ip_hashes
        .into_iter()
        .filter(|h| !is_blank(h))
        .max()
}

/// "Referrer IPs of R: … events with `now - ip_window_days <= created_at <= now` (both ends
/// included, days of 24 hours)". Returns the inclusive bounds.
pub fn ip_window(now: Instant, ip_window_days: i64) -> (Instant, Instant) {
    (now - ip_window_days * MICROS_PER_DAY, now)
}

/// Whether an event time lies in the window returned by [`ip_window`].
pub fn in_ip_window(t: Instant, window: (Instant, Instant)) -> bool {
    window.0 <= t && t <= window.1
}

/// "Referrer IPs of R: the distinct non-blank `ip_hash` of R's events" in the window.
pub fn referrer_ips<'a>(ip_hashes: impl IntoIterator<Item = &'a str>) -> IpSet<'a> {
    // Sized once for all of them (a referrer's few, a million times in a large run).
    let ip_hashes = ip_hashes.into_iter();
    let mut set = IpSet::with_capacity_and_hasher(ip_hashes.size_hint().0, Default::default());
    set.extend(ip_hashes.filter(|h| !is_blank(h)));
    set
}

/// Each user's signup IP ([`signup_ip`] over its registration events), in one pass.
pub fn signup_ips<'a>(
    registrations: impl IntoIterator<Item = &'a (i64, String)>,
) -> Fast<i64, &'a str> {
    let registrations = registrations.into_iter();
    let mut by_user: Fast<i64, &str> =
        Fast::with_capacity_and_hasher(registrations.size_hint().0, Default::default());
    for (user, ip) in registrations {
        if is_blank(ip) {
            continue;
        }
        by_user
            .entry(*user)
            .and_modify(|best| {
                if ip.as_str() > *best {
                    *best = ip;
                }
            })
            .or_insert(ip);
    }
    by_user
}

/// [`signup_ips`] of the users of a list, by their position in it (`users`: the list's index,
/// `ids`: its ids in order): an array beside the list rather than a map by id (at 10M users
/// the map was 210 MB, and a cache miss a lookup). Other users' registrations are skipped.
pub fn signup_ips_at<'a>(
    users: &IdIndex,
    ids: impl Iterator<Item = i64>,
    registrations: impl IntoIterator<Item = &'a (i64, String)>,
) -> Vec<Option<&'a str>> {
    let mut ips: Vec<Option<&str>> = vec![None; users.len()];
    for (user, ip) in registrations {
        if let Some(i) = users.get(*user) {
            ips[i] = greater_signup_ip(ips[i], ip);
        }
    }
    users.spread(ids, &mut ips);
    ips
}

/// One step of [`signup_ip`]: the signup IP so far, given one more registration IP hash.
fn greater_signup_ip<'a>(best: Option<&'a str>, ip: &'a str) -> Option<&'a str> {
    match best {
        _ if is_blank(ip) => best,
        Some(b) if b >= ip => best,
        _ => Some(ip),
    }
}

/// Each referrer's IPs in the window ([`referrer_ips`]).
pub fn referrer_ips_by_referrer<'a>(
    events: impl IntoIterator<Item = &'a (i64, String)>,
) -> Fast<i64, IpSet<'a>> {
    // Each referrer's events side by side, so that its set is built in one go: a list per
    // referrer in a map first cost a lookup per event (at 10M users, most of the second this
    // took). The full runs' scans give them in referrer order: then the sort only checks it.
    let mut events: Vec<&(i64, String)> = events.into_iter().collect();
    events.sort_by_key(|e| e.0);
    let groups = || events.chunk_by(|a, b| a.0 == b.0);
    let mut out: Fast<i64, IpSet<'a>> =
        Fast::with_capacity_and_hasher(groups().count(), Default::default());
    for group in groups() {
        out.insert(group[0].0, referrer_ips(group.iter().map(|e| e.1.as_str())));
    }
    out
}

/// Rule 1, `self_referral`: "U.id = R".
pub fn is_self_referral(user_id: i64, referrer_id: i64) -> bool {
    user_id == referrer_id
}

/// Rule 3, `missing_ip`: "require_ip_hash and U has no signup IP".
pub fn is_missing_ip(signup_ip: Option<&str>, require_ip_hash: bool) -> bool {
    require_ip_hash && signup_ip.is_none()
}

/// Rule 4, `shared_ip`: "U's signup IP is one of R's referrer IPs".
pub fn is_shared_ip(signup_ip: &str, referrer_ips: &IpSet<'_>) -> bool {
    referrer_ips.contains(signup_ip)
}

/// The fraud verdict of one referral: the first rule that applies, or `Pass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    SelfReferral,
    /// The program's own rule between rules 1 and 3 applied (the slots program's cooldown).
    Held,
    MissingIp,
    SharedIp,
    DuplicateIp,
    Pass,
}

/// One referrer's IP claims, judged referral by referral in the program's claim order.
/// Rule 5, `duplicate_ip`: an earlier referral of R with the same signup IP already passed. Only
/// a referral that passes claims its signup IP; one without a signup IP (when `require_ip_hash`
/// is off) skips rules 4 and 5 and claims nothing.
pub struct Claims<'r, 'a> {
    referrer_id: i64,
    referrer_ips: &'r IpSet<'a>,
    require_ip_hash: bool,
    claimed: IpSet<'a>,
}

impl<'r, 'a> Claims<'r, 'a> {
    pub fn new(referrer_id: i64, referrer_ips: &'r IpSet<'a>, require_ip_hash: bool) -> Self {
        Claims {
            referrer_id,
            referrer_ips,
            require_ip_hash,
            claimed: IpSet::default(),
        }
    }

    /// Starts over for another referrer, keeping the claim set's allocation when it is small
    /// (a run judges a hundred thousand referrers; clearing a large set costs its capacity).
    pub fn restart(&mut self, referrer_id: i64, referrer_ips: &'r IpSet<'a>) {
        self.referrer_id = referrer_id;
        self.referrer_ips = referrer_ips;
        if self.claimed.capacity() > 1024 {
            self.claimed = IpSet::default();
        } else {
            self.claimed.clear();
        }
    }

    /// The verdict of the next referral in claim order; `held` says whether the program's own
    /// rule between rules 1 and 3 applies to it.
    pub fn judge(&mut self, user_id: i64, signup_ip: Option<&'a str>, held: bool) -> Verdict {
        if is_self_referral(user_id, self.referrer_id) {
            return Verdict::SelfReferral;
        }
        if held {
            return Verdict::Held;
        }
        if is_missing_ip(signup_ip, self.require_ip_hash) {
            return Verdict::MissingIp;
        }
        let Some(ip) = signup_ip else {
            return Verdict::Pass;
        };
        if is_shared_ip(ip, self.referrer_ips) {
            Verdict::SharedIp
        } else if !self.claimed.insert(ip) {
            Verdict::DuplicateIp
        } else {
            Verdict::Pass
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_in_spec_order_and_only_a_pass_claims() {
        let ips: IpSet = ["r"].into_iter().collect();
        let mut c = Claims::new(1, &ips, true);
        // Self-referral comes before everything, even a shared IP.
        assert_eq!(c.judge(1, Some("r"), true), Verdict::SelfReferral);
        // The program's own rule comes before the IP rules, and claims nothing.
        assert_eq!(c.judge(2, Some("a"), true), Verdict::Held);
        assert_eq!(c.judge(3, None, false), Verdict::MissingIp);
        assert_eq!(c.judge(4, Some("r"), false), Verdict::SharedIp);
        assert_eq!(
            c.judge(5, Some("a"), false),
            Verdict::Pass,
            "a was not claimed by 2"
        );
        assert_eq!(c.judge(6, Some("a"), false), Verdict::DuplicateIp);
        assert_eq!(c.judge(7, Some("b"), false), Verdict::Pass);
    }

    #[test]
    fn without_required_ips_a_missing_ip_passes_and_claims_nothing() {
        let ips = IpSet::default();
        let mut c = Claims::new(1, &ips, false);
        assert_eq!(c.judge(2, None, false), Verdict::Pass);
        assert_eq!(c.judge(3, None, false), Verdict::Pass);
    }

    #[test]
    fn blank_hashes_are_missing_and_the_greatest_is_by_byte_order() {
        assert!(is_blank(" \u{3000}\t"));
        assert_eq!(signup_ip(["B2", "a1", " "]), Some("a1"));
        assert_eq!(signup_ip([" ", ""]), None);
    }
}
