//! The SQLite snapshot, read with rusqlite on a blocking thread.
//!
//! sqlx-sqlite hands every row from its worker thread to the async side (about 110k rows/s on
//! the referred-users query); a plain rusqlite loop decodes straight into the snapshot's
//! columns, borrowing text cells instead of allocating them. Same SQL files, same single read
//! transaction, a read-only connection. Writes stay on sqlx.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Row, named_params};

use super::StoreError;
use super::hex;
use super::{Part, ledger_grant};
use crate::instant::{self, Instant};
use crate::program::grants::{GrantsSnapshot, Payment, Referral};
use crate::program::slots::rewards::RewardResult;
use crate::program::slots::rules;
use crate::snapshot::{
    GrantsRead, Interner, ReferredUser, Scope, Snapshot, Stopwatch, Subscription,
};

fn sql_err(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::driver(what, &e)
}

use super::sqlite_time as time;

/// A cell as the database holds it, for error messages: text quoted, numbers with their type,
/// blobs and text that is not UTF-8 in hex.
fn show(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => format!("{i} (integer)"),
        ValueRef::Real(f) => format!("{f} (real)"),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(t) => format!("{t:?}"),
            Err(_) => format!("x'{}' (text that is not UTF-8)", hex(t)),
        },
        ValueRef::Blob(b) => format!("x'{}' (BLOB)", hex(b)),
    }
}

/// Where a cell is: its table and column, and its row's own id (`None` when the id itself is
/// the cell being read).
#[derive(Clone, Copy)]
struct At {
    table: &'static str,
    row: Option<i64>,
}

impl At {
    fn of(table: &'static str, row: i64) -> At {
        At {
            table,
            row: Some(row),
        }
    }

    fn id(table: &'static str) -> At {
        At { table, row: None }
    }

    fn bad(self, column: &'static str, v: ValueRef<'_>, expected: &'static str) -> StoreError {
        StoreError::BadValue {
            table: self.table,
            column,
            row: self.row,
            value: show(v),
            expected,
        }
    }

