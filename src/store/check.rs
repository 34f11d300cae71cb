//! `referral-rewards check`: whether a run can succeed against this database, before one is
//! tried. It reads the catalog only: the host tables (or views) and columns the configured
//! programs read, their types, the role's rights for an applying run and for a read-only audit,
//! the recommended indexes, and the job's migrations.

use serde::Serialize;

use super::migrations::MigrationStatus;
use super::{Store, StoreError};
use crate::config::Config;

/// What a column must be, loosely: the job converts what it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Read as a 64-bit integer as it is (PostgreSQL: `bigint`; a smaller integer fails the
    /// run's decoding: cast it in a view).
    Id,
    /// Any integer type.
    Int,
    Bool,
    /// `timestamp` or `timestamptz` (SQLite: ISO-8601 text).
    Time,
    /// Read as text: any type with a text form (text, varchar, an enum, …).
    Text,
}

/// A host table the configured programs need.
struct Needed {
    table: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// Only with grant programs configured.
    grants_only: bool,
}

const HOST: &[Needed] = &[
    Needed {
        table: "users",
        columns: &[
            ("id", Kind::Id),
            ("created_at", Kind::Time),
            ("is_active", Kind::Bool),
            ("is_verified", Kind::Bool),
            ("invite_code", Kind::Text),
            ("referred_by_user_id", Kind::Id),
        ],
        grants_only: false,
    },
    Needed {
        table: "subscriptions",
        columns: &[
            ("id", Kind::Id),
            ("user_id", Kind::Id),
            ("tier", Kind::Text),
            ("status", Kind::Text),
            ("max_domains", Kind::Int),
            ("referral_bonus_domains", Kind::Int),
            ("started_at", Kind::Time),
            ("expires_at", Kind::Time),
        ],
        grants_only: false,
    },
    Needed {
        table: "telemetry_events",
        columns: &[
            ("id", Kind::Id),
            ("user_id", Kind::Id),
            ("event_name", Kind::Text),
            ("ip_hash", Kind::Text),
            ("created_at", Kind::Time),
        ],
        grants_only: false,
    },
    Needed {
        table: "payments",
        columns: &[
            ("id", Kind::Int),
            ("user_id", Kind::Int),
            ("amount_cents", Kind::Int),
            ("currency", Kind::Text),
            ("status", Kind::Text),
            ("created_at", Kind::Time),
        ],
        grants_only: true,
    },
];

/// The balance columns on `users` that grant programs read and write.
const GRANT_USER_COLUMNS: &[(&str, Kind)] =
    &[("credit_until", Kind::Time), ("credit_cents", Kind::Int)];

/// The recommended indexes (README, sql/reference/*_indexes.sql): a table and the leading
/// columns an index must have.
const INDEXES: &[(&str, &[&str], bool, &str)] = &[
    (
        "users",
        &["invite_code"],
        false,
        "CREATE UNIQUE INDEX ON users (invite_code);",
    ),
    (
        "users",
        &["referred_by_user_id"],
        false,
        "CREATE INDEX ON users (referred_by_user_id);",
    ),
    (
        "subscriptions",
        &["user_id"],
        false,
        "CREATE UNIQUE INDEX ON subscriptions (user_id);",
    ),
    (
        "telemetry_events",
        &["user_id"],
        false,
        "CREATE INDEX ON telemetry_events (user_id) WHERE event_name = 'user_registered';",
    ),
    (
        "telemetry_events",
        &["user_id", "created_at"],
        false,
        "CREATE INDEX ON telemetry_events (user_id, created_at);",
    ),
    (
        "payments",
        &["user_id", "created_at"],
        true,
        "CREATE INDEX ON payments (user_id, created_at, id);",
    ),
];

/// One privilege a kind of run needs.
struct Right {
    table: &'static str,
    /// `None`: on the table.
    columns: &'static [&'static str],
    privilege: &'static str,
    apply: bool,
    audit: bool,
    grants_only: bool,
    /// A job-owned table (created by `migrate`).
    job: bool,
}

const fn right(
    table: &'static str,
    columns: &'static [&'static str],
    privilege: &'static str,
    (apply, audit): (bool, bool),
    grants_only: bool,
    job: bool,
) -> Right {
    Right {
        table,
        columns,
        privilege,
        apply,
        audit,
        grants_only,
        job,
    }
}

const BOTH: (bool, bool) = (true, true);
const APPLY: (bool, bool) = (true, false);

