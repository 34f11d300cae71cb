//! The SQLite snapshot, read with rusqlite on a blocking thread.
//!
//! sqlx-sqlite hands every row from its worker thread to the async side (about 110k rows/s on
//! the referred-users query); a plain rusqlite loop decodes straight into the snapshot's
//! columns, borrowing text cells instead of allocating them. Same SQL files, same single read
//! transaction, a read-only connection. Writes stay on sqlx.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Row, named_params};

use super::StoreError;
use crate::instant::{self, Instant};
use crate::rewards::RewardResult;
use crate::rules;
use crate::snapshot::{Interner, ReferredUser, Scope, Snapshot, Stopwatch, Subscription};

fn sql_err(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::driver(what, &e)
}

use super::sqlite_time as time;

fn text<'r>(row: &'r Row<'_>, i: usize) -> rusqlite::Result<Option<&'r str>> {
    use rusqlite::types::ValueRef;
    match row.get_ref(i)? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(Some)
            .map_err(|e| rusqlite::Error::Utf8Error(i, e)),
        other => Err(rusqlite::Error::InvalidColumnType(
            i,
            format!("{other:?}"),
            rusqlite::types::Type::Text,
        )),
    }
}

/// Whether the database file opens and its schema reads, on a connection of its own (not the
/// pool's, which a loaded server may have in use): `database is locked` means busy, not down.
pub fn ping(path: &Path) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err("reaching the database"))?;
    conn.busy_timeout(Duration::from_millis(200))
        .map_err(sql_err("reaching the database"))?;
    conn.query_row("SELECT COUNT(*) FROM reward_runs WHERE 0", [], |_| Ok(()))
        .map_err(sql_err("reaching the database"))
}

/// One consistent read (a deferred transaction: every query sees the same committed state).
pub fn snapshot(
    path: &Path,
    busy_timeout: Duration,
    scope: Scope,
    window: (Instant, Instant),
) -> Result<Snapshot, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(sql_err("opening the database"))?;
    conn.busy_timeout(busy_timeout)
        .map_err(sql_err("opening the database"))?;
    conn.execute_batch("BEGIN")
        .map_err(sql_err("starting the snapshot"))?;
    let snap = read(&conn, scope, window)?;
    conn.execute_batch("COMMIT")
        .map_err(sql_err("ending the snapshot"))?;
    Ok(snap)
}

