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

impl LogFormat {
    fn is_json(self) -> bool {
        self == LogFormat::Json
    }
}

/// Logs only, for the short-lived commands (stderr; stdout carries their
/// output).
fn init_logs(default_filter: &str, format: LogFormat) {
    // Without an exporter, setting up logs cannot fail.
    let _ = crate::telemetry::subscriber::init(default_filter, format.is_json(), None);
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
        Command::Run(args) => run_cmd::run(args, cli.log_format).unwrap_or_else(|e| fail("run", e)),
        Command::Dev(args) => dev_cmd::run(args, cli.log_format).unwrap_or_else(|e| fail("dev", e)),
        Command::Plugins(args) => {
            init_logs("warn", cli.log_format);
            plugins_cmd::run(args).unwrap_or_else(|e| fail("plugins", e))
        }
        Command::Test(args) => {
            init_logs("warn", cli.log_format);
            test_cmd::run(args)
        }
    }
}
