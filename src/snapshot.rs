//! The plain data a run computes from: what the store reads, nothing the rules decide.

use std::sync::Arc;

use crate::instant::Instant;
use crate::rewards::RewardResult;

/// Which referrers a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every referrer, plus every non-referrer who still holds a reward (revocation).
    Full,
    /// One user: a referrer's recompute, or the revocation of a user who no longer is one.
    Referrer(i64),
}

impl Scope {
    pub fn mode(&self) -> &'static str {
        match self {
            Scope::Full => "full",
            Scope::Referrer(_) => "referrer",
        }
    }

    pub fn referrer(&self) -> Option<i64> {
        match self {
            Scope::Full => None,
            Scope::Referrer(id) => Some(*id),
        }
    }
}

/// One consistent read of the host and job-owned state for a scope.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Ids of users with `invite_code IS NOT NULL` in scope, ascending.
    pub referrers: Vec<i64>,
    /// Every user whose `referred_by_user_id` is a referrer in scope.
    pub referred: Vec<ReferredUser>,
    /// `(user_id, ip_hash)` of the referred users' `user_registered` events (non-NULL hashes;
    /// blank ones are still here: deciding what is blank is a rule).
    pub registrations: Vec<(i64, String)>,
    /// `(referrer_id, ip_hash)` of the referrers' events inside the IP window, both ends
    /// included (non-NULL hashes, blank ones still here).
    pub referrer_events: Vec<(i64, String)>,
    /// The job-owned `referral_rewards` rows in scope.
    pub stored_rewards: Vec<RewardResult>,
    /// `(user_id, referral_bonus_domains)` of the subscription rows of users in scope: every
    /// referrer's, and every other one whose bonus is not zero.
    pub host_bonus: Vec<(i64, i64)>,
}

/// A referred user with what the rules need of its subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferredUser {
    pub id: i64,
    pub referrer_id: i64,
    pub created_at: Instant,
    pub is_active: bool,
    pub is_verified: bool,
    pub subscription: Option<Subscription>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// Interned: a few distinct values over millions of rows.
    pub tier: Arc<str>,
    pub status: Arc<str>,
    pub started_at: Option<Instant>,
    pub expires_at: Option<Instant>,
}

/// Shares one allocation per distinct string while decoding a column.
#[derive(Default)]
pub struct Interner(std::collections::HashMap<String, Arc<str>>);

impl Interner {
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(s.to_owned(), a.clone());
        a
    }
}
