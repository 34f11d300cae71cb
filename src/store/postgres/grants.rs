//! The grant programs' reads and writes (docs/rules.md §7): their part of the snapshot, in the
//! snapshot's transaction, and their ledger rows and balance writes, in the run's apply
//! transaction.

use std::collections::{BTreeMap, HashSet};

use sqlx::postgres::PgArguments;

use super::read::{Bad, bad, null, pg_time};
use super::*;
use crate::program::grants::plan::ProgramPlan;
use crate::program::grants::{GrantsSnapshot, Payment, Referral};
use crate::snapshot::QueryTiming;
use crate::store::{GrantsApplied, Part, ledger_grant, share_slots_reads};

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, PgArguments>;

/// One row's cells, from binary COPY or a SELECT row, read left to right.
pub(super) enum Cells<'a, 'b> {
    Copy(&'b mut pgcopy::Tuples<'a>),
    Row(&'b PgRow, usize),
}

impl Cells<'_, '_> {
    pub(super) fn i64(&mut self) -> Result<Option<i64>, Bad> {
        match self {
            Cells::Copy(t) => Ok(t.i64()?),
            Cells::Row(r, i) => {
                *i += 1;
                Ok(r.try_get(*i - 1)?)
            }
        }
    }

    fn bool(&mut self) -> Result<Option<bool>, Bad> {
        match self {
            Cells::Copy(t) => Ok(t.bool()?),
            Cells::Row(r, i) => {
                *i += 1;
                Ok(r.try_get(*i - 1)?)
            }
        }
    }

    /// A text cell; text that is not UTF-8 is an error naming `table.column` of `row`.
    fn text(
        &mut self,
        table: &'static str,
        column: &'static str,
        row: Option<i64>,
    ) -> Result<Option<String>, Bad> {
        let bytes: Option<Vec<u8>> = match self {
            Cells::Copy(t) => t.field()?.map(<[u8]>::to_vec),
            Cells::Row(r, i) => {
                *i += 1;
                r.try_get::<Option<Vec<u8>>, _>(*i - 1).or_else(|_| {
                    r.try_get::<Option<String>, _>(*i - 1)
                        .map(|s| s.map(String::into_bytes))
                })?
            }
        };
        bytes
            .map(|b| {
                String::from_utf8(b).map_err(|e| Bad::Cell {
                    table,
                    column,
                    row,
                    value: Some(format!("x'{}' (text that is not UTF-8)", hex(e.as_bytes()))),
                    expected: "UTF-8 text",
                })
            })
            .transpose()
    }
}

/// The payments and the ledger, read on connections that imported the snapshot's exported
/// snapshot (`pg_export_snapshot`, as `pg_dump -j` does) while the first connection reads the
/// rest: two side reads at once, each on a connection of its own, the payments (and the
/// referrers, when the users' scan does not give them) and the ledger; each fills its part.
#[derive(Default)]
pub(super) struct SideRead {
    /// Every referrer (`grants_referrers.sql`), unless the users' scan gives them.
    referrers: Option<Vec<i64>>,
    payments: Option<Vec<Payment>>,
    ledger: Option<Vec<(crate::program::grants::LedgerGrant, bool)>>,
    timings: Vec<QueryTiming>,
}

/// Which part of the grant programs' snapshot a side read reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SidePart {
    /// The payments, after the referrers when asked.
    Payments {
        referrers: bool,
    },
    Ledger,
}

pub(super) enum SideError {
    /// No connection, or the snapshot could not be imported: read on the snapshot's own
    /// connection instead.
    Import(StoreError),
    /// A read failed: the snapshot fails, as it would on one connection.
    Read(StoreError),
    /// A cell could not be decoded: the snapshot's own connection names it (`read::bad`), the
    /// side one being in the middle of its COPY.
    Decode(&'static str, Bad),
}

/// A side read's task, aborted if the snapshot ends without it (an error on the first
/// connection): nothing waits for it then.
pub(super) struct Side<T = SideRead>(pub(super) tokio::task::JoinHandle<Result<T, SideError>>);

impl<T> Drop for Side<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The second connection, closed rather than returned to the pool unless its read ended well
/// (an aborted or failed read may leave it in the middle of a COPY).
pub(super) struct CloseUnlessDone {
    pub(super) conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    pub(super) done: bool,
}

/// Starts a read-only transaction on the snapshot exported as `snapshot_id`, in UTC with the
/// run's timeouts. Tests hold it before the import (`REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE`)
/// to commit a change the snapshot must not see.
pub(super) async fn import_snapshot<'c>(
    conn: &'c mut sqlx::PgConnection,
    snapshot_id: &str,
    timeouts: &str,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, SideError> {
    crate::engine::test_hold(
        "REFERRAL_REWARDS_TEST_HOLD_SIDE_READ_FILE",
        "before a second snapshot connection imports the snapshot",
    )
    .await;
    let import = |e| SideError::Import(q("importing the snapshot")(e));
    let mut tx = conn
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(import)?;
    // The id is the server's own answer (hex digits and dashes), never user input.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET TRANSACTION SNAPSHOT '{snapshot_id}'"
    )))
    .execute(&mut *tx)
    .await
    .map_err(import)?;
    utc(&mut tx, timeouts).await.map_err(SideError::Import)?;
    Ok(tx)
}

