//! The `weir` command line.

mod dev_cmd;
mod dlq_cmd;
mod plugins_cmd;
mod replay_cmd;
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
    /// List, remove or reset the plugins of running hosts.
    Plugins(plugins_cmd::PluginsArgs),
    /// List, show, replay and purge dead letters.
    Dlq(dlq_cmd::DlqArgs),
    /// Run a candidate version over a range of history with no effects at
    /// all, and compare its outputs with a live plugin's (exit status 1 on
    /// any difference).
    Replay(replay_cmd::ReplayArgs),
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
    let _ = weir::telemetry::subscriber::init(default_filter, format.is_json(), None);
}

/// A multi-threaded runtime for the long-running commands.
/// Ask `question` on the terminal; only an explicit yes is a yes.
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, Write};
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Report an error the way every command does.
fn fail(command: &str, e: anyhow::Error) -> ExitCode {
    eprintln!("weir {command}: {}", describe(&e));
    ExitCode::FAILURE
}

/// An error and its causes on one line, like `{:#}`, but without causes
/// whose text the error before them already included (many library errors
/// print their source in their own message, which `{:#}` then repeats).
pub(crate) fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if previous.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        previous = text;
    }
    out
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
        Command::Dlq(args) => {
            init_logs("warn", cli.log_format);
            dlq_cmd::run(args).unwrap_or_else(|e| fail("dlq", e))
        }
        Command::Replay(args) => {
            init_logs("warn", cli.log_format);
            replay_cmd::run(args)
        }
        Command::Test(args) => {
            init_logs("warn", cli.log_format);
            test_cmd::run(args)
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Wrapping(std::io::Error);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "IO error: {}", self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_already_in_their_parents_text_are_not_repeated() {
        let io = std::io::Error::other("connection refused");
        let e = anyhow::Error::new(Wrapping(io)).context("connecting to NATS at nats://x:1");
        assert_eq!(
            super::describe(&e),
            "connecting to NATS at nats://x:1: IO error: connection refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::describe(&plain), "outer: inner");
    }
}
