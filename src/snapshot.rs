//! The plain data a run computes from: what the store reads, nothing the rules decide.

use std::sync::Arc;

use crate::instant::Instant;
use crate::program::slots::rewards::RewardResult;

/// Which referrers a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every referrer, plus every non-referrer who still holds a reward (revocation).
    Full,
    /// One user: a referrer's recompute, or the revocation of a user who no longer is one.
    Referrer(i64),
    /// The part of a full run whose users fall in one shard.
    Shard(Shard),
}

impl Scope {
    /// The run row's `mode`: a shard run is a full run of a part.
    pub fn mode(&self) -> &'static str {
        match self {
            Scope::Full | Scope::Shard(_) => "full",
            Scope::Referrer(_) => "referrer",
        }
    }

    pub fn referrer(&self) -> Option<i64> {
        match self {
            Scope::Referrer(id) => Some(*id),
            _ => None,
        }
    }

    pub fn shard(&self) -> Option<Shard> {
        match self {
            Scope::Shard(s) => Some(*s),
            _ => None,
        }
    }

    /// Whether a user's rewards belong to this scope.
    pub fn covers(&self, user_id: i64) -> bool {
        match self {
            Scope::Full => true,
            Scope::Referrer(id) => *id == user_id,
            Scope::Shard(s) => s.contains(user_id),
        }
    }
}

/// Shard `index` of `count` (1-based: `1/3`, `2/3`, `3/3`). A user belongs to shard
/// `splitmix64(id) % count + 1`, where splitmix64 is the finalizer of Steele, Lea and Flood's
/// SplitMix64 over the id's two's-complement bits:
/// `z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
/// z ^ (z >> 31)` (wrapping u64 arithmetic). It is computed in Rust, so it is the same on every
/// backend, and it spreads any id pattern evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub fn of(user_id: i64, count: u32) -> u32 {
        let mut z = user_id as u64;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % count as u64) as u32 + 1
    }

    pub fn contains(&self, user_id: i64) -> bool {
        Shard::of(user_id, self.count) == self.index
    }

    /// Parses `K/N` with 1 <= K <= N.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let err = || format!("{s:?} is not a shard; expected K/N with 1 <= K <= N, e.g. 2/8");
        let (k, n) = s.split_once('/').ok_or_else(err)?;
        let (index, count): (u32, u32) = (
            k.trim().parse().map_err(|_| err())?,
            n.trim().parse().map_err(|_| err())?,
        );
        if count == 0 || index == 0 || index > count || count > 65_536 {
            return Err(err());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_ids_evenly() {
        let count = 8;
        let mut sizes = [0u32; 8];
        // Demo referrers are ids 1, 11, 21, …: a pattern a modulo would put in one shard.
        for id in (0..80_000).map(|k| k * 10 + 1) {
            let s = Shard::of(id, count);
            assert!((1..=count).contains(&s));
            sizes[s as usize - 1] += 1;
        }
        assert!(
            sizes.iter().all(|n| (9_000..11_000).contains(n)),
            "{sizes:?}"
        );
    }

    #[test]
    fn shard_hash_is_fixed() {
        // Values computed independently (Python) from the documented formula.
        assert_eq!(Shard::of(1, 1_000_000), 578_790);
        assert_eq!(Shard::of(1, 3), 2);
        assert_eq!(Shard::of(42, 3), 3);
        assert_eq!(Shard::of(0, 7), 1);
    }

    #[test]
    fn shard_parsing() {
        assert_eq!(Shard::parse("2/8"), Ok(Shard { index: 2, count: 8 }));
        for bad in ["0/3", "4/3", "1/0", "x/2", "3", ""] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
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
    /// How long each query took and how many rows it gave (benchmarks, stage logs).
    pub timings: Vec<QueryTiming>,
    /// Whether the large queries were read with PostgreSQL's binary COPY.
    pub via_copy: bool,
    /// Whether the grant programs' payments and ledger were read on a second PostgreSQL
    /// connection sharing the snapshot (`pg_export_snapshot`).
    pub side_read: bool,
    /// The grant programs' facts, when any is configured.
    pub grants: Option<crate::program::grants::GrantsSnapshot>,
    /// `(referrer_id, referred_id)` of the referrals whose referrer exists but holds no invite
    /// code: they count for nobody in the slots program. Read for a one-user run on such a user
    /// (`explain`), and for full and shard runs only when asked (the per-referral report).
    pub uncounted: Vec<(i64, i64)>,
}

/// What the grant programs need read, when any is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantsRead {
    /// Whether any grant program checks fraud (reads the IP facts).
    pub fraud: bool,
    /// The payments worth reading: a status that some program counts and at least the
    /// smallest minimum amount. Each program's own filter is applied again in Rust.
    pub statuses: Vec<String>,
    pub min_payment_cents: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueryTiming {
    pub query: &'static str,
    pub rows: usize,
    pub elapsed: std::time::Duration,
}

/// Times consecutive queries of one snapshot.
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    pub fn start() -> Self {
        Stopwatch(std::time::Instant::now())
    }

    /// Records the time since the previous lap under `query`.
    pub fn lap(&mut self, timings: &mut Vec<QueryTiming>, query: &'static str, rows: usize) {
        let now = std::time::Instant::now();
        tracing::debug!(
            query,
            rows,
            ms = (now - self.0).as_secs_f64() * 1e3,
            "snapshot query"
        );
        timings.push(QueryTiming {
            query,
            rows,
            elapsed: now - self.0,
        });
        self.0 = now;
    }
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

/// Shares one allocation per distinct string while decoding a column. Hashed with foldhash:
/// it is called for every tier, status and currency cell (SipHash showed in the profile), and
/// holds a few distinct values.
#[derive(Default)]
pub struct Interner(crate::program::Fast<String, Arc<str>>);

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
