//! The run lock (advisory locks on a dedicated connection) and the run history rows.

use super::*;
use crate::store::{Begun, RUN_COLUMNS, Trigger};

impl PgStore {
    /// Session advisory locks on a dedicated connection: exclusive on [`LOCK_KEY`] for a full
    /// or one-referrer run; shared on it plus exclusive on the shard's own key for a shard.
    pub async fn try_lock(&self, shard: Option<Shard>) -> Result<Option<RunLock>, StoreError> {
        self.on_lock_connection(|conn| self.lock_on(conn, shard))
            .await
    }

    /// `f` on a kept lock connection if there is one; a stale one fails `f`: then on a fresh
    /// one.
    pub(super) async fn on_lock_connection<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(sqlx::PgConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let kept = self.lock_conns.lock().await.pop();
        if let Some(conn) = kept
            && let Ok(r) = f(conn).await
        {
            return Ok(r);
        }
        f(self.lock_connection().await?).await
    }

    /// [`crate::store::Store::begin_run`] for a full or one-referrer run: `begin_run.sql` on the
    /// lock's connection ([`PgStore::on_lock_connection`]).
    pub async fn begin_run(
        &self,
        scope: Scope,
        user: Option<i64>,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
    ) -> Result<Begun, StoreError> {
        self.on_lock_connection(|conn| self.begin_on(conn, scope, user, as_of, now, trigger))
            .await
    }

    /// An error drops `conn`: a session lock the failed statement took is not released by its
    /// rollback, but closing the connection releases it.
    pub(super) async fn begin_on(
        &self,
        mut conn: sqlx::PgConnection,
        scope: Scope,
        user: Option<i64>,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
    ) -> Result<Begun, StoreError> {
        let (got, known, abandoned, run_id): (bool, bool, i64, Option<i64>) =
            sqlx::query_as(include_str!("../../../sql/queries/postgres/begin_run.sql"))
                .bind(LOCK_KEY)
                .bind(dt(now))
                .bind(user)
                .bind(scope.mode())
                .bind(dt(as_of))
                .bind(trigger.map(Trigger::as_str))
                .bind(crate::store::ORPHAN_ERROR)
                .fetch_one(&mut conn)
                .await
                .map_err(q("taking the run lock and recording the run"))?;
        self.begun(conn, got, known, abandoned, run_id).await
    }

    /// What `begin_run.sql`'s row says, with the lock's connection: kept when the lock was
    /// not taken, held in the [`RunLock`] otherwise.
    pub(super) async fn begun(
        &self,
        conn: sqlx::PgConnection,
        got: bool,
        known: bool,
        abandoned: i64,
        run_id: Option<i64>,
    ) -> Result<Begun, StoreError> {
        let lock = |conn: sqlx::PgConnection| RunLock {
            shard: None,
            _held: Held::Postgres {
                conn: Some(Box::new(conn)),
                released: false,
                discard: false,
            },
        };
        match (got, known, run_id) {
            (false, _, _) => {
                self.keep(conn).await;
                Ok(Begun::Locked)
            }
            (true, false, _) => Ok(Begun::UnknownUser(lock(conn))),
            (true, true, Some(run_id)) => Ok(Begun::Started {
                lock: lock(conn),
                abandoned: abandoned as u64,
                run_id,
            }),
            (true, true, None) => Err(StoreError::Runtime(
                "recording the run: the run's row was not inserted".into(),
            )),
        }
    }

