//! `demo-data` on PostgreSQL: COPY FROM STDIN in one transaction.

use super::*;

impl PgStore {
    /// Loads with `COPY … FROM STDIN` (text format) in one transaction.
    pub async fn load_demo(&self, spec: &DemoSpec) -> Result<(u64, u64, u64), StoreError> {
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
        let (mut nu, mut ns, mut ne) = (0, 0, 0);
        let mut feed = ChunkFeed::new(*spec, encode_copy);
        while let Some([users, subs, events]) = feed.next().await? {
            nu += copy_in(&mut tx, "COPY users (id, email, created_at, is_active, is_verified, invite_code, referred_by_user_id) FROM STDIN", users).await?;
            ns += copy_in(&mut tx, "COPY subscriptions (user_id, tier, status, max_domains, referral_bonus_domains, started_at, expires_at) FROM STDIN", subs).await?;
            ne += copy_in(
                &mut tx,
                "COPY telemetry_events (id, user_id, event_name, ip_hash, created_at) FROM STDIN",
                events,
            )
            .await?;
        }
        tx.commit().await.map_err(q("committing demo data"))?;
        self.reference_schema(true).await?;
        sqlx::query("ANALYZE users, subscriptions, telemetry_events")
            .execute(&mut *conn)
            .await
            .map_err(q("analyzing demo data"))?;
        Ok((nu, ns, ne))
    }
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
    [users, subs, events]
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
