//! Reading the run history and the ledgers: `runs show`, `changes`, their HTTP twins, and the
//! "already applied" check of `reconcile --plan`. The same SQL on both backends (no time columns
//! are read here; names are cast to text, whatever type a column has), run on whichever pool.

use super::{Store, StoreError};

/// Runs `$body` with `$p` bound to the store's pool, whichever backend it is.
macro_rules! on_pool {
    ($store:expr, $p:ident => $body:expr) => {
        match $store {
            Store::Sqlite(s) => {
                let $p = &s.pool;
                $body
            }
            Store::Postgres(s) => {
                let $p = &s.pool;
                $body
            }
        }
    };
}

/// Which ledger rows to read: those of one run and/or one referrer, newest first, at most
/// `limit` of each ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeFilter {
    pub run: Option<i64>,
    pub referrer: Option<i64>,
    pub limit: i64,
}

impl ChangeFilter {
    /// The `WHERE` clause: only the predicates asked for, so that each query can use the
    /// ledger's index on `run_id` or `referrer_user_id`. Binds run, then referrer.
    fn clause(&self) -> &'static str {
        match (self.run, self.referrer) {
            (None, None) => "",
            (Some(_), None) => "WHERE run_id = $1",
            (None, Some(_)) => "WHERE referrer_user_id = $1",
            (Some(_), Some(_)) => "WHERE run_id = $1 AND referrer_user_id = $2",
        }
    }

    fn binds(&self) -> impl Iterator<Item = i64> {
        self.run.into_iter().chain(self.referrer)
    }

    /// The `LIMIT` placeholder's number, after the filters'.
    fn limit_param(&self) -> usize {
        1 + self.binds().count()
    }
}

/// A `reward_changes` row: one changed value of the slots program.
pub type RewardChangeRow = (i64, i64, i64, String, Option<String>, Option<String>);

/// A `referral_grants` row: id, run, program, kind, party, referrer, referred user, credited
/// user, grant_seq, credit_days, credit_cents, payment id.
pub type GrantRow = (
    i64,
    i64,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// How many ledger rows a run wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunLedgerCounts {
    pub reward_changes: i64,
    pub grants: i64,
    pub reversals: i64,
}

impl Store {
    /// The slots program's ledger (`reward_changes`), newest first; one row more than the
    /// limit tells the caller that there are more.
    pub async fn reward_changes(
        &self,
        filter: &ChangeFilter,
    ) -> Result<Vec<RewardChangeRow>, StoreError> {
        let sql = format!(
            "SELECT id, run_id, referrer_user_id, field, old_value, new_value FROM reward_changes \
             {} ORDER BY id DESC LIMIT ${}",
            filter.clause(),
            filter.limit_param()
        );
        on_pool!(self, pool => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            for b in filter.binds() {
                q = q.bind(b);
            }
            q.bind(filter.limit.saturating_add(1)).fetch_all(pool).await
        })
        .map_err(StoreError::sql("reading reward_changes"))
    }

    /// The grant programs' ledger (`referral_grants`), newest first; one row more than the
    /// limit tells the caller that there are more.
    pub async fn grant_changes(&self, filter: &ChangeFilter) -> Result<Vec<GrantRow>, StoreError> {
        let sql = format!(
            "SELECT id, run_id, program, CAST(kind AS TEXT), CAST(party AS TEXT), referrer_user_id, referred_user_id, \
             credited_user_id, grant_seq, credit_days, credit_cents, payment_id \
             FROM referral_grants {} ORDER BY id DESC LIMIT ${}",
            filter.clause(),
            filter.limit_param()
        );
        on_pool!(self, pool => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            for b in filter.binds() {
                q = q.bind(b);
            }
            q.bind(filter.limit.saturating_add(1)).fetch_all(pool).await
        })
        .map_err(StoreError::sql("reading referral_grants"))
    }

    /// How many ledger rows one run wrote, per ledger (through the ledgers' `run_id` indexes).
    pub async fn run_ledger_counts(&self, run_id: i64) -> Result<RunLedgerCounts, StoreError> {
        let changes: i64 = on_pool!(self, pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM reward_changes WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(pool)
                .await
        })
        .map_err(StoreError::sql("reading reward_changes"))?;
        let kinds: Vec<(String, i64)> = on_pool!(self, pool => {
            sqlx::query_as(
                "SELECT CAST(kind AS TEXT), COUNT(*) FROM referral_grants WHERE run_id = $1 GROUP BY kind",
            )
            .bind(run_id)
            .fetch_all(pool)
            .await
        })
        .map_err(StoreError::sql("reading referral_grants"))?;
        let of = |k: &str| {
            kinds
                .iter()
                .find(|(kind, _)| kind == k)
                .map_or(0, |(_, n)| *n)
        };
        Ok(RunLedgerCounts {
            reward_changes: changes,
            grants: of("grant"),
            reversals: of("reversal"),
        })
    }

    /// The latest succeeded run whose plan had this digest (`None`: no run applied it).
    pub async fn run_with_digest(&self, digest: &str) -> Result<Option<i64>, StoreError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(
                "SELECT id FROM reward_runs WHERE digest = $1 AND status = 'succeeded' \
                 ORDER BY id DESC LIMIT 1",
            )
            .bind(digest)
            .fetch_optional(pool)
            .await
        })
        .map_err(StoreError::sql("reading reward_runs"))
    }
}
