//! docs/rules.md §7.3 and §7.4, in order: the conversion of a referred user, a referrer's
//! conversion order, the outcome of each referral, the desired set, and the grants and
//! reversals that follow. Pure: plain data in, decisions out.

use std::collections::HashMap;

use crate::config::{GrantProgramConfig, OnRefund, RulesConfig};
use crate::ids::IdIndex;
use crate::instant::{Instant, MICROS_PER_DAY};
use crate::program::fraud::{self, Claims, Verdict};

use crate::program::Fast;

use super::{Amount, GrantsSnapshot, LedgerGrant, Party, Payment, Referral};

/// The outcome of one referral in one program, in the order they apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    NoConversion,
    SelfReferral,
    MissingIp,
    SharedIp,
    DuplicateIp,
    OnHold,
    CapReached,
    Granted,
    /// A held grant this run takes back (`on_refund = "reverse"`); the cause is beside it.
    Reversed,
}

// `ALL` in declaration order (`ALL[i].index() == i`), checked when the crate compiles.
const _: () = {
    let mut i = 0;
    while i < Outcome::ALL.len() {
        assert!(Outcome::ALL[i] as usize == i);
        i += 1;
    }
};

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::NoConversion,
        Outcome::SelfReferral,
        Outcome::MissingIp,
        Outcome::SharedIp,
        Outcome::DuplicateIp,
        Outcome::OnHold,
        Outcome::CapReached,
        Outcome::Granted,
        Outcome::Reversed,
    ];

    /// The outcome's place in [`Outcome::ALL`] (counts are kept in arrays by outcome; the
    /// assertion above checks that `ALL` lists the outcomes in declaration order).
    pub const fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NoConversion => "no_conversion",
            Outcome::SelfReferral => "self_referral",
            Outcome::MissingIp => "missing_ip",
            Outcome::SharedIp => "shared_ip",
            Outcome::DuplicateIp => "duplicate_ip",
            Outcome::OnHold => "on_hold",
            Outcome::CapReached => "cap_reached",
            Outcome::Granted => "granted",
            Outcome::Reversed => "reversed",
        }
    }
}

/// U's conversion: the payment that counts and its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversion {
    pub payment_id: i64,
    pub at: Instant,
}

/// A live grant the ledger holds for a referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub party: Party,
    pub credited_user_id: i64,
    pub amount: Amount,
    pub seq: i64,
    pub payment_id: Option<i64>,
}

/// A ledger row this run makes: a grant (positive amount) or a reversal (negative amount, the
/// `seq` of the grant it ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantChange {
    pub party: Party,
    pub credited_user_id: i64,
    pub amount: Amount,
    pub seq: i64,
    pub payment_id: Option<i64>,
    pub reversal: bool,
}

/// One referral's decision in one program.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub referrer_id: i64,
    pub user_id: i64,
    pub signed_up_at: Instant,
    pub referrer_exists: bool,
    pub conversion: Option<Conversion>,
    /// Rank in R's conversion order, from 1; `None` without a conversion.
    pub position: Option<u32>,
    pub outcome: Outcome,
    /// For `reversed`: the outcome that caused it.
    pub cause: Option<Outcome>,
    pub held: Vec<Held>,
    pub changes: Vec<GrantChange>,
}

/// The facts every grant program reads, indexed once per run.
pub struct Facts<'a> {
    /// Each referral's position in `referrals` by its referred user's id.
    users: IdIndex,
    /// Each referral's signup IP, by its position in `referrals` (an array beside them rather
    /// than a map by id: a cache miss a lookup at a million referrals).
    signup_ips: Vec<Option<&'a str>>,
    referrer_ips: Fast<i64, fraud::IpSet<'a>>,
    payments: &'a [Payment],
    /// Program → U → its ledger grants, live or reversed.
    ledger: HashMap<&'a str, Fast<i64, Vec<&'a LedgerGrant>>>,
    /// The referrals by `(R, U)`.
    referrals: Vec<&'a Referral>,
}

