//! Property tests over generated populations under generated rules configs (proptest):
//! - the engine equals an independent, naive model of SPEC section 3 ([`model`]): in memory,
//!   and through SQLite and PostgreSQL, down to what an apply writes;
//! - SQLite time text in every accepted form reads as the canonical text does;
//! - shuffled insertion order gives identical results (in memory, and through the databases);
//! - a second apply at the same as-of writes no reward, ledger or host-column row;
//! - `reconcile --referrer R` equals the full run's row for R, for every R;
//! - apply S1, change the rows to S2 in place, apply again: the same as a fresh apply of S2.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use referral_rewards::config::{Badge, Config};
use referral_rewards::engine::{self, RunReport, RunRequest};
use referral_rewards::instant::{self, Instant};
use referral_rewards::program::slots::compute::compute;
use referral_rewards::program::slots::plan::Plan;
use referral_rewards::program::slots::rewards::RewardResult;
use referral_rewards::snapshot::{ReferredUser, Scope, Snapshot, Subscription};
use referral_rewards::store::Store;

// The model.

/// SPEC section 3 written down from its text alone (none of the engine's `rules` or
/// `compute`): for each referrer, ascending by id, its counts, bonus slots and badge.
fn model(f: &Fixture, cfg: &Config, now: Instant) -> Vec<RewardResult> {
    let (rules, rewards) = (&cfg.rules, &cfg.rewards);
    // Blank: only Unicode White_Space, which is what `str::trim` removes.
    let non_blank = |h: &&str| !h.trim().is_empty();
    let mut referrers: Vec<i64> = f
        .users
        .iter()
        .filter(|u| u.invite_code.is_some())
        .map(|u| u.id)
        .collect();
    referrers.sort();
    let mut out = Vec::new();
    for r in referrers {
        let referred: Vec<&U> = f
            .users
            .iter()
            .filter(|u| u.referred_by == Some(r))
            .collect();
        // R's distinct non-blank IP hashes of any event in [now - ip_window_days, now].
        let referrer_ips: BTreeSet<&str> = f
            .events
            .iter()
            .filter(|e| e.user_id == Some(r))
            .filter(|e| now - rules.ip_window_days * DAY <= e.created_at && e.created_at <= now)
            .filter_map(|e| e.ip_hash.as_deref())
            .filter(non_blank)
            .collect();
        let mut candidates = Vec::new();
        for u in &referred {
            let Some(s) = f.subs.iter().find(|s| s.user_id == u.id) else {
                continue;
            };
            if u.is_active
                && u.is_verified
                && rules.qualifying_tiers.contains(&s.tier)
                && rules.qualifying_statuses.contains(&s.status)
                && s.expires_at.is_none_or(|e| e >= now)
            {
                // The greatest non-blank hash of U's `user_registered` events, in byte order
                // (which is how Rust orders `str`).
                let signup_ip = f
                    .events
                    .iter()
                    .filter(|e| e.user_id == Some(u.id) && e.name == "user_registered")
                    .filter_map(|e| e.ip_hash.as_deref())
                    .filter(non_blank)
                    .max();
                candidates.push((u, s, signup_ip));
            }
        }
        // started_at ascending with NULL last, then id.
        candidates.sort_by_key(|(u, s, _)| (s.started_at.is_none(), s.started_at, u.id));
        let cutoff = now - rules.cooldown_days * DAY;
        let mut claimed = BTreeSet::new();
        // qualified, self_referral, cooldown, missing_ip, shared_ip, duplicate_ip
        let mut n = [0i64; 6];
        for (u, s, signup_ip) in candidates {
            let outcome = if u.id == r {
                1
            } else if rules.cooldown_days > 0
                && (u.created_at > cutoff || s.started_at.is_some_and(|t| t > cutoff))
            {
                2
            } else if rules.require_ip_hash && signup_ip.is_none() {
                3
            } else if signup_ip.is_some_and(|ip| referrer_ips.contains(ip)) {
                4
            } else if signup_ip.is_some_and(|ip| claimed.contains(ip)) {
                5
            } else {
                claimed.extend(signup_ip);
                0
            };
            n[outcome] += 1;
        }
        let badge = rewards
            .badges
            .iter()
            .filter(|b| n[0] >= b.threshold)
            .max_by_key(|b| b.threshold)
            .map(|b| b.name.clone());
        out.push(RewardResult {
            referrer_user_id: r,
            referred_users_total: referred.len() as i64,
            qualified_referrals: n[0],
            disqualified_self_referral: n[1],
            disqualified_cooldown: n[2],
            disqualified_missing_ip: n[3],
            disqualified_shared_ip: n[4],
            disqualified_duplicate_ip: n[5],
            bonus_slots: n[0] / rewards.batch_size * rewards.bonus_per_batch,
            badge,
        });
    }
    out
}

// The generators.