fn read(
    conn: &Connection,
    scope: Scope,
    window: (Instant, Instant),
) -> Result<Snapshot, StoreError> {
    let mut snap = Snapshot::default();
    let mut sw = Stopwatch::start();

    snap.referrers = match scope {
        Scope::Referrer(id) => {
            let mut st = conn
                .prepare(include_str!("../../sql/queries/sqlite/referrer_one.sql"))
                .map_err(sql_err("reading the referrer"))?;
            let r: Option<bool> = st
                .query_row(named_params! {"$1": id}, |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(sql_err("reading the referrer"))?;
            if r == Some(true) { vec![id] } else { vec![] }
        }
        Scope::Full | Scope::Shard(_) => {
            let mut st = conn
                .prepare(include_str!("../../sql/queries/sqlite/referrers.sql"))
                .map_err(sql_err("reading referrers"))?;
            let ids = st
                .query_map([], |r| r.get::<_, i64>(0))
                .map_err(sql_err("reading referrers"))?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(sql_err("reading referrers"))?;
            ids.into_iter().filter(|id| scope.covers(*id)).collect()
        }
    };
    sw.lap(&mut snap.timings, "referrers", snap.referrers.len());

    if !snap.referrers.is_empty() {
        // Each query in its three variants; a shard's referrers go in as a JSON array.
        let ids = serde_json::to_string(&snap.referrers).expect("integers");
        let pick = |full: &'static str, one: &'static str, shard: &'static str| match scope {
            Scope::Full => full,
            Scope::Referrer(_) => one,
            Scope::Shard(_) => shard,
        };
        let key = match scope {
            Scope::Referrer(id) => rusqlite::types::Value::Integer(id),
            _ => rusqlite::types::Value::Text(ids),
        };

        let sql = pick(
            include_str!("../../sql/queries/sqlite/referred.sql"),
            include_str!("../../sql/queries/sqlite/referred_one.sql"),
            include_str!("../../sql/queries/sqlite/referred_shard.sql"),
        );
        let mut st = conn
            .prepare(sql)
            .map_err(sql_err("reading referred users"))?;
        let mut rows = if matches!(scope, Scope::Full) {
            st.query([])
        } else {
            st.query(named_params! {"$1": key})
        }
        .map_err(sql_err("reading referred users"))?;
        let mut interner = Interner::default();
        while let Some(r) = rows.next().map_err(sql_err("reading referred users"))? {
            snap.referred.push(referred_user(r, &mut interner)?);
        }
        drop(rows);
        drop(st);
        sw.lap(&mut snap.timings, "referred_users", snap.referred.len());

        let sql = pick(
            include_str!("../../sql/queries/sqlite/registrations.sql"),
            include_str!("../../sql/queries/sqlite/registrations_one.sql"),
            include_str!("../../sql/queries/sqlite/registrations_shard.sql"),
        );
        let mut st = conn
            .prepare(sql)
            .map_err(sql_err("reading registration events"))?;
        let mut rows = if matches!(scope, Scope::Full) {
            st.query([])
        } else {
            st.query(named_params! {"$1": key})
        }
        .map_err(sql_err("reading registration events"))?;
        while let Some(r) = rows
            .next()
            .map_err(sql_err("reading registration events"))?
        {
            let user: i64 = r.get(0).map_err(sql_err("reading registration events"))?;
            let ip = text(r, 1).map_err(sql_err("reading registration events"))?;
            if let Some(ip) = ip {
                snap.registrations.push((user, ip.to_owned()));
            }
        }
        drop(rows);
        drop(st);
        sw.lap(&mut snap.timings, "registrations", snap.registrations.len());

        // Whole dates around the window as text, a day wider on each side for offsets up to
        // ±24 h; the exact bounds are checked on the parsed instants.
        let lo = instant::date_text(window.0 - instant::MICROS_PER_DAY);
        let hi = instant::date_text(window.1 + 2 * instant::MICROS_PER_DAY);
        let sql = pick(
            include_str!("../../sql/queries/sqlite/referrer_events.sql"),
            include_str!("../../sql/queries/sqlite/referrer_events_one.sql"),
            include_str!("../../sql/queries/sqlite/referrer_events_shard.sql"),
        );
        let mut st = conn
            .prepare(sql)
            .map_err(sql_err("reading referrer events"))?;
        let mut rows = if matches!(scope, Scope::Full) {
            st.query(named_params! {"$1": lo, "$2": hi})
        } else {
            st.query(named_params! {"$1": lo, "$2": hi, "$3": key})
        }
        .map_err(sql_err("reading referrer events"))?;
        let mut seen: HashSet<(i64, String)> = HashSet::new();
        while let Some(r) = rows.next().map_err(sql_err("reading referrer events"))? {
            let user: i64 = r.get(0).map_err(sql_err("reading referrer events"))?;
            let ip = text(r, 1)
                .map_err(sql_err("reading referrer events"))?
                .unwrap_or_default();
            let at = text(r, 2)
                .map_err(sql_err("reading referrer events"))?
                .unwrap_or_default();
            let at = time("telemetry_events", "created_at", user, at)?;
            if rules::in_ip_window(at, window) && seen.insert((user, ip.to_owned())) {
                snap.referrer_events.push((user, ip.to_owned()));
            }
        }
        drop(rows);
        drop(st);
        sw.lap(
            &mut snap.timings,
            "referrer_events",
            snap.referrer_events.len(),
        );
    }

    // The current state: a shard reads all of it and keeps its own users'.
    let (sql, one) = match scope {
        Scope::Referrer(id) => (
            include_str!("../../sql/queries/sqlite/stored_rewards_one.sql"),
            Some(id),
        ),
        _ => (
            include_str!("../../sql/queries/sqlite/stored_rewards.sql"),
            None,
        ),
    };
    let mut st = conn
        .prepare(sql)
        .map_err(sql_err("reading referral_rewards"))?;
    let mut rows = match one {
        Some(id) => st.query(named_params! {"$1": id}),
        None => st.query([]),
    }
    .map_err(sql_err("reading referral_rewards"))?;
    while let Some(r) = rows.next().map_err(sql_err("reading referral_rewards"))? {
        let reward = reward(r).map_err(sql_err("reading referral_rewards"))?;
        if scope.covers(reward.referrer_user_id) {
            snap.stored_rewards.push(reward);
        }
    }
    drop(rows);
    drop(st);
    sw.lap(
        &mut snap.timings,
        "stored_rewards",
        snap.stored_rewards.len(),
    );

    let sql = match scope {
        Scope::Referrer(_) => include_str!("../../sql/queries/sqlite/host_bonus_one.sql"),
        _ => include_str!("../../sql/queries/sqlite/host_bonus.sql"),
    };
    let mut st = conn
        .prepare(sql)
        .map_err(sql_err("reading subscriptions"))?;
    let mut rows = match one {
        Some(id) => st.query(named_params! {"$1": id}),
        None => st.query([]),
    }
    .map_err(sql_err("reading subscriptions"))?;
    while let Some(r) = rows.next().map_err(sql_err("reading subscriptions"))? {
        let user: i64 = r.get(0).map_err(sql_err("reading subscriptions"))?;
        let bonus: i64 = r.get(1).map_err(sql_err("reading subscriptions"))?;
        if scope.covers(user) {
            snap.host_bonus.push((user, bonus));
        }
    }
    drop(rows);
    drop(st);
    sw.lap(&mut snap.timings, "host_bonus", snap.host_bonus.len());
    Ok(snap)
}

