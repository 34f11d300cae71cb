//! A full or shard snapshot's large reads as sequential scans, several at once: the users with a
//! referrer, every subscription, every registration IP and the referrers' IPs in the window,
//! each a binary COPY on a connection of its own that imported the snapshot's exported
//! snapshot (`pg_export_snapshot`, as `pg_dump -j` does), joined in memory with hash sets.
//!
//! Why: joined in the database, the referred users and their registrations cost an index
//! probe per user on a host without the recommended indexes (the planner picks nested loops),
//! and one connection reads one query at a time on a server with cores to spare. The scans
//! need no index at all and keep the server's cores busy. One-referrer runs keep the indexed
//! queries; a server that refuses COPY or snapshot export reads the joined queries on one
//! connection (read.rs), with the same rows.

use std::sync::Arc;
use std::time::Duration;

use super::grants::{CloseUnlessDone, Side, SideError, import_snapshot};
use super::read::{Bad, bad, null, pair, pg_text, pg_time};
use super::*;
use crate::program::{Fast, FastSet};
use crate::snapshot::QueryTiming;

const USERS: &str = include_str!("../../../sql/queries/postgres/scan_users.sql");
const SUBSCRIPTIONS: &str = include_str!("../../../sql/queries/postgres/scan_subscriptions.sql");
const REGISTRATIONS: &str = include_str!("../../../sql/queries/postgres/scan_registrations.sql");
const EVENTS: &str = include_str!("../../../sql/queries/postgres/referrer_events.sql");

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A timestamptz in its binary send format as an instant: 'infinity' and '-infinity' as the
/// largest and smallest instants (as referred.sql reads them); a finite time past what the job
/// can hold as `read::TIME_OUT_OF_RANGE`, which `pg_time` names.
fn instant_of(v: Option<i64>) -> Option<i64> {
    v.map(|t| match t {
        i64::MAX => i64::MAX,
        i64::MIN => -i64::MAX,
        t => t.checked_add(PG_EPOCH_MICROS).unwrap_or(i64::MIN),
    })
}