/// What an applying run and a read-only audit (dry runs, `explain`, `runs`, `check`) need; the
/// README's GRANT statements grant exactly these.
const RIGHTS: &[Right] = &[
    right("users", &[], "SELECT", BOTH, false, false),
    right("subscriptions", &[], "SELECT", BOTH, false, false),
    right("telemetry_events", &[], "SELECT", BOTH, false, false),
    right("payments", &[], "SELECT", BOTH, true, false),
    right(
        "subscriptions",
        &["referral_bonus_domains"],
        "UPDATE",
        APPLY,
        false,
        false,
    ),
    right(
        "subscriptions",
        &[
            "user_id",
            "tier",
            "status",
            "max_domains",
            "referral_bonus_domains",
            "started_at",
            "expires_at",
        ],
        "INSERT",
        APPLY,
        false,
        false,
    ),
    right(
        "users",
        &["credit_until", "credit_cents"],
        "UPDATE",
        APPLY,
        true,
        false,
    ),
    right("reward_runs", &[], "SELECT", BOTH, false, true),
    right("reward_runs", &[], "INSERT", APPLY, false, true),
    right("reward_runs", &[], "UPDATE", APPLY, false, true),
    right("referral_rewards", &[], "SELECT", BOTH, false, true),
    right("referral_rewards", &[], "INSERT", APPLY, false, true),
    right("referral_rewards", &[], "UPDATE", APPLY, false, true),
    right("reward_changes", &[], "INSERT", APPLY, false, true),
    right("referral_grants", &[], "SELECT", BOTH, true, true),
    right("referral_grants", &[], "INSERT", APPLY, true, true),
    right(
        "referral_rewards_migrations",
        &[],
        "SELECT",
        BOTH,
        false,
        true,
    ),
];