    fn cell<'r>(
        self,
        r: &'r Row<'_>,
        i: usize,
        what: &'static str,
    ) -> Result<ValueRef<'r>, StoreError> {
        r.get_ref(i).map_err(sql_err(what))
    }

    /// An integer cell; NULL and anything else is an error.
    fn int(
        self,
        r: &Row<'_>,
        i: usize,
        column: &'static str,
        what: &'static str,
    ) -> Result<i64, StoreError> {
        match self.cell(r, i, what)? {
            ValueRef::Integer(v) => Ok(v),
            v => Err(self.bad(column, v, "an integer")),
        }
    }

    /// A boolean cell: SQLite stores booleans as integers (0 false, anything else true); text
    /// such as 'true', NULL, reals and blobs are errors rather than guesses.
    fn bool(
        self,
        r: &Row<'_>,
        i: usize,
        column: &'static str,
        what: &'static str,
    ) -> Result<bool, StoreError> {
        match self.cell(r, i, what)? {
            ValueRef::Integer(v) => Ok(v != 0),
            v => Err(self.bad(column, v, "a boolean (an integer, 0 or 1)")),
        }
    }

    /// A text cell, borrowed; NULL is `None`; blobs, numbers and non-UTF-8 text are errors.
    fn text<'r>(
        self,
        r: &'r Row<'_>,
        i: usize,
        column: &'static str,
        what: &'static str,
    ) -> Result<Option<&'r str>, StoreError> {
        match self.cell(r, i, what)? {
            ValueRef::Null => Ok(None),
            v @ ValueRef::Text(t) => std::str::from_utf8(t)
                .map(Some)
                .map_err(|_| self.bad(column, v, "UTF-8 text")),
            v => Err(self.bad(column, v, "text")),
        }
    }

    /// A time cell (text, parsed); NULL is `None`.
    fn time(
        self,
        r: &Row<'_>,
        i: usize,
        column: &'static str,
        what: &'static str,
    ) -> Result<Option<Instant>, StoreError> {
        match self.cell(r, i, what)? {
            ValueRef::Null => Ok(None),
            v @ ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(t) => time(self.table, column, self.row.unwrap_or_default(), t).map(Some),
                Err(_) => Err(self.bad(column, v, "a time")),
            },
            v => Err(self.bad(column, v, "a time (text)")),
        }
    }

    /// A time cell that must not be NULL.
    fn time_not_null(
        self,
        r: &Row<'_>,
        i: usize,
        column: &'static str,
        what: &'static str,
    ) -> Result<Instant, StoreError> {
        match self.time(r, i, column, what)? {
            Some(t) => Ok(t),
            None => Err(self.bad(column, ValueRef::Null, "a time")),
        }
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
/// How the snapshot's connection is opened.
#[derive(Debug, Clone, Copy)]
pub struct Open {
    pub busy_timeout: Duration,
    /// `PRAGMA mmap_size` (0: no map).
    pub mmap_bytes: i64,
}

pub fn snapshot(
    path: &Path,
    open: Open,
    scope: Scope,
    window: (Instant, Instant),
    grants: Option<GrantsRead>,
    uncounted: bool,
) -> Result<Snapshot, StoreError> {
    let conn = open_read_only(path, open.busy_timeout)?;
    // Pages read through a read-only map: no pread and copy per page (a third of the
    // snapshot's time at 1M users). The connection never writes, so the map is never written.
    conn.pragma_update(None, "mmap_size", open.mmap_bytes)
        .map_err(sql_err("opening the database"))?;
    conn.execute_batch("BEGIN")
        .map_err(sql_err("starting the snapshot"))?;
    let snap = read(&conn, scope, window, grants, uncounted)?;
    conn.execute_batch("COMMIT")
        .map_err(sql_err("ending the snapshot"))?;
    Ok(snap)
}

fn read(
    conn: &Connection,
    scope: Scope,
    window: (Instant, Instant),
    grants: Option<GrantsRead>,
    uncounted: bool,
) -> Result<Snapshot, StoreError> {
    let mut snap = Snapshot::default();
    let mut sw = Stopwatch::start();
    const UNCOUNTED: &str = "reading the referrals of users without invite code";

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
            if r == Some(false) {
                let mut st = conn
                    .prepare(include_str!("../../sql/queries/sqlite/uncounted_one.sql"))
                    .map_err(sql_err(UNCOUNTED))?;
                snap.uncounted = st
                    .query_map(named_params! {"$1": id}, |r| Ok((id, r.get::<_, i64>(0)?)))
                    .map_err(sql_err(UNCOUNTED))?
                    .collect::<Result<_, _>>()
                    .map_err(sql_err(UNCOUNTED))?;
            }
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
            if uncounted {
                let mut st = conn
                    .prepare(include_str!("../../sql/queries/sqlite/uncounted.sql"))
                    .map_err(sql_err(UNCOUNTED))?;
                snap.uncounted = st
                    .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                    .map_err(sql_err(UNCOUNTED))?
                    .filter(|r| {
                        r.as_ref()
                            .map_or(true, |(referrer, _)| scope.covers(*referrer))
                    })
                    .collect::<Result<_, _>>()
                    .map_err(sql_err(UNCOUNTED))?;
            }
            ids.into_iter().filter(|id| scope.covers(*id)).collect()
        }
    };
    sw.lap(&mut snap.timings, "referrers", snap.referrers.len());

    // A full or shard run reads the users, subscriptions and registrations in passes and joins
    // them here (scan_referred); a one-referrer run through the indexes.
    let scanned = !matches!(scope, Scope::Referrer(_));
    if scanned {
        scan_referred(conn, scope, &mut snap)?;
        sw.lap(&mut snap.timings, "scans", snap.referred.len());
    }

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

        if !scanned {
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
        }

        if !scanned {
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
            const REG: &str = "reading registration events";
            while let Some(r) = rows.next().map_err(sql_err(REG))? {
                let id = At::id("telemetry_events").int(r, 2, "id", REG)?;
                let at = At::of("telemetry_events", id);
                let user = at.int(r, 0, "user_id", REG)?;
                if let Some(ip) = at.text(r, 1, "ip_hash", REG)? {
                    snap.registrations.push((user, ip.to_owned()));
                }
            }
            drop(rows);
            drop(st);
            sw.lap(&mut snap.timings, "registrations", snap.registrations.len());
        }

        let sql = pick(
            include_str!("../../sql/queries/sqlite/referrer_events.sql"),
            include_str!("../../sql/queries/sqlite/referrer_events_one.sql"),
            include_str!("../../sql/queries/sqlite/referrer_events_shard.sql"),
        );
        let key = (!matches!(scope, Scope::Full)).then_some(key);
        let mut seen: HashSet<(i64, String)> = HashSet::new();
        referrer_events(conn, sql, key, window, |user, ip, _| {
            if seen.insert((user, ip.to_owned())) {
                snap.referrer_events.push((user, ip.to_owned()));
            }
        })?;
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

    if !scanned {
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
        const SUBS: &str = "reading subscriptions";
        while let Some(r) = rows.next().map_err(sql_err(SUBS))? {
            let id = At::id("subscriptions").int(r, 2, "id", SUBS)?;
            let row = At::of("subscriptions", id);
            let user = row.int(r, 0, "user_id", SUBS)?;
            let bonus = row.int(r, 1, "referral_bonus_domains", SUBS)?;
            if scope.covers(user) {
                snap.host_bonus.push((user, bonus));
            }
        }
        drop(rows);
        drop(st);
        sw.lap(&mut snap.timings, "host_bonus", snap.host_bonus.len());
    }

    if let Some(gr) = grants {
        let mut timings = vec![];
        snap.grants = Some(read_grants(conn, scope, window, &gr, &snap, &mut timings)?);
        snap.timings.extend(timings);
    }

    let repeated = super::users_with_duplicate_subscriptions(&snap);
    if !repeated.is_empty() {
        const DUP: &str = "reading duplicate subscriptions";
        let ids = serde_json::to_string(&repeated).expect("integers");
        let mut st = conn
            .prepare(include_str!(
                "../../sql/queries/sqlite/duplicate_subscriptions.sql"
            ))
            .map_err(sql_err(DUP))?;
        let rows = st
            .query_map(named_params! {"$1": ids}, |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql_err(DUP))?
            .collect::<Result<Vec<(i64, i64)>, _>>()
            .map_err(sql_err(DUP))?;
        return Err(super::duplicate_subscriptions(&repeated, &rows));
    }
    Ok(snap)
}