static TIERS: [&str; 4] = ["trader", "tycoon", "scout", "Trader"];
static STATUSES: [&str; 4] = ["active", "past_due", "canceled", "Active"];
/// Hashes equal but for case ("b", "B"), in an order byte order and case-insensitive order
/// disagree on ("B" < "a" < "b"), with a leading space, beyond ASCII; blank ones; none. The
/// first ones more often, so that hashes are shared.
static IPS: [Option<&str>; 12] = [
    Some("a"),
    Some("a"),
    Some("a"),
    Some("b"),
    Some("b"),
    Some("B"),
    Some(" a"),
    Some("é"),
    Some(" "),
    Some(""),
    Some("\u{3000}"),
    None,
];
/// Only `user_registered`, exactly, is a registration.
static EVENT_NAMES: [&str; 6] = [
    "user_registered",
    "user_registered",
    "user_registered",
    "User_Registered",
    "USER_REGISTERED",
    "login",
];

/// The instants a run is made at: noon, midnights (whose boundaries are midnights too, so that
/// bare dates are written), one just before a midnight, a leap day in the window.
fn nows() -> Vec<Instant> {
    vec![
        at("2026-11-01 12:00:00"),
        at("2026-11-01 00:00:00"),
        at("2024-03-01 00:00:00"),
        at("2026-07-15 23:59:59.999999"),
    ]
}

fn subset(all: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::bool::weighted(0.7), all.len()).prop_map(move |keep| {
        all.iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(s, _)| s.to_string())
            .collect()
    })
}

/// A valid rules config: cooldown 0 (off) to 10 days, window 1 to 40 days, IP required or not,
/// any subset of tiers and statuses, batches of 1 to 4, 0 to 6 slots a batch, up to three
/// badges with strictly increasing thresholds.
fn rules_config() -> impl Strategy<Value = Config> {
    (
        prop_oneof![1 => Just(0i64), 3 => 1i64..=10],
        1i64..=40,
        any::<bool>(),
        subset(&TIERS),
        subset(&STATUSES),
        1i64..=4,
        0i64..=6,
        prop::collection::vec(1i64..=3, 0..=3),
    )
        .prop_map(
            |(cooldown, window, require_ip, tiers, statuses, batch, per_batch, steps)| {
                let mut cfg = Config::default();
                cfg.rules.cooldown_days = cooldown;
                cfg.rules.ip_window_days = window;
                cfg.rules.require_ip_hash = require_ip;
                cfg.rules.qualifying_tiers = tiers;
                cfg.rules.qualifying_statuses = statuses;
                // As validation demands: a subscription the job creates never qualifies.
                cfg.new_subscription.tier = "bonus".into();
                assert!(cfg.validate().is_ok());
                cfg.rewards.batch_size = batch;
                cfg.rewards.bonus_per_batch = per_batch;
                let mut threshold = 0;
                cfg.rewards.badges = steps
                    .into_iter()
                    .map(|step| {
                        threshold += step;
                        Badge {
                            name: format!("badge_{threshold}"),
                            threshold,
                        }
                    })
                    .collect();
                cfg.validate().expect("a generated config is valid");
                cfg
            },
        )
}

/// Times at and around every boundary of `cfg` at `now`: now, the cooldown's cutoff and the
/// window's start, each exactly and ±1 µs; a day ago, today's midnight, the future, long ago.
fn boundary_times(cfg: &Config, now: Instant) -> Vec<Instant> {
    let cutoff = now - cfg.rules.cooldown_days * DAY;
    let window = now - cfg.rules.ip_window_days * DAY;
    vec![
        now,
        now + 1,
        now - 1,
        cutoff,
        cutoff + 1,
        cutoff - 1,
        window,
        window - 1,
        window + 1,
        now - DAY,
        now.div_euclid(DAY) * DAY,
        now + DAY,
        now - 100 * DAY,
        now - 400 * DAY,
    ]
}

