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

/// The raw COPY data of the four scans.
pub(super) struct Scanned {
    users: Vec<u8>,
    subscriptions: Vec<u8>,
    registrations: Vec<u8>,
    events: Vec<u8>,
    /// Each scan's time on its connection, in the order above.
    elapsed: [Duration; 4],
}

/// One connection's scans, in order: `(name, query)`.
type Jobs = Vec<(&'static str, String)>;

impl PgStore {
    /// Starts the scans on two connections of their own, on the snapshot exported as
    /// `snapshot_id`. `None` from the task: COPY was refused (read with the joined queries).
    pub(super) fn spawn_scans(
        self: &Arc<Self>,
        snapshot_id: &str,
        permit: Arc<tokio::sync::OwnedSemaphorePermit>,
        window: (Instant, Instant),
    ) -> Side<Option<Scanned>> {
        let ts = |t| format!("'{}'::timestamptz", instant::to_rfc3339(t));
        let events = EVENTS
            .replace("$1", &ts(window.0))
            .replace("$2", &ts(window.1));
        // Two connections, each about half the work (measured at 1M users: users + registrations,
        // subscriptions + referrer events).
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
        let tasks: Vec<_> = halves
            .into_iter()
            .map(|jobs| {
                let me = Arc::clone(self);
                let id = snapshot_id.to_owned();
                let permit = Arc::clone(&permit);
                tokio::spawn(async move {
                    let _permit = permit;
                    let conn =
                        me.pool.acquire().await.map_err(|e| {
                            SideError::Import(q("opening a snapshot connection")(e))
                        })?;
                    let mut conn = CloseUnlessDone { conn, done: false };
                    let r = me.scan_on(&mut conn.conn, &id, jobs).await;
                    conn.done = r.is_ok();
                    r
                })
            })
            .collect();
        Side(tokio::spawn(async move {
            let mut guards: Vec<Side<_>> = tasks.into_iter().map(Side).collect();
            let mut out: Vec<(&'static str, Vec<u8>, Duration)> = vec![];
            for g in &mut guards {
                let read = (&mut g.0).await.map_err(|e| {
                    SideError::Read(StoreError::Sql {
                        what: "reading the snapshot's scans",
                        message: e.to_string(),
                    })
                })??;
                match read {
                    Some(parts) => out.extend(parts),
                    None => return Ok(None),
                }
            }
            let mut take = |name: &str| {
                let i = out.iter().position(|(n, ..)| *n == name).expect("scanned");
                out.swap_remove(i)
            };
            let parts = [
                take("scan_users"),
                take("scan_subscriptions"),
                take("scan_registrations"),
                take("referrer_events"),
            ];
            let elapsed = [parts[0].2, parts[1].2, parts[2].2, parts[3].2];
            let [users, subscriptions, registrations, events] = parts.map(|p| p.1);
            Ok(Some(Scanned {
                users,
                subscriptions,
                registrations,
                events,
                elapsed,
            }))
        }))
    }

    async fn scan_on(
        &self,
        conn: &mut sqlx::PgConnection,
        snapshot_id: &str,
        jobs: Jobs,
    ) -> Result<Option<Vec<(&'static str, Vec<u8>, Duration)>>, SideError> {
        let mut tx = import_snapshot(conn, snapshot_id, &self.timeouts).await?;
        let mut out = vec![];
        for (name, sql) in jobs {
            let t = std::time::Instant::now();
            match self.copy_out(&mut tx, &sql, &[], name).await {
                Ok(Some(bytes)) => out.push((name, bytes, t.elapsed())),
                Ok(None) => return Ok(None),
                Err(e) => return Err(SideError::Read(e)),
            }
        }
        tx.commit()
            .await
            .map_err(|e| SideError::Read(q("ending a snapshot connection")(e)))?;
        Ok(Some(out))
    }

    /// Joins the scans into the snapshot's referred users, registrations, referrer events and
    /// host bonus values, for the referrers in `snap.referrers` (already in scope). A cell that
    /// cannot be decoded is looked up and named on `tx`, the snapshot's own connection.
    pub(super) async fn join_scans(
        &self,
        tx: &mut sqlx::PgConnection,
        scope: Scope,
        scanned: Scanned,
        snap: &mut Snapshot,
    ) -> Result<(), StoreError> {
        let mut sw = Stopwatch::start();
        let referrers: FastSet<i64> = snap.referrers.iter().copied().collect();
        let rows = match join(scope, &referrers, &scanned, snap) {
            Ok(rows) => rows,
            Err((what, b)) => return Err(bad(tx, what, b).await),
        };
        // Each scan's rows as read (the join keeps fewer), beside its time on its connection.
        let names = [
            "scan_users",
            "scan_subscriptions",
            "scan_registrations",
            "referrer_events",
        ];
        for ((query, rows), elapsed) in names.into_iter().zip(rows).zip(scanned.elapsed) {
            snap.timings.push(QueryTiming {
                query,
                rows,
                elapsed,
            });
        }
        snap.via_copy = true;
        sw.lap(&mut snap.timings, "join_scans", snap.referred.len());
        Ok(())
    }
}

fn join(
    scope: Scope,
    referrers: &FastSet<i64>,
    s: &Scanned,
    snap: &mut Snapshot,
) -> Result<[usize; 4], (&'static str, Bad)> {
    let mut rows = [0usize; 4];
    const REFERRED: &str = "reading referred users";
    let at = |b: Bad| (REFERRED, b);
    // The users whose referrer holds an invite code (and is in scope).
    let mut t = pgcopy::Tuples::new(&s.users, 5).map_err(|e| at(e.into()))?;
    let mut index: Fast<i64, usize> = Fast::default();
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows[0] += 1;
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

    // Their subscriptions; the host column of the referrers' and of any other with a bonus.
    const SUBSCRIPTIONS: &str = "reading subscriptions";
    let mut interner = Interner::default();
    let mut t = pgcopy::Tuples::new(&s.subscriptions, 7).map_err(|e| at(e.into()))?;
    let mut extra = vec![];
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows[1] += 1;
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

    // The referred users' registration IPs.
    const REGISTRATIONS: &str = "reading registration events";
    let at = |b: Bad| (REGISTRATIONS, b);
    let mut t = pgcopy::Tuples::new(&s.registrations, 2).map_err(|e| at(e.into()))?;
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows[2] += 1;
        let user = t.i64().map_err(|e| at(e.into()))?;
        let ip = t.field().map_err(|e| at(e.into()))?;
        if user.is_some_and(|u| index.contains_key(&u)) {
            snap.registrations.push(pair(user, ip).map_err(at)?);
        }
    }

    // The referrers' IPs in the window (the query joins the referrers; a shard keeps its own).
    const EVENTS: &str = "reading referrer events";
    let at = |b: Bad| (EVENTS, b);
    let mut t = pgcopy::Tuples::new(&s.events, 2).map_err(|e| at(e.into()))?;
    while t.next_tuple().map_err(|e| at(e.into()))? {
        rows[3] += 1;
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
