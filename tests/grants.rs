//! Grant programs (SPEC §7) end to end on SQLite and PostgreSQL (TIMESTAMP and TIMESTAMPTZ
//! schemas, sessions in far time zones, a case-insensitive collation on the host's text
//! columns), over real connections: every outcome and boundary of §7.3, the writes of §7.4
//! (the ledger, relative balances), idempotence, one-user and shard runs, exactly-once under
//! faults and races, and a property over random histories.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use referral_rewards::config::Config;
use referral_rewards::engine::{self, EngineError, Planned, Progress, RunReport, RunRequest};
use referral_rewards::instant::{self, Instant};
use referral_rewards::program::grants::Amount;
use referral_rewards::program::grants::rules::{Decided, Outcome as O};
use referral_rewards::snapshot::{Scope, Shard};
use referral_rewards::store::{ApplyOutcome, RunFinish, RunLock, Store, StoreError, Writes};

const HOUR: i64 = 3_600_000_000;

// Helpers.

fn config(toml: &str) -> Config {
    Config::parse(toml).unwrap_or_else(|e| panic!("{toml}\n{e}"))
}

/// A payment row.
#[derive(Debug, Clone)]
struct P {
    id: i64,
    user: i64,
    cents: i64,
    currency: String,
    status: String,
    at: Instant,
}

/// A succeeded USD payment.
fn p(id: i64, user: i64, cents: i64, at: Instant) -> P {
    P {
        id,
        user,
        cents,
        currency: "USD".into(),
        status: "succeeded".into(),
        at,
    }
}

async fn pay(db: &TestDb, ps: &[P]) {
    if ps.is_empty() {
        return;
    }
    let sql: String = ps
        .iter()
        .map(|p| {
            format!(
                "INSERT INTO payments (id, user_id, amount_cents, currency, status, created_at) \
                 VALUES ({}, {}, {}, {}, {}, {});\n",
                p.id,
                p.user,
                p.cents,
                lit(&Some(p.currency.clone())),
                lit(&Some(p.status.clone())),
                db.ts(p.at)
            )
        })
        .collect();
    db.exec(&sql).await;
}

async fn set_status(db: &TestDb, payment: i64, status: &str) {
    db.exec(&format!(
        "UPDATE payments SET status = '{status}' WHERE id = {payment}"
    ))
    .await;
}

/// A `user_registered` event with a signup IP, long before the IP window.
fn reg(user: i64, ip: &str) -> E {
    ev(
        10_000 + user,
        user,
        "user_registered",
        Some(ip),
        now() - 100 * DAY,
    )
}

fn referred(id: i64, by: i64) -> U {
    user(id, Some(by))
}

/// PostgreSQL's reference schema keeps `users.referred_by_user_id` a foreign key; SPEC §7.1
/// allows a referrer whose row is missing, so tests that need one drop it (SQLite's loads run
/// with foreign keys off).
async fn allow_missing_referrers(db: &TestDb) {
    if db.is_pg() {
        db.exec("ALTER TABLE users DROP CONSTRAINT users_referred_by_user_id_fkey")
            .await;
    }
}

/// One `referral_grants` row, without its run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    program: String,
    r: i64,
    u: i64,
    party: String,
    kind: String,
    seq: i64,
    credited: i64,
    days: Option<i64>,
    cents: Option<i64>,
    payment: Option<i64>,
}

#[allow(clippy::too_many_arguments)]
fn row(
    program: &str,
    r: i64,
    u: i64,
    party: &str,
    credited: i64,
    amount: Amount,
    seq: i64,
    payment: i64,
) -> Row {
    let (days, cents) = match amount {
        Amount::Days(d) => (Some(d), None),
        Amount::Cents(c) => (None, Some(c)),
    };
    Row {
        program: program.into(),
        r,
        u,
        party: party.into(),
        kind: "grant".into(),
        seq,
        credited,
        days,
        cents,
        payment: Some(payment),
    }
}

/// The reversal of a grant row: same key and sequence, negative amount.
fn reversal_of(g: &Row) -> Row {
    Row {
        kind: "reversal".into(),
        days: g.days.map(|d| -d),
        cents: g.cents.map(|c| -c),
        ..g.clone()
    }
}

fn int(s: &Option<String>) -> i64 {
    s.as_deref().unwrap().parse().unwrap()
}

fn opt_int(s: &Option<String>) -> Option<i64> {
    s.as_deref().map(|v| v.parse().unwrap())
}

/// The ledger in insertion order, each row with its run id.
async fn ledger_runs(db: &TestDb) -> Vec<(i64, Row)> {
    db.rows(
        "SELECT program, CAST(referrer_user_id AS TEXT), CAST(referred_user_id AS TEXT), party, kind, \
         CAST(grant_seq AS TEXT), CAST(credited_user_id AS TEXT), CAST(credit_days AS TEXT), \
         CAST(credit_cents AS TEXT), CAST(payment_id AS TEXT), CAST(run_id AS TEXT) \
         FROM referral_grants ORDER BY id",
    )
    .await
    .iter()
    .map(|c| {
        (
            int(&c[10]),
            Row {
                program: c[0].clone().unwrap(),
                r: int(&c[1]),
                u: int(&c[2]),
                party: c[3].clone().unwrap(),
                kind: c[4].clone().unwrap(),
                seq: int(&c[5]),
                credited: int(&c[6]),
                days: opt_int(&c[7]),
                cents: opt_int(&c[8]),
                payment: opt_int(&c[9]),
            },
        )
    })
    .collect()
}

async fn ledger(db: &TestDb) -> Vec<Row> {
    ledger_runs(db).await.into_iter().map(|(_, r)| r).collect()
}

fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort();
    rows
}

/// `users.credit_until` as an instant, read the same way on every schema.
fn until_expr(db: &TestDb) -> &'static str {
    match db.backend {
        Backend::Sqlite => "credit_until",
        Backend::PgTimestamp => "to_char(credit_until, 'YYYY-MM-DD HH24:MI:SS.US')",
        Backend::PgTimestamptz => {
            "to_char(credit_until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
        }
    }
}

/// Every user's `(credit_cents, credit_until)`.
async fn balances(db: &TestDb) -> BTreeMap<i64, (i64, Option<Instant>)> {
    db.rows(&format!(
        "SELECT CAST(id AS TEXT), CAST(credit_cents AS TEXT), {} FROM users ORDER BY id",
        until_expr(db)
    ))
    .await
    .iter()
    .map(|c| {
        let until = c[2]
            .as_deref()
            .map(|t| instant::parse_sql_text(t).unwrap_or_else(|| panic!("{t}")));
        (int(&c[0]), (int(&c[1]), until))
    })
    .collect()
}

async fn cents(db: &TestDb, user: i64) -> i64 {
    balances(db).await[&user].0
}

async fn set_balance(db: &TestDb, user: i64, cents: i64, until: Option<Instant>) {
    db.exec(&format!(
        "UPDATE users SET credit_cents = {cents}, credit_until = {} WHERE id = {user}",
        db.opt_ts(until)
    ))
    .await;
}

async fn apply(db: &TestDb, cfg: &Config, scope: Scope, as_of: Instant) -> RunReport {
    db.reconcile_with(cfg, scope, as_of, false)
        .await
        .unwrap_or_else(|e| panic!("{scope:?} at {as_of}: {e}"))
}

async fn dry(db: &TestDb, cfg: &Config, scope: Scope, as_of: Instant) -> RunReport {
    db.reconcile_with(cfg, scope, as_of, true)
        .await
        .unwrap_or_else(|e| panic!("dry {scope:?} at {as_of}: {e}"))
}

fn program<'a>(r: &'a RunReport, name: &str) -> &'a [Decided] {
    &r.grants
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no program {name}"))
        .referrals
}

fn decided<'a>(r: &'a RunReport, name: &str, u: i64) -> &'a Decided {
    program(r, name)
        .iter()
        .find(|d| d.user_id == u)
        .unwrap_or_else(|| panic!("{name}: no referral of user {u}"))
}

/// `U → (outcome, cause)` for R's referrals in one program.
fn outcomes(r: &RunReport, name: &str, referrer: i64) -> BTreeMap<i64, (O, Option<O>)> {
    program(r, name)
        .iter()
        .filter(|d| d.referrer_id == referrer)
        .map(|d| (d.user_id, (d.outcome, d.cause)))
        .collect()
}

fn expect(pairs: &[(i64, O)]) -> BTreeMap<i64, (O, Option<O>)> {
    pairs.iter().map(|&(u, o)| (u, (o, None))).collect()
}

async fn statuses(db: &TestDb) -> Vec<String> {
    db.rows("SELECT status FROM reward_runs ORDER BY id")
        .await
        .into_iter()
        .map(|r| r[0].clone().unwrap())
        .collect()
}

// 1. §7.3: the conversion.

const CONVERSION: &str = r#"
[[grants]]
name = "usd"
min_payment_cents = 1000
currency = "USD"
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_cents = 1000 }

[[grants]]
name = "any"
payment_statuses = ["succeeded", "paid"]
fraud_checks = false
referred = { credit_cents = 7 }
"#;