/// A row of `referred*.sql`.
fn referred_user(r: &Row<'_>, interner: &mut Interner) -> Result<ReferredUser, StoreError> {
    let e = sql_err("reading referred users");
    let id: i64 = r.get(0).map_err(sql_err("reading referred users"))?;
    let referrer_id: i64 = r.get(1).map_err(sql_err("reading referred users"))?;
    let created_at = text(r, 2)
        .map_err(sql_err("reading referred users"))?
        .unwrap_or_default();
    let is_active: bool = r.get(3).map_err(sql_err("reading referred users"))?;
    let is_verified: bool = r.get(4).map_err(sql_err("reading referred users"))?;
    let has_sub: bool = r.get(5).map_err(e)?;
    let subscription = if has_sub {
        let t = |i| text(r, i).map_err(sql_err("reading referred users"));
        let started_at = t(8)?
            .map(|v| time("subscriptions", "started_at", id, v))
            .transpose()?;
        let expires_at = t(9)?
            .map(|v| time("subscriptions", "expires_at", id, v))
            .transpose()?;
        Some(Subscription {
            tier: interner.intern(t(6)?.unwrap_or_default()),
            status: interner.intern(t(7)?.unwrap_or_default()),
            started_at,
            expires_at,
        })
    } else {
        None
    };
    Ok(ReferredUser {
        id,
        referrer_id,
        created_at: time("users", "created_at", id, created_at)?,
        is_active,
        is_verified,
        subscription,
    })
}

fn reward(r: &Row<'_>) -> rusqlite::Result<RewardResult> {
    Ok(RewardResult {
        referrer_user_id: r.get(0)?,
        referred_users_total: r.get(1)?,
        qualified_referrals: r.get(2)?,
        disqualified_self_referral: r.get(3)?,
        disqualified_cooldown: r.get(4)?,
        disqualified_missing_ip: r.get(5)?,
        disqualified_shared_ip: r.get(6)?,
        disqualified_duplicate_ip: r.get(7)?,
        bonus_slots: r.get(8)?,
        badge: r.get(9)?,
    })
}