/// `n` users (ids 1..=n) with subscriptions and events, around the boundaries of `cfg` at
/// `now`, leaning towards candidates so that every rule gets to decide: referrals point mostly
/// at referrers (or at the user itself), tiers and statuses are mostly qualifying ones, two
/// thirds of the users' times are at the cooldown's cutoff or older, and the few distinct
/// times make ties in `started_at` that the ids decide. Event users may be NULL.
fn population(n: i64, cfg: &Config, now: Instant) -> impl Strategy<Value = Fixture> + use<> {
    let boundary = prop::sample::select(boundary_times(cfg, now));
    let cutoff = now - cfg.rules.cooldown_days * DAY;
    let old = prop::sample::select(vec![cutoff, cutoff - 1, now - 100 * DAY, now - 400 * DAY]);
    let time = prop_oneof![1 => boundary.clone(), 2 => old];
    let mostly = |qualifying: &[String], all: &[&str]| -> BoxedStrategy<String> {
        let all = prop::sample::select(all.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        if qualifying.is_empty() {
            all.boxed()
        } else {
            prop_oneof![3 => prop::sample::select(qualifying.to_vec()), 1 => all].boxed()
        }
    };
    let id = move |k: usize| k as i64 % n + 1;
    (
        prop::collection::vec(
            (
                prop::bool::weighted(0.25), // referrer
                any::<bool>(),              // its code's case
                0u8..12, // referred by: 0 nobody, 1 itself, 2-9 a referrer, else anyone
                0usize..16,
                time.clone(),
                prop::bool::weighted(0.9),
                prop::bool::weighted(0.9),
                // Registered from (fewer hashes than events have, so that they are shared).
                prop::option::weighted(0.7, prop::sample::select(&IPS[..5])),
                // An event that is not a registration by name but for case.
                prop::option::weighted(
                    0.3,
                    (
                        prop::sample::select(&EVENT_NAMES[3..5]),
                        prop::sample::select(&IPS[..]),
                    ),
                ),
            ),
            n as usize,
        ),
        prop::collection::vec(
            prop::option::weighted(
                0.8,
                (
                    mostly(&cfg.rules.qualifying_tiers, &TIERS),
                    mostly(&cfg.rules.qualifying_statuses, &STATUSES),
                    prop::sample::select(vec![0i64, 5, 10]),
                    prop::option::weighted(0.85, time),
                    prop::option::weighted(0.3, boundary.clone()),
                ),
            ),
            n as usize,
        ),
        prop::collection::vec(
            (
                0u8..10, // the event's user: 0 NULL, 1-4 a referrer, else anyone
                0usize..16,
                prop::sample::select(&EVENT_NAMES[..]),
                prop::sample::select(&IPS[..]),
                boundary,
            ),
            0..40,
        ),
    )
        .prop_map(move |(users, subs, events)| {
            let mut f = Fixture::default();
            let referrers: Vec<i64> = (1..=n).filter(|uid| users[*uid as usize - 1].0).collect();
            let mut registrations = Vec::new();
            for (
                i,
                (referrer, upper, kind, k, created_at, active, verified, registration, decoy),
            ) in users.into_iter().enumerate()
            {
                let uid = i as i64 + 1;
                registrations.extend(registration.map(|ip| (uid, "user_registered", ip)));
                registrations.extend(decoy.map(|(name, ip)| (uid, name, ip)));
                f.users.push(U {
                    id: uid,
                    created_at,
                    is_active: active,
                    is_verified: verified,
                    invite_code: referrer
                        .then(|| format!("{}{uid}", if upper { "C" } else { "c" })),
                    referred_by: match kind {
                        0 => None,
                        1 => Some(uid),
                        2..=9 if !referrers.is_empty() => Some(referrers[k % referrers.len()]),
                        _ => Some(id(k)),
                    },
                });
            }
            for (i, s) in subs.into_iter().enumerate() {
                if let Some((tier, status, bonus, started_at, expires_at)) = s {
                    f.subs.push(S {
                        user_id: i as i64 + 1,
                        tier,
                        status,
                        bonus,
                        started_at,
                        expires_at,
                    });
                }
            }
            for (i, (kind, k, name, ip, t)) in events.into_iter().enumerate() {
                f.events.push(E {
                    id: i as i64 + 1,
                    user_id: match kind {
                        0 => None,
                        1..=4 if !referrers.is_empty() => Some(referrers[k % referrers.len()]),
                        _ => Some(id(k)),
                    },
                    name: name.into(),
                    ip_hash: ip.map(str::to_owned),
                    created_at: t,
                });
            }
            for (user, name, ip) in registrations {
                f.events.push(E {
                    id: f.events.len() as i64 + 1,
                    user_id: Some(user),
                    name: name.into(),
                    ip_hash: ip.map(str::to_owned),
                    created_at: now - 100 * DAY,
                });
            }
            f
        })
}

/// A rules config, an instant, and a population around the config's boundaries.
#[derive(Debug, Clone)]
struct Case {
    cfg: Config,
    now: Instant,
    f: Fixture,
}

fn case() -> impl Strategy<Value = Case> {
    (rules_config(), prop::sample::select(nows()), 2i64..16)
        .prop_flat_map(|(cfg, now, n)| {
            let f = population(n, &cfg, now);
            (Just(cfg), Just(now), f)
        })
        .prop_map(|(cfg, now, f)| Case { cfg, now, f })
}

/// A case S1 and a population S2 over the same user ids: S1 with about a third of its parts
/// taken from another population (flags and times, invite codes, referrers, subscriptions,
/// events), so that codes come and go, subscriptions change, appear and disappear, and
/// events change, appear and disappear.
fn mutation() -> impl Strategy<Value = (Case, Fixture)> {
    (rules_config(), prop::sample::select(nows()), 2i64..16)
        .prop_flat_map(|(cfg, now, n)| {
            let (s1, other) = (population(n, &cfg, now), population(n, &cfg, now));
            (Just(cfg), Just(now), s1, other, any::<u64>())
        })
        .prop_map(|(cfg, now, s1, other, seed)| {
            let s2 = mixed(&s1, &other, seed);
            (Case { cfg, now, f: s1 }, s2)
        })
}

fn mixed(a: &Fixture, b: &Fixture, seed: u64) -> Fixture {
    let mut rng = Lcg(seed);
    let mut take = || rng.below(3) == 0;
    let mut f = Fixture::default();
    for (ua, ub) in a.users.iter().zip(&b.users) {
        let mut u = ua.clone();
        if take() {
            (u.is_active, u.is_verified, u.created_at) =
                (ub.is_active, ub.is_verified, ub.created_at);
        }
        if take() {
            u.invite_code = ub.invite_code.clone();
        }
        if take() {
            u.referred_by = ub.referred_by;
        }
        f.users.push(u);
    }
    for u in &a.users {
        let sub = |f: &Fixture| f.subs.iter().find(|s| s.user_id == u.id).cloned();
        f.subs.extend(if take() { sub(b) } else { sub(a) });
    }
    let events = a.events.len().max(b.events.len()) as i64;
    for id in 1..=events {
        let ev = |f: &Fixture| f.events.iter().find(|e| e.id == id).cloned();
        f.events.extend(if take() { ev(b) } else { ev(a) });
    }
    f
}

/// A fixed LCG: the choices it makes are part of the generated case.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize % n
    }
}