each_backend!(
    conversion_is_the_first_qualifying_payment_up_to_now,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(CONVERSION);
        let mut f = Fixture::default();
        f.users.push(user(1, None));
        for u in 2..=12 {
            f.users.push(referred(u, 1));
        }
        db.load(&f).await;
        pay(
            &db,
            &[
                // Exactly at now: counts.
                p(20, 2, 1000, n),
                // One microsecond after now: not yet.
                p(30, 3, 1000, n + 1),
                // A tie at one instant: the lower id; a later one does not count.
                p(41, 4, 1000, n - DAY),
                p(40, 4, 1000, n - DAY),
                p(39, 4, 1000, n - DAY + 1),
                // A small first payment, then a qualifying one: the qualifying one converts.
                // It ties with user 4's at one instant: in R's conversion order the lower
                // payment id (37) comes first, though user 5's id is the higher.
                p(50, 5, 500, n - 2 * DAY),
                p(37, 5, 1500, n - DAY),
                // Currency compared exactly.
                P {
                    currency: "usd".into(),
                    ..p(60, 6, 1000, n - DAY)
                },
                // Status compared exactly.
                P {
                    status: "Succeeded".into(),
                    ..p(70, 7, 1000, n - DAY)
                },
                // Statuses not in the program's list.
                P {
                    status: "pending".into(),
                    ..p(80, 8, 1000, n - 2 * DAY)
                },
                P {
                    status: "paid".into(),
                    ..p(81, 8, 1000, n - DAY)
                },
                // One cent below the minimum; exactly the minimum.
                p(90, 9, 999, n - DAY),
                p(100, 10, 1000, n - 3 * DAY),
                // 11 never paid; 12 was refunded.
                P {
                    status: "refunded".into(),
                    ..p(120, 12, 5000, n - DAY)
                },
            ],
        )
        .await;

        let r = apply(&db, &cfg, Scope::Full, n).await;
        use O::{Granted as G, NoConversion as NC};
        assert_eq!(
            outcomes(&r, "usd", 1),
            expect(&[
                (2, G),
                (3, NC),
                (4, G),
                (5, G),
                (6, NC),
                (7, NC),
                (8, NC),
                (9, NC),
                (10, G),
                (11, NC),
                (12, NC)
            ])
        );
        assert_eq!(
            outcomes(&r, "any", 1),
            expect(&[
                (2, G),
                (3, NC),
                (4, G),
                (5, G),
                (6, G),
                (7, NC),
                (8, G),
                (9, G),
                (10, G),
                (11, NC),
                (12, NC)
            ])
        );
        // The conversion payment, its time, and R's conversion order (time, then payment id).
        let conv = |name: &str, u: i64| {
            let d = decided(&r, name, u);
            (d.conversion.map(|c| (c.payment_id, c.at)), d.position)
        };
        assert_eq!(conv("usd", 2), (Some((20, n)), Some(4)));
        assert_eq!(conv("usd", 3), (None, None));
        assert_eq!(conv("usd", 4), (Some((40, n - DAY)), Some(3)));
        assert_eq!(conv("usd", 5), (Some((37, n - DAY)), Some(2)));
        assert_eq!(conv("usd", 10), (Some((100, n - 3 * DAY)), Some(1)));
        assert_eq!(conv("any", 5), (Some((50, n - 2 * DAY)), Some(2)));
        assert_eq!(conv("any", 6), (Some((60, n - DAY)), Some(4)));
        assert_eq!(conv("any", 8), (Some((81, n - DAY)), Some(5)));
        assert_eq!(conv("any", 9), (Some((90, n - DAY)), Some(6)));

        let mut want = vec![];
        for (u, pid) in [(2, 20), (4, 40), (5, 37), (10, 100)] {
            want.push(row("usd", 1, u, "referrer", 1, Amount::Cents(100), 1, pid));
            want.push(row("usd", 1, u, "referred", u, Amount::Cents(1000), 1, pid));
        }
        for (u, pid) in [
            (2, 20),
            (4, 40),
            (5, 50),
            (6, 60),
            (8, 81),
            (9, 90),
            (10, 100),
        ] {
            want.push(row("any", 1, u, "referred", u, Amount::Cents(7), 1, pid));
        }
        assert_eq!(sorted(ledger(&db).await), sorted(want.clone()));
        let a = r.applied.unwrap().grants;
        assert_eq!(
            (
                a.planned,
                a.grants_written,
                a.reversals_written,
                a.conflicts
            ),
            (15, 15, 0, 0)
        );

        // One microsecond later, user 3's payment is exactly at now: it converts.
        let r = apply(&db, &cfg, Scope::Full, n + 1).await;
        assert_eq!(decided(&r, "usd", 3).outcome, G);
        assert_eq!(decided(&r, "usd", 3).position, Some(5));
        want.push(row("usd", 1, 3, "referrer", 1, Amount::Cents(100), 1, 30));
        want.push(row("usd", 1, 3, "referred", 3, Amount::Cents(1000), 1, 30));
        want.push(row("any", 1, 3, "referred", 3, Amount::Cents(7), 1, 30));
        assert_eq!(sorted(ledger(&db).await), sorted(want));

        let all_cents: Vec<i64> = balances(&db).await.values().map(|b| b.0).collect();
        // Users 1..=12: R got 5 × 100; each granted U 1000 and/or 7.
        assert_eq!(
            all_cents,
            [500, 1007, 1007, 1007, 1007, 7, 0, 7, 7, 1007, 0, 0]
        );
        assert!(
            balances(&db).await.values().all(|b| b.1.is_none()),
            "no days program: credit_until untouched"
        );
    }
);

// 1. §7.3: the hold.

each_backend!(hold_days_boundary_is_exact, |db: TestDb| async move {
    let n = now();
    let cfg = config(
        r#"
[[grants]]
name = "held"
hold_days = 3
fraud_checks = false
referrer = { credit_cents = 10 }
referred = { credit_cents = 20 }
"#,
    );
    let mut f = Fixture::default();
    f.users.push(user(1, None));
    for u in 2..=4 {
        f.users.push(referred(u, 1));
    }
    db.load(&f).await;
    pay(
        &db,
        &[
            p(2, 2, 100, n - 3 * DAY),     // exactly now - hold_days: granted
            p(3, 3, 100, n - 3 * DAY + 1), // one microsecond later: on hold
            p(4, 4, 100, n),
        ],
    )
    .await;
    let r = apply(&db, &cfg, Scope::Full, n).await;
    assert_eq!(
        outcomes(&r, "held", 1),
        expect(&[(2, O::Granted), (3, O::OnHold), (4, O::OnHold)])
    );
    assert_eq!(
        sorted(ledger(&db).await),
        sorted(vec![
            row("held", 1, 2, "referrer", 1, Amount::Cents(10), 1, 2),
            row("held", 1, 2, "referred", 2, Amount::Cents(20), 1, 2),
        ])
    );
    // One microsecond later, user 3's conversion is exactly hold_days old.
    let r = apply(&db, &cfg, Scope::Full, n + 1).await;
    assert_eq!(
        outcomes(&r, "held", 1),
        expect(&[(2, O::Granted), (3, O::Granted), (4, O::OnHold)])
    );
    assert_eq!(ledger(&db).await.len(), 4);
    assert_eq!(
        (
            cents(&db, 1).await,
            cents(&db, 3).await,
            cents(&db, 4).await
        ),
        (20, 20, 0)
    );
});

// 1. §7.3: the cap, under `keep` and under `reverse`.

fn three_referrals() -> (Fixture, Vec<P>) {
    let n = now();
    let mut f = Fixture::default();
    f.users.push(user(1, None));
    for u in 2..=5 {
        f.users.push(referred(u, 1));
    }
    let pays = vec![
        p(2, 2, 100, n - 5 * DAY),
        p(3, 3, 100, n - 4 * DAY),
        p(4, 4, 100, n - 3 * DAY),
    ];
    (f, pays)
}

each_backend!(
    cap_with_keep_holds_grants_and_stops_new_ones,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(
            r#"
[[grants]]
name = "capped"
max_rewarded_per_referrer = 2
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_cents = 50 }
"#,
        );
        let (f, pays) = three_referrals();
        db.load(&f).await;
        pay(&db, &pays).await;
        let r = apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(
            outcomes(&r, "capped", 1),
            expect(&[
                (2, O::Granted),
                (3, O::Granted),
                (4, O::CapReached),
                (5, O::NoConversion)
            ])
        );
        let first = ledger(&db).await;
        assert_eq!(first.len(), 4);
        let b = balances(&db).await;

        // User 2's payment is refunded; user 5 converts before everyone else.
        set_status(&db, 2, "refunded").await;
        pay(&db, &[p(5, 5, 100, n - 6 * DAY)]).await;
        let r = apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(
            outcomes(&r, "capped", 1),
            expect(&[
                (2, O::Granted), // grants are final: held, though the state no longer converts
                (3, O::Granted),
                (4, O::CapReached),
                (5, O::CapReached) // the cap is reached by the held grants
            ])
        );
        assert_eq!(decided(&r, "capped", 2).conversion, None);
        assert_eq!(r.applied.unwrap().grants.planned, 0, "nothing written");
        assert_eq!(ledger(&db).await, first);
        assert_eq!(balances(&db).await, b);
        assert_eq!(
            (
                cents(&db, 1).await,
                cents(&db, 2).await,
                cents(&db, 3).await
            ),
            (200, 50, 50)
        );
    }
);