    /// The lock's connection sits idle while the run reads and computes: a server-side
    /// `idle_session_timeout` (PostgreSQL 14+) would close it and free the lock mid-run. It is
    /// switched off for this one session; if the connection is lost anyway, the fence in
    /// [`PgStore::apply`] keeps the run from writing.
    async fn lock_connection(&self) -> Result<sqlx::PgConnection, StoreError> {
        let mut conn = sqlx::PgConnection::connect_with(&self.options)
            .await
            .map_err(q("connecting for the run lock"))?;
        sqlx::query(
            "SELECT set_config('idle_session_timeout', '0', false) \
             WHERE current_setting('server_version_num')::int >= 140000",
        )
        .execute(&mut conn)
        .await
        .map_err(q("connecting for the run lock"))?;
        // The run's start (begin_run.sql) runs here in a transaction of its own: bounded by
        // the run's timeouts for the whole session, as the apply is by its own `SET LOCAL`s.
        // Its orphan check reads the partial index of `running` rows as a plain index scan
        // (bitmap scans off for the session; the apply, and a one-referrer apply's read, turn
        // them on again for their own transactions): every finished run leaves a dead entry
        // there until a vacuum, which a bitmap scan visits in the table on every start (3 ms
        // after 12,000 runs, autovacuum off), while an index scan marks them dead once and
        // skips them after.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "{} SET enable_bitmapscan = off;",
            self.timeouts.replace("SET LOCAL", "SET")
        )))
        .execute(&mut conn)
        .await
        .map_err(q("connecting for the run lock"))?;
        Ok(conn)
    }

    async fn lock_on(
        &self,
        mut conn: sqlx::PgConnection,
        shard: Option<Shard>,
    ) -> Result<Option<RunLock>, StoreError> {
        let got: bool = match shard {
            None => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LOCK_KEY)
                    .fetch_one(&mut conn)
                    .await
            }
            Some(s) => {
                // Shared on the run key, exclusive on the shard's; and one shard count at a
                // time (`K/2` beside `K/3` would cover users twice): shared on the count's key,
                // then no other count's key may be held. Each process takes its own key before
                // looking, so two counts never both go ahead.
                async {
                    let (run, own, count): (bool, bool, bool) = sqlx::query_as(include_str!(
                        "../../../sql/queries/postgres/shard_lock.sql"
                    ))
                    .bind(LOCK_KEY)
                    .bind(LOCK_KEY.wrapping_add(((s.count as i64) << 20) | s.index as i64))
                    .bind(COUNT_KEY_BASE)
                    .bind(s.count as i64)
                    .fetch_one(&mut conn)
                    .await?;
                    if !(run && own && count) {
                        return Ok(false);
                    }
                    let other: bool = sqlx::query_scalar(include_str!(
                        "../../../sql/queries/postgres/other_shard_count.sql"
                    ))
                    .bind(COUNT_KEY_BASE)
                    .bind(s.count as i64)
                    .fetch_one(&mut conn)
                    .await?;
                    Ok(!other)
                }
                .await
            }
        }
        .map_err(q("taking the run lock"))?;
        if !got {
            // Let go of whatever half was taken, and keep the connection.
            self.keep(conn).await;
            return Ok(None);
        }
        Ok(Some(RunLock {
            shard,
            _held: Held::Postgres {
                conn: Some(Box::new(conn)),
                released: false,
                discard: false,
            },
        }))
    }

    /// Releases the run lock and keeps its connection for the next run (unless a failed write
    /// left it unusable and it is gone already).
    pub async fn release(&self, lock: RunLock) {
        if let Held::Postgres {
            conn: Some(conn),
            released,
            discard,
        } = lock._held
        {
            if discard {
                // Dropped: closing the connection releases its locks.
                drop(conn);
            } else if released {
                self.keep_released(*conn).await;
            } else {
                self.keep(*conn).await;
            }
        }
    }

    /// Waits for the lock's connection to end what a dropped apply left on it (a queued
    /// rollback goes out; an in-flight commit completes or not). If it does not answer, it is
    /// closed at once: its session ends and whatever it held (the run row's lock among them) is
    /// released, so that recording the failure cannot wait on it.
    pub async fn settle(&self, lock: &mut RunLock) {
        if let Held::Postgres { conn, .. } = &mut lock._held
            && let Some(c) = conn
        {
            let ping = tokio::time::timeout(std::time::Duration::from_secs(10), c.ping());
            if !matches!(ping.await, Ok(Ok(()))) {
                tracing::warn!(
                    "the run lock's connection did not answer after a failed run; closing it"
                );
                *conn = None;
            }
        }
    }

    async fn keep(&self, mut conn: sqlx::PgConnection) {
        let unlocked = sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(&mut conn)
            .await
            .is_ok();
        if unlocked {
            self.keep_released(conn).await;
        }
        // Otherwise dropped: closing the connection releases its locks.
    }

    /// Keeps a lock connection that holds no lock any more (up to two of them).
    async fn keep_released(&self, conn: sqlx::PgConnection) {
        let mut kept = self.lock_conns.lock().await;
        if kept.len() < 2 {
            kept.push(conn);
        }
    }

    pub async fn abandon_orphans(
        &self,
        shard: Option<Shard>,
        now: Instant,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(include_str!("../../../sql/queries/abandon_orphans.sql"))
            .bind(dt(now))
            .bind(shard.map(|s| s.to_string()))
            .bind(crate::store::ORPHAN_ERROR)
            .execute(&self.pool)
            .await
            .map_err(q("marking abandoned runs"))?;
        Ok(r.rows_affected())
    }

    pub async fn start_run(
        &self,
        scope: Scope,
        as_of: Instant,
        now: Instant,
        trigger: Option<Trigger>,
    ) -> Result<i64, StoreError> {
        sqlx::query_scalar(include_str!("../../../sql/queries/start_run.sql"))
            .bind(scope.mode())
            .bind(scope.referrer())
            .bind(scope.shard().map(|s| s.to_string()))
            .bind(dt(as_of))
            .bind(dt(now))
            .bind(trigger.map(Trigger::as_str))
            .fetch_one(&self.pool)
            .await
            .map_err(q("recording the run"))
    }

    /// In a transaction bounded by the run's timeouts: the row may be locked by the failed
    /// run's own transaction, still ending on a connection that is gone.
    pub async fn fail_run(
        &self,
        run_id: i64,
        error: &str,
        now: Instant,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("recording the failed run"))?;
        utc(&mut tx, &self.timeouts).await?;
        let r = sqlx::query(include_str!("../../../sql/queries/fail_run.sql"))
            .bind(dt(now))
            .bind(error)
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(q("recording the failed run"))?;
        tx.commit().await.map_err(q("recording the failed run"))?;
        Ok(r.rows_affected() == 1)
    }

    /// The newest `limit` runs, or the one run `id`.
    pub async fn runs(&self, id: Option<i64>, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        self.runs_where("TRUE", id, limit).await
    }

    /// The newest `limit` runs whose row matches `filter` (one of the job's constant SQL
    /// conditions, [`crate::store::RunKind`]), or the one run `id`.
    pub async fn runs_where(
        &self,
        filter: &'static str,
        id: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RunRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM reward_runs WHERE ({filter}) AND ($1::bigint IS NULL OR id = $1) \
             ORDER BY id DESC LIMIT $2"
        )))
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading reward_runs"))?;
        rows.iter()
            .map(|r| -> Result<RunRow, sqlx::Error> {
                let t = |i: usize| -> Result<Option<Instant>, sqlx::Error> {
                    Ok(r.try_get::<Option<DateTime<Utc>>, _>(i)?
                        .map(instant::from_datetime))
                };
                Ok(RunRow {
                    id: r.try_get(0)?,
                    mode: r.try_get(1)?,
                    referrer_user_id: r.try_get(2)?,
                    as_of: t(3)?.unwrap_or_default(),
                    started_at: t(4)?.unwrap_or_default(),
                    finished_at: t(5)?,
                    status: r.try_get(6)?,
                    referrers_processed: r.try_get(7)?,
                    rewards_up: r.try_get(8)?,
                    rewards_down: r.try_get(9)?,
                    bonus_delta: r.try_get(10)?,
                    reward_rows_written: r.try_get(11)?,
                    host_values_written: r.try_get(12)?,
                    conflicts: r.try_get(13)?,
                    outcome_counts: r.try_get(14)?,
                    digest: r.try_get(15)?,
                    error: r.try_get(16)?,
                    programs: r.try_get(17)?,
                    shard: r.try_get(18)?,
                    trigger: r.try_get(19)?,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(q("decoding reward_runs"))
    }
}

impl RunLock {
    /// Closes the lock's connection at the release instead of keeping it for the next run:
    /// a read on it failed (see one.rs), which a fresh connection may not.
    pub(super) fn discard_connection(&mut self) {
        if let Held::Postgres { discard, .. } = &mut self._held {
            *discard = true;
        }
    }
}
