//! A full or shard snapshot's large reads as sequential scans, several at once: the users with a
//! referrer, every subscription, every registration IP and the referrers' IPs in the window,
//! each a binary COPY on a connection of its own that imported the snapshot's exported
//! snapshot (`pg_export_snapshot`, as `pg_dump -j` does), joined in memory on user ids
//! ([`crate::ids`]: arrays over a dense id range, else hash tables).
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
use super::read::{Bad, TIME_OUT_OF_RANGE, bad, null, pair, pg_text, pg_time};
use super::*;
use crate::ids::{IdIndex, IdSet};
use crate::program::FastSet;
use crate::snapshot::QueryTiming;

const USERS: &str = include_str!("../../../sql/queries/postgres/scan_users.sql");
const SUBSCRIPTIONS: &str = include_str!("../../../sql/queries/postgres/scan_subscriptions.sql");
const REGISTRATIONS: &str = include_str!("../../../sql/queries/postgres/scan_registrations.sql");
const EVENTS: &str = include_str!("../../../sql/queries/postgres/scan_events.sql");

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A timestamptz in its binary send format as an instant: 'infinity' and '-infinity' as the
/// largest and smallest instants (as referred.sql reads them); a finite time past what the job
/// can hold as [`TIME_OUT_OF_RANGE`], which `pg_time` names.
fn instant_of(v: Option<i64>) -> Option<i64> {
    v.map(|t| match t {
        i64::MAX => i64::MAX,
        i64::MIN => -i64::MAX,
        t => t.checked_add(PG_EPOCH_MICROS).unwrap_or(TIME_OUT_OF_RANGE),
    })
}

