//! The `referral-rewards` binary: parse, set up logging and the panic hook, run the command on
//! the async runtime, and map its outcome to an exit code (`cli::exit`).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use referral_rewards::engine;

use cli::args::{Cli, Command, LogFormat};
use cli::exit::Exit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        2
                    } else {
                        0
                    },
                );
            }
            // One line: clap's first line names the argument and the problem.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad usage"));
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    init_logging(&cli);
    install_panic_hook(matches!(cli.command, Command::Serve));
    // Now, while threads and descriptors are plentiful (see Cargo.toml).
    std::sync::LazyLock::force(&polars_core::runtime::THREAD_POOL);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::RunFailed as u8);
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(cli::commands::dispatch(cli))
    }));
    match outcome {
        Ok(Ok(())) => ExitCode::from(Exit::Success as u8),
        Ok(Err(f)) => {
            eprintln!("error: {}", f.message.replace('\n', " "));
            ExitCode::from(f.exit as u8)
        }
        Err(payload) => {
            let message = LAST_PANIC
                .lock()
                .ok()
                .and_then(|mut p| p.take())
                .unwrap_or_else(|| engine::panic_message(&*payload));
            eprintln!("error: internal error (a bug; please report it): {message}");
            ExitCode::from(Exit::RunFailed as u8)
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