each_backend!(
    cap_with_reverse_follows_the_first_n,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(
            r#"
[[grants]]
name = "rev"
max_rewarded_per_referrer = 2
on_refund = "reverse"
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_cents = 50 }
"#,
        );
        let (f, pays) = three_referrals();
        db.load(&f).await;
        pay(&db, &pays).await;
        let g = |u: i64, seq: i64| {
            [
                row("rev", 1, u, "referrer", 1, Amount::Cents(100), seq, u),
                row("rev", 1, u, "referred", u, Amount::Cents(50), seq, u),
            ]
        };
        let r = apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(
            outcomes(&r, "rev", 1),
            expect(&[
                (2, O::Granted),
                (3, O::Granted),
                (4, O::CapReached),
                (5, O::NoConversion)
            ])
        );
        let mut want: Vec<Row> = [g(2, 1), g(3, 1)].concat();
        assert_eq!(sorted(ledger(&db).await), sorted(want.clone()));

        // A refund: 2 leaves the first two (cause no_conversion); 4 enters.
        set_status(&db, 2, "refunded").await;
        let before = ledger(&db).await.len();
        let r = apply(&db, &cfg, Scope::Full, n).await;
        let mut o = expect(&[(3, O::Granted), (4, O::Granted), (5, O::NoConversion)]);
        o.insert(2, (O::Reversed, Some(O::NoConversion)));
        assert_eq!(outcomes(&r, "rev", 1), o);
        let new: Vec<Row> = ledger(&db).await.split_off(before);
        let mut w = g(2, 1).iter().map(reversal_of).collect::<Vec<_>>();
        w.extend(g(4, 1));
        assert_eq!(sorted(new), sorted(w.clone()));
        want.extend(w);
        assert_eq!(
            (
                cents(&db, 1).await,
                cents(&db, 2).await,
                cents(&db, 4).await
            ),
            (200, 0, 50),
            "balances restored by the reversal"
        );

        // 5 converts first: 4 leaves the first two (cause cap_reached).
        pay(&db, &[p(5, 5, 100, n - 6 * DAY)]).await;
        let r = apply(&db, &cfg, Scope::Full, n).await;
        let mut o = expect(&[(2, O::NoConversion), (3, O::Granted), (5, O::Granted)]);
        o.insert(4, (O::Reversed, Some(O::CapReached)));
        assert_eq!(outcomes(&r, "rev", 1), o);
        want.extend(g(4, 1).iter().map(reversal_of));
        want.extend(g(5, 1));
        assert_eq!(sorted(ledger(&db).await), sorted(want.clone()));

        // The refund is undone: 2 is back among the first two with a second grant; 3 leaves.
        set_status(&db, 2, "succeeded").await;
        let r = apply(&db, &cfg, Scope::Full, n).await;
        let mut o = expect(&[(2, O::Granted), (5, O::Granted), (4, O::CapReached)]);
        o.insert(3, (O::Reversed, Some(O::CapReached)));
        assert_eq!(outcomes(&r, "rev", 1), o);
        want.extend(g(3, 1).iter().map(reversal_of));
        want.extend(g(2, 2));
        assert_eq!(sorted(ledger(&db).await), sorted(want.clone()));
        let b = balances(&db).await;
        assert_eq!(
            (1..=5).map(|u| b[&u].0).collect::<Vec<_>>(),
            [200, 50, 0, 0, 50]
        );

        // Unchanged state: nothing more.
        let r = apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(r.applied.unwrap().grants.planned, 0);
        assert_eq!(sorted(ledger(&db).await), sorted(want));
        assert_eq!(balances(&db).await, b);
    }
);

// 1. §7.3/§7.4: a refund under each policy.

each_backend!(
    refund_keeps_or_reverses_by_policy,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(
            r#"
[[grants]]
name = "kept"
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_cents = 50 }

[[grants]]
name = "taken_back"
on_refund = "reverse"
fraud_checks = false
referrer = { credit_cents = 1000 }
referred = { credit_cents = 500 }
"#,
        );
        let mut f = Fixture::default();
        f.users.push(user(1, None));
        f.users.push(referred(2, 1));
        db.load(&f).await;
        pay(&db, &[p(7, 2, 100, n - DAY)]).await;
        apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!((cents(&db, 1).await, cents(&db, 2).await), (1100, 550));
        let granted = ledger(&db).await;
        assert_eq!(granted.len(), 4);

        set_status(&db, 7, "refunded").await;
        let r = apply(&db, &cfg, Scope::Full, n + HOUR).await;
        let d = decided(&r, "kept", 2);
        assert_eq!((d.outcome, d.cause, d.changes.len()), (O::Granted, None, 0));
        let d = decided(&r, "taken_back", 2);
        assert_eq!(
            (d.outcome, d.cause, d.changes.len()),
            (O::Reversed, Some(O::NoConversion), 2)
        );
        let new = ledger(&db).await.split_off(4);
        let want: Vec<Row> = granted
            .iter()
            .filter(|g| g.program == "taken_back")
            .map(reversal_of)
            .collect();
        assert_eq!(sorted(new), sorted(want));
        assert_eq!(
            (cents(&db, 1).await, cents(&db, 2).await),
            (100, 50),
            "only the reversing program's grants are taken back"
        );

        // Reversed once: the next run has nothing to take back.
        let r = apply(&db, &cfg, Scope::Full, n + HOUR).await;
        assert_eq!(decided(&r, "taken_back", 2).outcome, O::NoConversion);
        assert_eq!(r.applied.unwrap().grants.planned, 0);
        assert_eq!(ledger(&db).await.len(), 6);
    }
);

// 1. §7.3/§7.4: self-referrals and a missing referrer.

each_backend!(
    self_referral_with_and_without_fraud_checks,
    |db: TestDb| async move {
        let n = now();
        let parties = "referrer = { credit_cents = 100 }\nreferred = { credit_cents = 10 }\n";
        let cfg = config(&format!(
            "[[grants]]\nname = \"checked\"\n{parties}\n\
         [[grants]]\nname = \"unchecked\"\nfraud_checks = false\n{parties}\n\
         [[grants]]\nname = \"referrer_only\"\nfraud_checks = false\nreferrer = {{ credit_cents = 100 }}\n"
        ));
        let mut f = Fixture::default();
        f.users.push(referred(5, 5)); // referred itself
        f.users.push(referred(6, 5));
        f.events.push(reg(5, "s5"));
        f.events.push(reg(6, "u6"));
        db.load(&f).await;
        pay(&db, &[p(50, 5, 100, n - DAY), p(60, 6, 100, n - DAY)]).await;

        let r = apply(&db, &cfg, Scope::Full, n).await;
        let d = decided(&r, "checked", 5);
        assert_eq!((d.outcome, d.changes.len()), (O::SelfReferral, 0));
        assert_eq!(decided(&r, "unchecked", 5).outcome, O::Granted);
        let self_rows: Vec<Row> = ledger(&db).await.into_iter().filter(|g| g.u == 5).collect();
        assert_eq!(
            self_rows,
            [row(
                "unchecked",
                5,
                5,
                "referred",
                5,
                Amount::Cents(10),
                1,
                50
            )],
            "granted once, as referred; nothing with fraud checks or with only a referrer grant"
        );
        // User 6 is an ordinary referral of 5 in each program.
        assert_eq!(ledger(&db).await.len(), 1 + 2 + 2 + 1);
        assert_eq!(
            (cents(&db, 5).await, cents(&db, 6).await),
            (10 + 100 + 100 + 100, 20)
        );
        let again = apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(again.applied.unwrap().grants.planned, 0);
    }
);

each_backend!(
    a_missing_referrer_row_grants_only_the_referred,
    |db: TestDb| async move {
        let n = now();
        allow_missing_referrers(&db).await;
        let cfg = config(
            r#"
[[grants]]
name = "both"
referrer = { credit_cents = 100 }
referred = { credit_cents = 10 }
"#,
        );
        let mut f = Fixture::default();
        f.users.push(referred(2, 999)); // no user 999
        f.users.push(referred(3, 999));
        f.events.push(reg(2, "u2"));
        f.events.push(reg(3, "u3"));
        db.load(&f).await;
        pay(&db, &[p(20, 2, 100, n - DAY)]).await;
        let r = apply(&db, &cfg, Scope::Full, n).await;
        let d = decided(&r, "both", 2);
        assert_eq!(
            (d.referrer_id, d.referrer_exists, d.outcome),
            (999, false, O::Granted)
        );
        assert_eq!(decided(&r, "both", 3).outcome, O::NoConversion);
        assert_eq!(
            ledger(&db).await,
            [row("both", 999, 2, "referred", 2, Amount::Cents(10), 1, 20)]
        );
        assert_eq!(cents(&db, 2).await, 10);
        assert_eq!(
            apply(&db, &cfg, Scope::Full, n)
                .await
                .applied
                .unwrap()
                .grants
                .planned,
            0
        );
    }
);

// 1. §7.4: paid access and cents add to what is there.

each_backend!(
    credit_days_stack_from_the_later_of_as_of_and_the_old_end,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(
            r#"
[[grants]]
name = "access"
fraud_checks = false
on_refund = "reverse"
referrer = { credit_days = 45 }
referred = { credit_days = 45 }
"#,
        );
        let mut f = Fixture::default();
        f.users.push(user(1, None));
        f.users.push(referred(2, 1));
        f.users.push(referred(3, 1));
        f.users.push(referred(4, 1));
        f.users.push(referred(21, 3));
        f.users.push(user(10, None));
        f.users.push(referred(11, 10));
        db.load(&f).await;
        set_balance(&db, 3, 0, Some(n - 10 * DAY)).await; // past
        set_balance(&db, 21, 0, Some(n)).await; // exactly the as-of
        set_balance(&db, 10, 0, Some(n + 5 * DAY)).await; // future
        set_balance(&db, 11, 0, Some(n + 1)).await;
        pay(
            &db,
            &[
                p(2, 2, 100, n - DAY),
                p(3, 3, 100, n - DAY),
                p(21, 21, 100, n - DAY),
                p(11, 11, 100, n - DAY),
            ],
        )
        .await;
        apply(&db, &cfg, Scope::Full, n).await;
        let b = balances(&db).await;
        let days = |u: i64| b[&u].1;
        // 1 is the referrer of two converted referrals: 90 days from the as-of (NULL before).
        assert_eq!(days(1), Some(n + 90 * DAY));
        assert_eq!(days(2), Some(n + 45 * DAY), "NULL: from the as-of");
        // 3 is referred (by 1) and referrer (of 21): two grants, from the as-of (its end was past).
        assert_eq!(days(3), Some(n + 90 * DAY));
        assert_eq!(days(21), Some(n + 45 * DAY));
        assert_eq!(days(10), Some(n + 50 * DAY), "future: from the old end");
        assert_eq!(days(11), Some(n + 1 + 45 * DAY));
        assert_eq!(days(4), None);
        assert!(b.values().all(|v| v.0 == 0), "no cents program");

        // 100 days later: 2 is refunded (reversed) and 4 converts, so 1 gets a reversal and a
        // grant in one run: the reversal first (n+90-45 = n+45, before the as-of), then the grant
        // from the as-of (the grant first would give n2). The host cleared 2's paid access: a
        // reversal leaves NULL as NULL. 11 is refunded: reversals alone subtract, whatever the
        // as-of.
        let n2 = n + 100 * DAY;
        set_status(&db, 2, "refunded").await;
        set_status(&db, 11, "refunded").await;
        set_balance(&db, 2, 0, None).await;
        pay(&db, &[p(4, 4, 100, n + 50 * DAY)]).await;
        let r = apply(&db, &cfg, Scope::Full, n2).await;
        assert_eq!(decided(&r, "access", 2).outcome, O::Reversed);
        let b = balances(&db).await;
        assert_eq!(b[&1].1, Some(n2 + 45 * DAY));
        assert_eq!(b[&2].1, None);
        assert_eq!(b[&4].1, Some(n2 + 45 * DAY));
        assert_eq!(b[&3].1, Some(n + 90 * DAY), "untouched");
        assert_eq!(b[&10].1, Some(n + 5 * DAY));
        assert_eq!(b[&11].1, Some(n + 1));
        let rows = ledger(&db).await;
        assert!(rows.contains(&reversal_of(&row(
            "access",
            1,
            2,
            "referrer",
            1,
            Amount::Days(45),
            1,
            2
        ))));
        assert!(rows.contains(&reversal_of(&row(
            "access",
            1,
            2,
            "referred",
            2,
            Amount::Days(45),
            1,
            2
        ))));
    }
);

