//! `demo-data` on PostgreSQL: COPY FROM STDIN in one transaction.

use super::*;

impl PgStore {
    /// Loads with `COPY … FROM STDIN` (text format) in one transaction.
    pub async fn load_demo(&self, spec: &DemoSpec) -> Result<DemoCounts, StoreError> {
        self.reference_schema(false).await?;
        let existing: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM users LIMIT 1) AS t")
                .fetch_one(&self.pool)
                .await
                .map_err(q("reading users"))?;
        if existing > 0 {
            return Err(StoreError::Invalid(
                "demo-data needs empty host tables; the users table already has rows".into(),
            ));
        }
        let mut conn = self.pool.acquire().await.map_err(q("connecting"))?;
        let mut tx = conn.begin().await.map_err(q("loading demo data"))?;
        // Referrers may have larger ids than the users they refer: check keys at commit.
        sqlx::query("SET CONSTRAINTS ALL DEFERRED")
            .execute(&mut *tx)
            .await
            .map_err(q("loading demo data"))?;
        // PostgreSQL's "Populating a Database": no foreign key checked and no secondary index
        // maintained row by row (with them, COPY of the payments took about 6x as long, most of
        // it the key checks); dropped here and recreated as they were (one join per key, one sort
        // per index) before the commit, all in this transaction.
        let set_aside: Vec<(i32, String, String)> = sqlx::query_as(SET_ASIDE)
            .bind(&DEMO_TABLES[..])
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading the host tables' keys and indexes"))?;
        for (_, drop, _) in &set_aside {
            ddl(&mut tx, drop).await?;
        }
        // Rows written frozen and all-visible, as a host's tables are once autovacuum has been
        // through them: COPY FREEZE needs the tables truncated in this transaction. Without it a
        // fresh dataset's first runs set every page's hint bits (writing the whole dataset back)
        // and nothing reads index-only until a vacuum. Only empty, plain tables are truncated,
        // checked under the lock TRUNCATE takes anyway (the check above is of `users` alone,
        // outside this transaction); rows already in one of the other three stay, and so does
        // a partitioned table (FREEZE refuses those). Anything refused on the way (the lock, the
        // TRUNCATE: another table's key, no privilege) rolls back to the savepoint: the rows
        // load as before, without FREEZE.
        ddl(&mut tx, "SAVEPOINT demo_truncate").await?;
        let attempt: Result<bool, StoreError> = async {
            ddl(&mut tx, LOCK).await?;
            let plain_and_empty: bool = sqlx::query_scalar(PLAIN_AND_EMPTY)
                .fetch_one(&mut *tx)
                .await
                .map_err(q("reading the host tables"))?;
            if plain_and_empty {
                ddl(&mut tx, TRUNCATE).await?;
            }
            Ok(plain_and_empty)
        }
        .await;
        let freeze = match attempt {
            Ok(freeze) => freeze,
            Err(e) => {
                tracing::info!(error = %e, "demo-data: the host tables cannot be truncated; loading without FREEZE");
                ddl(&mut tx, "ROLLBACK TO SAVEPOINT demo_truncate").await?;
                false
            }
        };
        ddl(&mut tx, "RELEASE SAVEPOINT demo_truncate").await?;
        let with = if freeze { " WITH (FREEZE)" } else { "" };
        let statement = |columns: &str| format!("COPY {columns} FROM STDIN{with}");
        let mut n = DemoCounts::default();
        let mut feed = ChunkFeed::new(*spec, encode_copy);
        while let Some([users, subs, events, payments]) = feed.next().await? {
            n.users += copy_in(&mut tx, &statement("users (id, email, created_at, is_active, is_verified, invite_code, referred_by_user_id, credit_until, credit_cents)"), users).await?;
            n.subscriptions += copy_in(&mut tx, &statement("subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at)"), subs).await?;
            n.events += copy_in(
                &mut tx,
                &statement("telemetry_events (id, user_id, event_name, ip_hash, created_at)"),
                events,
            )
            .await?;
            n.payments += copy_in(
                &mut tx,
                &statement("payments (id, user_id, amount_cents, currency, status, created_at)"),
                payments,
            )
            .await?;
        }
        // Indexes first, then the foreign keys (one join each).
        for (_, _, create) in set_aside.iter().rev() {
            ddl(&mut tx, create).await?;
        }
        tx.commit().await.map_err(q("committing demo data"))?;
        self.reference_schema(true).await?;
        sqlx::query("ANALYZE users, subscriptions, telemetry_events, payments")
            .execute(&mut *conn)
            .await
            .map_err(q("analyzing demo data"))?;
        Ok(n)
    }
}