/// The scans under way: each one's data arrives on `rx` as soon as it is read, so that it is
/// decoded while the others are still being read.
pub(super) struct Scans {
    rx: tokio::sync::mpsc::UnboundedReceiver<(&'static str, Vec<u8>, Duration)>,
    /// One task per connection: `Ok(false)` when COPY was refused.
    tasks: Vec<Side<bool>>,
}

/// One connection's scans, in order: `(name, query)`.
type Jobs = Vec<(&'static str, String)>;

const NAMES: [&str; 4] = [
    "scan_users",
    "scan_subscriptions",
    "scan_registrations",
    "referrer_events",
];

impl PgStore {
    /// Starts the scans on two connections of their own, on the snapshot exported as
    /// `snapshot_id`.
    pub(super) fn spawn_scans(
        self: &Arc<Self>,
        snapshot_id: &str,
        permit: Arc<tokio::sync::OwnedSemaphorePermit>,
        window: (Instant, Instant),
    ) -> Scans {
        let ts = |t| format!("'{}'::timestamptz", instant::to_rfc3339(t));
        let events = EVENTS
            .replace("$1", &ts(window.0))
            .replace("$2", &ts(window.1));
        // Two connections, each about half the work (measured at 1M users), the users first:
        // the other scans' rows are picked by them.
        let halves: [Jobs; 2] = [
            vec![
                ("scan_users", USERS.to_owned()),
                ("scan_registrations", REGISTRATIONS.to_owned()),
            ],
            vec![
                ("scan_subscriptions", SUBSCRIPTIONS.to_owned()),
                ("referrer_events", events),
            ],
        ];
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let tasks = halves
            .into_iter()
            .map(|jobs| {
                let me = Arc::clone(self);
                let id = snapshot_id.to_owned();
                let permit = Arc::clone(&permit);
                let out = tx.clone();
                Side(tokio::spawn(async move {
                    let _permit = permit;
                    let conn =
                        me.pool.acquire().await.map_err(|e| {
                            SideError::Import(q("opening a snapshot connection")(e))
                        })?;
                    let mut conn = CloseUnlessDone { conn, done: false };
                    let r = me.scan_on(&mut conn.conn, &id, jobs, out).await;
                    conn.done = r.is_ok();
                    r
                }))
            })
            .collect();
        Scans { rx, tasks }
    }

    async fn scan_on(
        &self,
        conn: &mut sqlx::PgConnection,
        snapshot_id: &str,
        jobs: Jobs,
        out: tokio::sync::mpsc::UnboundedSender<(&'static str, Vec<u8>, Duration)>,
    ) -> Result<bool, SideError> {
        let mut tx = import_snapshot(conn, snapshot_id, &self.timeouts).await?;
        for (name, sql) in jobs {
            let t = std::time::Instant::now();
            match self.copy_out(&mut tx, &sql, &[], name).await {
                // The receiver is gone only when the snapshot ended without the scans.
                Ok(Some(bytes)) => {
                    let _ = out.send((name, bytes, t.elapsed()));
                }
                Ok(None) => return Ok(false),
                Err(e) => return Err(SideError::Read(e)),
            }
        }
        tx.commit()
            .await
            .map_err(|e| SideError::Read(q("ending a snapshot connection")(e)))?;
        Ok(true)
    }

    /// Decodes the scans as they arrive into the snapshot's referred users, registrations,
    /// referrer events and host bonus values, for the referrers in `snap.referrers` (already in
    /// scope). `Ok(false)`: no scans (COPY refused, no connection to import the snapshot on);
    /// read the joined queries instead. A cell that cannot be decoded is looked up and named on
    /// `tx`, the snapshot's own connection.
    pub(super) async fn join_scans(
        &self,
        tx: &mut sqlx::PgConnection,
        scope: Scope,
        mut scans: Scans,
        snap: &mut Snapshot,
    ) -> Result<bool, StoreError> {
        let referrers: FastSet<i64> = snap.referrers.iter().copied().collect();
        let mut referred: Option<Fast<i64, usize>> = None;
        let mut waiting: Vec<(&'static str, Vec<u8>)> = vec![];
        let mut rows = [0usize; 4];
        let mut elapsed = [Duration::ZERO; 4];
        let mut decode = [Duration::ZERO; 4];
        let mut left = 4;
        while left > 0 {
            let Some((name, bytes, took)) = scans.rx.recv().await else {
                break;
            };
            let i = NAMES.iter().position(|n| *n == name).expect("a scan");
            elapsed[i] = took;
            waiting.push((name, bytes));
            // Users first; the rest as soon as the users are in.
            while let Some(k) = waiting
                .iter()
                .position(|(n, _)| *n == "scan_users" || referred.is_some())
            {
                let (name, bytes) = waiting.swap_remove(k);
                let i = NAMES.iter().position(|n| *n == name).expect("a scan");
                let t = std::time::Instant::now();
                let decoded = match (name, &referred) {
                    ("scan_users", _) => users(&bytes, &referrers, snap).map(|(index, n)| {
                        referred = Some(index);
                        n
                    }),
                    ("scan_subscriptions", Some(index)) => {
                        subscriptions(&bytes, index, &referrers, scope, snap)
                    }
                    ("scan_registrations", Some(index)) => registrations(&bytes, index, snap),
                    (_, _) => events(&bytes, scope, snap),
                };
                rows[i] = match decoded {
                    Ok(n) => n,
                    Err((what, b)) => return Err(bad(tx, what, b).await),
                };
                decode[i] = t.elapsed();
                tracing::debug!(
                    query = name,
                    rows = rows[i],
                    read_ms = elapsed[i].as_secs_f64() * 1e3,
                    decode_ms = decode[i].as_secs_f64() * 1e3,
                    "snapshot scan"
                );
                left -= 1;
            }
        }
        if left > 0 {
            // A connection ended early: COPY refused, no snapshot import, or an error.
            for task in &mut scans.tasks {
                match (&mut task.0).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(SideError::Import(e))) => {
                        tracing::warn!(error = %e, "no second snapshot connection; reading the joined queries on the first");
                    }
                    Ok(Err(SideError::Read(e))) => return Err(e),
                    Err(e) => {
                        return Err(StoreError::Sql {
                            what: "reading the snapshot's scans",
                            message: e.to_string(),
                        });
                    }
                }
            }
            snap.referred.clear();
            snap.registrations.clear();
            snap.referrer_events.clear();
            snap.host_bonus.clear();
            return Ok(false);
        }
        // Each scan's rows as read (the join keeps fewer), its time on its connection and the
        // time decoding it here.
        for i in 0..4 {
            snap.timings.push(QueryTiming {
                query: NAMES[i],
                rows: rows[i],
                elapsed: elapsed[i],
            });
        }
        let decoding = decode.iter().sum::<Duration>();
        snap.timings.push(QueryTiming {
            query: "decoding the scans",
            rows: snap.referred.len(),
            elapsed: decoding,
        });
        snap.via_copy = true;
        Ok(true)
    }
}

type Decoded = Result<usize, (&'static str, Bad)>;

const REFERRED: &str = "reading referred users";

/// The users whose referrer holds an invite code (and is in scope), and their index in
/// `snap.referred` by id.
fn users(
    bytes: &[u8],
    referrers: &FastSet<i64>,
    snap: &mut Snapshot,
) -> Result<(Fast<i64, usize>, usize), (&'static str, Bad)> {
    let at = |b: Bad| (REFERRED, b);
    let mut rows = 0;
    let mut t = pgcopy::Tuples::new(bytes, 5).map_err(|e| at(e.into()))?;
    let mut index: Fast<i64, usize> = Fast::default();
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows += 1;
        let (id, referrer) = (
            t.i64().map_err(|e| at(e.into()))?,
            t.i64().map_err(|e| at(e.into()))?,
        );
        let Some(referrer) = referrer.filter(|r| referrers.contains(r)) else {
            for _ in 0..3 {
                t.field().map_err(|e| at(e.into()))?;
            }
            continue;
        };
        let id = id.ok_or_else(|| at(null("users", "id", None, "an id")))?;
        let user = |column, expected| at(null("users", column, Some(id), expected));
        let created_at = pg_time(
            instant_of(t.i64().map_err(|e| at(e.into()))?),
            "users",
            "created_at",
            id,
        )
        .map_err(at)?
        .ok_or_else(|| user("created_at", "a time"))?;
        let is_active = t
            .bool()
            .map_err(|e| at(e.into()))?
            .ok_or_else(|| user("is_active", "a boolean"))?;
        let is_verified = t
            .bool()
            .map_err(|e| at(e.into()))?
            .ok_or_else(|| user("is_verified", "a boolean"))?;
        index.insert(id, snap.referred.len());
        snap.referred.push(ReferredUser {
            id,
            referrer_id: referrer,
            created_at,
            is_active,
            is_verified,
            subscription: None,
        });
    }
    Ok((index, rows))
}

/// The referred users' subscriptions; the host column of the referrers' and of any other with
/// a bonus.
fn subscriptions(
    bytes: &[u8],
    index: &Fast<i64, usize>,
    referrers: &FastSet<i64>,
    scope: Scope,
    snap: &mut Snapshot,
) -> Decoded {
    const SUBSCRIPTIONS: &str = "reading subscriptions";
    let at = |b: Bad| (REFERRED, b);
    let mut rows = 0;
    let mut interner = Interner::default();
    let mut t = pgcopy::Tuples::new(bytes, 7).map_err(|e| at(e.into()))?;
    let mut extra = vec![];
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows += 1;
        let user = t.i64().map_err(|e| at(e.into()))?;
        let (tier, status) = (
            t.field().map_err(|e| at(e.into()))?,
            t.field().map_err(|e| at(e.into()))?,
        );
        let (started, expires) = (
            t.i64().map_err(|e| at(e.into()))?,
            t.i64().map_err(|e| at(e.into()))?,
        );
        let sid = t.i64().map_err(|e| at(e.into()))?;
        let bonus = t.i64().map_err(|e| at(e.into()))?;
        if let Some(&i) = user.and_then(|u| index.get(&u)) {
            let sid = sid.ok_or_else(|| at(null("subscriptions", "id", None, "an id")))?;
            let text = |v, column| pg_text(v, "subscriptions", column, sid).map_err(at);
            let time = |v, column| pg_time(instant_of(v), "subscriptions", column, sid).map_err(at);
            let sub = Subscription {
                tier: interner.intern(text(tier, "tier")?.unwrap_or_default()),
                status: interner.intern(text(status, "status")?.unwrap_or_default()),
                started_at: time(started, "started_at")?,
                expires_at: time(expires, "expires_at")?,
            };
            let u = &mut snap.referred[i];
            if u.subscription.is_none() {
                u.subscription = Some(sub);
            } else {
                // A second subscription: one row per subscription, as the joined query gives,
                // so that the snapshot refuses the user's duplicates by name.
                extra.push(ReferredUser {
                    subscription: Some(sub),
                    ..u.clone()
                });
            }
        }
        let referrer = user.is_some_and(|u| referrers.contains(&u));
        if referrer || bonus.is_some_and(|b| b != 0) {
            let host = |b| (SUBSCRIPTIONS, b);
            let sid = sid.ok_or_else(|| host(null("subscriptions", "id", None, "an id")))?;
            let user =
                user.ok_or_else(|| host(null("subscriptions", "user_id", Some(sid), "a user id")))?;
            let bonus = bonus.ok_or_else(|| {
                host(null(
                    "subscriptions",
                    "referral_bonus_domains",
                    Some(sid),
                    "an integer",
                ))
            })?;
            if scope.covers(user) {
                snap.host_bonus.push((user, bonus));
            }
        }
    }
    snap.referred.extend(extra);
    Ok(rows)
}

/// The referred users' registration IPs.
fn registrations(bytes: &[u8], index: &Fast<i64, usize>, snap: &mut Snapshot) -> Decoded {
    let at = |b: Bad| ("reading registration events", b);
    let mut rows = 0;
    let mut t = pgcopy::Tuples::new(bytes, 2).map_err(|e| at(e.into()))?;
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows += 1;
        let user = t.i64().map_err(|e| at(e.into()))?;
        let ip = t.field().map_err(|e| at(e.into()))?;
        if user.is_some_and(|u| index.contains_key(&u)) {
            snap.registrations.push(pair(user, ip).map_err(at)?);
        }
    }
    Ok(rows)
}

