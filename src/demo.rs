//! `demo-data`: a deterministic synthetic population that exercises every outcome of SPEC
//! section 3 at realistic proportions, and the grant programs' host state (docs/rules.md §7):
//! payments covering every conversion case, and the users' credit balances.
//!
//! Every user is a pure function of `(seed, users, anchor, id)`, so the loader can generate and
//! insert in chunks without holding a million users in memory, and any user can be recomputed
//! alone. The generator is a hand-rolled SplitMix64 on purpose: the data must stay the same
//! across dependency upgrades (the `rand` crate does not promise stable streams).

use crate::instant::{Instant, MICROS_PER_DAY};

/// About one user in ten owns an invite code.
const REFERRER_EVERY: i64 = 10;

#[derive(Debug, Clone, PartialEq)]
pub struct DemoUser {
    pub id: i64,
    pub email: String,
    pub created_at: Instant,
    pub is_active: bool,
    pub is_verified: bool,
    pub invite_code: Option<String>,
    pub referred_by_user_id: Option<i64>,
    /// Grant programs' balances: NULL for most users, in the past or future for some.
    pub credit_until: Option<Instant>,
    pub credit_cents: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DemoSubscription {
    pub user_id: i64,
    pub tier: &'static str,
    pub status: &'static str,
    pub max_domains: i32,
    pub referral_bonus_domains: i32,
    pub started_at: Option<Instant>,
    pub expires_at: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DemoEvent {
    pub id: i64,
    pub user_id: Option<i64>,
    pub event_name: &'static str,
    pub ip_hash: Option<String>,
    pub created_at: Instant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DemoPayment {
    pub id: i64,
    pub user_id: i64,
    pub amount_cents: i64,
    pub currency: &'static str,
    pub status: &'static str,
    pub created_at: Instant,
}

/// One chunk of rows, ready to insert.
#[derive(Debug, Default)]
pub struct DemoChunk {
    pub users: Vec<DemoUser>,
    pub subscriptions: Vec<DemoSubscription>,
    pub events: Vec<DemoEvent>,
    pub payments: Vec<DemoPayment>,
}

/// Rows loaded by `demo-data`, per host table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DemoCounts {
    pub users: u64,
    pub subscriptions: u64,
    pub events: u64,
    pub payments: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct DemoSpec {
    pub users: i64,
    pub seed: u64,
    /// The instant the population is built around; reconcile `--as-of` it to see every
    /// outcome (cooldowns and IP windows are relative to it).
    pub anchor: Instant,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and its stream is fixed forever.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64, id: i64) -> Self {
        let mut r =
            Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (id as u64).rotate_left(17));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn pick<T: Copy>(&mut self, weighted: &[(T, f64)]) -> T {
        let mut x = self.unit() * weighted.iter().map(|(_, w)| w).sum::<f64>();
        for (v, w) in weighted {
            if x < *w {
                return *v;
            }
            x -= w;
        }
        weighted[weighted.len() - 1].0
    }
}

fn hash_hex(seed: u64, stream: u64, id: i64) -> String {
    format!("{:016x}", Rng::new(seed, stream, id).next())
}

const S_USER: u64 = 1;
const S_HOME_IP: u64 = 2;
const S_RING_IP: u64 = 3;
const S_EVENTS: u64 = 4;
const S_SECOND_IP: u64 = 5;
// The grant programs' state draws from streams of its own: the rows above stay as they were.
const S_PAYMENTS: u64 = 6;
const S_CREDIT: u64 = 7;

/// A user's payment ids are `id * PAYMENT_IDS_PER_USER + k`, k in the order the payments are
/// generated (not always the order of their times: see [`FirstPayment::Backfilled`]).
const PAYMENT_IDS_PER_USER: i64 = 16;

/// A paying user's first payment(s): every case a grant program's conversion rule must handle.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FirstPayment {
    /// A succeeded USD payment at a list price (some below 1000 cents, some exactly 1000).
    Normal,
    /// 499 cents, then later an upgrade of at least 1000: a conversion for a program with no
    /// minimum at the first, for one with `min_payment_cents = 1000` at the second.
    SmallThenQualifying,
    /// One refunded payment and nothing else.
    OnlyRefunded,
    /// A refunded payment, then a succeeded one.
    RefundedThenPaid,
    /// A failed payment retried successfully minutes later.
    FailedThenRetry,
    OnlyFailed,
    /// A pending payment in the last three days, and nothing else.
    OnlyPending,
    /// EUR or GBP: not a conversion for a program with `currency = "USD"`.
    OtherCurrency,
    /// `usd`: not `USD` either (currencies are compared exactly).
    LowercaseUsd,
    /// Two or three payments at the very same instant: the lowest id comes first.
    SameInstant,
    /// First paid in the 14 days before the anchor: inside a hold period.
    Hold,
    /// First paid after the anchor: no conversion as of the anchor.
    AfterAnchor,
    /// First paid exactly at the anchor: a conversion as of the anchor (`<=`).
    AtAnchor,
    /// An older payment recorded last: the highest id is the earliest.
    Backfilled,
}

impl DemoSpec {
    pub fn is_referrer(&self, id: i64) -> bool {
        id % REFERRER_EVERY == 1
    }

