//! `config.toml`: every tunable of SPEC sections 3 and 4, with the SPEC defaults.
//!
//! Unknown keys are refused (a typo must not silently fall back to a default) and every
//! validation error names the key it is about, e.g. `rules.cooldown_days: must be >= 0, got -1`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A configuration problem: the message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rules: RulesConfig,
    pub rewards: RewardsConfig,
    pub new_subscription: NewSubscriptionConfig,
    pub schedule: ScheduleConfig,
    pub http: HttpConfig,
    /// Grant programs (docs/rules.md §7): `[[grants]]` entries, none by default.
    pub grants: Vec<GrantProgramConfig>,
}

/// One grant program: a one-time grant to the referrer and/or the referred user when the
/// referred user first pays.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrantProgramConfig {
    /// `[a-z][a-z0-9_]{0,39}`, unique; stored in the ledger.
    pub name: String,
    /// The payment statuses that count as paid.
    #[serde(default = "default_payment_statuses")]
    pub payment_statuses: Vec<String>,
    #[serde(default = "one")]
    pub min_payment_cents: i64,
    /// Payments in other currencies do not count; `None`: any currency.
    #[serde(default)]
    pub currency: Option<String>,
    /// A conversion is granted once it is this many days old.
    #[serde(default)]
    pub hold_days: i64,
    /// 0: no limit.
    #[serde(default)]
    pub max_rewarded_per_referrer: i64,
    /// The shared fraud rules 1, 3, 4, 5 (IP settings from `[rules]`).
    #[serde(default = "yes")]
    pub fraud_checks: bool,
    #[serde(default)]
    pub on_refund: OnRefund,
    pub referrer: Option<PartyGrant>,
    pub referred: Option<PartyGrant>,
}

/// What a referral that no longer qualifies keeps.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnRefund {
    /// Grants are final.
    #[default]
    Keep,
    /// A granted referral that leaves the desired set is reversed.
    Reverse,
}

/// One party's grant: days of paid access or cents of account credit (exactly one).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartyGrant {
    pub credit_days: Option<i64>,
    pub credit_cents: Option<i64>,
}

fn default_payment_statuses() -> Vec<String> {
    vec!["succeeded".into()]
}