impl<'a> Facts<'a> {
    /// `slots`: the slots program's part of the same snapshot, which holds the registrations
    /// and referrer events of the invite-code holders' referrals when
    /// [`GrantsSnapshot::fraud_from_slots`] says so.
    pub fn new(snap: &'a GrantsSnapshot, slots: Option<&'a crate::snapshot::Snapshot>) -> Self {
        let shared = slots.filter(|_| snap.fraud_from_slots);
        assert!(
            shared.is_some() || !snap.fraud_from_slots,
            "a grants snapshot that shares the slots part's reads needs that part"
        );
        let (registrations, referrer_events) = match shared {
            Some(s) => (&s.registrations[..], &s.referrer_events[..]),
            None => (&[][..], &[][..]),
        };
        let mut ledger: HashMap<&str, Fast<i64, Vec<&LedgerGrant>>> = HashMap::new();
        for g in &snap.ledger {
            ledger
                .entry(&*g.program)
                .or_default()
                .entry(g.user_id)
                .or_default()
                .push(g);
        }
        let mut referrals: Vec<&Referral> = snap.referrals.iter().collect();
        referrals.sort_unstable_by_key(|r| (r.referrer_id, r.user_id));
        let users = IdIndex::of(&referrals, |r| r.user_id);
        let signup_ips = fraud::signup_ips_at(
            &users,
            referrals.iter().map(|r| r.user_id),
            snap.registrations.iter().chain(registrations),
        );
        Facts {
            users,
            signup_ips,
            referrer_ips: fraud::referrer_ips_by_referrer(
                snap.referrer_events.iter().chain(referrer_events),
            ),
            payments: &snap.payments,
            ledger,
            referrals,
        }
    }
}

/// Whether a payment can be P's conversion: "`created_at <= now`, status in
/// `payment_statuses`, `amount_cents >= min_payment_cents` and, when `currency` is set, that
/// currency".
pub fn counts(p: &Payment, program: &GrantProgramConfig, now: Instant) -> bool {
    p.created_at <= now
        && p.amount_cents >= program.min_payment_cents
        && program.payment_statuses.iter().any(|s| **s == *p.status)
        && program
            .currency
            .as_deref()
            .is_none_or(|c| c == &*p.currency)
}

/// "U's conversion is U's earliest payment with `created_at <= now`, status in
/// `payment_statuses`, `amount_cents >= min_payment_cents` and, when `currency` is set, that
/// currency, by `created_at` then `id`." An earlier smaller payment does not use it up.
pub fn conversion<'p>(
    payments: impl IntoIterator<Item = &'p Payment>,
    program: &GrantProgramConfig,
    now: Instant,
) -> Option<Conversion> {
    payments
        .into_iter()
        .filter(|p| counts(p, program, now))
        .min_by_key(|p| (p.created_at, p.id))
        .map(|p| Conversion {
            payment_id: p.id,
            at: p.created_at,
        })
}

/// [`conversion`] of every user of `users` at once, by the position `users` gives it: one pass
/// over the payments, whatever their order. Other users' payments are skipped.
pub fn conversions(
    payments: &[Payment],
    program: &GrantProgramConfig,
    now: Instant,
    users: &IdIndex,
) -> Vec<Option<Conversion>> {
    let mut at: Vec<Option<Conversion>> = vec![None; users.len()];
    for p in payments.iter().filter(|p| counts(p, program, now)) {
        let Some(i) = users.get(p.user_id) else {
            continue;
        };
        let c = Conversion {
            payment_id: p.id,
            at: p.created_at,
        };
        if at[i].is_none_or(|best| (c.at, c.payment_id) < (best.at, best.payment_id)) {
            at[i] = Some(c);
        }
    }
    at
}

/// `on_hold`: "the conversion time is later than `now - hold_days`".
pub fn is_on_hold(converted_at: Instant, hold_days: i64, now: Instant) -> bool {
    converted_at > now - hold_days * MICROS_PER_DAY
}

/// Before the desired set: what the state says of a referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Natural {
    Out(Outcome),
    Eligible,
}

