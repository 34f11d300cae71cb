//! The job's migration history lives in a table of its own, `referral_rewards_migrations`, not
//! in sqlx's default `_sqlx_migrations`: a host application that uses sqlx migrations keeps its
//! history there, and each migrator refuses a table holding versions it does not know
//! ("migration … was previously applied but is missing"). Versions of the job before this one
//! recorded theirs in `_sqlx_migrations`; `migrate` moves those rows (and only those: same
//! version and checksum as one of the job's migrations) into the job's table.

use sqlx::migrate::Migrator;

use super::StoreError;
use crate::instant::{self, Instant};

/// Where the job records its applied migrations.
pub const TABLE: &str = "referral_rewards_migrations";
/// sqlx's default table, where versions of the job before this one recorded theirs.
pub const LEGACY_TABLE: &str = "_sqlx_migrations";

/// The job's migrations, recorded in [`TABLE`].
pub(crate) fn migrator(embedded: &Migrator) -> Migrator {
    let mut m = Migrator::with_migrations(embedded.migrations.to_vec());
    m.dangerous_set_table_name(TABLE);
    m
}

/// Copies the job's rows of [`LEGACY_TABLE`] into [`TABLE`] and deletes them there, leaving any
/// other row (the host application's) alone. Both statements per migration, in the caller's
/// transaction. The SQL is the same on both backends.
pub(crate) const ADOPT_INSERT: &str = "INSERT INTO referral_rewards_migrations \
     (version, description, installed_on, success, checksum, execution_time) \
     SELECT version, description, installed_on, success, checksum, execution_time \
     FROM _sqlx_migrations WHERE version = $1 AND checksum = $2 \
     ON CONFLICT (version) DO NOTHING";
pub(crate) const ADOPT_DELETE: &str =
    "DELETE FROM _sqlx_migrations WHERE version = $1 AND checksum = $2";

/// One of the job's migrations and whether it is applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MigrationStatus {
    pub version: i64,
    pub description: String,
    /// `applied`, `pending`, or `failed` (sqlx recorded it as not successful: a partial
    /// migration to repair by hand).
    pub status: &'static str,
    /// When it was applied, RFC 3339 UTC.
    pub applied_at: Option<String>,
    /// The table that records it: [`TABLE`], or [`LEGACY_TABLE`] until `migrate` moves it.
    pub recorded_in: Option<&'static str>,
    /// The applied migration's checksum is not the binary's: its file changed since (sqlx's
    /// migrator refuses to go on).
    pub checksum_mismatch: bool,
}

/// An applied row as read: version, success, installed_on, checksum.
pub(crate) type AppliedRow = (i64, bool, Option<Instant>, Vec<u8>);

/// Each embedded migration with its state, from the rows of the job's table and the job's rows
/// still in the legacy table.
pub(crate) fn statuses(
    embedded: &Migrator,
    ours: &[AppliedRow],
    legacy: &[AppliedRow],
) -> Vec<MigrationStatus> {
    embedded
        .iter()
        .map(|m| {
            let mine = ours.iter().find(|r| r.0 == m.version);
            // A legacy row is the job's only with the same checksum (else it is the app's).
            let old = legacy
                .iter()
                .find(|r| r.0 == m.version && r.3 == *m.checksum);
            let (row, table) = match (mine, old) {
                (Some(r), _) => (Some(r), Some(TABLE)),
                (None, Some(r)) => (Some(r), Some(LEGACY_TABLE)),
                (None, None) => (None, None),
            };
            MigrationStatus {
                version: m.version,
                description: m.description.to_string(),
                status: match row {
                    None => "pending",
                    Some(r) if r.1 => "applied",
                    Some(_) => "failed",
                },
                applied_at: row.and_then(|r| r.2).map(instant::to_rfc3339),
                recorded_in: table,
                checksum_mismatch: row.is_some_and(|r| r.3 != *m.checksum),
            }
        })
        .collect()
}

/// `migrate --info`: one line per migration.
pub fn info_text(statuses: &[MigrationStatus]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>7}  {:<20}  {:<8}  {:<27}  recorded in",
        "version", "description", "status", "applied at"
    );
    for m in statuses {
        let mut note = m.recorded_in.unwrap_or("-").to_owned();
        if m.recorded_in == Some(LEGACY_TABLE) {
            note.push_str(" (`migrate` moves it to referral_rewards_migrations)");
        }
        if m.checksum_mismatch {
            note.push_str(" (checksum differs from this binary's migration)");
        }
        let _ = writeln!(
            s,
            "{:>7}  {:<20}  {:<8}  {:<27}  {note}",
            m.version,
            m.description,
            m.status,
            m.applied_at.as_deref().unwrap_or("-"),
        );
    }
    s
}

pub(crate) fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    StoreError::Sql {
        what: "running migrations",
        message: super::one_line(&e.to_string()),
    }
}

/// A SQLite `installed_on` (`CURRENT_TIMESTAMP`: UTC text).
pub(crate) fn sqlite_installed_on(text: Option<String>) -> Option<Instant> {
    text.as_deref().and_then(instant::parse_sql_text)
}