fn one() -> i64 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`; `DATABASE_URL` and `--database-url` override it.
    pub url: String,
    /// Seconds a SQLite writer waits for a busy database before giving up.
    pub busy_timeout_secs: i64,
    /// SQLite: MiB of the database file the snapshot reads through a read-only memory map
    /// (`PRAGMA mmap_size`) instead of a system call and a copy per page; 0 turns it off.
    pub sqlite_mmap_mb: i64,
    /// PostgreSQL: read the snapshot's large queries with binary COPY (faster); the job falls
    /// back to SELECTs by itself where COPY is refused. `false` forces SELECTs.
    pub pg_binary_copy: bool,
    /// PostgreSQL: seconds a run's statement waits for a lock another transaction holds
    /// (`lock_timeout`) before the run fails; 0 waits forever.
    pub lock_timeout_secs: i64,
    /// PostgreSQL: seconds one statement of a run may take (`statement_timeout`); 0: no limit.
    pub statement_timeout_secs: i64,
}

/// SPEC section 3: the qualification rules.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub cooldown_days: i64,
    pub ip_window_days: i64,
    pub require_ip_hash: bool,
    pub qualifying_tiers: Vec<String>,
    pub qualifying_statuses: Vec<String>,
}

/// SPEC section 3: bonus slots and badges.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RewardsConfig {
    pub batch_size: i64,
    pub bonus_per_batch: i64,
    /// Lowest threshold first; thresholds strictly increasing.
    pub badges: Vec<Badge>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Badge {
    pub name: String,
    pub threshold: i64,
}

/// SPEC section 4: the subscription row created for a referrer without one who earns a bonus.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NewSubscriptionConfig {
    pub tier: String,
    pub status: String,
    pub max_domains: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// 6-field cron expression with seconds, UTC.
    pub cron: String,
    pub run_on_start: bool,
    pub shutdown_grace_secs: i64,
    /// `/healthz` is 503 (`stale`) once the last successful full run is older than this; 0:
    /// never stale.
    pub stale_after_secs: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub bind: String,
    /// Name of the environment variable holding the API bearer token.
    pub token_env: String,
    /// Connections served at once; more wait in the listen backlog. Lowered at start if the
    /// process's descriptor limit cannot hold them plus a reserve for runs.
    pub max_connections: i64,
    /// Seconds a client has to send a request's headers; the connection is closed after.
    pub header_timeout_secs: i64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://referral-rewards.db".into(),
            busy_timeout_secs: 30,
            sqlite_mmap_mb: 2048,
            pg_binary_copy: true,
            lock_timeout_secs: 30,
            statement_timeout_secs: 600,
        }
    }
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            cooldown_days: 7,
            ip_window_days: 30,
            require_ip_hash: true,
            qualifying_tiers: vec!["trader".into(), "tycoon".into()],
            qualifying_statuses: vec!["active".into(), "past_due".into()],
        }
    }
}

impl Default for RewardsConfig {
    fn default() -> Self {
        Self {
            batch_size: 3,
            bonus_per_batch: 5,
            badges: vec![
                Badge {
                    name: "verified_referrer".into(),
                    threshold: 3,
                },
                Badge {
                    name: "elite_referrer".into(),
                    threshold: 10,
                },
            ],
        }
    }
}

impl Default for NewSubscriptionConfig {
    fn default() -> Self {
        Self {
            tier: "scout".into(),
            status: "active".into(),
            max_domains: 5,
        }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            cron: "0 0 * * * *".into(),
            run_on_start: false,
            shutdown_grace_secs: 30,
            // Three periods of the default hourly schedule: one missed tick is no alarm.
            stale_after_secs: 3 * 3600,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8787".into(),
            token_env: "REFERRAL_REWARDS_API_TOKEN".into(),
            max_connections: 256,
            header_timeout_secs: 10,
        }
    }
}

/// Upper bound on day counts: keeps every `days * 86_400_000_000` microsecond product far from
/// overflow while allowing any window an operator could mean.
const MAX_DAYS: i64 = 100_000;

impl Config {
    /// Reads and validates a config file. A missing file is an error only when `required`
    /// (the user named it with `--config`); the default `config.toml` may be absent.
    pub fn load(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                let config = Config::default();
                config.validate()?;
                return Ok(config);
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// [`Config::load`], then the environment's overrides: `REFERRAL_REWARDS_<TABLE>__<KEY>`
    /// (sections and keys joined by `__`, any case, an array entry by its index:
    /// `REFERRAL_REWARDS_GRANTS__0__HOLD_DAYS`) sets that key over the file's value or the
    /// default. The value is TOML (`3`, `true`, `["trader", "tycoon"]`), or the text itself for
    /// a key that holds text. Validated like the file's values; an error names the variable.
    pub fn load_with_env(
        path: &Path,
        required: bool,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let shown = path.display().to_string();
        Self::parse_with_env(&text, vars).map_err(|e| match e {
            ConfigError::Parse { path, message } if path.is_empty() => ConfigError::Parse {
                path: shown,
                message,
            },
            other => other,
        })
    }

    /// [`Config::parse`] with environment overrides (see [`Config::load_with_env`]).
    pub fn parse_with_env(
        text: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut overrides: Vec<EnvOverride> = vars
            .into_iter()
            .filter_map(|(k, v)| EnvOverride::of(k, v))
            .collect();
        if overrides.is_empty() {
            return Self::parse(text);
        }
        overrides.sort_by(|a, b| a.var.cmp(&b.var));
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: String::new(),
            message: one_line(&e.to_string()),
        };
        let mut table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        // The file alone first, so that its own mistakes are named as the file's.
        toml::Value::Table(table.clone())
            .try_into::<Config>()
            .map_err(parse_error)?;
        let defaults = match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        for o in &overrides {
            o.apply(&mut table, &defaults)?;
            // One at a time: a value that does not fit is named by its variable.
            toml::Value::Table(table.clone())
                .try_into::<Config>()
                .map_err(|e| invalid(o.named(), one_line(&e.to_string())))?;
        }
        let config: Config = toml::Value::Table(table).try_into().map_err(parse_error)?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } => {
                match overrides.iter().rev().find(|o| o.covers(&key)) {
                    Some(o) => ConfigError::Invalid {
                        key: format!("{key} (from {})", o.var),
                        message,
                    },
                    None => ConfigError::Invalid { key, message },
                }
            }
            other => other,
        })?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            // toml's message carries the key and its line; keep it on one line.
            message: e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // A NUL passes TOML and SQLite but PostgreSQL refuses it in text, at apply time.
        let texts = [
            ("database.url", vec![&self.database.url]),
            (
                "rules.qualifying_tiers",
                self.rules.qualifying_tiers.iter().collect(),
            ),
            (
                "rules.qualifying_statuses",
                self.rules.qualifying_statuses.iter().collect(),
            ),
            (
                "rewards.badges",
                self.rewards.badges.iter().map(|b| &b.name).collect(),
            ),
            ("new_subscription.tier", vec![&self.new_subscription.tier]),
            (
                "new_subscription.status",
                vec![&self.new_subscription.status],
            ),
            ("schedule.cron", vec![&self.schedule.cron]),
            ("http.bind", vec![&self.http.bind]),
            ("http.token_env", vec![&self.http.token_env]),
        ];
        for (key, values) in texts {
            if let Some(v) = values.iter().find(|v| v.contains('\0')) {
                return Err(invalid(key, format!("contains a NUL character: {v:?}")));
            }
        }
        validate_url("database.url", &self.database.url)?;
        // The drivers and PostgreSQL's settings take milliseconds in an i32.
        for (key, v) in [
            (
                "database.busy_timeout_secs",
                self.database.busy_timeout_secs,
            ),
            (
                "database.lock_timeout_secs",
                self.database.lock_timeout_secs,
            ),
            (
                "database.statement_timeout_secs",
                self.database.statement_timeout_secs,
            ),
        ] {
            if !(0..=2_000_000).contains(&v) {
                return Err(invalid(
                    key,
                    format!("must be between 0 and 2000000, got {v}"),
                ));
            }
        }
        // Up to 1 TiB: SQLite caps it at its own limit anyway.
        if !(0..=1 << 20).contains(&self.database.sqlite_mmap_mb) {
            return Err(invalid(
                "database.sqlite_mmap_mb",
                format!(
                    "must be between 0 and 1048576, got {}",
                    self.database.sqlite_mmap_mb
                ),
            ));
        }
        let r = &self.rules;
        if !(0..=MAX_DAYS).contains(&r.cooldown_days) {
            return Err(invalid(
                "rules.cooldown_days",
                format!(
                    "must be between 0 and {MAX_DAYS} (0 disables the cooldown), got {}",
                    r.cooldown_days
                ),
            ));
        }
        if !(1..=MAX_DAYS).contains(&r.ip_window_days) {
            return Err(invalid(
                "rules.ip_window_days",
                format!("must be between 1 and {MAX_DAYS}, got {}", r.ip_window_days),
            ));
        }
        let w = &self.rewards;
        if w.batch_size < 1 || w.batch_size > i32::MAX as i64 {
            return Err(invalid(
                "rewards.batch_size",
                format!("must be >= 1, got {}", w.batch_size),
            ));
        }
        if w.bonus_per_batch < 0 || w.bonus_per_batch > i32::MAX as i64 {
            return Err(invalid(
                "rewards.bonus_per_batch",
                format!("must be >= 0, got {}", w.bonus_per_batch),
            ));
        }
        let mut previous: Option<&Badge> = None;
        for badge in &w.badges {
            if badge.name.trim().is_empty() {
                return Err(invalid("rewards.badges", "a badge name is empty"));
            }
            if badge.threshold < 1 {
                return Err(invalid(
                    "rewards.badges",
                    format!(
                        "threshold of badge {:?} must be >= 1, got {}",
                        badge.name, badge.threshold
                    ),
                ));
            }
            if let Some(p) = previous
                && badge.threshold <= p.threshold
            {
                return Err(invalid(
                    "rewards.badges",
                    format!(
                        "thresholds must be strictly increasing: {:?} at {} follows {:?} at {}",
                        badge.name, badge.threshold, p.name, p.threshold
                    ),
                ));
            }
            previous = Some(badge);
        }
        let n = &self.new_subscription;
        if n.tier.is_empty() {
            return Err(invalid("new_subscription.tier", "must not be empty"));
        }
        if n.status.is_empty() {
            return Err(invalid("new_subscription.status", "must not be empty"));
        }
        if n.max_domains < 0 || n.max_domains > i32::MAX as i64 {
            return Err(invalid(
                "new_subscription.max_domains",
                format!("must be >= 0, got {}", n.max_domains),
            ));
        }
        // A subscription the job creates must not make its own user a candidate: a referrer who
        // is also a referred user would then count differently on the next run, and "a second
        // run over unchanged state writes nothing" would fail after every new subscription.
        if self.rules.qualifying_tiers.contains(&n.tier)
            && self.rules.qualifying_statuses.contains(&n.status)
        {
            return Err(invalid(
                "new_subscription.tier",
                format!(
                    "{:?} with status {:?} qualifies (rules.qualifying_tiers and _statuses): a subscription the job creates would count on the next run",
                    n.tier, n.status
                ),
            ));
        }
        cron_with_seconds(&self.schedule.cron)?;
        if !(0..=MAX_DAYS * 86_400).contains(&self.schedule.shutdown_grace_secs) {
            return Err(invalid(
                "schedule.shutdown_grace_secs",
                format!("must be >= 0, got {}", self.schedule.shutdown_grace_secs),
            ));
        }
        if !(0..=MAX_DAYS * 86_400).contains(&self.schedule.stale_after_secs) {
            return Err(invalid(
                "schedule.stale_after_secs",
                format!(
                    "must be between 0 (never stale) and {}, got {}",
                    MAX_DAYS * 86_400,
                    self.schedule.stale_after_secs
                ),
            ));
        }
        if !(1..=65_536).contains(&self.http.max_connections) {
            return Err(invalid(
                "http.max_connections",
                format!(
                    "must be between 1 and 65536, got {}",
                    self.http.max_connections
                ),
            ));
        }
        if !(1..=3_600).contains(&self.http.header_timeout_secs) {
            return Err(invalid(
                "http.header_timeout_secs",
                format!(
                    "must be between 1 and 3600, got {}",
                    self.http.header_timeout_secs
                ),
            ));
        }
        if self.http.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.bind",
                format!("not an address:port: {:?}", self.http.bind),
            ));
        }
        self.validate_grants()?;
        Ok(())
    }
}

impl Config {
    /// `[[grants]]` (docs/rules.md §7.2): each error names the entry by its 0-based index, e.g.
    /// `grants[1].min_payment_cents`.
    fn validate_grants(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for (i, g) in self.grants.iter().enumerate() {
            let key = |k: &str| format!("grants[{i}].{k}");
            let ok_name = g.name.len() <= 40
                && g.name.starts_with(|c: char| c.is_ascii_lowercase())
                && g.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok_name {
                return Err(invalid(
                    key("name"),
                    format!("must match [a-z][a-z0-9_]{{0,39}}, got {:?}", g.name),
                ));
            }
            if !names.insert(g.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("{:?} names two grant programs", g.name),
                ));
            }
            if g.payment_statuses.is_empty() {
                return Err(invalid(
                    key("payment_statuses"),
                    "must name at least one status",
                ));
            }
            // Compared exactly with host text: an empty or NUL value could never match.
            if let Some(t) = g
                .payment_statuses
                .iter()
                .find(|t| t.is_empty() || t.contains('\0'))
            {
                return Err(invalid(
                    key("payment_statuses"),
                    format!("empty or NUL text: {t:?}"),
                ));
            }
            if let Some(c) = g
                .currency
                .as_ref()
                .filter(|c| c.is_empty() || c.contains('\0'))
            {
                return Err(invalid(
                    key("currency"),
                    format!("empty or NUL text: {c:?}"),
                ));
            }
            if !(1..=i64::MAX / 2).contains(&g.min_payment_cents) {
                return Err(invalid(
                    key("min_payment_cents"),
                    format!("must be >= 1, got {}", g.min_payment_cents),
                ));
            }
            if !(0..=MAX_DAYS).contains(&g.hold_days) {
                return Err(invalid(
                    key("hold_days"),
                    format!("must be between 0 and {MAX_DAYS}, got {}", g.hold_days),
                ));
            }
            if !(0..=i32::MAX as i64).contains(&g.max_rewarded_per_referrer) {
                return Err(invalid(
                    key("max_rewarded_per_referrer"),
                    format!(
                        "must be >= 0 (0: no limit), got {}",
                        g.max_rewarded_per_referrer
                    ),
                ));
            }
            if g.referrer.is_none() && g.referred.is_none() {
                return Err(invalid(
                    key("referrer"),
                    "at least one of referrer and referred must be granted something",
                ));
            }
            for (party, grant) in [("referrer", &g.referrer), ("referred", &g.referred)] {
                let Some(p) = grant else { continue };
                let (k, v, max) = match (p.credit_days, p.credit_cents) {
                    (Some(d), None) => ("credit_days", d, MAX_DAYS),
                    (None, Some(c)) => ("credit_cents", c, i64::MAX / 1024),
                    _ => {
                        return Err(invalid(
                            key(party),
                            "exactly one of credit_days and credit_cents",
                        ));
                    }
                };
                if !(1..=max).contains(&v) {
                    return Err(invalid(
                        format!("grants[{i}].{party}.{k}"),
                        format!("must be between 1 and {max}, got {v}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Environment variables that override config keys start with this (and hold a `__`).
pub const ENV_PREFIX: &str = "REFERRAL_REWARDS_";

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One `REFERRAL_REWARDS_<TABLE>__<KEY>=value`.
struct EnvOverride {
    var: String,
    /// Lowercase path segments: `["grants", "0", "hold_days"]`.
    path: Vec<String>,
    value: String,
}

impl EnvOverride {
    /// `None` for a variable that is not an override: other prefixes, and the job's own
    /// single-word variables (`REFERRAL_REWARDS_API_TOKEN`, `REFERRAL_REWARDS_FAULT`, …).
    fn of(var: String, value: String) -> Option<EnvOverride> {
        let rest = var.strip_prefix(ENV_PREFIX)?;
        if !rest.contains("__") {
            return None;
        }
        let path = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        Some(EnvOverride { var, path, value })
    }

    /// The key as validation errors name it: `grants[0].hold_days`.
    fn key(&self) -> String {
        let mut k = String::new();
        for p in &self.path {
            if p.parse::<usize>().is_ok() {
                k.push_str(&format!("[{p}]"));
            } else {
                if !k.is_empty() {
                    k.push('.');
                }
                k.push_str(p);
            }
        }
        k
    }

    fn named(&self) -> String {
        format!("{} (from {})", self.key(), self.var)
    }

    /// Whether a validation error about `key` may be this override's doing.
    fn covers(&self, key: &str) -> bool {
        let mine = self.key();
        key == mine
            || key.starts_with(&format!("{mine}."))
            || key.starts_with(&format!("{mine}["))
            || mine.starts_with(&format!("{key}."))
    }

    fn apply(&self, table: &mut toml::Table, defaults: &toml::Table) -> Result<(), ConfigError> {
        let bad = |message: String| invalid(self.named(), message);
        if self.path.iter().any(|p| p.is_empty()) {
            return Err(bad("an empty section or key between the `__`s".into()));
        }
        // A key that holds text takes the variable's text as it is; any other is TOML.
        let text = matches!(
            lookup(table, &self.path).or_else(|| lookup(defaults, &self.path)),
            Some(toml::Value::String(_))
        );
        let value = if text {
            toml::Value::String(self.value.clone())
        } else {
            toml::from_str::<toml::Table>(&format!("v = {}", self.value))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(self.value.clone()))
        };
        let (last, parents) = self.path.split_last().expect("at least two segments");
        let mut at = table;
        for (i, p) in parents.iter().enumerate() {
            let next = self.path.get(i + 1);
            // Absent from the file: start from the default (`rewards.badges`), else a table.
            let default = lookup(defaults, &self.path[..=i]).cloned();
            at = match at.entry(p.clone()).or_insert_with(|| {
                default.unwrap_or_else(|| toml::Value::Table(toml::Table::new()))
            }) {
                toml::Value::Table(t) => t,
                toml::Value::Array(a) => {
                    // `grants__0__…`: an entry of an array of tables, which must exist.
                    let n = next
                        .and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| bad(format!("{p} is a list: name an entry by its index")))?;
                    let len = a.len();
                    match a.get_mut(n) {
                        Some(toml::Value::Table(t)) => {
                            // Skip the index segment: continue below the entry.
                            return set_below(t, &self.path[i + 2..], value).map_err(&bad);
                        }
                        _ => return Err(bad(format!("{p} has {len} entries, no entry {n}"))),
                    }
                }
                _ => return Err(bad(format!("{p} is not a table"))),
            };
        }
        at.insert(last.clone(), value);
        Ok(())
    }
}

/// Sets `path` (no more array indexes) below `table` to `value`.
fn set_below(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("names an entry, not a key of it".into());
    };
    let mut at = table;
    for p in parents {
        at = match at
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => t,
            _ => return Err(format!("{p} is not a table")),
        };
    }
    at.insert(last.clone(), value);
    Ok(())
}

/// The value at `path` (table keys and array indexes), if any.
fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut v = table.get(first)?;
    for p in rest {
        v = match v {
            toml::Value::Table(t) => t.get(p)?,
            toml::Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// A config text with its commented `[[grants]]` examples enabled: everything from the first
/// `# [[grants]]` line on loses its `# ` (what `make demo` does to config.toml with `sed`).
/// `None` when the text has no such examples.
pub fn enable_grant_examples(text: &str) -> Option<String> {
    let at = text.find("# [[grants]]")?;
    let rest: Vec<&str> = text[at..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .collect();
    Some(text[..at].to_owned() + &rest.join("\n"))
}

/// The cron expression as the scheduler wants it: 6 fields with seconds, UTC. A classic 5-field
/// expression gets `0` seconds prefixed; anything else that does not parse is refused.
pub fn cron_with_seconds(expr: &str) -> Result<String, ConfigError> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 => fields.join(" "),
        n => {
            return Err(invalid(
                "schedule.cron",
                format!(
                    "{expr:?} has {n} fields; expected 6 with seconds, UTC, e.g. \"0 0 * * * *\" (hourly)"
                ),
            ));
        }
    };
    tokio_cron_scheduler::Job::new_async(six.as_str(), |_, _| Box::pin(async {})).map_err(|_| {
        invalid(
            "schedule.cron",
            format!(
                "{expr:?} is not a valid cron expression; expected 6 fields with seconds, UTC, e.g. \"0 0 * * * *\""
            ),
        )
    })?;
    Ok(six)
}