// 1. §7.3: the fraud rules, in conversion order.

const FRAUD: &str = r#"
[[grants]]
name = "fraud"
hold_days = 3
referrer = { credit_cents = 100 }
referred = { credit_cents = 10 }

[[grants]]
name = "capped"
max_rewarded_per_referrer = 1
referrer = { credit_cents = 1000 }
referred = { credit_cents = 1 }
"#;

/// Referrer 1 with a referral for each fraud outcome; referrer 20 with claims over the cap.
fn fraud_fixture() -> (Fixture, Vec<P>) {
    let n = now();
    let mut f = Fixture::default();
    f.users.push(user(1, None));
    f.users.push(user(20, None));
    // R1's events: in the window at both ends, just outside at both ends, one uppercase twin.
    f.events.push(ev(1, 1, "login", Some("r-ip"), n - DAY));
    f.events.push(ev(2, 1, "login", Some("R-IP"), n - 2 * DAY));
    f.events
        .push(ev(3, 1, "page_view", Some("edge-in"), n - 30 * DAY));
    f.events
        .push(ev(4, 1, "login", Some("edge-out"), n - 30 * DAY - 1));
    f.events.push(ev(5, 1, "login", Some("future"), n + 1));
    let mut pays = vec![];
    let mut add = |f: &mut Fixture, u: i64, by: i64, ip: Option<&str>, paid: Option<Instant>| {
        f.users.push(referred(u, by));
        if let Some(ip) = ip {
            f.events.push(reg(u, ip));
        }
        if let Some(t) = paid {
            pays.push(p(100 + u, u, 100, t));
        }
    };
    add(&mut f, 2, 1, Some("r-ip"), Some(n - 10 * DAY)); // shared_ip
    add(&mut f, 3, 1, None, Some(n - 10 * DAY + 1)); // missing_ip
    add(&mut f, 4, 1, Some("  "), Some(n - 10 * DAY + 2)); // missing_ip (blank)
    add(&mut f, 5, 1, Some("edge-in"), Some(n - 9 * DAY)); // shared_ip
    add(&mut f, 6, 1, Some("edge-out"), Some(n - 9 * DAY + 1)); // granted
    add(&mut f, 7, 1, Some("future"), Some(n - 9 * DAY + 2)); // granted
    add(&mut f, 8, 1, Some("dup"), Some(n - 20 * DAY)); // duplicate of 9, who converted first
    add(&mut f, 9, 1, Some("dup"), Some(n - 25 * DAY)); // granted
    add(&mut f, 10, 1, Some("hold"), Some(n - DAY)); // on_hold, and claims "hold"
    add(&mut f, 11, 1, Some("hold"), Some(n - 12 * HOUR)); // duplicate_ip
    add(&mut f, 12, 1, Some("nopay"), None); // no_conversion: claims nothing
    add(&mut f, 13, 1, Some("nopay"), Some(n - 8 * DAY)); // granted
    add(&mut f, 14, 1, Some("DUP"), Some(n - 8 * DAY + 1)); // granted: "DUP" is not "dup"
    add(&mut f, 25, 1, Some("R-IP"), Some(n - 7 * DAY)); // shared_ip (the uppercase twin)
    add(&mut f, 26, 1, None, Some(n - 7 * DAY + 1)); // missing_ip: its event is misnamed
    f.events.push(ev(
        20_026,
        26,
        "User_Registered",
        Some("x26"),
        n - 100 * DAY,
    ));
    add(&mut f, 21, 20, Some("a"), Some(n - 5 * DAY)); // capped: granted
    add(&mut f, 22, 20, Some("b"), Some(n - 4 * DAY)); // capped: cap_reached, claims "b"
    add(&mut f, 23, 20, Some("b"), Some(n - 3 * DAY)); // duplicate_ip
    add(&mut f, 24, 20, Some("c"), Some(n - 2 * DAY)); // capped: cap_reached
    (f, pays)
}

each_backend!(
    fraud_claims_follow_the_conversion_order,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(FRAUD);
        let (f, pays) = fraud_fixture();
        db.load(&f).await;
        pay(&db, &pays).await;
        let r = apply(&db, &cfg, Scope::Full, n).await;
        use O::*;
        assert_eq!(
            outcomes(&r, "fraud", 1),
            expect(&[
                (2, SharedIp),
                (3, MissingIp),
                (4, MissingIp),
                (5, SharedIp),
                (6, Granted),
                (7, Granted),
                (8, DuplicateIp),
                (9, Granted),
                (10, OnHold),
                (11, DuplicateIp),
                (12, NoConversion),
                (13, Granted),
                (14, Granted),
                (25, SharedIp),
                (26, MissingIp),
            ])
        );
        assert_eq!(
            outcomes(&r, "capped", 20),
            expect(&[
                (21, Granted),
                (22, CapReached),
                (23, DuplicateIp),
                (24, CapReached)
            ])
        );
        assert_eq!(
            outcomes(&r, "fraud", 20),
            expect(&[
                (21, Granted),
                (22, Granted),
                (23, DuplicateIp),
                (24, OnHold)
            ])
        );
        // Capped for R1: the first eligible referral in conversion order, user 9.
        assert_eq!(
            program(&r, "capped")
                .iter()
                .filter(|d| d.referrer_id == 1 && d.outcome == Granted)
                .map(|d| d.user_id)
                .collect::<Vec<_>>(),
            [9]
        );
        let b = balances(&db).await;
        assert_eq!(b[&1].0, 5 * 100 + 1000);
        assert_eq!(b[&20].0, 2 * 100 + 1000);
        assert_eq!((b[&9].0, b[&21].0, b[&6].0, b[&8].0), (11, 11, 10, 0));
        assert_eq!(ledger(&db).await.len(), 2 * (5 + 2) + 2 * 2);
    }
);

// 2. A second run over unchanged state grants nothing.

each_backend!(
    a_second_run_over_unchanged_state_grants_nothing,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(&format!(
            "{FRAUD}\n[[grants]]\nname = \"days\"\non_refund = \"reverse\"\nfraud_checks = false\n\
         max_rewarded_per_referrer = 3\nreferrer = {{ credit_days = 30 }}\nreferred = {{ credit_days = 7 }}\n"
        ));
        let (f, pays) = fraud_fixture();
        db.load(&f).await;
        pay(&db, &pays).await;
        let first = apply(&db, &cfg, Scope::Full, n).await;
        assert!(first.applied.as_ref().unwrap().grants.grants_written > 0);
        let d1 = dry(&db, &cfg, Scope::Full, n).await.plan.digest;
        let (l1, b1, s1) = (ledger(&db).await, balances(&db).await, db.state().await);

        let second = apply(&db, &cfg, Scope::Full, n).await;
        let a = second.applied.unwrap();
        assert_eq!(
            a.grants,
            Default::default(),
            "no ledger row planned or written"
        );
        assert_eq!(second.plan.digest, d1, "the run did what the dry run said");
        assert!(
            second
                .grants
                .iter()
                .flat_map(|p| &p.referrals)
                .all(|d| d.changes.is_empty()),
            "no grant or reversal planned"
        );
        assert_eq!(ledger(&db).await, l1);
        assert_eq!(balances(&db).await, b1);
        assert_eq!(db.state().await, s1);
        assert_eq!(
            dry(&db, &cfg, Scope::Full, n).await.plan.digest,
            d1,
            "stable digest"
        );
        assert_eq!(statuses(&db).await, ["succeeded", "succeeded"]);
    }
);

// 3. One-user runs and shard runs.

const FAMILY: &str = r#"
[[grants]]
name = "capped"
max_rewarded_per_referrer = 2
hold_days = 1
referrer = { credit_days = 30 }
referred = { credit_days = 15 }

[[grants]]
name = "rev"
max_rewarded_per_referrer = 1
on_refund = "reverse"
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_cents = 10 }
"#;

