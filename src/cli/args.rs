//! Command-line definitions (SPEC section 6).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use referral_rewards::instant::{self, Instant};
use referral_rewards::report::ReportFormat;
use referral_rewards::snapshot::Shard;

#[derive(Debug, Parser)]
#[command(
    name = "referral-rewards",
    version,
    about = "Reconciles referral-program rewards with the database"
)]
pub struct Cli {
    /// Configuration file [default: config.toml, optional]
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Database URL (sqlite://PATH or postgres://…); overrides DATABASE_URL and the config
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Log lines on stderr as text or JSON (RUST_LOG sets the levels)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExplainFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the job-owned tables (and the host tables, for demos)
    Migrate {
        /// Also create the reference host schema of SPEC section 2
        #[arg(long)]
        with_reference_schema: bool,
        /// List the job's migrations, applied (when) or pending, and change nothing
        #[arg(long, conflicts_with = "with_reference_schema")]
        info: bool,
    },
    /// Fill the host tables with a deterministic synthetic population
    DemoData {
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        users: i64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The instant the population is built around (reconcile --as-of it)
        #[arg(long, value_parser = parse_time, default_value = "2026-11-01T00:00:00Z")]
        anchor: Instant,
    },
    /// A full run, or one referrer's; --dry-run writes nothing
    Reconcile {
        #[arg(long)]
        referrer: Option<i64>,
        /// Only the users of shard K of N (1 <= K <= N); N processes together make a full run
        #[arg(long, value_name = "K/N", value_parser = Shard::parse, conflicts_with = "referrer")]
        shard: Option<Shard>,
        #[arg(long)]
        dry_run: bool,
        /// RFC 3339; without offset: UTC [default: now, or the --plan's as-of]
        #[arg(long, value_parser = parse_time)]
        as_of: Option<Instant>,
        /// Write the per-referrer report (SPEC section 5) here
        #[arg(long)]
        report: Option<PathBuf>,
        /// Report format [default: from the report's extension]
        #[arg(long, value_enum, requires = "report")]
        format: Option<ReportFormat>,
        /// Also write one row per referred user, beside the report (NAME.referrals.EXT)
        #[arg(long, requires = "report")]
        per_referral: bool,
        /// Keep only the referrers whose reward would change
        #[arg(long, requires = "report")]
        only_changes: bool,
        /// Save the plan as JSON, for a later `--expect-digest D --plan PATH`
        #[arg(long)]
        save_plan: Option<PathBuf>,
        /// Apply only if the fresh plan's digest is D (exit 3 and write nothing otherwise)
        #[arg(long, value_name = "D")]
        expect_digest: Option<String>,
        /// The audited plan (from --save-plan): its digest is expected, its as-of is used, and a
        /// refusal says how many referrers differ
        #[arg(long)]
        plan: Option<PathBuf>,
    },
    /// Every referred user of one referrer with its outcome
    Explain {
        #[arg(long)]
        referrer: i64,
        #[arg(long, value_parser = parse_time)]
        as_of: Option<Instant>,
        #[arg(long, value_enum, default_value_t = ExplainFormat::Text)]
        format: ExplainFormat,
    },
    /// Whether a run can succeed here: host tables and columns, the role's rights, the
    /// recommended indexes, the job's migrations (exit 0 only if it can)
    Check {
        /// Judge a read-only audit (dry runs, explain) instead of an applying run
        #[arg(long)]
        audit: bool,
        #[arg(long, value_enum, default_value_t = ExplainFormat::Text)]
        format: ExplainFormat,
    },
    /// The scheduler and the HTTP API: a full run at each cron tick, until SIGINT/SIGTERM
    Serve,
    /// The run history, newest first
    Runs {
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
}

fn parse_time(s: &str) -> Result<Instant, String> {
    instant::parse_as_of(s)
}
