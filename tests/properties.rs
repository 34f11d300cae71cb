//! Property tests over generated populations (proptest):
//! - shuffled insertion order gives identical results (in memory, and through the databases);
//! - a second apply at the same as-of writes no reward, ledger or host-column row;
//! - `reconcile --referrer R` equals the full run's row for R, for every R.

mod common;

use common::*;
use proptest::prelude::*;
use referral_rewards::compute::compute;
use referral_rewards::config::Config;
use referral_rewards::instant::Instant;
use referral_rewards::rewards::RewardResult;
use referral_rewards::snapshot::{ReferredUser, Scope, Snapshot, Subscription};

fn now() -> Instant {
    at("2026-11-01 12:00:00")
}

/// Times at and around every boundary the rules have.
fn time_near_boundaries() -> impl Strategy<Value = Instant> {
    prop::sample::select(vec![
        now(),
        now() + 1,
        now() - 1,
        now() - DAY,
        now() - 7 * DAY,
        now() - 7 * DAY + 1,
        now() - 30 * DAY,
        now() - 30 * DAY - 1,
        now() - 90 * DAY,
        now() - 200 * DAY,
    ])
}

fn ip() -> impl Strategy<Value = Option<String>> {
    prop::sample::select(vec![
        Some("a"),
        Some("b"),
        Some("B"),
        Some("c"),
        Some(" "),
        Some(""),
        Some("\u{3000}"),
        None,
    ])
    .prop_map(|s| s.map(str::to_owned))
}

prop_compose! {
    fn population()(n in 2i64..16)(
        n in Just(n),
        users in prop::collection::vec(
            (
                prop::bool::weighted(0.4),                   // referrer
                prop::option::weighted(0.8, 1i64..=16),     // referred by (may be self or unknown)
                time_near_boundaries(),
                prop::bool::weighted(0.9),
                prop::bool::weighted(0.9),
            ),
            n as usize,
        ),
        subs in prop::collection::vec(
            prop::option::weighted(0.8, (
                prop::sample::select(vec!["trader", "tycoon", "scout", "Trader"]),
                prop::sample::select(vec!["active", "past_due", "canceled"]),
                prop::sample::select(vec![0i64, 5, 10]),
                prop::option::weighted(0.85, time_near_boundaries()),
                prop::option::weighted(0.3, time_near_boundaries()),
            )),
            n as usize,
        ),
        events in prop::collection::vec(
            (1i64..=16, prop::bool::weighted(0.6), ip(), time_near_boundaries()),
            0..40,
        ),
    ) -> Fixture {
        let mut f = Fixture::default();
        for (i, (referrer, referred_by, created_at, active, verified)) in users.into_iter().enumerate() {
            let id = i as i64 + 1;
            f.users.push(U {
                id,
                created_at,
                is_active: active,
                is_verified: verified,
                invite_code: referrer.then(|| format!("C{id}")),
                referred_by: referred_by.filter(|r| *r <= n),
            });
        }
        for (i, s) in subs.into_iter().enumerate() {
            if let Some((tier, status, bonus, started_at, expires_at)) = s {
                f.subs.push(S {
                    user_id: i as i64 + 1,
                    tier: tier.into(),
                    status: status.into(),
                    bonus,
                    started_at,
                    expires_at,
                });
            }
        }
        for (k, (user, registration, ip, t)) in events.into_iter().enumerate() {
            f.events.push(E {
                id: k as i64 + 1,
                user_id: Some(user.min(n)),
                name: if registration { "user_registered" } else { "login" }.into(),
                ip_hash: ip,
                created_at: t,
            });
        }
        f
    }
}

/// The snapshot a store would read for a fixture (the same filters as the SQL).
fn snapshot_of(f: &Fixture) -> Snapshot {
    let referrers: Vec<i64> = f
        .users
        .iter()
        .filter(|u| u.invite_code.is_some())
        .map(|u| u.id)
        .collect();
    let is_referrer = |id: i64| referrers.contains(&id);
    let window = referral_rewards::rules::ip_window(now(), 30);
    let mut snap = Snapshot {
        referrers: {
            let mut r = referrers.clone();
            r.sort();
            r
        },
        ..Default::default()
    };
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
        if is_referrer(user) && window.0 <= e.created_at && e.created_at <= window.1 {
            snap.referrer_events.push((user, ip.clone()));
        }
    }
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

    /// The computation does not depend on the order rows arrive in.
    #[test]
    fn compute_is_order_independent(f in population(), seed in any::<u64>()) {
        let cfg = Config::default();
        let a = snapshot_of(&f);
        let mut b = a.clone();
        shuffle(&mut b.referred, seed);
        shuffle(&mut b.registrations, seed.rotate_left(3));
        shuffle(&mut b.referrer_events, seed.rotate_left(5));
        let (ca, cb) = (compute(&a, &cfg, now()).unwrap(), compute(&b, &cfg, now()).unwrap());
        prop_assert_eq!(&ca.results, &cb.results);
        prop_assert_eq!(&ca.referrals, &cb.referrals);
        // Every referrer has exactly one result and the counts add up.
        prop_assert_eq!(ca.results.len(), a.referrers.len());
        for r in &ca.results {
            let counted = r.qualified_referrals + r.disqualified_self_referral + r.disqualified_cooldown
                + r.disqualified_missing_ip + r.disqualified_shared_ip + r.disqualified_duplicate_ip;
            prop_assert!(counted <= r.referred_users_total);
            prop_assert_eq!(r.bonus_slots, (r.qualified_referrals / 3) * 5);
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Through a database: shuffled insertion order gives the same digest and state; a second
/// apply writes nothing; one-referrer runs equal the full run, for every user.
async fn database_properties(backend: Backend, f: Fixture, seed: u64) -> Result<(), TestCaseError> {
    let (Some(a), Some(b), Some(c)) = (
        TestDb::new(backend).await,
        TestDb::new(backend).await,
        TestDb::new(backend).await,
    ) else {
        return Ok(());
    };
    a.load(&f).await;
    b.load(&shuffled(&f, seed)).await;
    c.load(&f).await;

    // One-referrer dry runs against the untouched state equal the full plan's entries.
    let full_plan = a.reconcile(Scope::Full, now(), true).await.unwrap().plan;
    for u in &f.users {
        let one = a
            .reconcile(Scope::Referrer(u.id), now(), true)
            .await
            .unwrap()
            .plan;
        let want = full_plan
            .entries
            .iter()
            .find(|e| e.referrer_user_id() == u.id)
            .map(|e| e.desired.clone())
            .unwrap_or_else(|| RewardResult::zero(u.id));
        prop_assert_eq!(&one.entries[0].desired, &want, "user {}", u.id);
    }

    let ra = a.reconcile(Scope::Full, now(), false).await.unwrap();
    let rb = b.reconcile(Scope::Full, now(), false).await.unwrap();
    prop_assert_eq!(&ra.plan.digest, &rb.plan.digest);
    prop_assert_eq!(a.outcome_state().await, b.outcome_state().await);

    let before = a.state().await;
    let again = a
        .reconcile(Scope::Full, now(), false)
        .await
        .unwrap()
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
        c.reconcile(Scope::Referrer(u.id), now(), false)
            .await
            .unwrap();
    }
    prop_assert_eq!(c.outcome_state().await, a.outcome_state().await);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_order_rerun_and_one_referrer(f in population(), seed in any::<u64>()) {
        rt().block_on(database_properties(Backend::Sqlite, f, seed))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn postgres_order_rerun_and_one_referrer(f in population(), seed in any::<u64>()) {
        rt().block_on(database_properties(Backend::PgTimestamptz, f, seed))?;
    }
}