impl Drop for CloseUnlessDone {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

impl PgStore {
    /// Starts the side read of the snapshot exported as `snapshot_id`; `permit` keeps a second
    /// side read from waiting for a connection that the first holds (see `side_reads`).
    pub(super) fn spawn_side_read(
        self: &std::sync::Arc<Self>,
        snapshot_id: String,
        permit: std::sync::Arc<tokio::sync::OwnedSemaphorePermit>,
        as_of: Instant,
        read: GrantsRead,
        part: SidePart,
    ) -> Side {
        let me = std::sync::Arc::clone(self);
        Side(tokio::spawn(async move {
            let _permit = permit;
            let conn = me
                .pool
                .acquire()
                .await
                .map_err(|e| SideError::Import(q("opening a side snapshot connection")(e)))?;
            let mut conn = CloseUnlessDone { conn, done: false };
            let r = me
                .side_read(&mut conn.conn, &snapshot_id, as_of, &read, part)
                .await;
            conn.done = r.is_ok();
            r
        }))
    }

    async fn side_read(
        &self,
        conn: &mut sqlx::PgConnection,
        snapshot_id: &str,
        as_of: Instant,
        read: &GrantsRead,
        part: SidePart,
    ) -> Result<SideRead, SideError> {
        let mut tx = import_snapshot(conn, snapshot_id, &self.timeouts).await?;
        let mut sw = Stopwatch::start();
        let mut out = SideRead::default();
        match part {
            SidePart::Payments { referrers } => {
                if referrers {
                    let all = self
                        .read_referrers(&mut tx)
                        .await
                        .map_err(SideError::Read)?;
                    sw.lap(&mut out.timings, "grants_referrers", all.len());
                    out.referrers = Some(all);
                }
                let payments = self
                    .read_payments(&mut tx, &None, as_of, read)
                    .await
                    .map_err(SideError::Read)?;
                sw.lap(&mut out.timings, "grants_payments", payments.len());
                out.payments = Some(payments);
            }
            SidePart::Ledger => {
                let ledger = self
                    .read_ledger(&mut tx, &None)
                    .await
                    .map_err(SideError::Read)?;
                sw.lap(&mut out.timings, "grants_ledger", ledger.len());
                out.ledger = Some(ledger);
            }
        }
        tx.commit()
            .await
            .map_err(|e| SideError::Read(q("ending a side snapshot connection")(e)))?;
        Ok(out)
    }
}

/// A text array for the COPY text of a query: each element a string constant with its quotes
/// doubled (the server's standard_conforming_strings is on by default since 9.1).
fn text_array_literal(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("'{}'", s.replace('\'', "''")))
        .collect();
    format!("ARRAY[{}]::text[]", quoted.join(","))
}

impl Cells<'_, '_> {
    /// A text cell shared through `interner`: no allocation per row for a column of a few
    /// distinct values.
    fn interned(
        &mut self,
        table: &'static str,
        column: &'static str,
        row: Option<i64>,
        interner: &mut Interner,
    ) -> Result<Option<std::sync::Arc<str>>, Bad> {
        match self {
            Cells::Copy(t) => t
                .field()?
                .map(|b| {
                    std::str::from_utf8(b)
                        .map(|s| interner.intern(s))
                        .map_err(|_| Bad::Cell {
                            table,
                            column,
                            row,
                            value: Some(format!("x'{}' (text that is not UTF-8)", hex(b))),
                            expected: "UTF-8 text",
                        })
                })
                .transpose(),
            Cells::Row(..) => Ok(self.text(table, column, row)?.map(|s| interner.intern(&s))),
        }
    }
}