/// Checks a database URL with the driver's own parser, without connecting; `key` names where
/// the URL came from.
pub fn validate_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    use std::str::FromStr;
    let parsed = if url.starts_with("sqlite:") {
        sqlx::sqlite::SqliteConnectOptions::from_str(url).map(|_| ())
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        sqlx::postgres::PgConnectOptions::from_str(url).map(|_| ())
    } else {
        return Err(invalid(
            key,
            format!("expected sqlite://PATH or postgres://…, got {url:?}"),
        ));
    };
    parsed.map_err(|e| invalid(key, format!("malformed URL {url:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_spec_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.rules.cooldown_days, 7);
        assert_eq!(c.rules.ip_window_days, 30);
        assert!(c.rules.require_ip_hash);
        assert_eq!(c.rules.qualifying_tiers, ["trader", "tycoon"]);
        assert_eq!(c.rules.qualifying_statuses, ["active", "past_due"]);
        assert_eq!(c.rewards.batch_size, 3);
        assert_eq!(c.rewards.bonus_per_batch, 5);
        assert_eq!(c.rewards.badges[0].threshold, 3);
        assert_eq!(c.rewards.badges[1].name, "elite_referrer");
    }

    #[test]
    fn shipped_config_toml_is_valid_and_equals_defaults() {
        let text = include_str!("../config.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
    }

    #[test]
    fn shipped_grant_examples_enable_as_make_demo_does() {
        let enabled =
            enable_grant_examples(include_str!("../config.toml")).expect("the examples are there");
        let c = Config::parse(&enabled).unwrap();
        assert_eq!(c.grants.len(), 2);
        let (a, b) = (&c.grants[0], &c.grants[1]);
        assert_eq!(a.referrer.as_ref().unwrap().credit_days, Some(45));
        assert_eq!(a.referred.as_ref().unwrap().credit_days, Some(45));
        assert!(a.fraud_checks);
        assert_eq!(b.min_payment_cents, 1000);
        assert_eq!(b.max_rewarded_per_referrer, 10);
        assert_eq!(b.referred.as_ref().unwrap().credit_cents, Some(1000));
    }

    #[test]
    fn negative_cooldown_names_the_key() {
        assert!(err("[rules]\ncooldown_days = -1").contains("rules.cooldown_days"));
    }

    #[test]
    fn zero_ip_window_is_refused() {
        assert!(err("[rules]\nip_window_days = 0").contains("rules.ip_window_days"));
    }

    #[test]
    fn zero_batch_size_names_the_key() {
        assert!(err("[rewards]\nbatch_size = 0").contains("rewards.batch_size"));
    }

    #[test]
    fn busy_timeout_beyond_the_drivers_range_is_refused() {
        let e = err("[database]\nbusy_timeout_secs = 9999999999");
        assert!(e.contains("database.busy_timeout_secs"), "{e}");
        let e = err("[database]\nsqlite_mmap_mb = -1");
        assert!(e.contains("database.sqlite_mmap_mb"), "{e}");
    }

    #[test]
    fn a_nul_character_in_a_text_value_names_the_key() {
        let e = err("[rules]\nqualifying_tiers = [\"trader\", \"ty\\u0000coon\"]\n");
        assert!(
            e.contains("rules.qualifying_tiers") && e.contains("NUL"),
            "{e}"
        );
        let e = err("[new_subscription]\ntier = \"sc\\u0000out\"\n");
        assert!(e.contains("new_subscription.tier"), "{e}");
        let e = err("[[rewards.badges]]\nname = \"a\\u0000\"\nthreshold = 3\n");
        assert!(e.contains("rewards.badges"), "{e}");
    }

    const GRANTS: &str = "[[grants]]\nname = \"paid_access\"\nreferrer = { credit_days = 45 }\nreferred = { credit_days = 45 }\n\n[[grants]]\nname = \"credit\"\nmin_payment_cents = 1000\ncurrency = \"USD\"\nmax_rewarded_per_referrer = 10\non_refund = \"reverse\"\nreferrer = { credit_cents = 1000 }\nreferred = { credit_cents = 1000 }\n";

    #[test]
    fn grant_programs_parse_with_the_defaults() {
        let c = Config::parse(GRANTS).unwrap();
        let g = &c.grants[0];
        assert_eq!(g.payment_statuses, ["succeeded"]);
        assert_eq!(
            (
                g.min_payment_cents,
                g.hold_days,
                g.max_rewarded_per_referrer
            ),
            (1, 0, 0)
        );
        assert!(g.fraud_checks);
        assert_eq!(g.on_refund, OnRefund::Keep);
        assert_eq!(g.currency, None);
        assert_eq!(c.grants[1].on_refund, OnRefund::Reverse);
        assert_eq!(
            c.grants[1].referrer.as_ref().unwrap().credit_cents,
            Some(1000)
        );
    }

    #[test]
    fn a_bad_grant_value_names_the_entry_and_key() {
        let bad = |from: &str, to: &str| err(&GRANTS.replacen(from, to, 1));
        let e = bad("min_payment_cents = 1000", "min_payment_cents = 0");
        assert!(e.contains("grants[1].min_payment_cents"), "{e}");
        let e = bad("name = \"credit\"", "name = \"Credit\"");
        assert!(e.contains("grants[1].name"), "{e}");
        let e = bad("name = \"credit\"", "name = \"paid_access\"");
        assert!(e.contains("grants[1].name") && e.contains("two"), "{e}");
        let e = bad(
            "max_rewarded_per_referrer = 10",
            "max_rewarded_per_referrer = -1",
        );
        assert!(e.contains("grants[1].max_rewarded_per_referrer"), "{e}");
        let e = bad(
            "referrer = { credit_days = 45 }",
            "referrer = { credit_days = 0 }",
        );
        assert!(e.contains("grants[0].referrer.credit_days"), "{e}");
        let e = bad(
            "referrer = { credit_days = 45 }",
            "referrer = { credit_days = 4, credit_cents = 5 }",
        );
        assert!(e.contains("grants[0].referrer"), "{e}");
        let e = bad("on_refund = \"reverse\"", "on_refund = \"refund\"");
        assert!(e.contains("on_refund") || e.contains("refund"), "{e}");
        let e = err("[[grants]]\nname = \"x\"\n");
        assert!(e.contains("grants[0].referrer"), "{e}");
        let e = err("[[grants]]\nname = \"x\"\nhold_days = -1\nreferred = { credit_cents = 5 }\n");
        assert!(e.contains("grants[0].hold_days"), "{e}");
    }

    #[test]
    fn a_created_subscription_that_would_qualify_is_refused() {
        let e = err("[rules]\nqualifying_tiers = [\"trader\", \"scout\"]\n");
        assert!(e.contains("new_subscription.tier"), "{e}");
        // A qualifying tier with a status that does not qualify is fine.
        let ok =
            "[rules]\nqualifying_tiers = [\"scout\"]\n[new_subscription]\nstatus = \"trialing\"\n";
        assert!(Config::parse(ok).is_ok());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[rules]\ncooldown_dayz = 3");
        assert!(e.contains("cooldown_dayz"), "{e}");
    }

    #[test]
    fn badge_thresholds_out_of_order_are_refused() {
        let e = err(r#"[rewards]
badges = [{ name = "a", threshold = 5 }, { name = "b", threshold = 5 }]"#);
        assert!(
            e.contains("rewards.badges") && e.contains("strictly increasing"),
            "{e}"
        );
    }

    #[test]
    fn cron_five_fields_get_seconds_and_garbage_is_refused() {
        assert_eq!(cron_with_seconds("*/5 * * * *").unwrap(), "0 */5 * * * *");
        assert_eq!(cron_with_seconds("0 0 * * * *").unwrap(), "0 0 * * * *");
        let e = err("[schedule]\ncron = \"every hour\"");
        assert!(
            e.contains("schedule.cron") && e.contains("0 0 * * * *"),
            "{e}"
        );
        let e = err("[schedule]\ncron = \"99 * * * * *\"");
        assert!(e.contains("schedule.cron"), "{e}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_every_kind_of_key() {
        let c = Config::parse_with_env(
            "[rules]\ncooldown_days = 5\n",
            env(&[
                ("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS", "3"),
                ("REFERRAL_REWARDS_RULES__REQUIRE_IP_HASH", "false"),
                ("REFERRAL_REWARDS_RULES__QUALIFYING_TIERS", "[\"gold\"]"),
                ("referral_rewards_x", "ignored"),
                ("REFERRAL_REWARDS_API_TOKEN", "not an override"),
                ("REFERRAL_REWARDS_NEW_SUBSCRIPTION__TIER", "123"),
                ("REFERRAL_REWARDS_HTTP__BIND", "0.0.0.0:9000"),
                ("REFERRAL_REWARDS_SCHEDULE__CRON", "0 */5 * * * *"),
            ]),
        )
        .unwrap();
        assert_eq!(c.rules.cooldown_days, 3, "over the file's value");
        assert!(!c.rules.require_ip_hash);
        assert_eq!(c.rules.qualifying_tiers, ["gold"]);
        assert_eq!(c.new_subscription.tier, "123", "a text key takes the text");
        assert_eq!(c.http.bind, "0.0.0.0:9000");
        assert_eq!(c.schedule.cron, "0 */5 * * * *");
        // An entry of [[grants]] by index, and a whole list as TOML.
        let c = Config::parse_with_env(
            GRANTS,
            env(&[
                ("REFERRAL_REWARDS_GRANTS__1__HOLD_DAYS", "14"),
                ("REFERRAL_REWARDS_GRANTS__0__REFERRER__CREDIT_DAYS", "30"),
            ]),
        )
        .unwrap();
        assert_eq!(c.grants[1].hold_days, 14);
        assert_eq!(c.grants[0].referrer.as_ref().unwrap().credit_days, Some(30));
        let c = Config::parse_with_env(
            "",
            env(&[
                ("REFERRAL_REWARDS_GRANTS", "ignored: no __"),
                (
                    "REFERRAL_REWARDS_REWARDS__BADGES",
                    "[{ name = \"star\", threshold = 2 }]",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.rewards.badges.len(), 1);
        assert_eq!(c.rewards.badges[0].name, "star");
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let bad = |k: &str, v: &str| {
            Config::parse_with_env("", env(&[(k, v)]))
                .unwrap_err()
                .to_string()
        };
        let e = bad("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS", "-1");
        assert!(
            e.contains("rules.cooldown_days")
                && e.contains("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS"),
            "{e}"
        );
        let e = bad("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS", "three");
        assert!(e.contains("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS"), "{e}");
        let e = bad("REFERRAL_REWARDS_RULES__COOLDOWN_DAYZ", "3");
        assert!(
            e.contains("REFERRAL_REWARDS_RULES__COOLDOWN_DAYZ") && e.contains("cooldown_dayz"),
            "{e}"
        );
        let e = bad("REFERRAL_REWARDS_GRANTS__0__HOLD_DAYS", "3");
        assert!(
            e.contains("REFERRAL_REWARDS_GRANTS__0__HOLD_DAYS") && e.contains("no entry 0"),
            "{e}"
        );
        let e = bad("REFERRAL_REWARDS_SCHEDULE__STALE_AFTER_SECS", "-5");
        assert!(
            e.contains(
                "schedule.stale_after_secs (from REFERRAL_REWARDS_SCHEDULE__STALE_AFTER_SECS)"
            ),
            "{e}"
        );
        // A file mistake is still the file's.
        let e = Config::parse_with_env(
            "[rules]\ncooldown_dayz = 1\n",
            env(&[("REFERRAL_REWARDS_RULES__COOLDOWN_DAYS", "3")]),
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn malformed_url_names_the_key() {
        let e = err("[database]\nurl = \"mysql://x\"");
        assert!(e.contains("database.url"), "{e}");
        let e = err("[database]\nurl = \"postgres://u@host:notaport/db\"");
        assert!(e.contains("database.url") && e.contains("malformed"), "{e}");
    }
}