/// Why a scan's row could not be decoded: the snapshot query it stands for, and the cell.
pub(super) struct Fail(pub(super) &'static str, pub(super) Bad);

impl From<pgcopy::CopyError> for Fail {
    fn from(e: pgcopy::CopyError) -> Self {
        Fail("reading the snapshot's scans", Bad::Copy(e))
    }
}

type Row<'t, 'a> = &'t mut pgcopy::Tuples<'a>;
type Referrers = Arc<IdSet>;
type Index = Arc<IdIndex>;

/// The scans under way, on two connections: the users then the registration IPs (`a`); the
/// referrer events then the subscriptions (`b`). Each decodes its rows as they arrive; the
/// users wait for the referrers (`referrers`, from the snapshot's own connection), the
/// registrations and subscriptions for the users' index.
pub(super) struct Scans {
    referrers: tokio::sync::watch::Sender<Option<Referrers>>,
    a: Side<Option<PartA>>,
    b: Side<Option<PartB>>,
}

/// Each scan's rows as read (the join keeps fewer) and time on its connection.
type Timing = (&'static str, usize, Duration);

struct PartA {
    referred: Vec<ReferredUser>,
    /// The referrers of the other users with a referrer: not invite-code holders in scope.
    others: FastSet<i64>,
    registrations: Vec<(i64, String)>,
    timings: Vec<Timing>,
}

struct PartB {
    /// A subscription of `referred[i]`.
    subscriptions: Vec<(usize, Subscription)>,
    host_bonus: Vec<(i64, i64)>,
    events: Vec<(i64, String)>,
    timings: Vec<Timing>,
}

const REFERRED: &str = "reading referred users";

impl PgStore {
    /// Starts the scans on two connections of their own, on the snapshot exported as
    /// `snapshot_id`.
    pub(super) fn spawn_scans(
        self: &Arc<Self>,
        snapshot_id: &str,
        permit: Arc<tokio::sync::OwnedSemaphorePermit>,
        window: (Instant, Instant),
        scope: Scope,
    ) -> Scans {
        let (referrers, referrers_rx) = tokio::sync::watch::channel(None);
        let (index_tx, index_rx) = tokio::sync::watch::channel(None);
        let a = {
            let (me, id, permit, referrers) = (
                Arc::clone(self),
                snapshot_id.to_owned(),
                permit.clone(),
                referrers_rx.clone(),
            );
            Side(tokio::spawn(async move {
                let _permit = permit;
                let mut conn = me.side_connection().await?;
                let r = me
                    .scan_a(&mut conn.conn, &id, scope, referrers, index_tx)
                    .await;
                conn.done = r.is_ok();
                r
            }))
        };
        let b = {
            let (me, id) = (Arc::clone(self), snapshot_id.to_owned());
            Side(tokio::spawn(async move {
                let _permit = permit;
                let mut conn = me.side_connection().await?;
                let r = me
                    .scan_b(&mut conn.conn, &id, window, scope, referrers_rx, index_rx)
                    .await;
                conn.done = r.is_ok();
                r
            }))
        };
        Scans { referrers, a, b }
    }

    /// The run's timeouts, and no parallel workers: the scans already run side by side, a
    /// connection each, so a worker would only compete with the other scans (and the job) for
    /// the same cores, and pass each row through one more queue. With the typical indexes the
    /// planner gave the registrations' scan two (its estimate of the rows was a fifth of them):
    /// 0.16-0.38 s less server CPU without them at 1M users, in three A/B runs.
    fn scan_settings(&self) -> String {
        format!(
            "{} SET LOCAL max_parallel_workers_per_gather = 0;",
            self.timeouts
        )
    }

    async fn side_connection(&self) -> Result<CloseUnlessDone, SideError> {
        let conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| SideError::Import(q("opening a snapshot connection")(e)))?;
        Ok(CloseUnlessDone { conn, done: false })
    }

    /// One scan through binary COPY, each row handed to `row` as it arrives. `None`: COPY
    /// was refused.
    pub(super) async fn scan(
        &self,
        tx: &mut sqlx::PgConnection,
        name: &'static str,
        sql: &str,
        fields: usize,
        mut row: impl FnMut(Row<'_, '_>) -> Result<(), Fail>,
    ) -> Result<Option<Timing>, SideError> {
        let t = std::time::Instant::now();
        let mut stream = pgcopy::Stream::new(fields);
        let mut rows = 0;
        let read = self
            .copy_out_each(tx, sql, &[], name, |chunk| {
                stream.feed(chunk, |t: Row<'_, '_>| {
                    rows += 1;
                    row(t)
                })
            })
            .await
            .map_err(SideError::Read)?;
        match read {
            None => Ok(None),
            Some(Err(Fail(what, b))) => Err(SideError::Decode(what, b)),
            Some(Ok(())) => {
                stream
                    .finish()
                    .map_err(|e| SideError::Decode(name, e.into()))?;
                Ok(Some((name, rows, t.elapsed())))
            }
        }
    }

    /// [`PgStore::scan`] for rows that need the referrers, which the snapshot's own connection
    /// reads meanwhile: the scan starts at once; the rows that arrive before the referrers are
    /// known are kept as they came, those that `may_keep` (read from the row alone) lets through,
    /// and decoded once they are. A shard drops there the rows of users outside it: kept whole,
    /// the early rows of `--shard 1/8` took its peak at 10M users from 315 to 353-416 MiB once
    /// the scans ran faster than the referrers' query. `None`: COPY was refused, or the snapshot
    /// ended without the referrers.
    #[allow(clippy::too_many_arguments)]
    async fn scan_with_referrers(
        &self,
        tx: &mut sqlx::PgConnection,
        name: &'static str,
        sql: &str,
        fields: usize,
        referrers: &mut tokio::sync::watch::Receiver<Option<Referrers>>,
        may_keep: impl Fn(Row<'_, '_>) -> Result<bool, Fail>,
        mut row: impl FnMut(Row<'_, '_>, &Referrers) -> Result<(), Fail>,
    ) -> Result<Option<(Timing, Referrers)>, SideError> {
        let t = std::time::Instant::now();
        let mut stream = pgcopy::Stream::new(fields);
        let mut early: Vec<u8> = vec![];
        let mut known: Option<Referrers> = None;
        let mut rows = 0;
        let read = self
            .copy_out_each(tx, sql, &[], name, |chunk| {
                if known.is_none() {
                    known = referrers.borrow().clone();
                    if let Some(k) = &known {
                        pgcopy::each_tuple(&std::mem::take(&mut early), fields, |t| row(t, k))?;
                    }
                }
                stream.feed(chunk, |t: Row<'_, '_>| {
                    rows += 1;
                    match &known {
                        Some(k) => row(t, k),
                        None => {
                            if may_keep(t)? {
                                early.extend_from_slice(t.tuple_bytes());
                            }
                            Ok(())
                        }
                    }
                })
            })
            .await
            .map_err(SideError::Read)?;
        match read {
            None => return Ok(None),
            Some(Err(Fail(what, b))) => return Err(SideError::Decode(what, b)),
            Some(Ok(())) => {}
        }
        let known = match known {
            Some(k) => k,
            None => {
                tracing::debug!(
                    query = name,
                    rows,
                    "scan read before the referrers were known"
                );
                let Some(k) = wait(referrers).await else {
                    return Ok(None);
                };
                pgcopy::each_tuple(&std::mem::take(&mut early), fields, |t| row(t, &k))
                    .map_err(|Fail(w, b)| SideError::Decode(w, b))?;
                k
            }
        };
        stream
            .finish()
            .map_err(|e| SideError::Decode(name, e.into()))?;
        Ok(Some(((name, rows, t.elapsed()), known)))
    }

    async fn scan_a(
        &self,
        conn: &mut sqlx::PgConnection,
        snapshot_id: &str,
        scope: Scope,
        mut referrers: tokio::sync::watch::Receiver<Option<Referrers>>,
        index_tx: tokio::sync::watch::Sender<Option<Index>>,
    ) -> Result<Option<PartA>, SideError> {
        let mut tx = import_snapshot(conn, snapshot_id, &self.scan_settings()).await?;
        let mut referred = vec![];
        let mut others = FastSet::default();
        let Some((users, _)) = self
            .scan_with_referrers(
                &mut tx,
                "scan_users",
                USERS,
                5,
                &mut referrers,
                // A user whose referrer is outside the scope is neither kept nor one of
                // `others` that a run reads (the grant programs keep those in scope).
                |t| {
                    t.i64()?;
                    Ok(t.i64()?.is_some_and(|r| scope.covers(r)))
                },
                |t, k| user(t, k, &mut referred, &mut others),
            )
            .await?
        else {
            return Ok(None);
        };
        // Built once the scan is done, when the ids' range is known (an array over a dense one).
        let index = Arc::new(IdIndex::of(&referred, |u: &ReferredUser| u.id));
        // The receiver is gone only when the snapshot ended without the scans.
        let _ = index_tx.send(Some(Arc::clone(&index)));
        let mut registrations = vec![];
        let Some(regs) = self
            .scan(&mut tx, "scan_registrations", REGISTRATIONS, 2, |t| {
                keep_pair(
                    t,
                    |u| index.contains(u),
                    &mut registrations,
                    "reading registration events",
                )
            })
            .await?
        else {
            return Ok(None);
        };
        tx.commit()
            .await
            .map_err(|e| SideError::Read(q("ending a snapshot connection")(e)))?;
        Ok(Some(PartA {
            referred,
            others,
            registrations,
            timings: vec![users, regs],
        }))
    }

    async fn scan_b(
        &self,
        conn: &mut sqlx::PgConnection,
        snapshot_id: &str,
        window: (Instant, Instant),
        scope: Scope,
        mut referrers: tokio::sync::watch::Receiver<Option<Referrers>>,
        mut index: tokio::sync::watch::Receiver<Option<Index>>,
    ) -> Result<Option<PartB>, SideError> {
        let mut tx = import_snapshot(conn, snapshot_id, &self.scan_settings()).await?;
        // Untyped: compared as the column's type (scan_events.sql).
        let ts = |t| format!("'{}'", instant::to_rfc3339(t));
        let sql = EVENTS
            .replace("$1", &ts(window.0))
            .replace("$2", &ts(window.1));
        // The events are kept for the referrers alone (in scope).
        let mut events = vec![];
        let Some((ev, referrers)) = self
            .scan_with_referrers(
                &mut tx,
                "referrer_events",
                &sql,
                2,
                &mut referrers,
                // The referrers are in scope.
                |t| Ok(t.i64()?.is_some_and(|u| scope.covers(u))),
                |t, k| keep_pair(t, |u| k.contains(u), &mut events, "reading referrer events"),
            )
            .await?
        else {
            return Ok(None);
        };
        // Distinct pairs, as the joined query's DISTINCT (bytewise, as its COLLATE "C").
        events.sort_unstable();
        events.dedup();
        let Some(index) = wait(&mut index).await else {
            return Ok(None);
        };
        let mut part = PartB {
            subscriptions: vec![],
            host_bonus: vec![],
            events,
            timings: vec![ev],
        };
        let mut interner = Interner::default();
        let Some(subs) = self
            .scan(&mut tx, "scan_subscriptions", SUBSCRIPTIONS, 7, |t| {
                subscription(t, &index, &referrers, scope, &mut interner, &mut part)
            })
            .await?
        else {
            return Ok(None);
        };
        part.timings.push(subs);
        tx.commit()
            .await
            .map_err(|e| SideError::Read(q("ending a snapshot connection")(e)))?;
        Ok(Some(part))
    }

    /// Hands the scans the referrers in `snap.referrers` (already in scope) and joins what
    /// they read into the snapshot's referred users, registrations, referrer events and host
    /// bonus values, and returns the referrers of the other users with a referrer (the
    /// grant programs read their referrals). `Ok(None)`: no scans (COPY refused, no connection
    /// to import the snapshot on); read the joined queries instead. A cell that cannot be
    /// decoded is looked up and named on `tx`, the snapshot's own connection.
    pub(super) async fn join_scans(
        &self,
        tx: &mut sqlx::PgConnection,
        mut scans: Scans,
        snap: &mut Snapshot,
    ) -> Result<Option<Vec<i64>>, StoreError> {
        // Tests hold the referrers back until the scans have read every row, to decode them
        // all from what was kept before the referrers were known.
        crate::engine::test_hold(
            "REFERRAL_REWARDS_TEST_HOLD_REFERRERS_FILE",
            "before the scans are given the referrers",
        )
        .await;
        let _ = scans
            .referrers
            .send(Some(Arc::new(IdSet::new(&snap.referrers))));
        let a = settle(tx, &mut scans.a).await?;
        let b = settle(tx, &mut scans.b).await?;
        let (Some(a), Some(b)) = (a, b) else {
            return Ok(None);
        };
        let t = std::time::Instant::now();
        snap.referred = a.referred;
        crate::store::attach_subscriptions(&mut snap.referred, b.subscriptions);
        snap.registrations = a.registrations;
        snap.referrer_events = b.events;
        snap.host_bonus = b.host_bonus;
        for (query, rows, elapsed) in a.timings.into_iter().chain(b.timings) {
            tracing::debug!(
                query,
                rows,
                ms = elapsed.as_secs_f64() * 1e3,
                "snapshot scan"
            );
            snap.timings.push(QueryTiming {
                query,
                rows,
                elapsed,
            });
        }
        snap.timings.push(QueryTiming {
            query: "joining the scans",
            rows: snap.referred.len(),
            elapsed: t.elapsed(),
        });
        snap.via_copy = true;
        Ok(Some(a.others.into_iter().collect()))
    }
}

/// A watched value once it is there; `None` if its sender is gone without one.
async fn wait<T: Clone>(rx: &mut tokio::sync::watch::Receiver<Option<T>>) -> Option<T> {
    rx.wait_for(Option::is_some).await.ok()?.clone()
}

/// A scan task's result: `None` to read the joined queries instead.
async fn settle<T>(
    tx: &mut sqlx::PgConnection,
    task: &mut Side<Option<T>>,
) -> Result<Option<T>, StoreError> {
    match (&mut task.0).await {
        Ok(Ok(part)) => Ok(part),
        Ok(Err(SideError::Import(e))) => {
            tracing::warn!(error = %e, "no second snapshot connection; reading the joined queries on the first");
            Ok(None)
        }
        Ok(Err(SideError::Read(e))) => Err(e),
        Ok(Err(SideError::Decode(what, b))) => Err(bad(tx, what, b).await),
        Err(e) => Err(StoreError::Sql {
            what: "reading the snapshot's scans",
            message: e.to_string(),
        }),
    }
}

/// A `(user, ip_hash)` row, pushed onto `out` when its user is one `keep` wants.
fn keep_pair(
    t: Row<'_, '_>,
    keep: impl FnOnce(i64) -> bool,
    out: &mut Vec<(i64, String)>,
    what: &'static str,
) -> Result<(), Fail> {
    let user = t.i64()?;
    let ip = t.field()?;
    if user.is_some_and(keep) {
        out.push(pair(user, ip).map_err(|b| Fail(what, b))?);
    }
    Ok(())
}

/// A user with a referrer: kept if its referrer holds an invite code (and is in scope).
fn user(
    t: Row<'_, '_>,
    referrers: &IdSet,
    referred: &mut Vec<ReferredUser>,
    others: &mut FastSet<i64>,
) -> Result<(), Fail> {
    let at = |b: Bad| Fail(REFERRED, b);
    let (id, referrer) = (t.i64()?, t.i64()?);
    let Some(referrer) = referrer else {
        return Ok(());
    };
    if !referrers.contains(referrer) {
        others.insert(referrer);
        return Ok(());
    }
    let id = id.ok_or_else(|| at(null("users", "id", None, "an id")))?;
    let user = |column, expected| at(null("users", column, Some(id), expected));
    let created_at = pg_time(instant_of(t.i64()?), "users", "created_at", id)
        .map_err(at)?
        .ok_or_else(|| user("created_at", "a time"))?;
    let is_active = t.bool()?.ok_or_else(|| user("is_active", "a boolean"))?;
    let is_verified = t.bool()?.ok_or_else(|| user("is_verified", "a boolean"))?;
    referred.push(ReferredUser {
        id,
        referrer_id: referrer,
        created_at,
        is_active,
        is_verified,
        subscription: None,
    });
    Ok(())
}

/// A subscription: a referred user's; the host column of a referrer's or of any other with a
/// bonus.
fn subscription(
    t: Row<'_, '_>,
    index: &IdIndex,
    referrers: &IdSet,
    scope: Scope,
    interner: &mut Interner,
    part: &mut PartB,
) -> Result<(), Fail> {
    let at = |b: Bad| Fail(REFERRED, b);
    let user = t.i64()?;
    let (tier, status) = (t.field()?, t.field()?);
    let (started, expires) = (t.i64()?, t.i64()?);
    let sid = t.i64()?;
    let bonus = t.i64()?;
    if let Some(i) = user.and_then(|u| index.get(u)) {
        let sid = sid.ok_or_else(|| at(null("subscriptions", "id", None, "an id")))?;
        let text = |v, column| pg_text(v, "subscriptions", column, sid).map_err(at);
        let time = |v, column| pg_time(instant_of(v), "subscriptions", column, sid).map_err(at);
        part.subscriptions.push((
            i,
            Subscription {
                tier: interner.intern(text(tier, "tier")?.unwrap_or_default()),
                status: interner.intern(text(status, "status")?.unwrap_or_default()),
                started_at: time(started, "started_at")?,
                expires_at: time(expires, "expires_at")?,
            },
        ));
    }
    let referrer = user.is_some_and(|u| referrers.contains(u));
    if referrer || bonus.is_some_and(|b| b != 0) {
        let host = |b| Fail("reading subscriptions", b);
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
            part.host_bonus.push((user, bonus));
        }
    }
    Ok(())
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
        assert_eq!(instant_of(Some(i64::MAX - 1)), Some(TIME_OUT_OF_RANGE));
        assert_eq!(instant_of(Some(i64::MAX - PG_EPOCH_MICROS)), Some(i64::MAX));
    }
}
