//! The `weir` command line.

mod dev_cmd;
mod plugins_cmd;
mod run_cmd;
mod test_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "WebAssembly plugin stream processor for NATS JetStream"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "WEIR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the plugins of a directory against NATS JetStream.
    Run(run_cmd::RunArgs),
    /// Like `run`, but start a private nats-server when none is reachable.
    Dev(dev_cmd::DevArgs),
    /// Run a plugin against events from a file, with no broker.
    Test(test_cmd::TestArgs),
    /// List or remove the plugins of running hosts.
    Plugins(plugins_cmd::PluginsArgs),
}

/// Log to stderr (stdout carries command output), filtered by `WEIR_LOG`.
fn init_tracing(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A multi-threaded runtime for the long-running commands.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Report an error the way every command does.
fn fail(command: &str, e: anyhow::Error) -> ExitCode {
    eprintln!("weir {command}: {e:#}");
    ExitCode::FAILURE
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_tracing("info", cli.log_format);
            run_cmd::run(args).unwrap_or_else(|e| fail("run", e))
        }
        Command::Dev(args) => {
            init_tracing("info", cli.log_format);
            dev_cmd::run(args).unwrap_or_else(|e| fail("dev", e))
        }
        Command::Plugins(args) => {
            init_tracing("warn", cli.log_format);
            plugins_cmd::run(args).unwrap_or_else(|e| fail("plugins", e))
        }
        Command::Test(args) => {
            init_tracing("warn", cli.log_format);
            test_cmd::run(args)
        }
    }
}
