//! The apply: one transaction on the run lock's connection, set-based writes.

use super::*;
use crate::store::RunFinish;

impl PgStore {
    /// The write runs on the run lock's own connection: the lock is a session lock of that
    /// connection, so the transaction can only commit while the lock is held. Had the server
    /// closed the connection (an idle reaper, a network drop, `pg_terminate_backend`), the lock
    /// would be free for another run, and this write fails instead of racing it.
    pub async fn apply(
        &self,
        lock: &mut RunLock,
        writes: &Writes<'_>,
    ) -> Result<ApplyOutcome, StoreError> {
        let Writes {
            plan,
            grants,
            run_id,
            as_of,
            new_subscription: new_sub,
            finish,
            progress,
        } = *writes;
        let Held::Postgres { conn: Some(conn) } = &mut lock._held else {
            return Err(StoreError::Runtime(
                "the run lock's connection is gone; nothing was written".into(),
            ));
        };
        let mut out = ApplyOutcome::default();
        // Nothing to write but the run's end (a one-referrer recompute that finds its rewards
        // right, the common case): that one statement is its own transaction, two round trips
        // fewer than BEGIN … COMMIT. The lock's connection fences it all the same.
        if grants.is_empty()
            && plan.reward_upserts().next().is_none()
            && plan.host_changes().next().is_none()
        {
            crate::engine::inside_write(progress).await;
            finish_run(conn, finish, &out, run_id).await?;
            return Ok(out);
        }
        // BEGIN and the transaction's settings (see `utc`) in one round trip; bitmap scans,
        // off for the lock's session (see `lock_connection`), on again for the writes.
        let begin = format!(
            "BEGIN; SET LOCAL TIME ZONE 'UTC'; SET LOCAL enable_bitmapscan = on; {}",
            self.timeouts
        );
        let mut tx = conn
            .begin_with(sqlx::AssertSqlSafe(begin))
            .await
            .map_err(|e| StoreError::Sql {
                what: "starting the write transaction",
                message: format!(
                    "the run lock's connection was lost, so another run may hold the lock now: {}",
                    crate::store::one_line(&e.to_string())
                ),
            })?;

        let upserts: Vec<&RewardResult> = plan.reward_upserts().collect();
        if !upserts.is_empty() {
            let col =
                |f: fn(&RewardResult) -> i64| upserts.iter().map(|r| f(r)).collect::<Vec<i64>>();
            let r = sqlx::query(include_str!(
                "../../../sql/queries/postgres/upsert_rewards.sql"
            ))
            .bind(col(|r| r.referrer_user_id))
            .bind(col(|r| r.referred_users_total))
            .bind(col(|r| r.qualified_referrals))
            .bind(col(|r| r.disqualified_self_referral))
            .bind(col(|r| r.disqualified_cooldown))
            .bind(col(|r| r.disqualified_missing_ip))
            .bind(col(|r| r.disqualified_shared_ip))
            .bind(col(|r| r.disqualified_duplicate_ip))
            .bind(col(|r| r.bonus_slots))
            .bind(
                upserts
                    .iter()
                    .map(|r| r.badge.clone())
                    .collect::<Vec<Option<String>>>(),
            )
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(q("writing referral_rewards"))?;
            out.reward_rows_written = r.rows_affected();
        }
        crate::engine::inside_write(progress).await;

        let (mut up_ids, mut up_old, mut up_new) = (vec![], vec![], vec![]);
        let (mut in_ids, mut in_new) = (vec![], vec![]);
        for (user, change) in plan.host_changes() {
            match change {
                HostChange::Update { old, new } => {
                    up_ids.push(user);
                    up_old.push(old);
                    up_new.push(host_int(new));
                }
                HostChange::Insert { new } => {
                    in_ids.push(user);
                    in_new.push(host_int(new));
                }
            }
        }
        let mut applied: HashSet<i64> = HashSet::new();
        if !up_ids.is_empty() {
            let ids: Vec<i64> = sqlx::query_scalar(include_str!(
                "../../../sql/queries/postgres/update_host.sql"
            ))
            .bind(up_ids)
            .bind(up_old)
            .bind(up_new)
            .fetch_all(&mut *tx)
            .await
            .map_err(q("writing subscriptions.referral_bonus_domains"))?;
            applied.extend(ids);
        }
        if !in_ids.is_empty() {
            let sql = insert_host_sql(&mut tx).await?;
            let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(in_ids)
                .bind(in_new)
                .bind(&new_sub.tier)
                .bind(&new_sub.status)
                .bind(new_sub.max_domains as i32)
                .bind(dt(as_of))
                .fetch_all(&mut *tx)
                .await
                .map_err(q("creating subscriptions"))?;
            applied.extend(ids);
        }
        out.host_values_written = applied.len() as u64;
        out.conflicts = plan
            .host_changes()
            .map(|(u, _)| u)
            .filter(|u| !applied.contains(u))
            .collect();

        let ledger = plan.ledger(|u| applied.contains(&u));
        out.ledger_rows_written = ledger.len() as u64;
        if !ledger.is_empty() {
            sqlx::query(include_str!(
                "../../../sql/queries/postgres/insert_changes.sql"
            ))
            .bind(run_id)
            .bind(
                ledger
                    .iter()
                    .map(|c| c.referrer_user_id)
                    .collect::<Vec<_>>(),
            )
            .bind(
                ledger
                    .iter()
                    .map(|c| c.field.to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(
                ledger
                    .iter()
                    .map(|c| c.old_value.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                ledger
                    .iter()
                    .map(|c| c.new_value.clone())
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await
            .map_err(q("writing reward_changes"))?;
        }

        out.grants = self.apply_grants(&mut tx, grants, run_id, as_of).await?;
        if let Some(programs) = crate::store::programs_json(finish, &out.grants) {
            sqlx::query("UPDATE reward_runs SET programs = $1 WHERE id = $2")
                .bind(programs)
                .bind(run_id)
                .execute(&mut *tx)
                .await
                .map_err(q("recording the run"))?;
        }

        finish_run(&mut tx, finish, &out, run_id).await?;
        tx.commit().await.map_err(q("committing the run"))?;
        Ok(out)
    }
}

/// Marks the run `succeeded` with its counts, only while its row still says `running`.
async fn finish_run(
    conn: &mut sqlx::PgConnection,
    finish: &RunFinish,
    out: &ApplyOutcome,
    run_id: i64,
) -> Result<(), StoreError> {
    let s = &finish.stats;
    let finished = sqlx::query(include_str!("../../../sql/queries/postgres/finish_run.sql"))
        .bind(s.referrers as i64)
        .bind(s.rewards_up as i64)
        .bind(s.rewards_down as i64)
        .bind(s.bonus_delta)
        .bind(out.reward_rows_written as i64)
        .bind(out.host_values_written as i64)
        .bind(out.conflicts.len() as i64)
        .bind(&finish.outcome_counts)
        .bind(&finish.digest)
        .bind(run_id)
        .bind(dt(instant::from_datetime(Utc::now())))
        .bind(&finish.error)
        .execute(&mut *conn)
        .await
        .map_err(q("recording the run"))?;
    if finished.rows_affected() != 1 {
        let status: Option<String> = sqlx::query_scalar(RUN_STATUS)
            .bind(run_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(q("reading the run"))?;
        return Err(StoreError::NotRunning {
            run_id,
            status: status.unwrap_or_else(|| "missing".into()),
        });
    }
    Ok(())
}

/// insert_host.sql with the casts to the host's own types of `subscriptions.tier` and
/// `.status`, looked up in the write transaction (a text, enum or domain column alike).
async fn insert_host_sql(tx: &mut sqlx::PgConnection) -> Result<String, StoreError> {
    let types: Vec<(String, String)> = sqlx::query_as(include_str!(
        "../../../sql/queries/postgres/column_types.sql"
    ))
    .fetch_all(&mut *tx)
    .await
    .map_err(q("reading the types of subscriptions.tier and .status"))?;
    let of = |column: &str| {
        types
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| StoreError::Sql {
                what: "creating subscriptions",
                message: format!("subscriptions has no column {column}"),
            })
    };
    // The names come from the catalog's format_type, quoted and qualified as SQL needs.
    Ok(
        include_str!("../../../sql/queries/postgres/insert_host.sql")
            .replace("{tier_type}", &of("tier")?)
            .replace("{status_type}", &of("status")?),
    )
}