/// One of the texts SQLite may hold for instant `t`, as `parse_sql_text` accepts them:
/// `YYYY-MM-DD HH:MM:SS`, with a fraction of 1 to 9 digits (beyond 6 truncated), a `T`
/// separator, `Z` or a numeric offset (`+02:00`, up to ±23:59) for the same instant, a bare
/// date at midnight UTC, `HH:MM` without seconds, whitespace around.
fn time_text(t: Instant, rng: &mut Lcg) -> String {
    if t.rem_euclid(DAY) == 0 && rng.below(3) == 0 {
        return instant::date_text(t);
    }
    const OFFSETS: [i64; 9] = [0, 120, -300, 330, -570, 840, -720, 1439, -1439];
    let suffix = rng.below(3);
    let offset = if suffix == 2 {
        OFFSETS[rng.below(OFFSETS.len())]
    } else {
        0
    };
    let local = instant::to_sql_text(t + offset * 60_000_000); // YYYY-MM-DD HH:MM:SS.ffffff
    let sep = if rng.below(2) == 0 { " " } else { "T" };
    let micros = t.rem_euclid(1_000_000);
    // How many fraction digits can say `micros`: 0 only without micros, 1 to 5 only if the
    // digits left out are zeros, 6 to 9 always (the extra ones are truncated).
    let digits: Vec<u32> = (0..=9)
        .filter(|&d| d >= 6 || micros % 10i64.pow(6 - d) == 0)
        .collect();
    let d = digits[rng.below(digits.len())] as usize;
    let mut fraction = String::new();
    if d > 0 {
        fraction.push('.');
        fraction.push_str(&local[20..20 + d.min(6)]);
        for _ in 6..d {
            fraction.push(char::from(b'0' + rng.below(10) as u8));
        }
    }
    let mut text = if d == 0 && suffix == 0 && local[17..19] == *"00" && rng.below(3) == 0 {
        format!("{}{sep}{}", &local[..10], &local[11..16])
    } else {
        format!("{}{sep}{}{fraction}", &local[..10], &local[11..19])
    };
    match suffix {
        0 => {}
        1 => text.push('Z'),
        _ => {
            let sign = if offset < 0 { '-' } else { '+' };
            let m = offset.abs();
            text.push_str(&format!("{sign}{:02}:{:02}", m / 60, m % 60));
        }
    }
    match rng.below(8) {
        0 => format!(" {text}"),
        1 => format!("{text}\t"),
        _ => text,
    }
}

// In memory.

/// The snapshot a store would read for a fixture (the same filters as the SQL).
fn snapshot_of(f: &Fixture, cfg: &Config, now: Instant) -> Snapshot {
    let mut referrers: Vec<i64> = f
        .users
        .iter()
        .filter(|u| u.invite_code.is_some())
        .map(|u| u.id)
        .collect();
    referrers.sort();
    let is_referrer = |id: i64| referrers.contains(&id);
    let from = now - cfg.rules.ip_window_days * DAY;
    let mut snap = Snapshot::default();
    for u in &f.users {
        if u.referred_by.is_some_and(is_referrer) {
            let sub = f
                .subs
                .iter()
                .find(|s| s.user_id == u.id)
                .map(|s| Subscription {
                    tier: s.tier.as_str().into(),
                    status: s.status.as_str().into(),
                    started_at: s.started_at,
                    expires_at: s.expires_at,
                });
            snap.referred.push(ReferredUser {
                id: u.id,
                referrer_id: u.referred_by.unwrap(),
                created_at: u.created_at,
                is_active: u.is_active,
                is_verified: u.is_verified,
                subscription: sub,
            });
        }
    }
    for e in &f.events {
        let (Some(user), Some(ip)) = (e.user_id, &e.ip_hash) else {
            continue;
        };
        if e.name == "user_registered" {
            snap.registrations.push((user, ip.clone()));
        }
        if is_referrer(user) && from <= e.created_at && e.created_at <= now {
            snap.referrer_events.push((user, ip.clone()));
        }
    }
    snap.referrers = referrers;
    snap
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    // Fisher-Yates with a fixed LCG: the permutation is part of the generated case.
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, (x >> 33) as usize % (i + 1));
    }
}

