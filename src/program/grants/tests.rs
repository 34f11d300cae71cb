//! The grant programs' rules on plain data (no database): boundaries and policies.

use std::sync::Arc;

use super::plan::{self, ProgramPlan};
use super::rules::{Facts, Outcome, conversion, conversions, is_on_hold};
use super::*;
use crate::config::{Config, GrantProgramConfig, OnRefund};
use crate::instant::MICROS_PER_DAY;
use crate::snapshot::Scope;

const NOW: Instant = 1_800_000_000_000_000;

fn program(f: impl FnOnce(&mut GrantProgramConfig)) -> GrantProgramConfig {
    let text = "[[grants]]\nname = \"p\"\nreferrer = { credit_days = 45 }\nreferred = { credit_cents = 1000 }\n";
    let mut p = Config::parse(text).unwrap().grants.remove(0);
    f(&mut p);
    p
}

fn pay(id: i64, user: i64, cents: i64, at: Instant) -> Payment {
    Payment {
        id,
        user_id: user,
        amount_cents: cents,
        currency: Arc::from("USD"),
        status: Arc::from("succeeded"),
        created_at: at,
    }
}

fn referral(r: i64, u: i64) -> Referral {
    Referral {
        referrer_id: r,
        user_id: u,
        signed_up_at: NOW - 100 * MICROS_PER_DAY,
        referrer_exists: true,
    }
}

fn held(program: &str, r: i64, u: i64, party: Party, amount: Amount) -> LedgerGrant {
    LedgerGrant {
        program: Arc::from(program),
        referrer_id: r,
        user_id: u,
        party,
        credited_user_id: if party == Party::Referrer { r } else { u },
        amount,
        seq: 1,
        payment_id: None,
        reversed: false,
    }
}

fn decide(p: &GrantProgramConfig, snap: &GrantsSnapshot) -> ProgramPlan {
    ProgramPlan::build(
        p,
        &Config::default().rules,
        &Facts::new(snap, None),
        NOW,
        Scope::Full,
    )
}

fn outcomes(plan: &ProgramPlan) -> Vec<(i64, Outcome)> {
    plan.referrals
        .iter()
        .map(|d| (d.user_id, d.outcome))
        .collect()
}

#[test]
fn conversion_is_the_first_qualifying_payment_up_to_now() {
    let p = program(|p| {
        p.min_payment_cents = 1000;
        p.currency = Some("USD".into());
    });
    let mut eur = pay(1, 2, 5000, NOW - 10);
    eur.currency = Arc::from("usd");
    let mut refunded = pay(2, 2, 5000, NOW - 9);
    refunded.status = Arc::from("refunded");
    let small = pay(3, 2, 999, NOW - 8);
    let tie_high = pay(5, 2, 1000, NOW - 7);
    let tie_low = pay(4, 2, 1000, NOW - 7);
    let later = pay(6, 2, 1000, NOW + 1);
    let all = [eur, refunded, small, tie_high, tie_low.clone(), later];
    let c = conversion(&all, &p, NOW).unwrap();
    assert_eq!(
        (c.payment_id, c.at),
        (4, NOW - 7),
        "ties by id; the small one does not count"
    );
    // Exactly at now counts; one microsecond after does not.
    assert!(conversion(&[pay(7, 2, 1000, NOW)], &p, NOW).is_some());
    assert!(conversion(&[pay(7, 2, 1000, NOW + 1)], &p, NOW).is_none());
}

proptest::proptest! {
    /// The one-pass conversions of a run equal each user's [`conversion`], whatever the order
    /// of the payments (ties at one instant included).
    #[test]
    fn conversions_of_a_run_equal_each_users_conversion(
        rows in proptest::collection::vec((1i64..6, 0i64..4, 990i64..1010, 0u8..3), 0..40),
        rotate in 0usize..40,
    ) {
        let p = program(|p| p.min_payment_cents = 1000);
        let mut payments: Vec<Payment> = rows
            .iter()
            .enumerate()
            .map(|(i, &(user, at, cents, status))| {
                let mut x = pay(i as i64 + 1, user, cents, NOW - 2 + at);
                x.status = Arc::from(["succeeded", "refunded", "failed"][status as usize]);
                x
            })
            .collect();
        if !payments.is_empty() {
            let k = rotate % payments.len();
            payments.rotate_left(k);
        }
        // Users 1 to 4 at positions 3 to 0; user 5's payments are skipped.
        let users = crate::ids::IdIndex::new(&[4, 3, 2, 1]);
        let all = conversions(&payments, &p, NOW, &users);
        for user in 1..5 {
            let one = conversion(payments.iter().filter(|x| x.user_id == user), &p, NOW);
            proptest::prop_assert_eq!(all[4 - user as usize], one, "user {}", user);
        }
    }
}