/// A bigint array for the COPY text of a query (NULL: every referrer).
fn ids_literal(ids: &Option<Vec<i64>>) -> String {
    match ids {
        None => "NULL".into(),
        Some(ids) => format!(
            "'{{{}}}'",
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        ),
    }
}

impl PgStore {
    /// Reads one query through COPY where it can, else SELECT, decoding each row with
    /// `decode` (which may drop a row by answering `None`).
    #[allow(clippy::too_many_arguments)] // the query, both ways of binding it, and its decoder
    pub(super) async fn rows<T>(
        &self,
        tx: &mut sqlx::PgConnection,
        sql: &'static str,
        literals: &[String],
        bind: impl for<'q> FnOnce(PgQuery<'q>) -> PgQuery<'q>,
        fields: usize,
        what: &'static str,
        mut decode: impl FnMut(&mut Cells<'_, '_>) -> Result<Option<T>, Bad>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        let result: Result<(), Bad> =
            if let Some(bytes) = self.copy_out(tx, sql, literals, what).await? {
                (|| {
                    let mut t = pgcopy::Tuples::new(&bytes, fields)?;
                    while t.next_tuple()? {
                        out.extend(decode(&mut Cells::Copy(&mut t))?);
                    }
                    Ok(())
                })()
            } else {
                let rows: Vec<PgRow> = bind(sqlx::query(sql))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(q(what))?;
                rows.iter().try_for_each(|r| {
                    out.extend(decode(&mut Cells::Row(r, 0))?);
                    Ok(())
                })
            };
        match result {
            Ok(()) => Ok(out),
            Err(b) => Err(bad(tx, what, b).await),
        }
    }

    /// The grant programs' part of the snapshot (see `sqlite_read::read_grants`), and whether
    /// its payments and ledger came from the side read.
    #[allow(clippy::too_many_arguments)] // the snapshot's transaction, scope and parts so far
    pub(super) async fn read_grants(
        &self,
        tx: &mut sqlx::PgConnection,
        scope: Scope,
        window: (Instant, Instant),
        read: &GrantsRead,
        slots: &Snapshot,
        others: Option<Vec<i64>>,
        timings: &mut Vec<QueryTiming>,
        sides: Vec<Side>,
    ) -> Result<(GrantsSnapshot, bool), StoreError> {
        let mut sw = Stopwatch::start();
        let mut g = GrantsSnapshot::default();
        let as_of = window.1;
        let in_scope = |r: i64| !matches!(scope, Scope::Shard(s) if !s.contains(r));
        // The referrers, the payments and the ledger: from the side read started with the
        // snapshot when there is one (done by now: this connection has read the slots part
        // meanwhile), else here.
        let mut side = SideRead::default();
        let mut side_read = false;
        for mut handle in sides {
            match (&mut handle.0).await {
                Ok(Ok(read)) => {
                    side_read = true;
                    side.referrers = side.referrers.or(read.referrers);
                    side.payments = side.payments.or(read.payments);
                    side.ledger = side.ledger.or(read.ledger);
                    side.timings.extend(read.timings);
                }
                Ok(Err(SideError::Import(e))) => {
                    tracing::warn!(error = %e, "a side snapshot connection is unavailable; reading its part on the first");
                }
                Ok(Err(SideError::Read(e))) => return Err(e),
                Ok(Err(SideError::Decode(what, b))) => return Err(bad(tx, what, b).await),
                Err(e) => {
                    return Err(StoreError::Sql {
                        what: "reading payments and the ledger",
                        message: e.to_string(),
                    });
                }
            }
        }
        // The referrers whose referrals are read here, and the filter of the payments and the
        // ledger (`None`: every referred user's). A one-user run reads the user's set and its
        // referrer's; a full or shard run the sets of referrers without an invite code, and
        // takes the invite-code holders' from the slots part of the snapshot (`complement`).
        let complement = !matches!(scope, Scope::Referrer(_));
        let (referrers, filter): (Vec<i64>, Option<Vec<i64>>) = match scope {
            Scope::Referrer(x) => {
                let up: Option<Option<i64>> = sqlx::query_scalar(include_str!(
                    "../../../sql/queries/postgres/grants_referrer_of.sql"
                ))
                .bind(x)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q("reading the user's referrer"))?;
                let mut ids = vec![x];
                ids.extend(up.flatten());
                (ids.clone(), Some(ids))
            }
            _ => {
                // `others`: the referrers the users' scan found without an invite code in
                // scope; else every referrer, from the side read or read here.
                let all = match (others, side.referrers.take()) {
                    (Some(o), _) | (None, Some(o)) => o,
                    (None, None) => self.read_referrers(tx).await?,
                };
                let holders: HashSet<i64> = slots.referrers.iter().copied().collect();
                let rest = all
                    .into_iter()
                    .filter(|r| in_scope(*r) && !holders.contains(r))
                    .collect();
                (rest, None)
            }
        };
        let lit = ids_literal(&Some(referrers.clone()));

        let ids = referrers.clone();
        g.referrals = self
            .rows(
                tx,
                include_str!("../../../sql/queries/postgres/grants_referrals.sql"),
                std::slice::from_ref(&lit),
                move |qy| qy.bind(ids),
                4,
                "reading referrals",
                |c| {
                    let id = c.i64()?.ok_or_else(|| null("users", "id", None, "an id"))?;
                    let referrer_id = c
                        .i64()?
                        .ok_or_else(|| null("users", "referred_by_user_id", Some(id), "an id"))?;
                    let signed_up_at = pg_time(c.i64()?, "users", "created_at", id)?
                        .ok_or_else(|| null("users", "created_at", Some(id), "a time"))?;
                    let referrer_exists = c.bool()?.unwrap_or(false);
                    Ok(in_scope(referrer_id).then_some(Referral {
                        referrer_id,
                        user_id: id,
                        signed_up_at,
                        referrer_exists,
                    }))
                },
            )
            .await?;
        if complement {
            share_slots_reads(&mut g, slots, Part::Referrals);
        }
        sw.lap(timings, "grants_referrals", g.referrals.len());
        let referred =
            crate::ids::IdSet::new(&g.referrals.iter().map(|x| x.user_id).collect::<Vec<_>>());

        if read.fraud {
            let ids = referrers.clone();
            g.registrations = self
                .rows(
                    tx,
                    include_str!("../../../sql/queries/postgres/grants_registrations.sql"),
                    std::slice::from_ref(&lit),
                    move |qy| qy.bind(ids),
                    2,
                    "reading registration events",
                    |c| {
                        let user = c.i64()?.ok_or_else(|| {
                            null("telemetry_events", "user_id", None, "a user id")
                        })?;
                        let ip = c.text("telemetry_events", "ip_hash", None)?;
                        Ok(ip.filter(|_| referred.contains(user)).map(|ip| (user, ip)))
                    },
                )
                .await?;
            if complement {
                share_slots_reads(&mut g, slots, Part::Registrations);
            }
            sw.lap(timings, "grants_registrations", g.registrations.len());

            let wanted: HashSet<i64> = g.referrals.iter().map(|x| x.referrer_id).collect();
            let ids = referrers.clone();
            let literals = [
                format!("'{}'::timestamptz", instant::to_rfc3339(window.0)),
                format!("'{}'::timestamptz", instant::to_rfc3339(window.1)),
                lit.clone(),
            ];
            g.referrer_events = self
                .rows(
                    tx,
                    include_str!("../../../sql/queries/postgres/grants_referrer_events.sql"),
                    &literals,
                    move |qy| qy.bind(dt(window.0)).bind(dt(window.1)).bind(ids),
                    2,
                    "reading referrer events",
                    |c| {
                        let user = c.i64()?.ok_or_else(|| {
                            null("telemetry_events", "user_id", None, "a user id")
                        })?;
                        let ip = c.text("telemetry_events", "ip_hash", None)?;
                        Ok(ip.filter(|_| wanted.contains(&user)).map(|ip| (user, ip)))
                    },
                )
                .await?;
            if complement {
                share_slots_reads(&mut g, slots, Part::ReferrerEvents);
            }
            sw.lap(timings, "grants_referrer_events", g.referrer_events.len());
        }

        timings.extend(side.timings);
        // What no side read gave (none started, or its connection was unavailable): read here.
        let payments = match side.payments {
            Some(p) => p,
            None => {
                let payments = self.read_payments(tx, &filter, as_of, read).await?;
                sw.lap(timings, "grants_payments", payments.len());
                payments
            }
        };
        let ledger = match side.ledger {
            Some(l) => l,
            None => {
                let ledger = self.read_ledger(tx, &filter).await?;
                sw.lap(timings, "grants_ledger", ledger.len());
                ledger
            }
        };
        // Only the referred users in scope (a shard's; every referred user's for a full run).
        g.payments = payments;
        g.payments.retain(|p| referred.contains(p.user_id));
        g.ledger = crate::store::live_ledger(
            ledger
                .into_iter()
                .filter(|(x, _)| referred.contains(x.user_id))
                .collect(),
        );
        Ok((g, side_read))
    }

    /// Every user that referred someone (`grants_referrers.sql`).
    async fn read_referrers(&self, tx: &mut sqlx::PgConnection) -> Result<Vec<i64>, StoreError> {
        sqlx::query_scalar(include_str!(
            "../../../sql/queries/postgres/grants_referrers.sql"
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(q("reading referrers"))
    }

    /// The payments that can be a conversion (see grants_payments.sql) of the referred users
    /// of `filter`'s referrers (`None`: every referred user).
    pub(super) async fn read_payments(
        &self,
        tx: &mut sqlx::PgConnection,
        filter: &Option<Vec<i64>>,
        as_of: Instant,
        read: &GrantsRead,
    ) -> Result<Vec<Payment>, StoreError> {
        let literals = [
            ids_literal(filter),
            format!("'{}'::timestamptz", instant::to_rfc3339(as_of)),
            text_array_literal(&read.statuses),
            read.min_payment_cents.to_string(),
        ];
        let (ids, statuses, min_cents) = (
            filter.clone(),
            read.statuses.clone(),
            read.min_payment_cents,
        );
        let mut interner = Interner::default();
        self.rows(
            tx,
            include_str!("../../../sql/queries/postgres/grants_payments.sql"),
            &literals,
            move |qy| qy.bind(ids).bind(dt(as_of)).bind(statuses).bind(min_cents),
            6,
            "reading payments",
            |c| {
                let id = c
                    .i64()?
                    .ok_or_else(|| null("payments", "id", None, "an id"))?;
                let cell = |column, expected| null("payments", column, Some(id), expected);
                let user_id = c.i64()?.ok_or_else(|| cell("user_id", "a user id"))?;
                let amount_cents = c.i64()?.ok_or_else(|| cell("amount_cents", "an integer"))?;
                let currency = c
                    .interned("payments", "currency", Some(id), &mut interner)?
                    .ok_or_else(|| cell("currency", "text"))?;
                let status = c
                    .interned("payments", "status", Some(id), &mut interner)?
                    .ok_or_else(|| cell("status", "text"))?;
                let created_at = pg_time(c.i64()?, "payments", "created_at", id)?
                    .ok_or_else(|| cell("created_at", "a time"))?;
                Ok((created_at <= as_of).then_some(Payment {
                    id,
                    user_id,
                    amount_cents,
                    currency,
                    status,
                    created_at,
                }))
            },
        )
        .await
    }

    /// Every ledger row of the referred users of `filter`'s referrers (`None`: of every user),
    /// with whether it is a reversal.
    pub(super) async fn read_ledger(
        &self,
        tx: &mut sqlx::PgConnection,
        filter: &Option<Vec<i64>>,
    ) -> Result<Vec<(crate::program::grants::LedgerGrant, bool)>, StoreError> {
        const LED: &str = "reading referral_grants";
        let ids = filter.clone();
        let mut interner = Interner::default();
        type Row = (crate::program::grants::LedgerGrant, bool);
        let rows: Vec<Result<Row, StoreError>> = self
            .rows(
                tx,
                include_str!("../../../sql/queries/postgres/grants_ledger.sql"),
                &[ids_literal(filter)],
                move |qy| qy.bind(ids),
                10,
                LED,
                |c| {
                    let table = "referral_grants";
                    // Interned: a few distinct values in every row (no allocation per row).
                    let program = c.interned(table, "program", None, &mut interner)?;
                    let referrer = c.i64()?.unwrap_or_default();
                    let user = c.i64()?.unwrap_or_default();
                    let party = c.interned(table, "party", None, &mut interner)?;
                    let credited = c.i64()?.unwrap_or_default();
                    let (days, cents) = (c.i64()?, c.i64()?);
                    let seq = c.i64()?.unwrap_or_default();
                    let payment = c.i64()?;
                    let reversal = c.bool()?.unwrap_or(false);
                    Ok(Some(
                        ledger_grant(
                            program.as_deref().unwrap_or_default(),
                            referrer,
                            user,
                            party.as_deref().unwrap_or_default(),
                            credited,
                            days,
                            cents,
                            seq,
                            payment,
                            false,
                            &mut interner,
                        )
                        .map(|g| (g, reversal)),
                    ))
                },
            )
            .await?;
        rows.into_iter().collect()
    }

    /// The grant programs' writes, inside the run's apply transaction: the ledger rows, then
    /// the balances of the rows actually written (a row another run wrote first is skipped, and
    /// so is its balance change).
    pub(super) async fn apply_grants(
        &self,
        tx: &mut sqlx::PgConnection,
        programs: &[ProgramPlan],
        run_id: i64,
        as_of: Instant,
    ) -> Result<GrantsApplied, StoreError> {
        let rows = crate::store::ledger_rows(programs);
        let mut out = GrantsApplied {
            planned: rows.len() as u64,
            ..GrantsApplied::default()
        };
        if rows.is_empty() {
            return Ok(out);
        }
        let col_s = |f: fn(&crate::store::LedgerRow) -> String| -> Vec<String> {
            rows.iter().map(f).collect()
        };
        let col_i = |f: fn(&crate::store::LedgerRow) -> Option<i64>| -> Vec<Option<i64>> {
            rows.iter().map(f).collect()
        };
        let written: Vec<PgRow> = sqlx::query(include_str!(
            "../../../sql/queries/postgres/insert_grants.sql"
        ))
        .bind(col_s(|r| r.program.clone()))
        .bind(col_i(|r| Some(r.referrer_id)))
        .bind(col_i(|r| Some(r.user_id)))
        .bind(col_s(|r| r.party.as_str().to_owned()))
        .bind(col_s(|r| r.kind().to_owned()))
        .bind(col_i(|r| Some(r.seq)))
        .bind(col_i(|r| Some(r.credited_user_id)))
        .bind(col_i(|r| r.days()))
        .bind(col_i(|r| r.cents()))
        .bind(col_i(|r| r.payment_id))
        .bind(run_id)
        .bind(dt(as_of))
        .fetch_all(&mut *tx)
        .await
        .map_err(q("writing referral_grants"))?;

        let mut balances: BTreeMap<i64, crate::store::Balance> = BTreeMap::new();
        for r in &written {
            let kind: String = r.try_get(3).map_err(q("writing referral_grants"))?;
            let credited: i64 = r.try_get(4).map_err(q("writing referral_grants"))?;
            let days: Option<i64> = r.try_get(5).map_err(q("writing referral_grants"))?;
            let cents: Option<i64> = r.try_get(6).map_err(q("writing referral_grants"))?;
            let b = balances.entry(credited).or_default();
            b.add(kind == "reversal", days, cents);
            if kind == "reversal" {
                out.reversals_written += 1;
            } else {
                out.grants_written += 1;
            }
        }
        out.conflicts = out.planned - written.len() as u64;

        let cents: Vec<(i64, i64)> = balances
            .iter()
            .filter(|(_, b)| b.cents != 0)
            .map(|(u, b)| (*u, b.cents))
            .collect();
        if !cents.is_empty() {
            sqlx::query(include_str!(
                "../../../sql/queries/postgres/credit_cents.sql"
            ))
            .bind(cents.iter().map(|c| c.0).collect::<Vec<_>>())
            .bind(cents.iter().map(|c| c.1).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(q("writing users.credit_cents"))?;
        }
        let days: Vec<(i64, i64, i64)> = balances
            .iter()
            .filter(|(_, b)| b.days_touched)
            .map(|(u, b)| (*u, b.days_reversed, b.days_granted))
            .collect();
        if !days.is_empty() {
            sqlx::query(include_str!(
                "../../../sql/queries/postgres/credit_until.sql"
            ))
            .bind(days.iter().map(|c| c.0).collect::<Vec<_>>())
            .bind(days.iter().map(|c| c.1).collect::<Vec<_>>())
            .bind(days.iter().map(|c| c.2).collect::<Vec<_>>())
            .bind(dt(as_of))
            .execute(&mut *tx)
            .await
            .map_err(q("writing users.credit_until"))?;
        }
        out.balances_written = balances.len() as u64;
        Ok(out)
    }
}