/// Three generations under 1, a second root 7, a self-referral (9), a missing referrer (999):
/// loaded and applied at `now - 5 days`, then changed so that the run at `now` grants, holds,
/// caps and reverses (the keep program grants days only, the reverse program cents only, so
/// the balances do not depend on the order of the runs that write them).
async fn family(db: &TestDb) -> Config {
    let n = now();
    let cfg = config(FAMILY);
    allow_missing_referrers(db).await;
    let mut f = Fixture::default();
    f.users.push(user(1, None));
    f.users.push(user(7, None));
    for (u, by) in [
        (2, 1),
        (3, 1),
        (4, 1),
        (5, 1),
        (11, 1),
        (30, 3),
        (31, 3),
        (300, 30),
        (8, 7),
        (9, 9),
        (10, 999),
    ] {
        f.users.push(referred(u, by));
        let ip = match u {
            4 | 5 => Some("ip45".to_owned()),
            31 => None,
            _ => Some(format!("ip{u}")),
        };
        if let Some(ip) = ip {
            f.events.push(reg(u, &ip));
        }
    }
    db.load(&f).await;
    let pays: Vec<P> = [2, 3, 4, 5, 30, 31, 300, 8, 9, 10]
        .iter()
        .enumerate()
        .map(|(k, &u)| p(u, u, 100, n - (20 - k as i64) * DAY))
        .collect();
    pay(db, &pays).await;
    apply(db, &cfg, Scope::Full, n - 5 * DAY).await;
    assert!(!ledger(db).await.is_empty());

    set_status(db, 2, "refunded").await;
    pay(
        db,
        &[
            p(3101, 31, 100, n - 16 * DAY - HOUR), // before 30's: 30 leaves rev's first one
            p(11, 11, 100, n - 2 * HOUR),          // on hold in capped
        ],
    )
    .await;
    db.exec("UPDATE users SET referred_by_user_id = 1 WHERE id = 8")
        .await;
    cfg
}

const FAMILY_USERS: [i64; 13] = [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 30, 31, 300];

fn by_referral(mut v: Vec<Decided>) -> Vec<Decided> {
    v.sort_by_key(|d| (d.referrer_id, d.user_id));
    v
}

fn all_referrals(r: &RunReport) -> BTreeMap<String, Vec<Decided>> {
    r.grants
        .iter()
        .map(|p| (p.name.clone(), by_referral(p.referrals.clone())))
        .collect()
}

each_backend!(one_user_runs_equal_the_full_run, |db: TestDb| async move {
    let n = now();
    let cfg = family(&db).await;
    let full = dry(&db, &cfg, Scope::Full, n).await;
    let full = all_referrals(&full);
    // The run at `now` does make changes of every kind.
    let kinds: BTreeSet<O> = full.values().flatten().map(|d| d.outcome).collect();
    for o in [
        O::Granted,
        O::Reversed,
        O::CapReached,
        O::OnHold,
        O::DuplicateIp,
    ] {
        assert!(kinds.contains(&o), "{o:?} in {kinds:?}");
    }
    assert!(full.values().flatten().any(|d| !d.changes.is_empty()));

    // Decided as the full run decides, for the referrals in which X is R or U.
    for x in FAMILY_USERS {
        let one = dry(&db, &cfg, Scope::Referrer(x), n).await;
        for (name, decided) in all_referrals(&one) {
            let want: Vec<Decided> = full[&name]
                .iter()
                .filter(|d| d.referrer_id == x || d.user_id == x)
                .cloned()
                .collect();
            assert_eq!(decided, want, "program {name}, user {x}");
        }
    }

    // Applied one user at a time, each run writes only its referrals' rows, and together
    // they write what one full run writes (on a twin database).
    for x in FAMILY_USERS {
        let before = ledger(&db).await.len();
        let r = apply(&db, &cfg, Scope::Referrer(x), n).await;
        let new = ledger(&db).await.split_off(before);
        assert!(
            new.iter().all(|g| g.r == x || g.u == x),
            "user {x} wrote {new:?}"
        );
        assert_eq!(
            r.applied.unwrap().grants.grants_written,
            new.iter().filter(|g| g.kind == "grant").count() as u64
        );
    }
    let twin = TestDb::new(db.backend).await.expect("a second database");
    let twin_cfg = family(&twin).await;
    apply(&twin, &twin_cfg, Scope::Full, n).await;
    assert_eq!(sorted(ledger(&db).await), sorted(ledger(&twin).await));
    assert_eq!(balances(&db).await, balances(&twin).await);
    let rest = apply(&db, &cfg, Scope::Full, n).await;
    assert_eq!(
        rest.applied.unwrap().grants.planned,
        0,
        "nothing left for a full run"
    );
});

each_backend!(
    shard_runs_together_equal_the_full_run,
    |db: TestDb| async move {
        let n = now();
        let cfg = family(&db).await;
        let full = all_referrals(&dry(&db, &cfg, Scope::Full, n).await);
        let count = 3;
        let shards = (1..=count).map(|index| Scope::Shard(Shard { index, count }));
        let mut union: BTreeMap<String, Vec<Decided>> = BTreeMap::new();
        for s in shards.clone() {
            for (name, v) in all_referrals(&dry(&db, &cfg, s, n).await) {
                union.entry(name).or_default().extend(v);
            }
        }
        let union: BTreeMap<String, Vec<Decided>> = union
            .into_iter()
            .map(|(k, v)| (k, by_referral(v)))
            .collect();
        assert_eq!(union, full);

        for s in shards {
            let before = ledger(&db).await.len();
            apply(&db, &cfg, s, n).await;
            let Scope::Shard(shard) = s else {
                unreachable!()
            };
            assert!(
                ledger(&db).await[before..]
                    .iter()
                    .all(|g| shard.contains(g.r)),
                "a shard writes its referrers' referrals"
            );
        }
        let twin = TestDb::new(db.backend).await.expect("a second database");
        let twin_cfg = family(&twin).await;
        apply(&twin, &twin_cfg, Scope::Full, n).await;
        assert_eq!(sorted(ledger(&db).await), sorted(ledger(&twin).await));
        assert_eq!(balances(&db).await, balances(&twin).await);
        let rest = apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(rest.applied.unwrap().grants.planned, 0);
    }
);

// 4. Exactly once under faults.

const BOTH: &str = r#"
[[grants]]
name = "cents"
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_cents = 50 }

[[grants]]
name = "days"
fraud_checks = false
referrer = { credit_days = 30 }
referred = { credit_days = 14 }
"#;

/// R 1 with three converted referrals (2, 3, 4); users start with 500 cents.
async fn three_paid(db: &TestDb) {
    let n = now();
    let mut f = Fixture::default();
    f.users.push(user(1, None));
    for u in 2..=4 {
        f.users.push(referred(u, 1));
    }
    f.users.push(referred(5, 1));
    db.load(&f).await;
    db.exec("UPDATE users SET credit_cents = 500").await;
    pay(
        db,
        &[
            p(2, 2, 100, n - 3 * DAY),
            p(3, 3, 100, n - 2 * DAY),
            p(4, 4, 100, n - DAY),
        ],
    )
    .await;
}

fn three_paid_ledger() -> Vec<Row> {
    let mut want = vec![];
    for u in 2..=4 {
        want.push(row("cents", 1, u, "referrer", 1, Amount::Cents(100), 1, u));
        want.push(row("cents", 1, u, "referred", u, Amount::Cents(50), 1, u));
        want.push(row("days", 1, u, "referrer", 1, Amount::Days(30), 1, u));
        want.push(row("days", 1, u, "referred", u, Amount::Days(14), 1, u));
    }
    sorted(want)
}

/// Credited once, from 500 cents and no paid access.
async fn assert_credited_once(db: &TestDb) {
    let n = now();
    assert_eq!(sorted(ledger(db).await), three_paid_ledger());
    let b = balances(db).await;
    assert_eq!(b[&1], (800, Some(n + 90 * DAY)));
    for u in 2..=4 {
        assert_eq!(b[&u], (550, Some(n + 14 * DAY)), "user {u}");
    }
    assert_eq!(b[&5], (500, None));
}

each_backend!(
    a_failure_mid_apply_writes_no_grant,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(BOTH);
        three_paid(&db).await;
        let (l0, b0, s0) = (ledger(&db).await, balances(&db).await, db.state().await);
        // First on the ledger insert, then on the last balance write (credit_until, after the
        // ledger rows and the credit_cents update are in the transaction). Two trigger names: the
        // second admin connection's SQLite schema may still list a dropped one when it parses.
        let faults: [(&str, &str); 2] = if db.is_pg() {
            [
                (
                    "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN RAISE EXCEPTION 'injected fault'; END $$; \
                 CREATE TRIGGER fault_ledger BEFORE INSERT ON referral_grants FOR EACH ROW EXECUTE FUNCTION fault();",
                    "DROP TRIGGER fault_ledger ON referral_grants;",
                ),
                (
                    "CREATE TRIGGER fault_until BEFORE UPDATE OF credit_until ON users FOR EACH ROW EXECUTE FUNCTION fault();",
                    "DROP TRIGGER fault_until ON users;",
                ),
            ]
        } else {
            [
                (
                    "CREATE TRIGGER fault_ledger BEFORE INSERT ON referral_grants BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
                    "DROP TRIGGER fault_ledger;",
                ),
                (
                    "CREATE TRIGGER fault_until BEFORE UPDATE OF credit_until ON users BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
                    "DROP TRIGGER fault_until;",
                ),
            ]
        };
        for (k, (create, drop)) in faults.iter().enumerate() {
            db.exec(create).await;
            let e = db
                .reconcile_with(&cfg, Scope::Full, n, false)
                .await
                .unwrap_err();
            let EngineError::RunFailed { message, .. } = &e else {
                panic!("{e}")
            };
            assert!(message.contains("injected fault"), "{message}");
            assert_eq!(ledger(&db).await, l0, "fault {k}: no ledger row");
            assert_eq!(balances(&db).await, b0, "fault {k}: no balance change");
            assert_eq!(db.state().await, s0);
            db.exec(drop).await;
        }
        assert_eq!(statuses(&db).await, ["failed", "failed"]);
        let errors = db.rows("SELECT error FROM reward_runs ORDER BY id").await;
        assert!(
            errors
                .iter()
                .all(|e| e[0].as_deref().unwrap().contains("injected fault"))
        );

        apply(&db, &cfg, Scope::Full, n).await;
        assert_eq!(statuses(&db).await, ["failed", "failed", "succeeded"]);
        assert_credited_once(&db).await;
    }
);