/// The referred users (those whose referrer is in `snap.referrers`) with their subscriptions
/// and registration IPs, and the host column of the referrers' subscriptions and of any other
/// holding a bonus: three passes (scan_users.sql, scan_subscriptions.sql,
/// scan_registrations.sql) joined on user ids ([`crate::ids`]), where SQLite would look up each referred
/// user's rows by index (2.0 s against 0.6 s for the registrations alone at 1M users without
/// the partial index on them). Only the rows kept have their cells checked, as when the
/// database joined them.
fn scan_referred(conn: &Connection, scope: Scope, snap: &mut Snapshot) -> Result<(), StoreError> {
    const W: &str = "reading referred users";
    let referrers = crate::ids::IdSet::new(&snap.referrers);
    let mut st = conn
        .prepare(include_str!("../../sql/queries/sqlite/scan_users.sql"))
        .map_err(sql_err(W))?;
    let mut rows = st.query([]).map_err(sql_err(W))?;
    while let Some(r) = rows.next().map_err(sql_err(W))? {
        // A referrer that is not an integer is no user's id: not a referral.
        let referrer_id = match r.get_ref(1).map_err(sql_err(W))? {
            ValueRef::Integer(id) if referrers.contains(id) => id,
            _ => continue,
        };
        let id = At::id("users").int(r, 0, "id", W)?;
        let user = At::of("users", id);
        snap.referred.push(ReferredUser {
            id,
            referrer_id,
            created_at: user.time_not_null(r, 2, "created_at", W)?,
            is_active: user.bool(r, 3, "is_active", W)?,
            is_verified: user.bool(r, 4, "is_verified", W)?,
            subscription: None,
        });
    }
    drop(rows);
    drop(st);
    // Built once the users are read, when the ids' range is known (an array over a dense one).
    let index = crate::ids::IdIndex::of(&snap.referred, |u: &ReferredUser| u.id);

    const SUBS: &str = "reading subscriptions";
    let mut st = conn
        .prepare(include_str!(
            "../../sql/queries/sqlite/scan_subscriptions.sql"
        ))
        .map_err(sql_err(SUBS))?;
    let mut rows = st.query([]).map_err(sql_err(SUBS))?;
    let mut interner = Interner::default();
    let mut subscriptions = vec![];
    while let Some(r) = rows.next().map_err(sql_err(SUBS))? {
        let user = match r.get_ref(0).map_err(sql_err(SUBS))? {
            ValueRef::Integer(u) => Some(u),
            _ => None,
        };
        if let Some(i) = user.and_then(|u| index.get(u)) {
            let sub = At::of("subscriptions", At::id("subscriptions").int(r, 5, "id", W)?);
            let subscription = Subscription {
                tier: interner.intern(sub.text(r, 1, "tier", W)?.unwrap_or_default()),
                status: interner.intern(sub.text(r, 2, "status", W)?.unwrap_or_default()),
                started_at: sub.time(r, 3, "started_at", W)?,
                expires_at: sub.time(r, 4, "expires_at", W)?,
            };
            subscriptions.push((i, subscription));
        }
        // host_bonus.sql's filter: a referrer's subscription, or `referral_bonus_domains <> 0`
        // (NULL is not, and text or a blob always is, in SQLite's comparison).
        let referrer = user.is_some_and(|u| referrers.contains(u));
        let bonus = match r.get_ref(6).map_err(sql_err(SUBS))? {
            ValueRef::Null => false,
            ValueRef::Integer(b) => b != 0,
            ValueRef::Real(b) => b != 0.0,
            ValueRef::Text(_) | ValueRef::Blob(_) => true,
        };
        if referrer || bonus {
            let id = At::id("subscriptions").int(r, 5, "id", SUBS)?;
            let row = At::of("subscriptions", id);
            let user = row.int(r, 0, "user_id", SUBS)?;
            let bonus = row.int(r, 6, "referral_bonus_domains", SUBS)?;
            if scope.covers(user) {
                snap.host_bonus.push((user, bonus));
            }
        }
    }
    super::attach_subscriptions(&mut snap.referred, subscriptions);
    drop(rows);
    drop(st);

    // Their registration IPs.
    const REG: &str = "reading registration events";
    let mut st = conn
        .prepare(include_str!(
            "../../sql/queries/sqlite/scan_registrations.sql"
        ))
        .map_err(sql_err(REG))?;
    let mut rows = st.query([]).map_err(sql_err(REG))?;
    while let Some(r) = rows.next().map_err(sql_err(REG))? {
        match r.get_ref(0).map_err(sql_err(REG))? {
            ValueRef::Integer(u) if index.contains(u) => {}
            _ => continue,
        }
        let id = At::id("telemetry_events").int(r, 2, "id", REG)?;
        let at = At::of("telemetry_events", id);
        let user = at.int(r, 0, "user_id", REG)?;
        if let Some(ip) = at.text(r, 1, "ip_hash", REG)? {
            snap.registrations.push((user, ip.to_owned()));
        }
    }
    Ok(())
}