    fn referrer_count(&self) -> i64 {
        (self.users + REFERRER_EVERY - 2) / REFERRER_EVERY
    }

    /// A user's everyday IP hash: what its own events carry.
    fn home_ip(&self, id: i64) -> String {
        hash_hex(self.seed, S_HOME_IP, id)
    }

    /// Rows for users `from..to` (1-based, `to` exclusive, clamped to the population).
    pub fn chunk(&self, from: i64, to: i64) -> DemoChunk {
        let mut chunk = DemoChunk::default();
        for id in from.max(1)..to.min(self.users + 1) {
            self.user(id, &mut chunk);
        }
        chunk
    }

    fn user(&self, id: i64, out: &mut DemoChunk) {
        let mut rng = Rng::new(self.seed, S_USER, id);
        let referrer = self.is_referrer(id);
        let day = MICROS_PER_DAY;
        let micros = |rng: &mut Rng, days: u64| rng.below(days * day as u64) as i64;

        // Who referred this user: a skewed choice among referrers (a few refer very many),
        // some self-referrals, and a few users "referred" by someone with no invite code.
        let referred_by = if referrer {
            if rng.chance(0.005) {
                Some(id)
            } else if rng.chance(0.10) {
                Some(self.random_referrer(&mut rng))
            } else {
                None
            }
        } else if rng.chance(0.445) {
            if rng.chance(0.002) {
                Some(((id + 1) % self.users).max(2)).filter(|r| !self.is_referrer(*r))
            } else {
                Some(self.random_referrer(&mut rng))
            }
        } else {
            None
        };
        let referred_by = referred_by.filter(|r| *r <= self.users);

        // Recent signups fall in the cooldown.
        let created_at = if referred_by.is_some() && rng.chance(0.04) {
            self.anchor - micros(&mut rng, 7)
        } else {
            self.anchor - 8 * day - micros(&mut rng, 720)
        };
        let (credit_until, credit_cents) = self.credit(id);
        out.users.push(DemoUser {
            id,
            email: format!("user{id}@example.com"),
            created_at,
            is_active: rng.chance(0.96),
            is_verified: rng.chance(0.92),
            invite_code: referrer.then(|| {
                // One empty-string code: still a referrer.
                if id == 1 {
                    String::new()
                } else {
                    format!("INV{id:07}")
                }
            }),
            referred_by_user_id: referred_by,
            credit_until,
            credit_cents,
        });

        let has_subscription = rng.chance(if referrer {
            0.8
        } else if referred_by.is_some() {
            0.85
        } else {
            0.5
        });
        if has_subscription {
            let started_at = if rng.chance(0.03) {
                None
            } else if rng.chance(0.03) {
                Some(self.anchor - micros(&mut rng, 7))
            } else {
                Some((created_at + micros(&mut rng, 30)).min(self.anchor - 8 * day))
            };
            let expires_at = rng.pick(&[(0u8, 0.85), (1, 0.10), (2, 0.04), (3, 0.01)]);
            let expires_at = match expires_at {
                0 => None,
                1 => Some(self.anchor + 1 + micros(&mut rng, 365)),
                2 => Some(self.anchor - 1 - micros(&mut rng, 365)),
                _ => Some(self.anchor),
            };
            let stale_bonus = if rng.chance(0.05) {
                5 * (1 + rng.below(4) as i32)
            } else {
                0
            };
            out.subscriptions.push(DemoSubscription {
                user_id: id,
                tier: rng.pick(&[
                    ("trader", 0.45),
                    ("tycoon", 0.20),
                    ("scout", 0.30),
                    ("Trader", 0.02),
                    ("enterprise", 0.03),
                ]),
                status: rng.pick(&[
                    ("active", 0.80),
                    ("past_due", 0.08),
                    ("canceled", 0.06),
                    ("expired", 0.04),
                    ("Active", 0.02),
                ]),
                max_domains: 5,
                referral_bonus_domains: stale_bonus,
                started_at,
                expires_at,
            });
        }

        self.events(id, created_at, referred_by, out);
        self.payments(id, created_at, referred_by, out);
    }