fn shuffled(f: &Fixture, seed: u64) -> Fixture {
    let mut g = f.clone();
    shuffle(&mut g.users, seed);
    shuffle(&mut g.subs, seed.rotate_left(7));
    shuffle(&mut g.events, seed.rotate_left(13));
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The engine's computation equals the naive model, whatever the config.
    #[test]
    fn compute_equals_the_model(c in case()) {
        let got = compute(&snapshot_of(&c.f, &c.cfg, c.now), &c.cfg, c.now).unwrap();
        prop_assert_eq!(got.results, model(&c.f, &c.cfg, c.now));
    }

    /// Every text [`time_text`] writes is read as its instant (so a database property that
    /// fails with these texts fails in the store, not in the generator).
    #[test]
    fn every_time_text_form_reads_as_its_instant(c in case(), seed in any::<u64>()) {
        let mut rng = Lcg(seed);
        for t in boundary_times(&c.cfg, c.now) {
            for _ in 0..8 {
                let text = time_text(t, &mut rng);
                prop_assert_eq!(instant::parse_sql_text(&text), Some(t), "{:?}", text);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The computation does not depend on the order rows arrive in.
    #[test]
    fn compute_is_order_independent(c in case(), seed in any::<u64>()) {
        let a = snapshot_of(&c.f, &c.cfg, c.now);
        let mut b = a.clone();
        shuffle(&mut b.referred, seed);
        shuffle(&mut b.registrations, seed.rotate_left(3));
        shuffle(&mut b.referrer_events, seed.rotate_left(5));
        let ca = compute(&a, &c.cfg, c.now).unwrap();
        let cb = compute(&b, &c.cfg, c.now).unwrap();
        prop_assert_eq!(&ca.results, &cb.results);
        prop_assert_eq!(&ca.referrals, &cb.referrals);
        // Every referrer has exactly one result and the counts add up.
        prop_assert_eq!(ca.results.len(), a.referrers.len());
        let w = &c.cfg.rewards;
        for r in &ca.results {
            let counted = r.qualified_referrals + r.disqualified_self_referral + r.disqualified_cooldown
                + r.disqualified_missing_ip + r.disqualified_shared_ip + r.disqualified_duplicate_ip;
            prop_assert!(counted <= r.referred_users_total);
            prop_assert_eq!(r.bonus_slots, (r.qualified_referrals / w.batch_size) * w.bonus_per_batch);
        }
    }
}

// Through the databases.

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A run on a store the test keeps open (connecting takes longer than a run here).
async fn run(
    store: &Store,
    cfg: &Config,
    scope: Scope,
    as_of: Instant,
    dry_run: bool,
) -> RunReport {
    engine::run(
        store,
        cfg,
        RunRequest {
            scope,
            as_of,
            dry_run,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{scope:?} at {as_of}, dry run {dry_run}: {e}"))
}

/// The plan's entries for referrers; any other entry must be a revocation to zeros.
fn referrer_results(plan: &Plan, f: &Fixture) -> Result<Vec<RewardResult>, TestCaseError> {
    let referrers: BTreeSet<i64> = f
        .users
        .iter()
        .filter(|u| u.invite_code.is_some())
        .map(|u| u.id)
        .collect();
    let mut out = Vec::new();
    for e in &plan.entries {
        if referrers.contains(&e.referrer_user_id()) {
            out.push(e.desired.clone());
        } else {
            prop_assert_eq!(&e.desired, &RewardResult::zero(e.referrer_user_id()));
        }
    }
    Ok(out)
}

/// `TestDb::outcome_state`: reward rows, and tier, status and bonus by user.
type OutcomeState = (
    Vec<Vec<Option<String>>>,
    BTreeMap<String, Vec<Option<String>>>,
);

/// What an apply on a fresh database must leave, by the model: a `referral_rewards` row for
/// each referrer whose result is not all zeros, and each subscription's bonus at its user's
/// bonus slots if a referrer, else 0; a referrer without subscription who earns slots gets one
/// as configured.
fn expected_state(f: &Fixture, cfg: &Config, now: Instant) -> OutcomeState {
    let results = model(f, cfg, now);
    let slots: BTreeMap<i64, i64> = results
        .iter()
        .map(|r| (r.referrer_user_id, r.bonus_slots))
        .collect();
    let rows = results
        .iter()
        .filter(|r| **r != RewardResult::zero(r.referrer_user_id))
        .map(|r| {
            let mut row: Vec<Option<String>> = [
                r.referrer_user_id,
                r.referred_users_total,
                r.qualified_referrals,
                r.disqualified_self_referral,
                r.disqualified_cooldown,
                r.disqualified_missing_ip,
                r.disqualified_shared_ip,
                r.disqualified_duplicate_ip,
                r.bonus_slots,
            ]
            .iter()
            .map(|v| Some(v.to_string()))
            .collect();
            row.push(r.badge.clone());
            row
        })
        .collect();
    let mut subs: BTreeMap<String, Vec<Option<String>>> = f
        .subs
        .iter()
        .map(|s| {
            let bonus = slots.get(&s.user_id).copied().unwrap_or(0);
            let row = vec![
                Some(s.tier.clone()),
                Some(s.status.clone()),
                Some(bonus.to_string()),
            ];
            (s.user_id.to_string(), row)
        })
        .collect();
    for (user, bonus) in slots {
        if bonus > 0 && !f.subs.iter().any(|s| s.user_id == user) {
            let n = &cfg.new_subscription;
            let row = vec![
                Some(n.tier.clone()),
                Some(n.status.clone()),
                Some(bonus.to_string()),
            ];
            subs.insert(user.to_string(), row);
        }
    }
    (rows, subs)
}

/// A database's [`OutcomeState`] with its reward rows by numeric id (PostgreSQL orders
/// `outcome_state`'s rows by the text its first column is cast to).
async fn outcome(db: &TestDb) -> OutcomeState {
    let (mut rows, subs) = db.outcome_state().await;
    rows.sort_by_key(|r| r[0].as_deref().unwrap().parse::<i64>().unwrap());
    (rows, subs)
}

/// Through a database: the full plan equals the model, and so does what the apply writes;
/// shuffled insertion order gives the same digest and state; a second apply writes nothing;
/// one-referrer runs equal the full run, for every user.
async fn database_properties(backend: Backend, c: Case, seed: u64) -> Result<(), TestCaseError> {
    let (Some(a), Some(b), Some(d)) = (
        TestDb::new(backend).await,
        TestDb::new(backend).await,
        TestDb::new(backend).await,
    ) else {
        return Ok(());
    };
    let (f, cfg, now) = (&c.f, &c.cfg, c.now);
    a.load(f).await;
    b.load(&shuffled(f, seed)).await;
    d.load(f).await;
    let (a_store, b_store, d_store) = (a.store().await, b.store().await, d.store().await);

    let full_plan = run(&a_store, cfg, Scope::Full, now, true).await.plan;
    prop_assert_eq!(referrer_results(&full_plan, f)?, model(f, cfg, now));
    // One-referrer dry runs against the untouched state equal the full plan's entries.
    for u in &f.users {
        let one = run(&a_store, cfg, Scope::Referrer(u.id), now, true)
            .await
            .plan;
        let want = full_plan
            .entries
            .iter()
            .find(|e| e.referrer_user_id() == u.id)
            .map(|e| e.desired.clone())
            .unwrap_or_else(|| RewardResult::zero(u.id));
        prop_assert_eq!(&one.entries[0].desired, &want, "user {}", u.id);
    }

    let ra = run(&a_store, cfg, Scope::Full, now, false).await;
    let rb = run(&b_store, cfg, Scope::Full, now, false).await;
    prop_assert_eq!(&ra.plan.digest, &rb.plan.digest);
    let state = outcome(&a).await;
    prop_assert_eq!(&state, &expected_state(f, cfg, now));
    prop_assert_eq!(&outcome(&b).await, &state);

    let before = a.state().await;
    let again = run(&a_store, cfg, Scope::Full, now, false)
        .await
        .applied
        .unwrap();
    prop_assert_eq!(
        (
            again.reward_rows_written,
            again.host_values_written,
            again.ledger_rows_written
        ),
        (0, 0, 0)
    );
    prop_assert_eq!(a.state().await, before);

    // Applying one referrer at a time reaches the full run's state.
    for u in &f.users {
        run(&d_store, cfg, Scope::Referrer(u.id), now, false).await;
    }
    prop_assert_eq!(outcome(&d).await, state);
    for store in [a_store, b_store, d_store] {
        store.close().await;
    }
    Ok(())
}

/// SQLite with every time in a randomly chosen accepted text form: the same snapshot as the
/// canonical text, and the same results as the model and as the canonical text (the full run,
/// each one-referrer run, every referral).
async fn sqlite_time_forms(c: Case, seed: u64) -> Result<(), TestCaseError> {
    let (Some(canonical), Some(forms)) = (
        TestDb::new(Backend::Sqlite).await,
        TestDb::new(Backend::Sqlite).await,
    ) else {
        return Err(TestCaseError::fail("SQLite is always available"));
    };
    let (f, cfg, now) = (&c.f, &c.cfg, c.now);
    canonical.load(f).await;
    let mut rng = Lcg(seed);
    forms
        .load_with(f, &mut |t| format!("'{}'", time_text(t, &mut rng)))
        .await;
    let (canonical_store, forms_store) = (canonical.store().await, forms.store().await);

    // What the store reads is the same, row for row.
    let window = (now - cfg.rules.ip_window_days * DAY, now);
    let (mut want, mut got) = (
        canonical_store
            .snapshot(Scope::Full, window, None)
            .await
            .unwrap(),
        forms_store
            .snapshot(Scope::Full, window, None)
            .await
            .unwrap(),
    );
    for s in [&mut want, &mut got] {
        s.referred.sort_by_key(|u| u.id);
        s.registrations.sort();
        s.referrer_events.sort();
    }
    prop_assert_eq!(&got.referrers, &want.referrers);
    prop_assert_eq!(&got.referred, &want.referred);
    prop_assert_eq!(&got.registrations, &want.registrations);
    prop_assert_eq!(&got.referrer_events, &want.referrer_events);

    let want = run(&canonical_store, cfg, Scope::Full, now, true).await;
    let got = run(&forms_store, cfg, Scope::Full, now, true).await;
    prop_assert_eq!(referrer_results(&got.plan, f)?, model(f, cfg, now));
    prop_assert_eq!(&got.plan.digest, &want.plan.digest);
    prop_assert_eq!(&got.computation.referrals, &want.computation.referrals);
    for u in &f.users {
        let one = run(&forms_store, cfg, Scope::Referrer(u.id), now, true).await;
        let full = want
            .plan
            .entries
            .iter()
            .find(|e| e.referrer_user_id() == u.id);
        prop_assert_eq!(
            &one.plan.entries[0].desired,
            &full.map_or_else(|| RewardResult::zero(u.id), |e| e.desired.clone()),
            "user {}",
            u.id
        );
    }
    canonical_store.close().await;
    forms_store.close().await;
    Ok(())
}

/// The statements that change a database holding `s1` (and what a run wrote: bonuses, and the
/// subscriptions of `subscribed`) into one holding `s2`, but for the bonus of subscriptions
/// kept, which the host leaves alone.
fn mutation_sql(db: &TestDb, s1: &Fixture, s2: &Fixture, subscribed: &BTreeSet<i64>) -> String {
    let mut sql = String::from("BEGIN;\n");
    for (old, u) in s1.users.iter().zip(&s2.users) {
        if (
            old.created_at,
            old.is_active,
            old.is_verified,
            &old.invite_code,
            old.referred_by,
        ) != (
            u.created_at,
            u.is_active,
            u.is_verified,
            &u.invite_code,
            u.referred_by,
        ) {
            sql.push_str(&format!(
                "UPDATE users SET created_at = {}, is_active = {}, is_verified = {}, \
                 invite_code = {}, referred_by_user_id = {} WHERE id = {};\n",
                db.ts(u.created_at),
                db.bool(u.is_active),
                db.bool(u.is_verified),
                lit(&u.invite_code),
                u.referred_by.map_or("NULL".into(), |r| r.to_string()),
                u.id
            ));
        }
    }
    for u in &s2.users {
        match (subscribed.contains(&u.id), s2.subs.iter().find(|s| s.user_id == u.id)) {
            (true, Some(s)) => sql.push_str(&format!(
                "UPDATE subscriptions SET tier = {}, status = {}, started_at = {}, expires_at = {} \
                 WHERE user_id = {};\n",
                lit(&Some(s.tier.clone())),
                lit(&Some(s.status.clone())),
                db.opt_ts(s.started_at),
                db.opt_ts(s.expires_at),
                u.id
            )),
            (false, Some(s)) => sql.push_str(&format!(
                "INSERT INTO subscriptions (user_id, tier, status, referral_bonus_domains, started_at, expires_at) \
                 VALUES ({}, {}, {}, {}, {}, {});\n",
                u.id,
                lit(&Some(s.tier.clone())),
                lit(&Some(s.status.clone())),
                s.bonus,
                db.opt_ts(s.started_at),
                db.opt_ts(s.expires_at)
            )),
            (true, None) => sql.push_str(&format!(
                "DELETE FROM subscriptions WHERE user_id = {};\n",
                u.id
            )),
            (false, None) => {}
        }
    }
    let ids: BTreeSet<i64> = s1.events.iter().chain(&s2.events).map(|e| e.id).collect();
    for id in ids {
        let old = s1.events.iter().find(|e| e.id == id);
        let new = s2.events.iter().find(|e| e.id == id);
        let values = |e: &E| {
            (
                e.user_id.map_or("NULL".into(), |u| u.to_string()),
                lit(&Some(e.name.clone())),
                lit(&e.ip_hash),
                db.ts(e.created_at),
            )
        };
        match (old, new) {
            (Some(o), Some(e)) if values(o) == values(e) => {}
            (Some(_), Some(e)) => {
                let (user, name, ip, t) = values(e);
                sql.push_str(&format!(
                    "UPDATE telemetry_events SET user_id = {user}, event_name = {name}, \
                     ip_hash = {ip}, created_at = {t} WHERE id = {id};\n"
                ));
            }
            (None, Some(e)) => {
                let (user, name, ip, t) = values(e);
                sql.push_str(&format!(
                    "INSERT INTO telemetry_events (id, user_id, event_name, ip_hash, created_at) \
                     VALUES ({id}, {user}, {name}, {ip}, {t});\n"
                ));
            }
            (Some(_), None) => {
                sql.push_str(&format!("DELETE FROM telemetry_events WHERE id = {id};\n"))
            }
            (None, None) => {}
        }
    }
    sql.push_str("COMMIT;\n");
    sql
}

/// The host rows as text, but for subscription ids and bonuses.
async fn host_rows(db: &TestDb) -> Vec<Vec<Option<String>>> {
    let mut rows = db
        .rows(
            "SELECT CAST(id AS TEXT), CAST(created_at AS TEXT), CAST(is_active AS TEXT), \
             CAST(is_verified AS TEXT), invite_code, CAST(referred_by_user_id AS TEXT) \
             FROM users ORDER BY id",
        )
        .await;
    rows.extend(
        db.rows(
            "SELECT CAST(user_id AS TEXT), tier, status, CAST(started_at AS TEXT), \
             CAST(expires_at AS TEXT) FROM subscriptions ORDER BY user_id",
        )
        .await,
    );
    rows.extend(
        db.rows(
            "SELECT CAST(id AS TEXT), CAST(user_id AS TEXT), event_name, ip_hash, \
             CAST(created_at AS TEXT) FROM telemetry_events ORDER BY id",
        )
        .await,
    );
    rows
}

/// A `referral_rewards` row of zeros without badge reads as no row (SPEC): drop such rows.
fn without_zero_rows(mut s: OutcomeState) -> OutcomeState {
    s.0.retain(|r| r[1..9].iter().any(|v| v.as_deref() != Some("0")) || r[9].is_some());
    s
}

/// Apply S1, change the rows to S2 in place, apply again: the same rewards and host bonuses as
/// a fresh apply of S2 (which are the model's).
async fn mutation_property(backend: Backend, c: Case, s2: Fixture) -> Result<(), TestCaseError> {
    let (Some(a), Some(b)) = (TestDb::new(backend).await, TestDb::new(backend).await) else {
        return Ok(());
    };
    let (cfg, now) = (&c.cfg, c.now);
    a.load(&c.f).await;
    let a_store = a.store().await;
    run(&a_store, cfg, Scope::Full, now, false).await;
    let subscribed: BTreeSet<i64> = a
        .rows("SELECT CAST(user_id AS TEXT) FROM subscriptions")
        .await
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect();
    a.exec(&mutation_sql(&a, &c.f, &s2, &subscribed)).await;
    b.load(&s2).await;
    let b_store = b.store().await;
    prop_assert_eq!(
        host_rows(&a).await,
        host_rows(&b).await,
        "the mutation made S2"
    );

    run(&a_store, cfg, Scope::Full, now, false).await;
    run(&b_store, cfg, Scope::Full, now, false).await;
    let fresh = outcome(&b).await;
    prop_assert_eq!(without_zero_rows(outcome(&a).await), fresh.clone());
    prop_assert_eq!(fresh, expected_state(&s2, cfg, now));
    a_store.close().await;
    b_store.close().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_model_order_rerun_and_one_referrer(c in case(), seed in any::<u64>()) {
        rt().block_on(database_properties(Backend::Sqlite, c, seed))?;
    }

    #[test]
    fn sqlite_time_text_in_every_accepted_form(c in case(), seed in any::<u64>()) {
        rt().block_on(sqlite_time_forms(c, seed))?;
    }

    #[test]
    fn sqlite_apply_mutate_apply_equals_fresh_apply((c, s2) in mutation()) {
        rt().block_on(mutation_property(Backend::Sqlite, c, s2))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn postgres_model_order_rerun_and_one_referrer(c in case(), seed in any::<u64>()) {
        rt().block_on(database_properties(Backend::PgTimestamptz, c, seed))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    #[test]
    fn postgres_apply_mutate_apply_equals_fresh_apply((c, s2) in mutation()) {
        rt().block_on(mutation_property(Backend::PgTimestamp, c, s2))?;
    }
}
