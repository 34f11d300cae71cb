//! Command-line definitions (README "Commands"). Every argument and subcommand has a help text:
//! the `--help` pages, the man pages and the shell completions are generated from these.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use referral_rewards::instant::{self, Instant};
use referral_rewards::report::ReportFormat;
use referral_rewards::snapshot::Shard;

/// `--version`: the crate's version and the git revision it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("REFERRAL_REWARDS_GIT_REV"),
    ")"
);

/// After `--help` and in the man page.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a failed run (its row says failed, nothing else was written), a database that cannot be
     reached or lacks its tables, or output that cannot be written
  2  bad usage or configuration (the message names the argument or key)
  3  refused: another applying run holds the lock, or the plan's digest is not the expected one
     (an --plan already applied says by which run); nothing was written
  4  some referrers could not be written (the summary lists them); everyone else was written
  5  the run committed (its row says succeeded), but its report, plan or summary could not be
     written afterwards";

#[derive(Debug, Parser)]
#[command(
    name = "referral-rewards",
    version = VERSION,
    about = "Reconciles referral-program rewards with the database",
    after_long_help = EXIT_CODES
)]
pub struct Cli {
    /// Configuration file [default: config.toml, optional]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Database URL (sqlite://PATH or postgres://…); overrides database.url of the config
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Whether `database_url` came from `DATABASE_URL` rather than the flag (for messages).
    #[arg(skip)]
    pub database_url_from_env: bool,
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

/// How a command prints its result on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people: aligned lines and tables
    Text,
    /// One JSON document, for scripts
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the job-owned tables (and the host tables, for demos)
    Migrate {
        /// Also create the reference host schema (docs/rules.md §2) and its indexes
        #[arg(long)]
        with_reference_schema: bool,
        /// List the job's migrations, applied (when) or pending, and change nothing
        #[arg(long, conflicts_with = "with_reference_schema")]
        info: bool,
    },
    /// Fill the host tables with a deterministic synthetic population
    DemoData {
        /// How many users to create (at least 1)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        users: i64,
        /// Seed of the generator: the same users and seed give the same data
        #[arg(long, value_name = "S", default_value_t = 42)]
        seed: u64,
        /// The instant the population is built around (reconcile --as-of it)
        #[arg(long, value_name = "TIME", value_parser = parse_time, default_value = "2026-11-01T00:00:00Z")]
        anchor: Instant,
    },
    /// A full run, a shard's or one referrer's; --dry-run writes nothing
    Reconcile {
        /// Only this user: a referrer's recompute, or the revocation of a former referrer
        #[arg(long, value_name = "ID")]
        referrer: Option<i64>,
        /// Only the users of shard K of N (1 <= K <= N); N processes together make a full run
        #[arg(long, value_name = "K/N", value_parser = Shard::parse, conflicts_with = "referrer")]
        shard: Option<Shard>,
        /// Compute and show what an apply would write, writing nothing (no lock, no run row)
        #[arg(long)]
        dry_run: bool,
        /// RFC 3339; without offset: UTC [default: now]
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        as_of: Option<Instant>,
        /// Write the per-referrer report (docs/rules.md §5) here (.csv, .json or .parquet), or
        /// the audit page (.html, as --html)
        #[arg(long, value_name = "PATH")]
        report: Option<PathBuf>,
        /// Write the audit page here: one self-contained HTML file (summary, outcome charts,
        /// top referrers, the plan's changes, the config in force)
        #[arg(long, value_name = "PATH")]
        html: Option<PathBuf>,
        /// Report format [default: from the report's extension]
        #[arg(long, value_enum, requires = "report")]
        format: Option<ReportFormat>,
        /// Also write one row per referred user, beside the report (NAME.referrals.EXT)
        #[arg(long, requires = "report")]
        per_referral: bool,
        /// Keep only the referrers whose reward would change
        #[arg(long, requires = "report")]
        only_changes: bool,
        /// Save the plan as JSON (a .json path), for a later `--plan PATH`
        #[arg(long, value_name = "PATH")]
        save_plan: Option<PathBuf>,
        /// Apply only if the fresh plan's digest is D (exit 3 and write nothing otherwise)
        #[arg(long, value_name = "D")]
        expect_digest: Option<String>,
        /// Apply the audited plan (from --save-plan): its digest is expected and its as-of used;
        /// a refusal says how many referrers differ, or which run applied it already
        #[arg(long, value_name = "PATH", conflicts_with_all = ["as_of", "referrer", "expect_digest"])]
        plan: Option<PathBuf>,
        /// After the summary, only what the plan changes, old -> new per field, grouped (as
        /// `plan show`, at most 100 per group; in --output json, the `diff` object)
        #[arg(long, requires = "dry_run")]
        diff: bool,
        /// The run summary on stdout: text, or one JSON object for scripts (--format is the
        /// report's)
        #[arg(long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Why referrals count or not, with their facts and what would change them: one referrer's
    /// referrals (--referrer), or one referred user in every program (--user); a dry run
    #[command(group = clap::ArgGroup::new("who").required(true).args(["referrer", "user"]))]
    Explain {
        /// The referrer to explain: every user it referred
        #[arg(long, value_name = "ID")]
        referrer: Option<i64>,
        /// The referred user to explain: who referred it and its outcome in every program
        #[arg(long, value_name = "ID")]
        user: Option<i64>,
        /// RFC 3339; without offset: UTC [default: now]
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        as_of: Option<Instant>,
        /// Text, or JSON (the same as GET /v1/referrers/{id}, not paged, or GET /v1/users/{id})
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Whether a run can succeed here: host tables and columns, the role's rights, the
    /// recommended indexes, the job's migrations (exit 0 only if it can)
    Check {
        /// Judge a read-only audit (dry runs, explain) instead of an applying run
        #[arg(long)]
        audit: bool,
        /// Text for a person, or JSON for tools
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// The scheduler and the HTTP API: a full run at each cron tick, until SIGINT/SIGTERM
    Serve,
    /// The run history, newest first; `runs show ID` for one run and its ledger rows
    #[command(args_conflicts_with_subcommands = true)]
    Runs {
        #[command(subcommand)]
        show: Option<RunsCommand>,
        /// How many runs to list
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Text, or JSON (the same as GET /v1/runs)
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// The ledgers, newest first: reward_changes (slots) and referral_grants (grant programs)
    Changes {
        /// Only the rows this run wrote
        #[arg(long, value_name = "ID")]
        run: Option<i64>,
        /// Only the rows of this referrer
        #[arg(long, value_name = "ID")]
        referrer: Option<i64>,
        /// At most N rows of each ledger
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Text, or JSON (the same as GET /v1/changes)
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Saved plans (--save-plan): `plan show PATH` for what one changes
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, or write one page per command into --dir
    Man {
        /// Write referral-rewards.1 and a page per subcommand into this directory (created if
        /// missing)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Only what a saved plan changes, old -> new per field, grouped (bonus up, down, revoked,
    /// new subscriptions, counts only, grants, reversals), with totals; reads no database
    Show {
        /// The plan file (from reconcile --dry-run --save-plan PATH.json)
        path: PathBuf,
        /// At most N entries per group; 0 shows all (the totals always count everything)
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Text for a reviewer, or JSON for tools
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// One run: its row, how many ledger rows it wrote, and the newest of them
    Show {
        /// The run's id (the first column of `runs`)
        id: i64,
        /// At most N ledger rows of each ledger
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Text, or JSON (the same as GET /v1/runs/{id})
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

fn parse_time(s: &str) -> Result<Instant, String> {
    instant::parse_as_of(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `--help`, the man pages and the completions say what every flag and subcommand is for.
    #[test]
    fn every_argument_and_subcommand_has_a_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = vec![];
        let mut cmd = Cli::command();
        cmd.build();
        walk(&cmd, "referral-rewards", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }
}