    fn random_referrer(&self, rng: &mut Rng) -> i64 {
        // Squaring a uniform skews towards the first referrers: a long tail of small ones.
        let u = rng.unit();
        let k = ((u * u) * self.referrer_count() as f64) as i64;
        k * REFERRER_EVERY + 1
    }

    fn events(&self, id: i64, created_at: Instant, referred_by: Option<i64>, out: &mut DemoChunk) {
        let mut rng = Rng::new(self.seed, S_EVENTS, id);
        let mut seq = 0i64;
        let mut push =
            |user_id: Option<i64>, name: &'static str, ip: Option<String>, at: Instant| {
                out.events.push(DemoEvent {
                    id: id * 16 + seq,
                    user_id,
                    event_name: name,
                    ip_hash: ip,
                    created_at: at,
                });
                seq += 1;
            };

        // The signup: its IP hash carries the fraud patterns.
        let signup_ip = match referred_by {
            Some(r) if r != id => {
                let pattern = rng.pick(&[
                    (0u8, 0.855),
                    (1, 0.03),
                    (2, 0.06),
                    (3, 0.02),
                    (4, 0.01),
                    (5, 0.005),
                    (6, 0.005),
                    (7, 0.015),
                ]);
                match pattern {
                    0 => Some(self.home_ip(id)),
                    1 => Some(self.home_ip(r)), // shared with the referrer
                    2 => Some(hash_hex(self.seed, S_RING_IP, r * 4 + rng.below(2) as i64)), // a ring under one referrer
                    3 => None,
                    4 => Some(String::new()),
                    5 => Some("   ".into()),
                    6 => Some("\u{3000}".into()), // Unicode blank
                    _ => Some(self.home_ip(id).to_uppercase()), // case differs: not the same hash
                }
            }
            _ => Some(self.home_ip(id)),
        };
        if rng.chance(0.02) {
            // No registration event at all.
        } else {
            push(Some(id), "user_registered", signup_ip, created_at);
            if rng.chance(0.03) {
                push(
                    Some(id),
                    "user_registered",
                    Some(hash_hex(self.seed, S_SECOND_IP, id)),
                    created_at + 1,
                );
            }
        }

        // Everyday events; referrers are active recently, some only outside the IP window.
        let n = 2 + rng.below(5);
        let recent_days = if self.is_referrer(id) && rng.chance(0.85) {
            40
        } else {
            400
        };
        for _ in 0..n {
            let at = self.anchor - (rng.below(recent_days * MICROS_PER_DAY as u64) as i64);
            let at = at.max(created_at);
            let ip = if rng.chance(0.1) {
                Some(hash_hex(self.seed, S_SECOND_IP, id))
            } else if rng.chance(0.02) {
                None
            } else {
                Some(self.home_ip(id))
            };
            let name = if rng.chance(0.5) {
                "login"
            } else {
                "page_view"
            };
            let user = if rng.chance(0.005) { None } else { Some(id) };
            push(user, name, ip, at);
        }
    }

    /// A user's grant balances: `credit_until` NULL for most, in the past for some, in the
    /// future for some, exactly the anchor for a few; `credit_cents` positive for some.
    fn credit(&self, id: i64) -> (Option<Instant>, i64) {
        let mut rng = Rng::new(self.seed, S_CREDIT, id);
        let year = 365 * MICROS_PER_DAY as u64;
        let until = match rng.pick(&[(0u8, 0.85), (1, 0.075), (2, 0.07), (3, 0.005)]) {
            0 => None,
            1 => Some(self.anchor - 1 - rng.below(year) as i64),
            2 => Some(self.anchor + 1 + rng.below(year) as i64),
            _ => Some(self.anchor),
        };
        let cents = if rng.chance(0.10) {
            100 * (1 + rng.below(50) as i64)
        } else {
            0
        };
        (until, cents)
    }

