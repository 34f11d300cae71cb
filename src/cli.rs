//! Command-line definitions (SPEC section 6).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use referral_rewards::instant::{self, Instant};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the job-owned tables (and the host tables, for demos)
    Migrate {
        /// Also create the reference host schema of SPEC section 2
        #[arg(long)]
        with_reference_schema: bool,
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
        #[arg(long)]
        dry_run: bool,
        /// RFC 3339; without offset: UTC [default: now]
        #[arg(long, value_parser = parse_time)]
        as_of: Option<Instant>,
    },
    /// Every referred user of one referrer with its outcome
    Explain {
        #[arg(long)]
        referrer: i64,
        #[arg(long, value_parser = parse_time)]
        as_of: Option<Instant>,
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