#[derive(Debug, Clone, Serialize)]
pub struct ColumnCheck {
    pub name: String,
    /// `None`: missing.
    pub data_type: Option<String>,
    /// `ok`, `missing`, or what is wrong with the type.
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableCheck {
    pub name: String,
    /// `table`, `view`, …; `None`: missing.
    pub kind: Option<String>,
    /// Why it is needed: the slots program, or the grant programs.
    pub needed_by: &'static str,
    pub columns: Vec<ColumnCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RightCheck {
    /// `users`, `subscriptions.referral_bonus_domains`, … or `(database file)` on SQLite.
    pub on: String,
    pub privilege: String,
    pub granted: bool,
    pub needed_for_apply: bool,
    pub needed_for_audit: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexCheck {
    pub table: String,
    pub columns: Vec<String>,
    /// The index that serves it; `None`: missing (or unknown through a view).
    pub present: Option<String>,
    /// Why it could not be checked (a view: its base table's indexes count).
    pub note: Option<String>,
    pub create: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub backend: &'static str,
    /// PostgreSQL: the role, database and search_path; SQLite: the file.
    pub connection: String,
    pub tables: Vec<TableCheck>,
    pub rights: Vec<RightCheck>,
    pub indexes: Vec<IndexCheck>,
    pub migrations: Vec<MigrationStatus>,
    /// What makes an applying run fail.
    pub apply_problems: Vec<String>,
    /// What makes a read-only audit (dry run, explain) fail.
    pub audit_problems: Vec<String>,
    /// What makes runs slower, or needs attention, without failing them.
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// Whether the run asked about can succeed: an applying run, or with `audit` a dry run.
    pub fn ok(&self, audit: bool) -> bool {
        if audit {
            self.audit_problems.is_empty()
        } else {
            self.apply_problems.is_empty()
        }
    }
}

/// The catalog facts of one backend.
struct Catalog {
    connection: String,
    /// Table name → kind, for the tables that exist.
    kinds: std::collections::HashMap<&'static str, String>,
    /// (table, column) → type.
    columns: std::collections::HashMap<(&'static str, String), String>,
    /// Table → its indexes' column lists.
    indexes: std::collections::HashMap<&'static str, Vec<(String, Vec<String>)>>,
    rights: Vec<RightCheck>,
}

/// Checks the database for the programs `config` configures.
pub async fn check(store: &Store, config: &Config) -> Result<CheckReport, StoreError> {
    let grants = !config.grants.is_empty();
    let migrations = store.migration_info().await?;
    let catalog = match store {
        Store::Postgres(s) => postgres(&s.pool, grants).await?,
        Store::Sqlite(s) => sqlite(&s.pool, s.path.as_deref()).await?,
    };
    let pg = matches!(store, Store::Postgres(_));
    let mut report = CheckReport {
        backend: store.backend(),
        connection: catalog.connection.clone(),
        tables: vec![],
        rights: catalog.rights.clone(),
        indexes: vec![],
        migrations,
        apply_problems: vec![],
        audit_problems: vec![],
        warnings: vec![],
    };
    let both = |r: &mut CheckReport, problem: String| {
        r.apply_problems.push(problem.clone());
        r.audit_problems.push(problem);
    };

    for need in HOST.iter().filter(|n| grants || !n.grants_only) {
        let needed_by = if need.grants_only {
            "grant programs"
        } else {
            "slots program"
        };
        let kind = catalog.kinds.get(need.table).cloned();
        let mut columns: Vec<(&str, Kind, &str)> = need
            .columns
            .iter()
            .map(|(c, k)| (*c, *k, needed_by))
            .collect();
        if grants && need.table == "users" {
            columns.extend(
                GRANT_USER_COLUMNS
                    .iter()
                    .map(|(c, k)| (*c, *k, "grant programs")),
            );
        }
        if kind.is_none() {
            both(
                &mut report,
                format!(
                    "{}: no such table or view (needed by the {needed_by}; map your table onto it with a view)",
                    need.table
                ),
            );
        }
        let mut checked = vec![];
        for (column, want, by) in columns {
            let data_type = catalog
                .columns
                .get(&(need.table, column.to_owned()))
                .cloned();
            let verdict = match (&kind, &data_type) {
                (None, _) => "missing".to_owned(),
                (Some(_), None) => {
                    both(
                        &mut report,
                        format!(
                            "{}.{column}: no such column (needed by the {by})",
                            need.table
                        ),
                    );
                    "missing".to_owned()
                }
                (Some(_), Some(t)) => match type_problem(pg, want, t) {
                    None => "ok".to_owned(),
                    Some(why) => {
                        both(
                            &mut report,
                            format!("{}.{column} is {t}: {why}", need.table),
                        );
                        why
                    }
                },
            };
            checked.push(ColumnCheck {
                name: column.to_owned(),
                data_type,
                verdict,
            });
        }
        report.tables.push(TableCheck {
            name: need.table.to_owned(),
            kind,
            needed_by,
            columns: checked,
        });
    }

    for r in &catalog.rights {
        if r.granted {
            continue;
        }
        let what = format!("the role lacks {} on {}", r.privilege, r.on);
        if r.needed_for_apply {
            report
                .apply_problems
                .push(format!("{what} (an applying run needs it)"));
        }
        if r.needed_for_audit {
            report
                .audit_problems
                .push(format!("{what} (a dry run needs it)"));
        }
    }

    for (table, columns, grants_only, create) in INDEXES {
        if *grants_only && !grants {
            continue;
        }
        let mut check = IndexCheck {
            table: table.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            present: None,
            note: None,
            create: create.to_string(),
        };
        match catalog.kinds.get(table).map(String::as_str) {
            None => continue,
            Some("table") | Some("partitioned table") => {
                check.present = catalog.indexes.get(table).and_then(|list| {
                    list.iter()
                        .find(|(_, cols)| {
                            cols.len() >= columns.len() && cols[..columns.len()] == **columns
                        })
                        .map(|(name, _)| name.clone())
                });
                if check.present.is_none() {
                    report.warnings.push(format!(
                        "recommended index missing: {create} (runs work without it, slower)"
                    ));
                }
            }
            Some(kind) => {
                check.note = Some(format!(
                    "{table} is a {kind}: the indexes of the table behind it count, not checked here"
                ));
            }
        }
        report.indexes.push(check);
    }

    let pending: Vec<String> = report
        .migrations
        .iter()
        .filter(|m| m.status != "applied")
        .map(|m| format!("{} {} ({})", m.version, m.description, m.status))
        .collect();
    if !pending.is_empty() {
        both(
            &mut report,
            format!(
                "migrations not applied: {} (run `referral-rewards migrate`)",
                pending.join(", ")
            ),
        );
    }
    if report
        .migrations
        .iter()
        .any(|m| m.recorded_in == Some(super::migrations::LEGACY_TABLE))
    {
        report.warnings.push(
            "the job's migrations are still recorded in _sqlx_migrations: `referral-rewards migrate` moves them".into(),
        );
    }
    Ok(report)
}

/// Why a column of type `t` does not fit, if it does not.
fn type_problem(pg: bool, want: Kind, t: &str) -> Option<String> {
    if !pg {
        // SQLite's declared types are advisory; the snapshot names any cell it cannot read.
        return None;
    }
    let integer = matches!(t, "smallint" | "integer" | "bigint");
    match want {
        Kind::Id if t != "bigint" => {
            Some("the job reads it as bigint: cast it in a view (`id::bigint AS id`)".into())
        }
        Kind::Int if !integer => Some("the job needs an integer type".into()),
        Kind::Bool if t != "boolean" => Some("the job needs boolean".into()),
        Kind::Time
            if !matches!(
                t,
                "timestamp without time zone" | "timestamp with time zone"
            ) =>
        {
            Some("the job needs timestamp or timestamptz".into())
        }
        _ => None,
    }
}

async fn postgres(pool: &sqlx::PgPool, grants: bool) -> Result<Catalog, StoreError> {
    let q = StoreError::sql;
    let (role, db, path): (String, String, String) = sqlx::query_as(
        "SELECT current_user::text, current_database()::text, current_setting('search_path')",
    )
    .fetch_one(pool)
    .await
    .map_err(q("reading the connection"))?;
    let mut c = Catalog {
        connection: format!("role {role} on database {db}, search_path {path}"),
        kinds: Default::default(),
        columns: Default::default(),
        indexes: Default::default(),
        rights: vec![],
    };
    let tables: Vec<&'static str> = HOST
        .iter()
        .map(|n| n.table)
        .chain(RIGHTS.iter().filter(|r| r.job).map(|r| r.table))
        .collect();
    for table in tables {
        if c.kinds.contains_key(table) {
            continue;
        }
        let kind: Option<String> = sqlx::query_scalar(
            "SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'partitioned table' \
             WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table' \
             ELSE c.relkind::text END FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(pool)
        .await
        .map_err(q("reading the catalog"))?;
        let Some(kind) = kind else { continue };
        c.kinds.insert(table, kind);
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .map_err(q("reading the catalog"))?;
        for (name, t) in columns {
            c.columns.insert((table, name), t);
        }
        let indexes: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT i.relname::text, array_agg(coalesce(a.attname::text, '(expression)') ORDER BY k.ord) \
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
             CROSS JOIN LATERAL unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum \
             WHERE x.indrelid = to_regclass($1) GROUP BY i.relname ORDER BY i.relname",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .map_err(q("reading the catalog"))?;
        c.indexes.insert(table, indexes);
    }
    for r in RIGHTS.iter().filter(|r| grants || !r.grants_only) {
        // A table that is missing is reported as missing, not as a right.
        if !c.kinds.contains_key(r.table) {
            continue;
        }
        if r.columns.is_empty() {
            let granted: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2)")
                .bind(r.table)
                .bind(r.privilege)
                .fetch_one(pool)
                .await
                .map_err(q("reading the role's rights"))?;
            c.rights.push(right_check(r, r.table.to_owned(), granted));
        } else {
            for column in r.columns {
                if !c.columns.contains_key(&(r.table, column.to_string())) {
                    continue;
                }
                let granted: bool = sqlx::query_scalar("SELECT has_column_privilege($1, $2, $3)")
                    .bind(r.table)
                    .bind(*column)
                    .bind(r.privilege)
                    .fetch_one(pool)
                    .await
                    .map_err(q("reading the role's rights"))?;
                c.rights
                    .push(right_check(r, format!("{}.{column}", r.table), granted));
            }
        }
    }
    Ok(c)
}

fn right_check(r: &Right, on: String, granted: bool) -> RightCheck {
    RightCheck {
        on,
        privilege: r.privilege.to_owned(),
        granted,
        needed_for_apply: r.apply,
        needed_for_audit: r.audit,
    }
}

async fn sqlite(
    pool: &sqlx::SqlitePool,
    path: Option<&std::path::Path>,
) -> Result<Catalog, StoreError> {
    let q = StoreError::sql;
    let mut c = Catalog {
        connection: path.map_or_else(
            || "an in-memory database".into(),
            |p| format!("file {}", p.display()),
        ),
        kinds: Default::default(),
        columns: Default::default(),
        indexes: Default::default(),
        rights: vec![],
    };
    for need in HOST {
        let kind: Option<String> = sqlx::query_scalar(
            "SELECT type FROM sqlite_master WHERE name = $1 AND type IN ('table', 'view')",
        )
        .bind(need.table)
        .fetch_optional(pool)
        .await
        .map_err(q("reading the schema"))?;
        let Some(kind) = kind else { continue };
        c.kinds.insert(need.table, kind);
        let columns: Vec<(String, String)> =
            sqlx::query_as("SELECT name, type FROM pragma_table_info($1)")
                .bind(need.table)
                .fetch_all(pool)
                .await
                .map_err(q("reading the schema"))?;
        for (name, t) in columns {
            c.columns.insert((need.table, name), t);
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT il.name, coalesce(ii.name, '(expression)') FROM pragma_index_list($1) AS il, \
             pragma_index_info(il.name) AS ii ORDER BY il.name, ii.seqno",
        )
        .bind(need.table)
        .fetch_all(pool)
        .await
        .map_err(q("reading the schema"))?;
        let mut list: Vec<(String, Vec<String>)> = vec![];
        for (index, column) in rows {
            match list.last_mut() {
                Some((name, cols)) if *name == index => cols.push(column),
                _ => list.push((index, vec![column])),
            }
        }
        c.indexes.insert(need.table, list);
    }
    // SQLite's rights are the file's: an apply writes the file, its journal and the lock file
    // beside it; an audit reads the file.
    if let Some(p) = path {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let can = |path: &std::path::Path, mode: libc::c_int| {
            use std::os::unix::ffi::OsStrExt;
            std::ffi::CString::new(path.as_os_str().as_bytes())
                // SAFETY: a NUL-terminated path, read by access(2) only.
                .is_ok_and(|s| unsafe { libc::access(s.as_ptr(), mode) } == 0)
        };
        let file = |privilege: &str, granted, apply, audit| RightCheck {
            on: format!("the database file {}", p.display()),
            privilege: privilege.to_owned(),
            granted,
            needed_for_apply: apply,
            needed_for_audit: audit,
        };
        c.rights.push(file("read", can(p, libc::R_OK), true, true));
        c.rights
            .push(file("write", can(p, libc::W_OK), true, false));
        c.rights.push(RightCheck {
            on: format!("its directory {} (journal and lock files)", dir.display()),
            privilege: "write".into(),
            granted: can(dir, libc::W_OK),
            needed_for_apply: true,
            needed_for_audit: false,
        });
    }
    Ok(c)
}

/// The report as text, for a terminal.
pub fn text(r: &CheckReport, audit: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}: {}", r.backend, r.connection);
    let _ = writeln!(s, "\nhost tables");
    for t in &r.tables {
        let _ = writeln!(
            s,
            "  {:<40} {} (for the {})",
            t.name,
            t.kind.as_deref().unwrap_or("MISSING"),
            t.needed_by
        );
        for c in &t.columns {
            let _ = writeln!(
                s,
                "    {:<38} {:<28} {}",
                c.name,
                c.data_type.as_deref().unwrap_or("-"),
                c.verdict
            );
        }
    }
    let _ = writeln!(s, "\nrights of this connection");
    for g in &r.rights {
        let _ = writeln!(
            s,
            "  {:<8} {:<58} {:<7} needed by {}",
            g.privilege,
            g.on,
            if g.granted { "granted" } else { "MISSING" },
            match (g.needed_for_apply, g.needed_for_audit) {
                (true, true) => "apply, audit",
                (true, false) => "apply",
                _ => "audit",
            }
        );
    }
    let _ = writeln!(
        s,
        "\nrecommended indexes (a missing one makes runs slower, never fails them: a warning)"
    );
    for i in &r.indexes {
        let state = match (&i.present, &i.note) {
            (Some(name), _) => format!("present ({name})"),
            (None, Some(note)) => note.clone(),
            (None, None) => format!("MISSING: {}", i.create),
        };
        let _ = writeln!(
            s,
            "  {:<40} {state}",
            format!("{} ({})", i.table, i.columns.join(", "))
        );
    }
    let _ = writeln!(s, "\njob migrations");
    for m in &r.migrations {
        let _ = writeln!(
            s,
            "  {:>4} {:<22} {:<8} {}",
            m.version,
            m.description,
            m.status,
            m.applied_at.as_deref().unwrap_or("")
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "\nwarning: {w}");
    }
    let (what, problems) = if audit {
        ("a dry run (audit)", &r.audit_problems)
    } else {
        ("an applying run", &r.apply_problems)
    };
    if problems.is_empty() {
        let _ = writeln!(s, "\nok: {what} can succeed");
    } else {
        let _ = writeln!(s, "\n{what} cannot succeed:");
        for p in problems {
            let _ = writeln!(s, "  - {p}");
        }
    }
    s
}