/// Applies a computed plan under a lock the caller took, as `engine::run` would.
async fn apply_planned(
    store: &Store,
    lock: &mut RunLock,
    planned: &Planned,
    cfg: &Config,
    as_of: Instant,
    progress: Option<&Progress>,
) -> Result<ApplyOutcome, StoreError> {
    let run_id = store.start_run(Scope::Full, as_of, as_of, None).await?;
    let finish = RunFinish {
        stats: planned.plan.stats(),
        outcome_counts: engine::outcome_counts_json(&planned.computation),
        digest: planned.plan.digest.clone(),
        error: None,
        programs: engine::programs_json(&planned.grants),
    };
    let writes = Writes {
        plan: &planned.plan,
        grants: &planned.grants,
        run_id,
        as_of,
        new_subscription: &cfg.new_subscription,
        finish: &finish,
        progress,
    };
    store.apply(lock, &writes).await
}

fn full_at(as_of: Instant) -> RunRequest {
    RunRequest {
        scope: Scope::Full,
        as_of,
        dry_run: false,
    }
}

each_backend!(
    two_plans_from_one_snapshot_grant_once,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(BOTH);
        three_paid(&db).await;
        let store = db.store().await;
        let a = engine::plan(&store, &cfg, full_at(n), None).await.unwrap();
        let b = engine::plan(&store, &cfg, full_at(n), None).await.unwrap();
        let mut outs = vec![];
        for planned in [&a, &b] {
            let mut lock = store.try_lock(Scope::Full).await.unwrap().expect("lock");
            outs.push(
                apply_planned(&store, &mut lock, planned, &cfg, n, None)
                    .await
                    .unwrap(),
            );
            store.release(lock).await;
        }
        store.close().await;
        assert_eq!(
            (
                outs[0].grants.planned,
                outs[0].grants.grants_written,
                outs[0].grants.conflicts
            ),
            (12, 12, 0)
        );
        assert_eq!(
            (
                outs[1].grants.planned,
                outs[1].grants.grants_written,
                outs[1].grants.conflicts,
                outs[1].grants.balances_written
            ),
            (12, 0, 12, 0),
            "the second apply skips every row, with its balance change"
        );
        assert_credited_once(&db).await;
    }
);

/// Two stores on one PostgreSQL database, each under a shard lock of its own (the run lock
/// bypassed: shards 1/2 and 2/2 do not exclude each other).
async fn two_writers(db: &TestDb) -> ((Store, RunLock), (Store, RunLock)) {
    let mut out = vec![];
    for index in [1, 2] {
        let store = db.store().await;
        let lock = store
            .try_lock(Scope::Shard(Shard { index, count: 2 }))
            .await
            .unwrap()
            .expect("shard lock");
        out.push((store, lock));
    }
    let b = out.pop().unwrap();
    (out.pop().unwrap(), b)
}

fn spawn_apply(
    (store, mut lock): (Store, RunLock),
    planned: Planned,
    cfg: Config,
    as_of: Instant,
    progress: Option<Progress>,
) -> tokio::task::JoinHandle<Result<ApplyOutcome, StoreError>> {
    tokio::spawn(async move {
        let r = apply_planned(&store, &mut lock, &planned, &cfg, as_of, progress.as_ref()).await;
        store.release(lock).await;
        store.close().await;
        r
    })
}

/// Waits until a backend of this database waits on `wait_event` (a lock).
async fn until_waiting(db: &TestDb, wait_event: &str) {
    for _ in 0..600 {
        let waiting = db
            .scalar(&format!(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND wait_event = '{wait_event}'"
            ))
            .await;
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nobody waited on {wait_event}");
}

each_pg_backend!(racing_applies_grant_exactly_once, |db: TestDb| async move {
    let n = now();
    let cfg = config(BOTH);

    // A writes its ledger rows and is held before its commit; B inserts the same keys and
    // waits on A's transaction; A commits; B skips them all.
    three_paid(&db).await;
    let (wa, wb) = two_writers(&db).await;
    let a = engine::plan(&wa.0, &cfg, full_at(n), None).await.unwrap();
    let b = engine::plan(&wb.0, &cfg, full_at(n), None).await.unwrap();
    assert_eq!(a.plan.digest, b.plan.digest);
    // Run ids are the next identity values: the first run row written is A's.
    db.exec(
        "CREATE FUNCTION hold_a() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.run_id = (SELECT min(id) FROM reward_runs) THEN \
           PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242); \
         END IF; RETURN NULL; END $$; \
         CREATE TRIGGER hold_a AFTER INSERT ON referral_grants FOR EACH ROW EXECUTE FUNCTION hold_a();",
    )
    .await;
    let mut holder = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&db.url).await.unwrap()
    };
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    let ta = spawn_apply(wa, a, cfg.clone(), n, None);
    until_waiting(&db, "advisory").await;
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM referral_grants").await,
        0,
        "A's rows are not committed"
    );
    let tb = spawn_apply(wb, b, cfg.clone(), n, None);
    until_waiting(&db, "transactionid").await;
    sqlx::query("SELECT pg_advisory_unlock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    let (oa, ob) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
    assert_eq!((oa.grants.grants_written, oa.grants.conflicts), (12, 0));
    assert_eq!(
        (
            ob.grants.grants_written,
            ob.grants.conflicts,
            ob.grants.balances_written
        ),
        (0, 12, 0)
    );
    assert_credited_once(&db).await;
    assert_eq!(statuses(&db).await, ["succeeded", "succeeded"]);

    // A holds its transaction open before writing any grant; B writes and commits; A goes
    // on and skips every row B wrote.
    let db = TestDb::new(db.backend).await.unwrap();
    three_paid(&db).await;
    let (wa, wb) = two_writers(&db).await;
    let a = engine::plan(&wa.0, &cfg, full_at(n), None).await.unwrap();
    let b = engine::plan(&wb.0, &cfg, full_at(n), None).await.unwrap();
    let (hook, mut pause) = Pause::at("inside the write transaction", true);
    let ta = spawn_apply(wa, a, cfg.clone(), n, Some(hook));
    pause.reached().await;
    let ob = spawn_apply(wb, b, cfg.clone(), n, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((ob.grants.grants_written, ob.grants.conflicts), (12, 0));
    pause.resume();
    let oa = ta.await.unwrap().unwrap();
    assert_eq!(
        (
            oa.grants.grants_written,
            oa.grants.conflicts,
            oa.grants.balances_written
        ),
        (0, 12, 0)
    );
    assert_credited_once(&db).await;
});

// 4. A host write between snapshot and apply is kept.

each_backend!(
    a_host_write_between_snapshot_and_apply_is_kept,
    |db: TestDb| async move {
        let n = now();
        let cfg = config(BOTH);
        three_paid(&db).await;
        let (hook, mut pause) = Pause::at("writing", true);
        let run = spawn_run(db.url.clone(), db.opts(), cfg, full_at(n), Some(hook));
        pause.reached().await;
        // The plan is made; the host spends and tops up before the write.
        db.exec("UPDATE users SET credit_cents = credit_cents + 5")
            .await;
        db.exec(&format!(
            "UPDATE users SET credit_until = {} WHERE id = 2",
            db.ts(n + 10 * DAY)
        ))
        .await;
        pause.resume();
        let r = run.await.unwrap().unwrap();
        assert_eq!(r.applied.unwrap().grants.grants_written, 12);
        let b = balances(&db).await;
        assert_eq!(b[&1].0, 500 + 5 + 300);
        assert_eq!(b[&2], (500 + 5 + 50, Some(n + 10 * DAY + 14 * DAY)));
        assert_eq!(b[&3], (500 + 5 + 50, Some(n + 14 * DAY)));
        assert_eq!(b[&5], (505, None));
    }
);

// 5. A property: balances are what the ledger implies, whatever the history.

#[derive(Debug, Clone)]
struct PUser {
    referred_by: Option<i64>,
    signup_ip: Option<&'static str>,
    event_ip: Option<&'static str>,
    cents: i64,
    until_days: Option<i64>,
}

#[derive(Debug, Clone)]
struct Prog {
    cap: i64,
    reverse: bool,
    hold: i64,
    fraud: bool,
    /// 1: referrer only, 2: referred only, 3: both.
    parties: u8,
    usd_only: bool,
}

impl Prog {
    fn toml(&self, name: &str, days: bool) -> String {
        let unit = if days { "credit_days" } else { "credit_cents" };
        let (a, b) = if days { (30, 7) } else { (100, 10) };
        let mut s = format!(
            "[[grants]]\nname = \"{name}\"\nmin_payment_cents = 1000\nhold_days = {}\n\
             max_rewarded_per_referrer = {}\nfraud_checks = {}\non_refund = \"{}\"\n",
            self.hold,
            self.cap,
            self.fraud,
            if self.reverse { "reverse" } else { "keep" }
        );
        if self.usd_only {
            s.push_str("currency = \"USD\"\n");
        }
        if self.parties & 1 != 0 {
            s.push_str(&format!("referrer = {{ {unit} = {a} }}\n"));
        }
        if self.parties & 2 != 0 {
            s.push_str(&format!("referred = {{ {unit} = {b} }}\n"));
        }
        s
    }
}

#[derive(Debug, Clone)]
enum Change {
    Pay {
        user: i64,
        cents: i64,
        status: &'static str,
        usd: bool,
        hours_ago: i64,
    },
    /// The status of an earlier payment (by index, modulo their number).
    Status {
        pick: usize,
        status: &'static str,
    },
    Refer {
        user: i64,
        to: Option<i64>,
    },
}

#[derive(Debug, Clone)]
struct Case {
    users: Vec<PUser>,
    cents: Prog,
    days: Prog,
    /// Each state: hours the as-of advances, then the changes made before its run.
    states: Vec<(i64, Vec<Change>)>,
}

fn prog() -> impl Strategy<Value = Prog> {
    (
        0i64..=2,
        any::<bool>(),
        0i64..=1,
        any::<bool>(),
        1u8..=3,
        any::<bool>(),
    )
        .prop_map(|(cap, reverse, hold, fraud, parties, usd_only)| Prog {
            cap,
            reverse,
            hold,
            fraud,
            parties,
            usd_only,
        })
}