    /// A user's payments. About a third of referred users pay (their conversions), and so do
    /// about half of the other users: roughly one payment per user over the population.
    fn payments(
        &self,
        id: i64,
        created_at: Instant,
        referred_by: Option<i64>,
        out: &mut DemoChunk,
    ) {
        use FirstPayment::*;
        let mut rng = Rng::new(self.seed, S_PAYMENTS, id);
        let day = MICROS_PER_DAY;
        let micros = |rng: &mut Rng, days: u64| rng.below(days * day as u64) as i64;
        let payer = rng.chance(if self.is_referrer(id) {
            0.55
        } else if referred_by.is_some_and(|r| r != id) {
            0.36
        } else {
            0.45
        });
        if !payer {
            return;
        }
        let mut seq = 0i64;
        let mut pay =
            |at: Instant, amount_cents: i64, currency: &'static str, status: &'static str| {
                debug_assert!(seq < PAYMENT_IDS_PER_USER);
                out.payments.push(DemoPayment {
                    id: id * PAYMENT_IDS_PER_USER + seq,
                    user_id: id,
                    amount_cents,
                    currency,
                    status,
                    created_at: at,
                });
                seq += 1;
            };
        let price = |rng: &mut Rng| {
            rng.pick(&[
                (499i64, 0.12),
                (999, 0.05),
                (1000, 0.13),
                (1900, 0.30),
                (2900, 0.22),
                (4900, 0.12),
                (9900, 0.06),
            ])
        };

        // Most pay within days of signing up, the others within half a year; never before.
        let first = created_at
            + 1
            + if rng.chance(0.5) {
                micros(&mut rng, 3)
            } else {
                micros(&mut rng, 180)
            };
        let case = rng.pick(&[
            (Normal, 0.615),
            (SmallThenQualifying, 0.07),
            (OnlyRefunded, 0.03),
            (RefundedThenPaid, 0.02),
            (FailedThenRetry, 0.04),
            (OnlyFailed, 0.015),
            (OnlyPending, 0.015),
            (OtherCurrency, 0.04),
            (LowercaseUsd, 0.02),
            (SameInstant, 0.04),
            (Hold, 0.05),
            (AfterAnchor, 0.04),
            (AtAnchor, 0.005),
            (Backfilled, 0.03),
        ]);
        let amount = price(&mut rng);
        // The payment monthly renewals follow (none after a lone refunded, failed or pending one).
        let renew: Option<(Instant, i64, &'static str)> = match case {
            Normal => {
                pay(first, amount, "USD", "succeeded");
                Some((first, amount, "USD"))
            }
            SmallThenQualifying => {
                pay(first, 499, "USD", "succeeded");
                let at = first + 3_600_000_000 + micros(&mut rng, 20);
                let upgrade = rng.pick(&[(1000i64, 0.3), (1900, 0.4), (2900, 0.3)]);
                pay(at, upgrade, "USD", "succeeded");
                Some((at, upgrade, "USD"))
            }
            OnlyRefunded => {
                pay(first, amount, "USD", "refunded");
                None
            }
            RefundedThenPaid => {
                pay(first, amount, "USD", "refunded");
                let at = first + 1 + micros(&mut rng, 60);
                let amount = price(&mut rng);
                pay(at, amount, "USD", "succeeded");
                Some((at, amount, "USD"))
            }
            FailedThenRetry => {
                pay(first, amount, "USD", "failed");
                let at = first + 1 + rng.below(3_600_000_000) as i64;
                pay(at, amount, "USD", "succeeded");
                Some((at, amount, "USD"))
            }
            OnlyFailed => {
                pay(first, amount, "USD", "failed");
                None
            }
            OnlyPending => {
                let at = (self.anchor - micros(&mut rng, 3)).max(created_at);
                pay(at, amount, "USD", "pending");
                None
            }
            OtherCurrency => {
                let currency = rng.pick(&[("EUR", 0.8), ("GBP", 0.2)]);
                pay(first, amount, currency, "succeeded");
                Some((first, amount, currency))
            }
            LowercaseUsd => {
                pay(first, amount, "usd", "succeeded");
                Some((first, amount, "usd"))
            }
            SameInstant => {
                // An order and its add-ons, recorded at once: a small or failed one may hold
                // the lowest id.
                let lead = if rng.chance(0.25) {
                    (amount, "failed")
                } else if rng.chance(0.5) {
                    (499, "succeeded")
                } else {
                    (amount, "succeeded")
                };
                pay(first, lead.0, "USD", lead.1);
                for _ in 0..1 + rng.below(2) {
                    pay(first, price(&mut rng), "USD", "succeeded");
                }
                Some((first, amount, "USD"))
            }
            Hold => {
                let at = (self.anchor - 1 - micros(&mut rng, 14)).max(created_at);
                pay(at, amount, "USD", "succeeded");
                Some((at, amount, "USD"))
            }
            AfterAnchor => {
                let at = self.anchor + 1 + micros(&mut rng, 30);
                pay(at, amount, "USD", "succeeded");
                Some((at, amount, "USD"))
            }
            AtAnchor => {
                pay(self.anchor, amount, "USD", "succeeded");
                Some((self.anchor, amount, "USD"))
            }
            Backfilled => {
                pay(first, amount, "USD", "succeeded");
                Some((first, amount, "USD"))
            }
        };

        // Monthly renewals, some failed or refunded; up to two months past the anchor.
        if let Some((from, amount, currency)) = renew {
            for k in 1..=rng.below(4) as i64 {
                let at = from + k * 30 * day + micros(&mut rng, 1) / 4;
                if at > self.anchor + 60 * day {
                    break;
                }
                let status = rng.pick(&[
                    ("succeeded", 0.90),
                    ("failed", 0.05),
                    ("refunded", 0.04),
                    ("pending", 0.01),
                ]);
                pay(at, amount, currency, status);
            }
        }
        if case == Backfilled {
            // Recorded last, paid first.
            let at = (first - 1 - micros(&mut rng, 30)).max(created_at);
            pay(at, price(&mut rng), "USD", "succeeded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instant::parse_sql_text;
    use std::collections::{HashMap, HashSet};

    fn spec(users: i64) -> DemoSpec {
        DemoSpec {
            users,
            seed: 7,
            anchor: parse_sql_text("2026-11-01 00:00:00").unwrap(),
        }
    }

    #[test]
    fn same_seed_same_population() {
        let a = spec(500).chunk(1, 501);
        let b = spec(500).chunk(1, 501);
        assert_eq!(a.users, b.users);
        assert_eq!(a.subscriptions, b.subscriptions);
        assert_eq!(a.events, b.events);
        assert_eq!(a.payments, b.payments);
        assert!(!a.payments.is_empty());
        // Chunking does not change the rows.
        let c = spec(500).chunk(200, 260);
        assert_eq!(c.users[..], a.users[199..259]);
        let in_range = |p: &&DemoPayment| (200..260).contains(&p.user_id);
        let expected: Vec<_> = a.payments.iter().filter(in_range).cloned().collect();
        assert!(!expected.is_empty());
        assert_eq!(c.payments, expected);
        // Another seed, other payments.
        let d = DemoSpec {
            seed: 8,
            ..spec(500)
        }
        .chunk(1, 501);
        assert_ne!(a.payments, d.payments);
    }

    #[test]
    fn proportions_are_realistic() {
        let c = spec(20_000).chunk(1, 20_001);
        let referrers = c.users.iter().filter(|u| u.invite_code.is_some()).count();
        let referred = c
            .users
            .iter()
            .filter(|u| u.referred_by_user_id.is_some())
            .count();
        assert!((1_900..2_100).contains(&referrers), "{referrers}");
        assert!((7_000..9_000).contains(&referred), "{referred}");
        assert!(
            (90_000..130_000).contains(&c.events.len()),
            "{}",
            c.events.len()
        );
        let ids: std::collections::HashSet<_> = c.events.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), c.events.len(), "event ids are unique");
        assert!(c.users.iter().all(|u| {
            u.referred_by_user_id
                .is_none_or(|r| (1..=20_000).contains(&r))
        }));
    }

    /// A referred user's conversion as docs/rules.md §7 defines it: the earliest payment (by
    /// time, then id) at or before `as_of` with a counted status, the minimum amount and, when
    /// set, exactly the currency.
    fn conversion<'a>(
        payments: &[&'a DemoPayment],
        as_of: Instant,
        min_cents: i64,
        currency: Option<&str>,
    ) -> Option<&'a DemoPayment> {
        payments
            .iter()
            .copied()
            .filter(|p| {
                p.created_at <= as_of
                    && p.status == "succeeded"
                    && p.amount_cents >= min_cents
                    && currency.is_none_or(|c| p.currency == c)
            })
            .min_by_key(|p| (p.created_at, p.id))
    }