/// A row of `referred*.sql`: every cell checked, each error naming its table's own row id.
fn referred_user(r: &Row<'_>, interner: &mut Interner) -> Result<ReferredUser, StoreError> {
    const W: &str = "reading referred users";
    let id = At::id("users").int(r, 0, "id", W)?;
    let user = At::of("users", id);
    let referrer_id = user.int(r, 1, "referred_by_user_id", W)?;
    let created_at = user.time_not_null(r, 2, "created_at", W)?;
    let is_active = user.bool(r, 3, "is_active", W)?;
    let is_verified = user.bool(r, 4, "is_verified", W)?;
    let has_sub: bool = r.get(5).map_err(sql_err(W))?;
    let subscription = if has_sub {
        let sub = At::of(
            "subscriptions",
            At::id("subscriptions").int(r, 10, "id", W)?,
        );
        Some(Subscription {
            tier: interner.intern(sub.text(r, 6, "tier", W)?.unwrap_or_default()),
            status: interner.intern(sub.text(r, 7, "status", W)?.unwrap_or_default()),
            started_at: sub.time(r, 8, "started_at", W)?,
            expires_at: sub.time(r, 9, "expires_at", W)?,
        })
    } else {
        None
    };
    Ok(ReferredUser {
        id,
        referrer_id,
        created_at,
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

/// The grant programs' part of the snapshot, in the same read transaction: the referrals in
/// scope with their facts (docs/rules.md §7.1). `fraud`: whether any program checks fraud
/// (the IP queries are skipped otherwise). A one-user run on X reads X's referral set and X's
/// referrer's; a shard reads every referral and keeps its referrers'. A full or shard run reads
/// only what `slots`, the slots program's part of the same snapshot, has not: the referrals,
/// registrations and IPs of users without an invite code (see [`share_slots_reads`]).
pub(super) fn read_grants(
    conn: &Connection,
    scope: Scope,
    window: (Instant, Instant),
    read: &GrantsRead,
    slots: &Snapshot,
    timings: &mut Vec<crate::snapshot::QueryTiming>,
) -> Result<GrantsSnapshot, StoreError> {
    let complement = !matches!(scope, Scope::Referrer(_));
    let mut sw = Stopwatch::start();
    let mut g = GrantsSnapshot::default();
    let as_of = window.1;
    let in_scope = |referrer: i64| !matches!(scope, Scope::Shard(s) if !s.contains(referrer));
    // The referrers whose referrals are read here (JSON): a one-user run reads the user's set
    // and its referrer's; a full or shard run the sets of referrers without an invite code, and
    // takes the invite-code holders' from the slots part of the snapshot (`complement`). The
    // payments and the ledger are read for every referred user then (the `_one` variants read
    // those of these referrers' referred users).
    let referrers: String = match scope {
        Scope::Referrer(x) => {
            const W: &str = "reading the user's referrer";
            let mut st = conn
                .prepare(include_str!(
                    "../../sql/queries/sqlite/grants_referrer_of.sql"
                ))
                .map_err(sql_err(W))?;
            let up: Option<Option<i64>> = st
                .query_row(named_params! {"$1": x}, |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(sql_err(W))?;
            let mut ids = vec![x];
            ids.extend(up.flatten());
            serde_json::to_string(&ids).expect("integers")
        }
        _ => {
            const W: &str = "reading referrers";
            let mut st = conn
                .prepare(include_str!(
                    "../../sql/queries/sqlite/grants_referrers.sql"
                ))
                .map_err(sql_err(W))?;
            let all = st
                .query_map([], |r| r.get::<_, i64>(0))
                .map_err(sql_err(W))?
                .collect::<Result<Vec<i64>, _>>()
                .map_err(sql_err(W))?;
            let holders: HashSet<i64> = slots.referrers.iter().copied().collect();
            let rest: Vec<i64> = all
                .into_iter()
                .filter(|r| in_scope(*r) && !holders.contains(r))
                .collect();
            serde_json::to_string(&rest).expect("integers")
        }
    };

    const REF: &str = "reading referrals";
    let mut st = conn
        .prepare(include_str!(
            "../../sql/queries/sqlite/grants_referrals.sql"
        ))
        .map_err(sql_err(REF))?;
    let mut rows = st
        .query(named_params! {"$1": referrers})
        .map_err(sql_err(REF))?;
    while let Some(r) = rows.next().map_err(sql_err(REF))? {
        let id = At::id("users").int(r, 0, "id", REF)?;
        let user = At::of("users", id);
        let referrer_id = user.int(r, 1, "referred_by_user_id", REF)?;
        if !in_scope(referrer_id) {
            continue;
        }
        g.referrals.push(Referral {
            referrer_id,
            user_id: id,
            signed_up_at: user.time_not_null(r, 2, "created_at", REF)?,
            referrer_exists: r.get(3).map_err(sql_err(REF))?,
        });
    }
    drop(rows);
    drop(st);
    if complement {
        super::share_slots_reads(&mut g, slots, Part::Referrals);
    }
    sw.lap(timings, "grants_referrals", g.referrals.len());
    let referred =
        crate::ids::IdSet::new(&g.referrals.iter().map(|x| x.user_id).collect::<Vec<_>>());

    if read.fraud {
        const REG: &str = "reading registration events";
        let mut st = conn
            .prepare(include_str!(
                "../../sql/queries/sqlite/grants_registrations.sql"
            ))
            .map_err(sql_err(REG))?;
        let mut rows = st
            .query(named_params! {"$1": referrers})
            .map_err(sql_err(REG))?;
        while let Some(r) = rows.next().map_err(sql_err(REG))? {
            let id = At::id("telemetry_events").int(r, 2, "id", REG)?;
            let at = At::of("telemetry_events", id);
            let user = at.int(r, 0, "user_id", REG)?;
            if !referred.contains(user) {
                continue;
            }
            if let Some(ip) = at.text(r, 1, "ip_hash", REG)? {
                g.registrations.push((user, ip.to_owned()));
            }
        }
        drop(rows);
        drop(st);
        if complement {
            super::share_slots_reads(&mut g, slots, Part::Registrations);
        }
        sw.lap(timings, "grants_registrations", g.registrations.len());

        const EV: &str = "reading referrer events";
        let lo = instant::date_text(window.0 - instant::MICROS_PER_DAY);
        let hi = instant::date_text(window.1 + 2 * instant::MICROS_PER_DAY);
        let wanted: HashSet<i64> = g.referrals.iter().map(|x| x.referrer_id).collect();
        let mut st = conn
            .prepare(include_str!(
                "../../sql/queries/sqlite/grants_referrer_events.sql"
            ))
            .map_err(sql_err(EV))?;
        let mut rows = st
            .query(named_params! {"$1": lo, "$2": hi, "$3": referrers})
            .map_err(sql_err(EV))?;
        let mut seen: HashSet<(i64, String)> = HashSet::new();
        while let Some(r) = rows.next().map_err(sql_err(EV))? {
            let id = At::id("telemetry_events").int(r, 3, "id", EV)?;
            let row = At::of("telemetry_events", id);
            let user = row.int(r, 0, "user_id", EV)?;
            if !wanted.contains(&user) {
                continue;
            }
            let ip = row.text(r, 1, "ip_hash", EV)?.unwrap_or_default();
            let at = row.time_not_null(r, 2, "created_at", EV)?;
            if rules::in_ip_window(at, window) && seen.insert((user, ip.to_owned())) {
                g.referrer_events.push((user, ip.to_owned()));
            }
        }
        drop(rows);
        drop(st);
        if complement {
            super::share_slots_reads(&mut g, slots, Part::ReferrerEvents);
        }
        sw.lap(timings, "grants_referrer_events", g.referrer_events.len());
    }

    const PAY: &str = "reading payments";
    let mut st = conn
        .prepare(if complement {
            include_str!("../../sql/queries/sqlite/grants_payments.sql")
        } else {
            include_str!("../../sql/queries/sqlite/grants_payments_one.sql")
        })
        .map_err(sql_err(PAY))?;
    let statuses = serde_json::to_string(&read.statuses).expect("strings");
    let mut rows = if complement {
        st.query(named_params! {"$1": statuses, "$2": read.min_payment_cents})
    } else {
        st.query(named_params! {"$1": statuses, "$2": read.min_payment_cents, "$3": referrers})
    }
    .map_err(sql_err(PAY))?;
    let mut interner = Interner::default();
    while let Some(r) = rows.next().map_err(sql_err(PAY))? {
        let id = At::id("payments").int(r, 0, "id", PAY)?;
        let row = At::of("payments", id);
        let user_id = row.int(r, 1, "user_id", PAY)?;
        if !referred.contains(user_id) {
            continue;
        }
        let created_at = row.time_not_null(r, 5, "created_at", PAY)?;
        if created_at > as_of {
            continue;
        }
        g.payments.push(Payment {
            id,
            user_id,
            amount_cents: row.int(r, 2, "amount_cents", PAY)?,
            currency: interner.intern(
                row.text(r, 3, "currency", PAY)?
                    .ok_or_else(|| row.bad("currency", ValueRef::Null, "text"))?,
            ),
            status: interner.intern(
                row.text(r, 4, "status", PAY)?
                    .ok_or_else(|| row.bad("status", ValueRef::Null, "text"))?,
            ),
            created_at,
        });
    }
    drop(rows);
    drop(st);
    sw.lap(timings, "grants_payments", g.payments.len());

    const LED: &str = "reading referral_grants";
    let mut st = conn
        .prepare(if complement {
            include_str!("../../sql/queries/sqlite/grants_ledger.sql")
        } else {
            include_str!("../../sql/queries/sqlite/grants_ledger_one.sql")
        })
        .map_err(sql_err(LED))?;
    let mut rows = if complement {
        st.query([])
    } else {
        st.query(named_params! {"$1": referrers})
    }
    .map_err(sql_err(LED))?;
    let mut all = Vec::new();
    while let Some(r) = rows.next().map_err(sql_err(LED))? {
        let reversal: bool = r.get(9).map_err(sql_err(LED))?;
        let (program, party): (String, String) = (
            r.get(0).map_err(sql_err(LED))?,
            r.get(3).map_err(sql_err(LED))?,
        );
        let grant = ledger_grant(
            &program,
            r.get(1).map_err(sql_err(LED))?,
            r.get(2).map_err(sql_err(LED))?,
            &party,
            r.get(4).map_err(sql_err(LED))?,
            r.get(5).map_err(sql_err(LED))?,
            r.get(6).map_err(sql_err(LED))?,
            r.get(7).map_err(sql_err(LED))?,
            r.get(8).map_err(sql_err(LED))?,
            false,
            &mut interner,
        )?;
        if referred.contains(grant.user_id) {
            all.push((grant, reversal));
        }
    }
    g.ledger = super::live_ledger(all);
    drop(rows);
    drop(st);
    sw.lap(timings, "grants_ledger", g.ledger.len());
    Ok(g)
}

/// Opens the database read-only (no writes can happen through it), waiting `busy_timeout` on a
/// locked file.
fn open_read_only(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(sql_err("opening the database"))?;
    conn.busy_timeout(busy_timeout)
        .map_err(sql_err("opening the database"))?;
    Ok(conn)
}

/// Each referrer event of `sql` (one of the `referrer_events*.sql` variants; `key` its `$3`, if
/// it has one) inside the inclusive IP window: `f(user, ip_hash, created_at)`. Blank hashes are
/// passed on (what is blank is a rule's call).
fn referrer_events(
    conn: &Connection,
    sql: &str,
    key: Option<rusqlite::types::Value>,
    window: (Instant, Instant),
    mut f: impl FnMut(i64, &str, Instant),
) -> Result<(), StoreError> {
    const EV: &str = "reading referrer events";
    // Whole dates around the window as text, a day wider on each side for offsets up to ±24 h;
    // the exact bounds are checked on the parsed instants.
    let lo = instant::date_text(window.0 - instant::MICROS_PER_DAY);
    let hi = instant::date_text(window.1 + 2 * instant::MICROS_PER_DAY);
    let mut st = conn.prepare(sql).map_err(sql_err(EV))?;
    let mut rows = match key {
        None => st.query(named_params! {"$1": lo, "$2": hi}),
        Some(key) => st.query(named_params! {"$1": lo, "$2": hi, "$3": key}),
    }
    .map_err(sql_err(EV))?;
    while let Some(r) = rows.next().map_err(sql_err(EV))? {
        let id = At::id("telemetry_events").int(r, 3, "id", EV)?;
        let row = At::of("telemetry_events", id);
        let user = row.int(r, 0, "user_id", EV)?;
        let ip = row.text(r, 1, "ip_hash", EV)?.unwrap_or_default();
        let at = row.time_not_null(r, 2, "created_at", EV)?;
        if rules::in_ip_window(at, window) {
            f(user, ip, at);
        }
    }
    Ok(())
}

/// The newest time the user used each IP hash inside the window (blank hashes included; what
/// is blank is a rule's call): the `shared_ip` facts of `explain`.
pub fn ip_last_used(
    path: &Path,
    busy_timeout: Duration,
    user: i64,
    window: (Instant, Instant),
) -> Result<std::collections::HashMap<String, Instant>, StoreError> {
    let conn = open_read_only(path, busy_timeout)?;
    let mut last: std::collections::HashMap<String, Instant> = Default::default();
    referrer_events(
        &conn,
        include_str!("../../sql/queries/sqlite/referrer_events_one.sql"),
        Some(rusqlite::types::Value::Integer(user)),
        window,
        |_, ip, at| {
            let e = last.entry(ip.to_owned()).or_insert(at);
            *e = (*e).max(at);
        },
    )?;
    Ok(last)
}