/// The host tables `demo-data` loads, emptied in its transaction (they are empty already) so
/// that COPY may write their rows frozen.
const TRUNCATE: &str = "TRUNCATE users, subscriptions, telemetry_events, payments";
/// Whether the four host tables are empty and none is partitioned.
const PLAIN_AND_EMPTY: &str = "SELECT NOT (EXISTS (SELECT FROM users) \
     OR EXISTS (SELECT FROM subscriptions) OR EXISTS (SELECT FROM telemetry_events) \
     OR EXISTS (SELECT FROM payments) OR EXISTS (SELECT FROM pg_class WHERE relkind = 'p' \
     AND oid IN ('users'::regclass, 'subscriptions'::regclass, 'telemetry_events'::regclass, \
     'payments'::regclass)))";
const LOCK: &str =
    "LOCK TABLE users, subscriptions, telemetry_events, payments IN ACCESS EXCLUSIVE MODE";

/// The host tables `demo-data` loads.
const DEMO_TABLES: [&str; 4] = ["users", "subscriptions", "telemetry_events", "payments"];

/// The loaded tables' foreign keys, then their indexes that back no constraint: a statement
/// dropping each and one recreating it exactly.
const SET_ASIDE: &str = "\
SELECT 1, format('ALTER TABLE %s DROP CONSTRAINT %I', conrelid::regclass, conname),
       format('ALTER TABLE %s ADD CONSTRAINT %I %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
FROM pg_constraint
WHERE contype = 'f' AND conrelid = ANY($1::text[]::regclass[])
UNION ALL
SELECT 2, format('DROP INDEX %s', i.indexrelid::regclass), pg_get_indexdef(i.indexrelid)
FROM pg_index AS i
WHERE i.indrelid = ANY($1::text[]::regclass[])
  AND NOT EXISTS (SELECT FROM pg_constraint AS c WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x'))
ORDER BY 1";

async fn ddl(conn: &mut sqlx::PgConnection, statement: &str) -> Result<(), StoreError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(q("loading demo data"))
}

/// A demo chunk in COPY's text format.
fn encode_copy(c: DemoChunk) -> EncodedChunk {
    let mut users = String::with_capacity(c.users.len() * 80);
    for u in &c.users {
        copy_row(
            &mut users,
            &[
                Some(&u.id.to_string()),
                Some(&u.email),
                Some(&instant::to_sql_text(u.created_at)),
                Some(if u.is_active { "t" } else { "f" }),
                Some(if u.is_verified { "t" } else { "f" }),
                u.invite_code.as_deref(),
                u.referred_by_user_id.map(|r| r.to_string()).as_deref(),
                u.credit_until.map(instant::to_sql_text).as_deref(),
                Some(&u.credit_cents.to_string()),
            ],
        );
    }
    let mut subs = String::with_capacity(c.subscriptions.len() * 80);
    for s in &c.subscriptions {
        copy_row(
            &mut subs,
            &[
                Some(&s.user_id.to_string()),
                Some(s.tier),
                Some(s.status),
                Some(&s.max_domains.to_string()),
                Some(&s.referral_bonus_domains.to_string()),
                s.started_at.map(instant::to_sql_text).as_deref(),
                s.expires_at.map(instant::to_sql_text).as_deref(),
            ],
        );
    }
    let mut events = String::with_capacity(c.events.len() * 70);
    for e in &c.events {
        copy_row(
            &mut events,
            &[
                Some(&e.id.to_string()),
                e.user_id.map(|u| u.to_string()).as_deref(),
                Some(e.event_name),
                e.ip_hash.as_deref(),
                Some(&instant::to_sql_text(e.created_at)),
            ],
        );
    }
    let mut payments = String::with_capacity(c.payments.len() * 60);
    for p in &c.payments {
        copy_row(
            &mut payments,
            &[
                Some(&p.id.to_string()),
                Some(&p.user_id.to_string()),
                Some(&p.amount_cents.to_string()),
                Some(p.currency),
                Some(p.status),
                Some(&instant::to_sql_text(p.created_at)),
            ],
        );
    }
    [users, subs, events, payments]
}

async fn copy_in(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    data: String,
) -> Result<u64, StoreError> {
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .map_err(q("loading demo data"))?;
    copy.send(data.into_bytes())
        .await
        .map_err(q("loading demo data"))?;
    copy.finish().await.map_err(q("loading demo data"))
}

/// One row of COPY's text format: tab-separated, `\N` for NULL, backslash escapes.
fn copy_row(buf: &mut String, fields: &[Option<&str>]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            buf.push('\t');
        }
        match f {
            None => buf.push_str("\\N"),
            Some(s)
                if !s
                    .bytes()
                    .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
            {
                buf.push_str(s)
            }
            Some(s) => {
                for ch in s.chars() {
                    match ch {
                        '\\' => buf.push_str("\\\\"),
                        '\t' => buf.push_str("\\t"),
                        '\n' => buf.push_str("\\n"),
                        '\r' => buf.push_str("\\r"),
                        c => buf.push(c),
                    }
                }
            }
        }
    }
    buf.push('\n');
}