    /// The 20k-user population, with each user's payments and signup IP hash.
    struct Population {
        spec: DemoSpec,
        chunk: DemoChunk,
        payments: HashMap<i64, Vec<usize>>,
        signup_ip: HashMap<i64, Option<String>>,
    }

    impl Population {
        fn new() -> Self {
            let spec = spec(20_000);
            let chunk = spec.chunk(1, 20_001);
            let mut payments: HashMap<i64, Vec<usize>> = HashMap::new();
            for (i, p) in chunk.payments.iter().enumerate() {
                payments.entry(p.user_id).or_default().push(i);
            }
            let mut signup_ip = HashMap::new();
            for e in &chunk.events {
                if e.event_name == "user_registered" {
                    // The first registration event (lowest id) is the signup.
                    signup_ip
                        .entry(e.user_id.unwrap())
                        .or_insert_with(|| e.ip_hash.clone());
                }
            }
            Population {
                spec,
                chunk,
                payments,
                signup_ip,
            }
        }

        fn payments_of(&self, id: i64) -> Vec<&DemoPayment> {
            self.payments
                .get(&id)
                .map(|ix| ix.iter().map(|&i| &self.chunk.payments[i]).collect())
                .unwrap_or_default()
        }

        /// Referred users (not self-referred) and their referrers.
        fn referred(&self) -> impl Iterator<Item = (&DemoUser, i64)> {
            self.chunk
                .users
                .iter()
                .filter_map(|u| u.referred_by_user_id.filter(|&r| r != u.id).map(|r| (u, r)))
        }

