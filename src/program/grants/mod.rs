//! Grant programs (docs/rules.md §7): a one-time grant to the referrer and/or the referred user
//! when the referred user first pays, granted exactly once through the `referral_grants` ledger.
//!
//! - [`rules`]: the conversion, the conversion order, the outcome of each referral and the
//!   desired set of each referrer: plain functions over plain data.
//! - [`plan`]: the grants and reversals a run makes, their digest entries and their counts.
//! - [`report`]: the summary figures and analytics of a program.

pub mod plan;
pub mod report;
pub mod rules;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::instant::Instant;

/// Who a grant credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Party {
    Referrer,
    Referred,
}

impl Party {
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Referrer => "referrer",
            Party::Referred => "referred",
        }
    }

    pub fn parse(s: &str) -> Option<Party> {
        match s {
            "referrer" => Some(Party::Referrer),
            "referred" => Some(Party::Referred),
            _ => None,
        }
    }
}

/// One referral `(R, U)`: a user `U` whose `referred_by_user_id` is `R`.
#[derive(Debug, Clone, PartialEq)]
pub struct Referral {
    pub referrer_id: i64,
    pub user_id: i64,
    /// `U.created_at`: the start of the time to conversion.
    pub signed_up_at: Instant,
    /// Whether R has a user row (a missing R is granted nothing).
    pub referrer_exists: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    pub id: i64,
    pub user_id: i64,
    pub amount_cents: i64,
    /// Interned: a few distinct values over millions of rows.
    pub currency: Arc<str>,
    pub status: Arc<str>,
    pub created_at: Instant,
}

/// A grant row of the ledger (`kind = 'grant'`), with whether a reversal row ends it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerGrant {
    pub program: Arc<str>,
    pub referrer_id: i64,
    pub user_id: i64,
    pub party: Party,
    pub credited_user_id: i64,
    pub amount: Amount,
    /// The grant's sequence number for its `(program, U, party)`: 1 for the first grant, one
    /// more for each grant after a reversal.
    pub seq: i64,
    pub payment_id: Option<i64>,
    pub reversed: bool,
}

/// What a grant gives: days of paid access or cents of account credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Amount {
    Days(i64),
    Cents(i64),
}

impl Amount {
    pub fn days(self) -> i64 {
        match self {
            Amount::Days(d) => d,
            Amount::Cents(_) => 0,
        }
    }

    pub fn cents(self) -> i64 {
        match self {
            Amount::Cents(c) => c,
            Amount::Days(_) => 0,
        }
    }

    /// `credit_days` as stored and reported: `None` for a cents amount.
    pub fn credit_days(self) -> Option<i64> {
        match self {
            Amount::Days(d) => Some(d),
            Amount::Cents(_) => None,
        }
    }

    /// `credit_cents` as stored and reported: `None` for a days amount.
    pub fn credit_cents(self) -> Option<i64> {
        match self {
            Amount::Cents(c) => Some(c),
            Amount::Days(_) => None,
        }
    }

    pub fn negated(self) -> Amount {
        match self {
            Amount::Days(d) => Amount::Days(-d),
            Amount::Cents(c) => Amount::Cents(-c),
        }
    }

    pub fn from_config(p: &crate::config::PartyGrant) -> Option<Amount> {
        match (p.credit_days, p.credit_cents) {
            (Some(d), None) => Some(Amount::Days(d)),
            (None, Some(c)) => Some(Amount::Cents(c)),
            _ => None,
        }
    }
}

/// What the grant programs read, for every grant program at once: one consistent snapshot.
#[derive(Debug, Clone, Default)]
pub struct GrantsSnapshot {
    /// The referrals in scope, by `(R, U)`.
    pub referrals: Vec<Referral>,
    /// `(user_id, ip_hash)` of the referred users' `user_registered` events (non-NULL hashes);
    /// empty when no program checks fraud.
    pub registrations: Vec<(i64, String)>,
    /// `(referrer_id, ip_hash)` of the referrers' events inside the IP window.
    pub referrer_events: Vec<(i64, String)>,
    /// The referred users' payments with `created_at <= as-of`.
    pub payments: Vec<Payment>,
    /// The ledger's grant rows of the referred users in scope.
    pub ledger: Vec<LedgerGrant>,
    /// The registrations and referrer events of the invite-code holders' referrals are the
    /// slots program's part of the same snapshot (`Snapshot::registrations` and
    /// `Snapshot::referrer_events`): [`rules::Facts::new`] reads them there rather than from a
    /// copy here (about a million strings at 1M users). Only in a full or shard run.
    pub fraud_from_slots: bool,
}

/// A user's paid access after a run's day grants and reversals (docs/rules.md §7.4):
/// reversals first (`credit_until - days`; a NULL stays NULL), then the grants, each from the
/// later of the as-of and the current end (`max(as_of, coalesce(until, as_of)) + days`).
/// Days of 24 hours. `reversed` and `granted` are the run's totals for the user, in days.
pub fn credit_until(
    until: Option<Instant>,
    as_of: Instant,
    reversed: i64,
    granted: i64,
) -> Option<Instant> {
    let day = crate::instant::MICROS_PER_DAY;
    let until = until.map(|t| t.saturating_sub(reversed.saturating_mul(day)));
    if granted == 0 {
        return until;
    }
    // Grants of at least a day each: after the first, the end is past the as-of, so the rest
    // simply add up.
    Some(
        until
            .unwrap_or(as_of)
            .max(as_of)
            .saturating_add(granted.saturating_mul(day)),
    )
}
