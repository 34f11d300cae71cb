//! The `referral-rewards` binary: parse, set up logging and the panic hook, run the command on
//! the async runtime, and map its outcome to an exit code (`cli::exit`).

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use referral_rewards::engine;

use cli::args::{Cli, Command, LogFormat};
use cli::exit::{Exit, Failure};

fn main() -> ExitCode {
    let mut cli = match parse() {
        Ok(cli) => cli,
        // clap's own message, whole: the problem, the usage line and its tips ("a similar
        // argument exists: '--dry-run'"); `--help` and `--version` go to stdout and exit 0.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(Exit::Usage as u8));
        }
    };
    if let Command::Completions { .. } | Command::Man { .. } = cli.command {
        // Generated from the definitions alone: no configuration, logging or runtime.
        return finish(cli::commands::generate(&mut cli));
    }
    if let Command::Plan { command } = &cli.command {
        // A file in, text out: no configuration or database.
        return finish(cli::commands::plan_command(command));
    }
    init_logging(&cli);
    install_panic_hook(matches!(cli.command, Command::Serve));
    // Now, while threads and descriptors are plentiful (see Cargo.toml).
    std::sync::LazyLock::force(&polars_core::runtime::THREAD_POOL);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            return finish(Err(Failure {
                exit: Exit::RunFailed,
                message: format!("cannot start the async runtime: {e}"),
            }));
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(cli::commands::dispatch(cli))
    }));
    match outcome {
        Ok(result) => finish(result),
        Err(payload) => {
            let message = LAST_PANIC
                .lock()
                .ok()
                .and_then(|mut p| p.take())
                .unwrap_or_else(|| engine::panic_message(&*payload));
            finish(Err(Failure {
                exit: Exit::RunFailed,
                message: format!("internal error (a bug; please report it): {message}"),
            }))
        }
    }
}

/// The arguments, and whether the database URL came from `DATABASE_URL` (an error about it
/// names the variable, not the flag).
fn parse() -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches()?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.database_url_from_env =
        matches.value_source("database_url") == Some(clap::parser::ValueSource::EnvVariable);
    Ok(cli)
}

/// The exit code of an outcome, its error as one line on stderr (never a panic, even when
/// stderr itself is closed or full).
fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(Exit::Success as u8),
        Err(f) => {
            let _ = writeln!(std::io::stderr(), "error: {}", f.message.replace('\n', " "));
            ExitCode::from(f.exit as u8)
        }
    }
}

/// Where the last panic happened, for the one line printed on the way out.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A panic is a bug: one line, never Rust's multi-line report. A one-shot command prints it when
/// it exits (1); a panic inside a run fails that run only (the engine catches it and the run's row
/// says so), which `serve` logs as one line and survives.
fn install_panic_hook(server: bool) {
    std::panic::set_hook(Box::new(move |info| {
        let message = format!(
            "{} at {}",
            engine::panic_message(info.payload()),
            info.location()
                .map_or_else(|| "?".into(), |l| format!("{}:{}", l.file(), l.line()))
        );
        if server {
            tracing::error!(panic = %message, "a task panicked");
        }
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(message);
        }
    }));
}

/// `RUST_LOG` wins; otherwise a server logs its runs (info), and a one-shot command only what
/// its one-line error on stderr does not already say.
fn init_logging(cli: &Cli) {
    let default = match cli.command {
        Command::Serve => "info,sqlx::query=error",
        _ => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}