/// Decides every referral of every referrer in `facts` for one program.
pub fn decide(
    program: &GrantProgramConfig,
    rules: &RulesConfig,
    facts: &Facts<'_>,
    now: Instant,
) -> Vec<Decided> {
    let mut conversions = conversions(facts.payments, program, now, &facts.users);
    // A user at two positions (two referrers) has its conversion at both.
    facts
        .users
        .spread(facts.referrals.iter().map(|r| r.user_id), &mut conversions);
    // The program's part of the ledger, looked up once; the scratch space reused by referrer.
    let ledger = facts.ledger.get(program.name.as_str());
    let mut scratch = Scratch::default();
    let no_ips = fraud::IpSet::default();
    let mut claims = Claims::new(0, &no_ips, rules.require_ip_hash);
    let mut out = Vec::with_capacity(facts.referrals.len());
    let mut start = 0;
    while start < facts.referrals.len() {
        let r = facts.referrals[start].referrer_id;
        let end = start
            + facts.referrals[start..]
                .iter()
                .position(|x| x.referrer_id != r)
                .unwrap_or(facts.referrals.len() - start);
        let ips = facts.referrer_ips.get(&r).unwrap_or(&no_ips);
        claims.restart(r, ips);
        decide_referrer(
            program,
            &mut claims,
            ledger,
            &conversions[start..end],
            &facts.signup_ips[start..end],
            &facts.referrals[start..end],
            now,
            &mut scratch,
            &mut out,
        );
        start = end;
    }
    out
}

/// One program's ledger grants by U.
type Ledger<'a> = Fast<i64, Vec<&'a LedgerGrant>>;

/// [`decide_referrer`]'s working vectors, kept from one referrer to the next (one allocation
/// each per run rather than per referrer).
#[derive(Default)]
struct Scratch {
    conversions: Vec<Option<Conversion>>,
    order: Vec<usize>,
    natural: Vec<Natural>,
    position: Vec<Option<u32>>,
    held: Vec<Vec<Held>>,
    desired: Vec<bool>,
}

/// One referrer's referrals (sorted by U), decided together: the claims (started over for R)
/// and the cap are R's.
#[allow(clippy::too_many_arguments)] // the program, its facts, and the run's buffers
fn decide_referrer<'a>(
    program: &GrantProgramConfig,
    claims: &mut Claims<'_, 'a>,
    ledger: Option<&Ledger<'_>>,
    converted: &[Option<Conversion>],
    signup_ips: &[Option<&'a str>],
    referrals: &[&Referral],
    now: Instant,
    scratch: &mut Scratch,
    out: &mut Vec<Decided>,
) {
    let referrer = referrals[0].referrer_id;
    let Scratch {
        conversions,
        order,
        natural,
        position,
        held,
        desired,
    } = scratch;
    conversions.clear();
    conversions.extend_from_slice(converted);
    // R's conversion order: conversion time, then payment id, then U's id.
    order.clear();
    order.extend((0..referrals.len()).filter(|&i| conversions[i].is_some()));
    order.sort_unstable_by_key(|&i| {
        let c = conversions[i].expect("filtered");
        (c.at, c.payment_id, referrals[i].user_id)
    });

    natural.clear();
    natural.resize(referrals.len(), Natural::Out(Outcome::NoConversion));
    position.clear();
    position.resize(referrals.len(), None);
    for (rank, &i) in order.iter().enumerate() {
        position[i] = Some(rank as u32 + 1);
        let x = referrals[i];
        // The claims follow the conversion order, whatever the hold and the cap say later.
        let verdict = if program.fraud_checks {
            claims.judge(x.user_id, signup_ips[i], false)
        } else {
            Verdict::Pass
        };
        natural[i] = match verdict {
            Verdict::SelfReferral => Natural::Out(Outcome::SelfReferral),
            Verdict::MissingIp => Natural::Out(Outcome::MissingIp),
            Verdict::SharedIp => Natural::Out(Outcome::SharedIp),
            Verdict::DuplicateIp => Natural::Out(Outcome::DuplicateIp),
            Verdict::Held => unreachable!("grant programs have no rule of their own there"),
            Verdict::Pass => {
                let at = conversions[i].expect("ordered").at;
                if is_on_hold(at, program.hold_days, now) {
                    Natural::Out(Outcome::OnHold)
                } else {
                    Natural::Eligible
                }
            }
        };
    }

    held.clear();
    held.extend(referrals.iter().map(|x| live_grants(ledger, x.user_id)));
    desired_set(program, order, natural, held, desired);

    for (i, x) in referrals.iter().enumerate() {
        let holds = !held[i].is_empty();
        let cause = match natural[i] {
            Natural::Out(o) => o,
            Natural::Eligible => Outcome::CapReached,
        };
        let (outcome, cause, changes) = if desired[i] {
            let changes = if holds {
                vec![]
            } else {
                new_grants(program, ledger, x, conversions[i].expect("eligible"))
            };
            (Outcome::Granted, None, changes)
        } else if holds {
            // Under `keep` every holder is in the desired set; under `reverse` one that left it
            // is taken back, and reported with its cause.
            let reversals = held[i]
                .iter()
                .map(|h| GrantChange {
                    party: h.party,
                    credited_user_id: h.credited_user_id,
                    amount: h.amount.negated(),
                    seq: h.seq,
                    payment_id: h.payment_id,
                    reversal: true,
                })
                .collect();
            (Outcome::Reversed, Some(cause), reversals)
        } else {
            (cause, None, vec![])
        };
        out.push(Decided {
            referrer_id: referrer,
            user_id: x.user_id,
            signed_up_at: x.signed_up_at,
            referrer_exists: x.referrer_exists,
            conversion: conversions[i],
            position: position[i],
            outcome,
            cause,
            held: std::mem::take(&mut held[i]),
            changes,
        });
    }
}

