//! The `miosa-edge` command line: `run`, `check`.

use clap::{Parser, Subcommand};
use miosa_edge::config::{Config, ConfigError};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "miosa-edge", version, about = "Edge proxy for MIOSA sandboxes and deployments")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge (the embedded config/dev.toml when --config is not given).
    Run {
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate a config file without starting anything; exit status 1 on errors.
    Check {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
}

fn init_logs() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MIOSA_EDGE_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr).init();
}

fn report(e: &ConfigError) {
    match e {
        ConfigError::Invalid { file, issues } => {
            for i in issues {
                eprintln!("{file}:{i}");
            }
            eprintln!("{file}: {} error(s)", issues.len());
        }
        other => eprintln!("error: {other}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(Some(&config)) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} workspaces, {} sandboxes, {} deployments)",
                    config.display(),
                    cfg.state.workspaces.len(),
                    cfg.state.sandboxes.len(),
                    cfg.state.deployments.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            init_logs();
            let cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    report(&e);
                    return ExitCode::FAILURE;
                }
            };
            match miosa_edge::server::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