        /// Program A's conversion (no minimum, any currency).
        fn conversion_a(&self, id: i64) -> Option<&DemoPayment> {
            conversion(&self.payments_of(id), self.spec.anchor, 1, None)
        }

        /// Program B's conversion (at least 1000 cents, in USD).
        fn conversion_b(&self, id: i64) -> Option<&DemoPayment> {
            conversion(&self.payments_of(id), self.spec.anchor, 1000, Some("USD"))
        }
    }

    #[test]
    fn payments_proportions_are_realistic() {
        let pop = Population::new();
        let c = &pop.chunk;
        let referred = pop.referred().count();
        let referred_payers = pop
            .referred()
            .filter(|(u, _)| pop.payments.contains_key(&u.id))
            .count();
        let converted = pop
            .referred()
            .filter(|(u, _)| pop.conversion_a(u.id).is_some())
            .count();
        let share = referred_payers as f64 / referred as f64;
        assert!(
            (0.30..0.40).contains(&share),
            "{referred_payers} of {referred}"
        );
        assert!(converted * 10 > referred_payers * 8, "{converted}");
        // About one payment per user over the whole population, non-referred users included.
        let per_user = c.payments.len() as f64 / c.users.len() as f64;
        assert!((0.8..1.2).contains(&per_user), "{}", c.payments.len());
        let non_referred_payers = c
            .users
            .iter()
            .filter(|u| u.referred_by_user_id.is_none() && pop.payments.contains_key(&u.id))
            .count();
        assert!(
            non_referred_payers > referred_payers,
            "{non_referred_payers}"
        );

        let ids: HashSet<_> = c.payments.iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), c.payments.len(), "payment ids are unique");
        let signup: HashMap<_, _> = c.users.iter().map(|u| (u.id, u.created_at)).collect();
        for p in &c.payments {
            assert_eq!(p.id / PAYMENT_IDS_PER_USER, p.user_id, "{p:?}");
            assert!(
                p.created_at >= signup[&p.user_id],
                "paid before signing up: {p:?}"
            );
            assert!(p.amount_cents > 0, "{p:?}");
        }
        let statuses: HashSet<_> = c.payments.iter().map(|p| p.status).collect();
        let currencies: HashSet<_> = c.payments.iter().map(|p| p.currency).collect();
        assert_eq!(
            statuses,
            HashSet::from(["succeeded", "refunded", "failed", "pending"])
        );
        assert_eq!(currencies, HashSet::from(["USD", "usd", "EUR", "GBP"]));
        let succeeded = c
            .payments
            .iter()
            .filter(|p| p.status == "succeeded")
            .count();
        assert!(succeeded * 10 > c.payments.len() * 8, "{succeeded}");
    }

    #[test]
    fn payments_cover_every_conversion_case() {
        let pop = Population::new();
        let anchor = pop.spec.anchor;
        let count = |f: &dyn Fn(&DemoUser, &[&DemoPayment]) -> bool| {
            pop.referred()
                .filter(|(u, _)| f(u, &pop.payments_of(u.id)))
                .count()
        };
        let cases = [
            (
                "a small first payment, then a qualifying one",
                count(&|u, _| {
                    let (a, b) = (pop.conversion_a(u.id), pop.conversion_b(u.id));
                    a.is_some_and(|a| a.amount_cents == 499)
                        && b.is_some_and(|b| b.created_at > a.unwrap().created_at)
                }),
            ),
            (
                "a single payment, refunded",
                count(&|_, ps| ps.len() == 1 && ps[0].status == "refunded"),
            ),
            (
                "a refunded payment before the conversion",
                count(&|u, ps| {
                    let a = pop.conversion_a(u.id);
                    ps.iter().any(|p| {
                        p.status == "refunded" && a.is_some_and(|a| p.created_at < a.created_at)
                    })
                }),
            ),
            (
                "a refunded payment after the conversion",
                count(&|u, ps| {
                    pop.conversion_a(u.id).is_some()
                        && ps
                            .iter()
                            .any(|p| p.status == "refunded" && p.created_at <= anchor)
                }),
            ),
            (
                "a failed payment, nothing else",
                count(&|_, ps| ps.len() == 1 && ps[0].status == "failed"),
            ),
            (
                "a failed payment before the conversion",
                count(&|u, ps| {
                    let a = pop.conversion_a(u.id);
                    ps.iter().any(|p| {
                        p.status == "failed" && a.is_some_and(|a| p.created_at < a.created_at)
                    })
                }),
            ),
            (
                "a pending payment, nothing else",
                count(&|_, ps| ps.len() == 1 && ps[0].status == "pending"),
            ),
            (
                "paid in EUR or GBP only: no USD conversion",
                count(&|u, ps| {
                    pop.conversion_a(u.id)
                        .is_some_and(|a| a.currency != "USD" && a.amount_cents >= 1000)
                        && pop.conversion_b(u.id).is_none()
                        && ps.iter().all(|p| p.currency != "USD")
                }),
            ),
            (
                "paid in lowercase usd only",
                count(&|u, ps| {
                    pop.conversion_a(u.id).is_some() && ps.iter().all(|p| p.currency == "usd")
                }),
            ),
            (
                "payments at the same instant",
                count(&|_, ps| {
                    ps.iter().enumerate().any(|(i, p)| {
                        ps[i + 1..]
                            .iter()
                            .any(|q| q.created_at == p.created_at && q.id != p.id)
                    })
                }),
            ),
            (
                "a tie whose lower id is the conversion, and a higher id another program's",
                count(&|u, _| {
                    let (a, b) = (pop.conversion_a(u.id), pop.conversion_b(u.id));
                    a.zip(b)
                        .is_some_and(|(a, b)| a.created_at == b.created_at && a.id < b.id)
                }),
            ),
            (
                "the earliest payment holds the highest id",
                count(&|u, ps| {
                    pop.conversion_a(u.id)
                        .is_some_and(|a| ps.iter().all(|p| p.id <= a.id) && ps.len() > 1)
                }),
            ),
            (
                "a conversion in the 14 days before the anchor (held)",
                count(&|u, _| {
                    pop.conversion_a(u.id)
                        .is_some_and(|a| a.created_at > anchor - 14 * MICROS_PER_DAY)
                }),
            ),
            (
                "a conversion exactly at the anchor",
                count(&|u, _| {
                    pop.conversion_a(u.id)
                        .is_some_and(|a| a.created_at == anchor)
                }),
            ),
            (
                "paid only after the anchor",
                count(&|_, ps| !ps.is_empty() && ps.iter().all(|p| p.created_at > anchor)),
            ),
            (
                "a conversion, then payments after the anchor",
                count(&|u, ps| {
                    pop.conversion_a(u.id).is_some() && ps.iter().any(|p| p.created_at > anchor)
                }),
            ),
            (
                "a conversion of exactly 1000 cents",
                count(&|u, _| {
                    pop.conversion_b(u.id)
                        .is_some_and(|b| b.amount_cents == 1000)
                }),
            ),
            (
                "a conversion of 999 cents, no qualifying payment",
                count(&|u, _| {
                    pop.conversion_a(u.id)
                        .is_some_and(|a| a.amount_cents == 999)
                        && pop.conversion_b(u.id).is_none()
                }),
            ),
        ];
        for (case, n) in &cases {
            assert!(*n > 0, "no referred user with {case}");
        }

        // Over program B's cap: referrers with more than 10 converted referred users.
        let mut per_referrer: HashMap<i64, usize> = HashMap::new();
        for (u, r) in pop.referred() {
            if pop.conversion_b(u.id).is_some() {
                *per_referrer.entry(r).or_default() += 1;
            }
        }
        let over_cap = per_referrer.values().filter(|&&n| n > 10).count();
        assert!(over_cap > 0, "no referrer over the cap");

        // Fraud outcomes among converted referrals.
        let converted: Vec<(&DemoUser, i64)> = pop
            .referred()
            .filter(|(u, _)| pop.conversion_a(u.id).is_some())
            .collect();
        let ip = |id: i64| pop.signup_ip.get(&id).cloned().flatten();
        let mut per_ip: HashMap<(i64, String), usize> = HashMap::new();
        for (u, r) in pop.referred() {
            if let Some(ip) = ip(u.id).filter(|ip| !ip.trim().is_empty()) {
                *per_ip.entry((r, ip)).or_default() += 1;
            }
        }
        let shared = converted
            .iter()
            .filter(|(u, r)| ip(u.id) == Some(pop.spec.home_ip(*r)))
            .count();
        let duplicate = converted
            .iter()
            .filter(|(u, r)| {
                ip(u.id)
                    .filter(|ip| !ip.trim().is_empty())
                    .is_some_and(|ip| per_ip[&(*r, ip)] > 1)
            })
            .count();
        let missing = converted
            .iter()
            .filter(|(u, _)| ip(u.id).is_none_or(|ip| ip.trim().is_empty()))
            .count();
        let self_referred = pop
            .chunk
            .users
            .iter()
            .filter(|u| u.referred_by_user_id == Some(u.id) && pop.conversion_a(u.id).is_some())
            .count();
        for (case, n) in [
            ("a shared signup IP", shared),
            ("a duplicate signup IP", duplicate),
            ("a missing or blank signup IP", missing),
            ("a self-referral", self_referred),
        ] {
            assert!(n > 0, "no converted referral with {case}");
        }
    }

    #[test]
    fn credit_balances_cover_every_case() {
        let c = spec(20_000).chunk(1, 20_001);
        let anchor = spec(1).anchor;
        let n = |f: &dyn Fn(&DemoUser) -> bool| c.users.iter().filter(|u| f(u)).count();
        let null = n(&|u| u.credit_until.is_none());
        assert!(null * 10 > c.users.len() * 8, "{null}");
        assert!(n(&|u| u.credit_until.is_some_and(|t| t < anchor)) > 0);
        assert!(n(&|u| u.credit_until == Some(anchor)) > 0);
        assert!(n(&|u| u.credit_until.is_some_and(|t| t > anchor)) > 0);
        // Among referrers too: a grant of credit days extends a balance still running.
        assert!(n(&|u| u.invite_code.is_some() && u.credit_until.is_some_and(|t| t > anchor)) > 0);
        let zero = n(&|u| u.credit_cents == 0);
        assert!(zero * 10 > c.users.len() * 8, "{zero}");
        assert!(n(&|u| u.credit_cents > 0) > 0);
        assert!(c.users.iter().all(|u| u.credit_cents >= 0));
    }
}