const IPS: &[&str] = &["a", "b", "c"];

fn case() -> impl Strategy<Value = Case> {
    (3i64..=6)
        .prop_flat_map(|n| {
            let ip = || prop_oneof![Just(None), prop::sample::select(IPS).prop_map(Some)];
            // n + 1 has no user row: a missing referrer.
            let referrer = prop_oneof![1 => Just(None), 5 => (1..=n + 1).prop_map(Some)];
            let user = (
                referrer.clone(),
                ip(),
                ip(),
                prop::sample::select(vec![0i64, 500]),
                prop_oneof![Just(None), (-5i64..=5).prop_map(Some)],
            )
                .prop_map(
                    |(referred_by, signup_ip, event_ip, cents, until_days)| PUser {
                        referred_by,
                        signup_ip,
                        event_ip,
                        cents,
                        until_days,
                    },
                );
            let change = prop_oneof![
                4 => (
                    1..=n,
                    prop::sample::select(vec![500i64, 1000, 2000]),
                    prop::sample::select(vec!["succeeded", "succeeded", "refunded", "pending"]),
                    prop::bool::weighted(0.8),
                    -24i64..=96
                )
                    .prop_map(|(user, cents, status, usd, hours_ago)| Change::Pay {
                        user,
                        cents,
                        status,
                        usd,
                        hours_ago
                    }),
                2 => (any::<usize>(), prop::sample::select(vec!["succeeded", "refunded"]))
                    .prop_map(|(pick, status)| Change::Status { pick, status }),
                1 => (1..=n, referrer).prop_map(|(user, to)| Change::Refer { user, to }),
            ];
            (
                prop::collection::vec(user, n as usize),
                prog(),
                prog(),
                prop::collection::vec((0i64..=60, prop::collection::vec(change, 0..=5)), 2..=4),
            )
        })
        .prop_map(|(users, cents, days, states)| Case {
            users,
            cents,
            days,
            states,
        })
}

/// §7.4 from the ledger alone: each user's cents are the start plus every row's cents (the
/// live grants' sum: a reversal cancels its grant); paid access replays the runs in order,
/// per run a user's reversals (`- days`, NULL stays NULL), then its grants one by one
/// (`max(as_of, coalesce(until, as_of)) + days`).
fn implied(
    start: &BTreeMap<i64, (i64, Option<Instant>)>,
    ledger: &[(i64, Row)],
    as_of: &BTreeMap<i64, Instant>,
) -> BTreeMap<i64, (i64, Option<Instant>)> {
    let mut out = start.clone();
    let mut runs: BTreeMap<i64, Vec<&Row>> = BTreeMap::new();
    for (run, r) in ledger {
        runs.entry(*run).or_default().push(r);
    }
    for (run, rows) in runs {
        let t = as_of[&run];
        for r in rows.iter().filter(|r| r.kind == "reversal") {
            let b = out.get_mut(&r.credited).expect("credited user exists");
            b.0 += r.cents.unwrap_or(0);
            if let Some(d) = r.days {
                b.1 = b.1.map(|u| u + d * DAY);
            }
        }
        for r in rows.iter().filter(|r| r.kind == "grant") {
            let b = out.get_mut(&r.credited).expect("credited user exists");
            b.0 += r.cents.unwrap_or(0);
            if let Some(d) = r.days {
                b.1 = Some(t.max(b.1.unwrap_or(t)) + d * DAY);
            }
        }
    }
    out
}

/// The ledger's own invariants: per (program, U, party) the grants are numbered 1, 2, … with
/// every one but the last reversed (at most one live), each reversal ending one grant with
/// its amount negated; a missing user is never credited.
fn check_ledger(
    ledger: &[(i64, Row)],
    users: &BTreeSet<i64>,
) -> Result<BTreeMap<i64, i64>, TestCaseError> {
    let mut by_key: BTreeMap<(String, i64, String), Vec<&Row>> = BTreeMap::new();
    for (_, r) in ledger {
        prop_assert!(
            users.contains(&r.credited),
            "credited a missing user: {r:?}"
        );
        by_key
            .entry((r.program.clone(), r.u, r.party.clone()))
            .or_default()
            .push(r);
    }
    let mut live_cents: BTreeMap<i64, i64> = BTreeMap::new();
    for (key, rows) in by_key {
        let grants: Vec<&&Row> = rows.iter().filter(|r| r.kind == "grant").collect();
        let reversals: Vec<&&Row> = rows.iter().filter(|r| r.kind == "reversal").collect();
        let seqs: Vec<i64> = grants.iter().map(|g| g.seq).collect();
        prop_assert_eq!(
            &seqs,
            &(1..=grants.len() as i64).collect::<Vec<_>>(),
            "{:?}",
            key
        );
        prop_assert!(
            reversals.len() == grants.len() || reversals.len() + 1 == grants.len(),
            "{:?}: {} grants, {} reversals",
            key,
            grants.len(),
            reversals.len()
        );
        for r in &reversals {
            let g = grants.iter().find(|g| g.seq == r.seq);
            prop_assert!(g.is_some(), "{key:?}: a reversal of no grant");
            // The reversal names the referral as it is now (U may have changed referrer).
            prop_assert_eq!(
                &Row {
                    r: r.r,
                    ..reversal_of(g.unwrap())
                },
                **r
            );
        }
        if grants.len() > reversals.len() {
            let live = grants.last().unwrap();
            prop_assert!(reversals.iter().all(|r| r.seq != live.seq));
            *live_cents.entry(live.credited).or_default() += live.cents.unwrap_or(0);
        }
    }
    Ok(live_cents)
}

async fn grant_property(backend: Backend, c: Case) -> Result<(), TestCaseError> {
    let Some(db) = TestDb::new(backend).await else {
        return Ok(());
    };
    allow_missing_referrers(&db).await;
    let cfg = config(&format!(
        "{}\n{}",
        c.cents.toml("cents", false),
        c.days.toml("days", true)
    ));
    let n0 = now();
    let mut f = Fixture::default();
    for (i, u) in c.users.iter().enumerate() {
        let id = i as i64 + 1;
        f.users.push(U {
            referred_by: u.referred_by,
            ..user(id, None)
        });
        if let Some(ip) = u.signup_ip {
            f.events.push(reg(id, ip));
        }
        if let Some(ip) = u.event_ip {
            f.events
                .push(ev(20_000 + id, id, "login", Some(ip), n0 - DAY));
        }
    }
    db.load(&f).await;
    let users: BTreeSet<i64> = (1..=c.users.len() as i64).collect();
    for (i, u) in c.users.iter().enumerate() {
        let until = u.until_days.map(|d| n0 + d * DAY);
        set_balance(&db, i as i64 + 1, u.cents, until).await;
    }
    let start = balances(&db).await;
    let store = db.store().await;
    let run = |scope, as_of, dry_run| {
        let (store, cfg) = (&store, &cfg);
        async move {
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
            .unwrap_or_else(|e| panic!("at {as_of}: {e}"))
        }
    };

    let mut as_of = n0;
    let mut as_ofs: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut payments: Vec<i64> = vec![];
    for (advance, changes) in &c.states {
        as_of += advance * HOUR;
        for ch in changes {
            match ch {
                Change::Pay {
                    user,
                    cents,
                    status,
                    usd,
                    hours_ago,
                } => {
                    let id = payments.len() as i64 + 1;
                    payments.push(id);
                    pay(
                        &db,
                        &[P {
                            currency: if *usd { "USD" } else { "usd" }.into(),
                            status: (*status).into(),
                            ..p(id, *user, *cents, as_of - hours_ago * HOUR)
                        }],
                    )
                    .await;
                }
                Change::Status { pick, status } => {
                    if !payments.is_empty() {
                        set_status(&db, payments[pick % payments.len()], status).await;
                    }
                }
                Change::Refer { user, to } => {
                    let to = to.map_or("NULL".into(), |t| t.to_string());
                    let sql =
                        format!("UPDATE users SET referred_by_user_id = {to} WHERE id = {user}");
                    if db.is_pg() {
                        db.exec(&sql).await;
                    } else {
                        db.exec(&format!(
                            "PRAGMA foreign_keys = OFF; {sql}; PRAGMA foreign_keys = ON;"
                        ))
                        .await;
                    }
                }
            }
        }
        let r = run(Scope::Full, as_of, false).await;
        as_ofs.insert(r.run_id.unwrap(), as_of);
        let l = ledger_runs(&db).await;
        let live = check_ledger(&l, &users)?;
        let now_balances = balances(&db).await;
        prop_assert_eq!(&now_balances, &implied(&start, &l, &as_ofs));
        for (u, (cents, _)) in &now_balances {
            prop_assert_eq!(
                *cents,
                start[u].0 + live.get(u).copied().unwrap_or(0),
                "user {}: the live grants' cents",
                u
            );
        }

        // Replaying the run changes nothing, and does what its dry run says.
        let digest = run(Scope::Full, as_of, true).await.plan.digest;
        let again = run(Scope::Full, as_of, false).await;
        prop_assert_eq!(again.applied.unwrap().grants, Default::default());
        prop_assert_eq!(again.plan.digest, digest);
        prop_assert_eq!(ledger_runs(&db).await, l);
        prop_assert_eq!(balances(&db).await, now_balances);
    }
    store.close().await;
    Ok(())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_balances_are_what_the_ledger_implies(c in case()) {
        rt().block_on(grant_property(Backend::Sqlite, c))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]

    #[test]
    fn postgres_timestamptz_balances_are_what_the_ledger_implies(c in case()) {
        rt().block_on(grant_property(Backend::PgTimestamptz, c))?;
    }

    #[test]
    fn postgres_timestamp_balances_are_what_the_ledger_implies(c in case()) {
        rt().block_on(grant_property(Backend::PgTimestamp, c))?;
    }
}

