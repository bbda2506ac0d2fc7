//! The `forkd` binary: parses the command line, runs the daemon or one client command, and
//! turns any error into one line on stderr and a non-zero exit.

use clap::Parser;
use forkd::cli::{client, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORKD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match &cli.command {
        Command::Serve(args) => forkd::server::serve::run(args, forkd::agent::ingest_step),
        Command::Ingest(args) => client(&cli).and_then(|c| forkd::agent::ingest::run(&c, args, cli.json)),
        Command::Dump { reference, file } => {
            client(&cli).and_then(|c| forkd::cli::dump::run(&c, reference, file, cli.json))
        }
        Command::Scrub => client(&cli).and_then(|c| forkd::cli::scrub::run(&c, cli.json)),
        Command::Check { data_dir } => forkd::server::offline::check(data_dir, cli.json),
        Command::Compact { data_dir } => forkd::server::offline::compact(data_dir, cli.json),
        Command::Repair { data_dir, accept_loss } => forkd::server::offline::repair(data_dir, *accept_loss, cli.json),
        _ => forkd::cli::run_client(&cli),
    };
    if let Err(e) = result {
        eprintln!("forkd: error: {e:#}");
        std::process::exit(1);
    }
}