#[test]
fn hold_ends_exactly_hold_days_after_conversion() {
    assert!(!is_on_hold(NOW - 14 * MICROS_PER_DAY, 14, NOW));
    assert!(is_on_hold(NOW - 14 * MICROS_PER_DAY + 1, 14, NOW));
    assert!(!is_on_hold(NOW, 0, NOW));
}

#[test]
fn keep_holds_grants_and_stops_new_ones_at_the_cap() {
    let p = program(|p| {
        p.max_rewarded_per_referrer = 2;
        p.fraud_checks = false;
    });
    let snap = GrantsSnapshot {
        referrals: vec![referral(1, 2), referral(1, 3), referral(1, 4)],
        // 4 converted first, but 2 holds a grant and has no conversion any more (refunded).
        payments: vec![pay(10, 4, 100, NOW - 30), pay(11, 3, 100, NOW - 20)],
        ledger: vec![held("p", 1, 2, Party::Referred, Amount::Cents(1000))],
        ..GrantsSnapshot::default()
    };
    let plan = decide(&p, &snap);
    assert_eq!(
        outcomes(&plan),
        [
            (2, Outcome::Granted),
            (3, Outcome::CapReached),
            (4, Outcome::Granted)
        ]
    );
    assert!(
        plan.referrals[0].changes.is_empty(),
        "grants are final, never made twice"
    );
    let four = &plan.referrals[2];
    assert_eq!(four.changes.len(), 2, "both parties");
    assert_eq!(four.position, Some(1));
}

#[test]
fn reverse_takes_back_a_refunded_grant_with_its_cause() {
    let p = program(|p| {
        p.on_refund = OnRefund::Reverse;
        p.fraud_checks = false;
    });
    let snap = GrantsSnapshot {
        referrals: vec![referral(1, 2)],
        ledger: vec![
            held("p", 1, 2, Party::Referrer, Amount::Days(45)),
            held("p", 1, 2, Party::Referred, Amount::Cents(1000)),
        ],
        ..GrantsSnapshot::default()
    };
    let plan = decide(&p, &snap);
    let d = &plan.referrals[0];
    assert_eq!(
        (d.outcome, d.cause),
        (Outcome::Reversed, Some(Outcome::NoConversion))
    );
    let amounts: Vec<(Party, Amount, bool)> = d
        .changes
        .iter()
        .map(|c| (c.party, c.amount, c.reversal))
        .collect();
    assert_eq!(
        amounts,
        [
            (Party::Referrer, Amount::Days(-45), true),
            (Party::Referred, Amount::Cents(-1000), true)
        ]
    );
    // After the reversal the next grant of that party gets the next sequence number.
    let mut snap2 = snap.clone();
    for g in &mut snap2.ledger {
        g.reversed = true;
    }
    snap2.payments = vec![pay(1, 2, 100, NOW - 1)];
    let again = decide(&p, &snap2);
    assert_eq!(again.referrals[0].outcome, Outcome::Granted);
    assert!(
        again.referrals[0]
            .changes
            .iter()
            .all(|c| c.seq == 2 && !c.reversal)
    );
}

#[test]
fn claims_follow_conversion_order_even_when_on_hold() {
    let p = program(|p| p.hold_days = 10);
    let snap = GrantsSnapshot {
        referrals: vec![referral(1, 2), referral(1, 3)],
        registrations: vec![(2, "ip".into()), (3, "ip".into())],
        // 3 converted first but is still on hold: it claims the IP all the same.
        payments: vec![
            pay(1, 3, 100, NOW - MICROS_PER_DAY),
            pay(2, 2, 100, NOW - 20 * MICROS_PER_DAY + 1),
        ],
        ..GrantsSnapshot::default()
    };
    let plan = decide(&p, &snap);
    // 2's payment is earlier (20 days ago) than 3's (1 day ago): 2 claims, 3 is a duplicate.
    assert_eq!(
        outcomes(&plan),
        [(2, Outcome::Granted), (3, Outcome::DuplicateIp)]
    );
    let snap = GrantsSnapshot {
        payments: vec![
            pay(1, 3, 100, NOW - 2 * MICROS_PER_DAY),
            pay(2, 2, 100, NOW - MICROS_PER_DAY),
        ],
        ..snap
    };
    let plan = decide(&p, &snap);
    assert_eq!(
        outcomes(&plan),
        [(2, Outcome::DuplicateIp), (3, Outcome::OnHold)]
    );
}