// 9. PostgreSQL reads the payments and the ledger on a second connection sharing the snapshot.

// The second connection imports the first one's snapshot: a payment committed after the
// snapshot was taken and before the second connection started reading is not seen. The real
// binary holds its second connection before the import (`REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE`)
// and says so in its log; the payment is committed then.
each_pg_backend!(
    the_second_connection_reads_the_snapshot_not_a_later_commit,
    |db: TestDb| async move {
        let n = now();
        let mut f = Fixture::default();
        f.users.push(user(1, None));
        f.users.push(referred(2, 1));
        db.load(&f).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "[[grants]]\nname = \"g\"\nfraud_checks = false\nreferred = { credit_cents = 500 }\n",
        )
        .unwrap();
        let report = dir.path().join("r.json");
        let run = |hold: Option<&std::path::Path>| {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_referral-rewards"));
            c.arg("--config")
                .arg(&config)
                .args([
                    "--database-url",
                    &db.url,
                    "reconcile",
                    "--dry-run",
                    "--as-of",
                ])
                .arg(instant::to_rfc3339(n))
                .arg("--report")
                .arg(&report)
                .arg("--per-referral")
                .env("RUST_LOG", "referral_rewards=info")
                .env_remove("REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            if let Some(h) = hold {
                c.env("REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE", h);
            }
            c.spawn().unwrap()
        };
        let outcome_of_2 = || -> String {
            let text = std::fs::read_to_string(dir.path().join("r.grants.json")).unwrap();
            let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            let row = rows
                .iter()
                .find(|r| r["referred_user_id"] == 2)
                .unwrap_or_else(|| panic!("no row of user 2 in {text}"));
            row["outcome"].as_str().unwrap().to_owned()
        };

        let hold = dir.path().join("hold");
        std::fs::write(&hold, "").unwrap();
        let mut child = run(Some(&hold));
        let reader = wait_for_test_hold(
            &mut child,
            Duration::from_secs(120),
            "the run reaches the hold of its second connection",
        );
        pay(&db, &[p(1, 2, 1000, n - HOUR)]).await;
        std::fs::remove_file(&hold).unwrap();
        let status = child.wait().unwrap();
        let log = reader.join().unwrap();
        assert!(status.success(), "{log}");
        assert_eq!(
            outcome_of_2(),
            "no_conversion",
            "the payment committed after the snapshot is not in it"
        );

        // The next run's snapshot has it.
        let status = run(None).wait().unwrap();
        assert!(status.success());
        assert_eq!(outcome_of_2(), "granted");
    }
);

// A server that refuses to export a snapshot (here `pg_export_snapshot` is shadowed by a function
// that raises feature_not_supported): the snapshot is read on one connection, with the same
// results.
each_pg_backend!(
    a_refused_snapshot_export_reads_on_one_connection,
    |db: TestDb| async move {
        let n = now();
        let cfg = family(&db).await;
        let read = engine::grants_read(&cfg);
        let window =
            referral_rewards::program::slots::rules::ip_window(n, cfg.rules.ip_window_days);
        let store = db.store().await;
        let two = store
            .snapshot(Scope::Full, window, read.clone())
            .await
            .unwrap();
        assert!(
            two.side_read,
            "a full run reads beside the first connection"
        );
        let one_user = store
            .snapshot(Scope::Referrer(1), window, read.clone())
            .await
            .unwrap();
        assert!(
            !one_user.side_read,
            "a one-user run reads on one connection"
        );
        store.close().await;
        let expected = dry(&db, &cfg, Scope::Full, n).await;

        db.exec(
            "CREATE FUNCTION public.pg_export_snapshot() RETURNS text LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'no snapshot export here' USING ERRCODE = '0A000'; END $$",
        )
        .await;
        db.exec(&format!(
            "ALTER DATABASE {} SET search_path = public, pg_catalog",
            db.pg_name().unwrap()
        ))
        .await;
        let store = db.store().await;
        let one = store
            .snapshot(Scope::Full, window, read.clone())
            .await
            .unwrap();
        assert!(!one.side_read, "the export was refused");
        let (a, b) = (two.grants.unwrap(), one.grants.unwrap());
        assert!(!a.payments.is_empty() && !a.ledger.is_empty());
        assert_eq!(a.payments, b.payments);
        assert_eq!(a.ledger, b.ledger);
        assert_eq!(a.referrals, b.referrals);
        store.close().await;
        let got = dry(&db, &cfg, Scope::Full, n).await;
        assert_eq!(got.plan.digest, expected.plan.digest);
        assert_eq!(all_referrals(&got), all_referrals(&expected));
    }
);

/// `explain` of the grant programs from both sides, as text and JSON: the conversion payment
/// and time, the hold's end and the place against the cap, with what would change each.
#[tokio::test]
async fn snapshots_of_explain_with_grant_programs() {
    use referral_rewards::explain;
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let n = now();
    let cfg = config(
        r#"
[[grants]]
name = "first_payment"
max_rewarded_per_referrer = 2
hold_days = 3
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_days = 30 }
"#,
    );
    let (mut f, mut pays) = three_referrals();
    f.users.push(referred(6, 1));
    pays.push(p(5, 5, 100, n - DAY));
    db.load(&f).await;
    pay(&db, &pays).await;
    let store = db.store().await;
    let r = explain::explain_referrer(&store, &cfg, 1, n, None)
        .await
        .unwrap();
    insta::assert_snapshot!(
        "explain_grants_referrer_1",
        explain::referrer_text(&r, &cfg)
    );
    let outcomes: Vec<(i64, &str)> = r.grant_programs[0]
        .referrals
        .iter()
        .map(|v| (v.referred_user_id, v.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (2, "granted"),
            (3, "granted"),
            (4, "cap_reached"),
            (5, "on_hold"),
            (6, "no_conversion")
        ]
    );
    for user in [2, 4, 5, 6] {
        let u = explain::explain_user(&store, &cfg, user, n).await.unwrap();
        insta::assert_snapshot!(
            format!("explain_grants_user_{user}"),
            explain::user_text(&u)
        );
        insta::assert_json_snapshot!(format!("explain_grants_user_{user}_json"), u);
    }
    let on_hold = explain::explain_user(&store, &cfg, 5, n).await.unwrap();
    assert_eq!(
        on_hold.grant_programs[0].referral.hold_ends_at,
        Some(referral_rewards::instant::to_rfc3339(n + 2 * DAY))
    );
    store.close().await;
}

/// `plan show` over two saved plans, as text and JSON: the first creates a subscription,
/// revokes two bonuses and makes grants; after it is applied, a referred user goes inactive
/// and a payment is refunded, so the second lowers a bonus and reverses grants. `reconcile
/// --dry-run --diff` prints the same diff as `plan show` of the plan it saves.
#[tokio::test]
async fn plan_show_groups_what_a_plan_changes() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let n = now();
    let toml = r#"
[[grants]]
name = "first_payment"
on_refund = "reverse"
fraud_checks = false
referrer = { credit_cents = 100 }
referred = { credit_days = 30 }
"#;
    let cfg = config(toml);
    db.load(&every_outcome()).await;
    pay(
        &db,
        &[p(2, 2, 500, n - 20 * DAY), p(3, 3, 500, n - 10 * DAY)],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let show = |plan: &std::path::Path, json: bool| {
        let mut args = vec!["plan", "show", plan.to_str().unwrap()];
        if json {
            args.extend(["--format", "json"]);
        }
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_referral-rewards"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let save = |r: &RunReport, name: &str| {
        let path = dir.path().join(name);
        let saved = referral_rewards::report::saved_plan(&r.plan, &r.grants, r.request.as_of);
        referral_rewards::report::save_plan(&saved, &path).unwrap();
        path
    };

    let first = dry(&db, &cfg, Scope::Full, n).await;
    let text = show(&save(&first, "first.json"), false);
    insta::assert_snapshot!("plan_show_first", text);
    let d = referral_rewards::diff::diff(&referral_rewards::report::saved_plan(
        &first.plan,
        &first.grants,
        n,
    ));
    let ids = |g: &[referral_rewards::diff::ReferrerDiff]| {
        g.iter().map(|r| r.referrer_user_id).collect::<Vec<_>>()
    };
    assert_eq!(ids(&d.new_subscriptions), [1]);
    assert_eq!(ids(&d.revoked), [30, 40]);
    assert_eq!(
        (d.totals.grants, d.totals.grant_cents, d.totals.grant_days),
        (4, 200, 60)
    );
    assert_eq!(d.totals.bonus_delta, first.stats.bonus_delta);

    apply(&db, &cfg, Scope::Full, n).await;
    // User 14 shares user 2's IP and qualifies in its place; user 16 leaves for good.
    db.exec("UPDATE users SET is_active = 0 WHERE id IN (2, 16)")
        .await;
    set_status(&db, 2, "refunded").await;
    let second = dry(&db, &cfg, Scope::Full, n).await;
    let path = save(&second, "second.json");
    insta::assert_snapshot!("plan_show_second", show(&path, false));
    insta::assert_snapshot!("plan_show_second_json", show(&path, true));
    let d = referral_rewards::diff::diff(&referral_rewards::report::load_plan(&path).unwrap());
    assert_eq!(ids(&d.down), [1]);
    assert_eq!((d.totals.reversals, d.totals.reversal_cents), (2, -100));
    assert_eq!(d.totals.changed, 1);

    // The same diff from a dry run, after its summary.
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, toml).unwrap();
    let plan_path = dir.path().join("third.json");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_referral-rewards"))
        .args([
            "--config",
            config_path.to_str().unwrap(),
            "--database-url",
            &db.url,
        ])
        .args(["reconcile", "--dry-run", "--diff", "--as-of"])
        .arg(referral_rewards::instant::to_rfc3339(n))
        .args(["--save-plan", plan_path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.ends_with(&show(&plan_path, false)), "{out}");
}