/// R's desired set (whether each of its referrals is in it). `keep`: every referral that holds
/// a grant, plus the eligible ones without, in conversion order, while the set is smaller than
/// the cap. `reverse`: the first `cap` eligible referrals in conversion order. A cap of 0 is no
/// limit.
fn desired_set(
    program: &GrantProgramConfig,
    order: &[usize],
    natural: &[Natural],
    held: &[Vec<Held>],
    set: &mut Vec<bool>,
) {
    let cap = program.max_rewarded_per_referrer;
    let keep = matches!(program.on_refund, OnRefund::Keep);
    set.clear();
    set.resize(held.len(), false);
    let mut size = 0i64;
    if keep {
        // Holders first, whatever the cap: grants are final.
        for (i, h) in held.iter().enumerate() {
            if !h.is_empty() {
                set[i] = true;
                size += 1;
            }
        }
    }
    for &i in order {
        // Under `keep` a holder is in already; under `reverse` holding changes nothing.
        let wanted = natural[i] == Natural::Eligible && (!keep || held[i].is_empty());
        if wanted && (cap == 0 || size < cap) {
            set[i] = true;
            size += 1;
        }
    }
}

/// The live grants of `(program, U)`: a referral holds a grant when U does, in this program
/// (the ledger allows one live grant per program, U and party, whoever referred U).
fn live_grants(ledger: Option<&Ledger<'_>>, user_id: i64) -> Vec<Held> {
    let mut held: Vec<Held> = ledger
        .and_then(|l| l.get(&user_id))
        .into_iter()
        .flatten()
        .filter(|g| !g.reversed)
        .map(|g| Held {
            party: g.party,
            credited_user_id: g.credited_user_id,
            amount: g.amount,
            seq: g.seq,
            payment_id: g.payment_id,
        })
        .collect();
    held.sort_by_key(|h| h.party);
    held
}

/// The next sequence number of `(program, U, party)`: one more than any grant it ever had.
fn next_seq(ledger: Option<&Ledger<'_>>, user_id: i64, party: Party) -> i64 {
    ledger
        .and_then(|l| l.get(&user_id))
        .into_iter()
        .flatten()
        .filter(|g| g.party == party)
        .map(|g| g.seq)
        .max()
        .unwrap_or(0)
        + 1
}

/// "Each configured party (R as `referrer`, U as `referred`) gets a grant; a self-referral
/// without fraud checks is granted once, as `referred`; a missing R gets none."
fn new_grants(
    program: &GrantProgramConfig,
    ledger: Option<&Ledger<'_>>,
    x: &Referral,
    conversion: Conversion,
) -> Vec<GrantChange> {
    let self_referral = fraud::is_self_referral(x.user_id, x.referrer_id);
    let mut grants = Vec::new();
    let parties = [
        (
            Party::Referrer,
            &program.referrer,
            x.referrer_id,
            x.referrer_exists && !self_referral,
        ),
        (Party::Referred, &program.referred, x.user_id, true),
    ];
    for (party, grant, credited, allowed) in parties {
        let Some(amount) = grant.as_ref().and_then(Amount::from_config) else {
            continue;
        };
        if !allowed {
            continue;
        }
        grants.push(GrantChange {
            party,
            credited_user_id: credited,
            amount,
            seq: next_seq(ledger, x.user_id, party),
            payment_id: Some(conversion.payment_id),
            reversal: false,
        });
    }
    grants
}