#[test]
fn self_referral_and_missing_referrer() {
    let mut snap = GrantsSnapshot {
        referrals: vec![
            referral(5, 5),
            Referral {
                referrer_exists: false,
                ..referral(9, 6)
            },
        ],
        registrations: vec![(5, "a".into()), (6, "b".into())],
        payments: vec![pay(1, 5, 100, NOW - 1), pay(2, 6, 100, NOW - 1)],
        ..GrantsSnapshot::default()
    };
    let checked = decide(&program(|_| {}), &snap);
    assert_eq!(
        outcomes(&checked),
        [(5, Outcome::SelfReferral), (6, Outcome::Granted)]
    );
    let six = &checked.referrals[1].changes;
    assert_eq!(six.len(), 1, "a missing referrer gets nothing");
    assert_eq!(
        (six[0].party, six[0].credited_user_id),
        (Party::Referred, 6)
    );
    let unchecked = decide(&program(|p| p.fraud_checks = false), &snap);
    let five = &unchecked.referrals[0];
    assert_eq!(five.outcome, Outcome::Granted);
    assert_eq!(five.changes.len(), 1, "granted once, as referred");
    assert_eq!(five.changes[0].party, Party::Referred);
    snap.registrations.clear();
    let missing = decide(&program(|_| {}), &snap);
    assert_eq!(missing.referrals[1].outcome, Outcome::MissingIp);
}

#[test]
fn credit_until_stacks_on_the_later_of_as_of_and_the_old_end() {
    let d = MICROS_PER_DAY;
    assert_eq!(credit_until(None, NOW, 0, 45), Some(NOW + 45 * d));
    assert_eq!(credit_until(Some(NOW - d), NOW, 0, 45), Some(NOW + 45 * d));
    assert_eq!(credit_until(Some(NOW + d), NOW, 0, 90), Some(NOW + 91 * d));
    assert_eq!(credit_until(None, NOW, 45, 0), None, "a NULL stays NULL");
    // Reversals first: the grant then starts from the as-of if the reversal went below it.
    assert_eq!(
        credit_until(Some(NOW + 10 * d), NOW, 45, 45),
        Some(NOW + 45 * d)
    );
    assert_eq!(
        credit_until(Some(NOW + 10 * d), NOW, 45, 0),
        Some(NOW - 35 * d)
    );
}

#[test]
fn without_grant_programs_the_digest_is_the_slots_digest() {
    assert_eq!(plan::digest("abc", &[]), "abc");
    let snap = GrantsSnapshot {
        referrals: vec![referral(1, 2)],
        payments: vec![pay(1, 2, 100, NOW - 1)],
        ..GrantsSnapshot::default()
    };
    let p = decide(&program(|_| {}), &snap);
    assert_ne!(plan::digest("abc", std::slice::from_ref(&p)), "abc");
}

/// A user at two positions (referred by two referrers: bad host data) has its conversion and
/// its signup IP at both, as a map by user id gave them.
#[test]
fn a_user_referred_twice_has_its_facts_at_both_positions() {
    let p = program(|p| p.fraud_checks = true);
    let snap = GrantsSnapshot {
        referrals: vec![referral(10, 5), referral(20, 5), referral(20, 6)],
        payments: vec![pay(1, 5, 5000, NOW - 10), pay(2, 6, 5000, NOW - 9)],
        registrations: vec![(5, "ip5".into()), (6, "ip6".into())],
        ..Default::default()
    };
    let plan = decide(&p, &snap);
    let got: Vec<(i64, i64, Outcome, Option<i64>)> = plan
        .referrals
        .iter()
        .map(|d| {
            (
                d.referrer_id,
                d.user_id,
                d.outcome,
                d.conversion.map(|c| c.payment_id),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (10, 5, Outcome::Granted, Some(1)),
            (20, 5, Outcome::Granted, Some(1)),
            (20, 6, Outcome::Granted, Some(2)),
        ]
    );
    // Without its signup IP, the first position would be missing_ip.
    let mut no_ip = snap.clone();
    no_ip.registrations.retain(|r| r.0 != 5);
    assert_eq!(
        outcomes(&decide(&p, &no_ip))[..2],
        [(5, Outcome::MissingIp), (5, Outcome::MissingIp)]
    );
}
