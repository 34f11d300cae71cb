//! `demo-data`: a deterministic synthetic population that exercises every outcome of SPEC
//! section 3 at realistic proportions.
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

/// One chunk of rows, ready to insert.
#[derive(Debug, Default)]
pub struct DemoChunk {
    pub users: Vec<DemoUser>,
    pub subscriptions: Vec<DemoSubscription>,
    pub events: Vec<DemoEvent>,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instant::parse_sql_text;

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
        assert_eq!(a.events, b.events);
        // Chunking does not change the rows.
        let c = spec(500).chunk(200, 260);
        assert_eq!(c.users[..], a.users[199..259]);
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
}
