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
        let Held::Postgres {
            conn: slot,
            released,
            ..
        } = &mut lock._held
        else {
            return Err(connection_gone());
        };
        // Nothing to write but the run's end (a one-referrer recompute that finds its rewards
        // right, the common case): that one statement is its own transaction, two round trips
        // fewer than BEGIN … COMMIT, and the lock is released in the same round trip. The
        // lock's connection fences it all the same.
        let mut out = ApplyOutcome::default();
        if grants.is_empty()
            && plan.reward_upserts().next().is_none()
            && plan.host_changes().next().is_none()
        {
            crate::engine::inside_write(progress).await;
            *released = finish_run_and_release(slot, finish, &out, run_id).await?;
            return Ok(out);
        }
        let Some(conn) = slot else {
            return Err(connection_gone());
        };
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

/// [`finish_run`] as its own transaction, and the run lock released right after its commit,
/// in one round trip where there were two (a simple-query message, `EXECUTE finish; COMMIT;
/// EXECUTE release`: both statements prepared once per connection, the values inlined). The
/// release follows the commit, so no other run can take the lock and read the state before
/// this run's end is in; it releases only if the row now says `succeeded`, so that a run that
/// failed here is recorded under the lock. Whether the lock was released. On an error the
/// transaction is rolled back, or the connection closed (`conn` set to `None`) if it cannot be.
/// At 1M users a one-referrer apply's p50 went from 1.73-2.11 to 1.63-2.04 ms (four
/// interleaved runs of 1,000 a side; the end's own stage takes 0.1 ms longer, the release's
/// round trip is gone).
async fn finish_run_and_release(
    conn: &mut Option<Box<sqlx::PgConnection>>,
    finish: &RunFinish,
    out: &ApplyOutcome,
    run_id: i64,
) -> Result<bool, StoreError> {
    let Some(c) = conn.as_deref_mut() else {
        return Err(connection_gone());
    };
    let sent = match finish_message(c, finish, out, run_id).await {
        Err(e) if super::one::not_prepared(&e) => {
            // A connection new to this: the message stopped at its first statement (its implicit
            // transaction ended with it); prepare, send again.
            let prepare = format!(
                "PREPARE {FINISH_STATEMENT}(bigint, bigint, bigint, bigint, bigint, bigint, \
                 bigint, text, text, bigint, timestamptz, text) AS {}; \
                 PREPARE {RELEASE_STATEMENT}(bigint) AS SELECT pg_advisory_unlock_all() \
                 FROM reward_runs WHERE id = $1 AND status = 'succeeded'",
                include_str!("../../../sql/queries/postgres/finish_run.sql")
            );
            match sqlx::raw_sql(sqlx::AssertSqlSafe(prepare))
                .execute(&mut *c)
                .await
            {
                Ok(_) => finish_message(c, finish, out, run_id).await,
                Err(e) => Err(e),
            }
        }
        r => r,
    };
    match sent {
        Ok((1, released)) => Ok(released),
        // Committed, changing nothing: the lock is still held.
        Ok(_) => Err(not_running(c, run_id).await),
        Err(e) => {
            if sqlx::raw_sql("ROLLBACK").execute(&mut *c).await.is_err() {
                *conn = None;
            }
            Err(q("recording the run")(e))
        }
    }
}

/// The run lock's connection is not there (a failed statement closed it): nothing can be written.
fn connection_gone() -> StoreError {
    StoreError::Runtime("the run lock's connection is gone; nothing was written".into())
}

const FINISH_STATEMENT: &str = "referral_rewards_finish";
const RELEASE_STATEMENT: &str = "referral_rewards_release";

/// Sends the run's end and the release: how many rows the end changed, and whether the
/// release ran.
async fn finish_message(
    conn: &mut sqlx::PgConnection,
    finish: &RunFinish,
    out: &ApplyOutcome,
    run_id: i64,
) -> Result<(u64, bool), sqlx::Error> {
    use futures_util::TryStreamExt;
    let s = &finish.stats;
    let now = instant::to_rfc3339(instant::from_datetime(Utc::now()));
    let text = |v: Option<&str>| v.map_or_else(|| "NULL".to_owned(), dollar_quoted);
    let sql = format!(
        "EXECUTE {FINISH_STATEMENT}({}, {}, {}, {}, {}, {}, {}, {}, {}, {run_id}, \
         '{now}'::timestamptz, {}); COMMIT; EXECUTE {RELEASE_STATEMENT}({run_id})",
        s.referrers as i64,
        s.rewards_up as i64,
        s.rewards_down as i64,
        s.bonus_delta,
        out.reward_rows_written as i64,
        out.host_values_written as i64,
        out.conflicts.len() as i64,
        text(Some(&finish.outcome_counts)),
        text(Some(&finish.digest)),
        text(finish.error.as_deref()),
    );
    // EXECUTE, COMMIT, EXECUTE: the first result is the end's, a row the release's.
    let mut finished = None;
    let mut released = false;
    let mut stream = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).fetch_many(&mut *conn);
    while let Some(item) = stream.try_next().await? {
        match item {
            sqlx::Either::Left(r) => {
                finished.get_or_insert(r.rows_affected());
            }
            sqlx::Either::Right(_) => released = true,
        }
    }
    Ok((finished.unwrap_or(0), released))
}

/// `s` as a dollar-quoted string constant, whose tag `s` does not contain: read the same
/// whatever `standard_conforming_strings` says, and no character of `s` needs escaping.
pub(super) fn dollar_quoted(s: &str) -> String {
    let mut tag = String::from("$rr$");
    let mut n = 0;
    while s.contains(&tag) {
        n += 1;
        tag = format!("$rr{n}$");
    }
    format!("{tag}{s}{tag}")
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
        return Err(not_running(conn, run_id).await);
    }
    Ok(())
}

/// The run's end changed no row: its row no longer says `running` (another process marked it
/// `abandoned`), or is gone.
async fn not_running(conn: &mut sqlx::PgConnection, run_id: i64) -> StoreError {
    let status: Result<Option<String>, _> = sqlx::query_scalar(RUN_STATUS)
        .bind(run_id)
        .fetch_optional(&mut *conn)
        .await;
    match status {
        Ok(status) => StoreError::NotRunning {
            run_id,
            status: status.unwrap_or_else(|| "missing".into()),
        },
        Err(e) => q("reading the run")(e),
    }
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

#[cfg(test)]
mod tests {
    use super::dollar_quoted;

    #[test]
    fn dollar_quoting_picks_a_tag_the_text_does_not_hold() {
        assert_eq!(dollar_quoted("it's \\ fine"), "$rr$it's \\ fine$rr$");
        assert_eq!(dollar_quoted(""), "$rr$$rr$");
        let tricky = "a $rr$ b $rr1$ c";
        let quoted = dollar_quoted(tricky);
        assert_eq!(quoted, format!("$rr2${tricky}$rr2$"));
    }
}