/// The referrers' IPs in the window (the query joins the referrers; a shard keeps its own).
fn events(bytes: &[u8], scope: Scope, snap: &mut Snapshot) -> Decoded {
    let at = |b: Bad| ("reading referrer events", b);
    let mut rows = 0;
    let mut t = pgcopy::Tuples::new(bytes, 2).map_err(|e| at(e.into()))?;
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows += 1;
        let user = t.i64().map_err(|e| at(e.into()))?;
        let ip = t.field().map_err(|e| at(e.into()))?;
        if user.is_none_or(|u| scope.covers(u)) {
            snap.referrer_events.push(pair(user, ip).map_err(at)?);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_timestamps_read_as_unix_microseconds() {
        // 2000-01-01 00:00:00 UTC, and one microsecond before the Unix epoch.
        assert_eq!(instant_of(Some(0)), Some(PG_EPOCH_MICROS));
        assert_eq!(instant_of(Some(-PG_EPOCH_MICROS - 1)), Some(-1));
        assert_eq!(instant_of(None), None);
        // 'infinity' and '-infinity', as referred.sql reads them.
        assert_eq!(instant_of(Some(i64::MAX)), Some(i64::MAX));
        assert_eq!(instant_of(Some(i64::MIN)), Some(-i64::MAX));
        // Past 294247-01-10 04:00:54.775807 UTC: the value pg_time names.
        assert_eq!(instant_of(Some(i64::MAX - 1)), Some(i64::MIN));
        assert_eq!(instant_of(Some(i64::MAX - PG_EPOCH_MICROS)), Some(i64::MAX));
    }
}
