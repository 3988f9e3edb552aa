//! The `miosa-edge` command line: `run`, `check`, `token mint`, `token share`.

use clap::{Parser, Subcommand};
use miosa_edge::config::{Config, ConfigError};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: miosa_edge::allocator::EdgeAlloc = miosa_edge::allocator::EdgeAlloc;

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
        /// Take over the listening sockets of the running edge (zero-downtime binary
        /// upgrade): start this, then send SIGQUIT to the old process (README).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file without starting anything; exit status 1 on errors.
    Check {
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Make access tokens for testing a deployment of the edge.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print an `mp_` preview token signed with a key of `[tokens]` (HS256 secrets come
    /// from their environment variable; ES256/EdDSA need the private key file).
    Mint {
        /// Config whose `[[tokens.preview_keys]]` to use (the embedded default if absent).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Sandbox id (the `sub` claim).
        #[arg(long)]
        sandbox: String,
        /// Limit the token to one port.
        #[arg(long)]
        port: Option<u16>,
        /// Lifetime: seconds, or a number with s, m, h or d (at most 24h).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Key id (required when several keys are configured).
        #[arg(long)]
        kid: Option<String>,
        /// PKCS#8 PEM private key, for ES256 and EdDSA keys.
        #[arg(long, value_name = "PEM")]
        key_file: Option<PathBuf>,
    },
    /// Print a fresh `ms_` share token with its `token_sha256` (and, with --password,
    /// the argon2id hash of a password read from stdin) as JSON, ready to push.
    Share {
        #[arg(long)]
        password: bool,
    },
}

/// Parses `90`, `90s`, `15m`, `1h`, `1d` into seconds.
fn parse_ttl(s: &str) -> Result<i64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: i64 = num.parse().map_err(|_| format!("`{s}` is not a duration (e.g. 90s, 15m, 1h)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: unit must be s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(t) if t > 0 && t <= miosa_edge::access::MAX_TOKEN_LIFE_SECS => Ok(t),
        _ => Err(format!("`{s}`: a preview token lives between 1 second and 24 hours")),
    }
}

fn token_command(cmd: TokenCommand) -> Result<String, String> {
    use miosa_edge::access::KeyAlg;
    use miosa_edge::access::{mint, password};
    match cmd {
        TokenCommand::Mint { config, sandbox, port, ttl, kid, key_file } => {
            let ttl = parse_ttl(&ttl)?;
            let tokens = match Config::load(config.as_deref()) {
                Ok(c) => c.tokens,
                Err(e) => {
                    report(&e);
                    return Err("the config is invalid".into());
                }
            };
            let keys = &tokens.preview_keys;
            let spec = match &kid {
                Some(k) => keys.iter().find(|s| &s.kid == k).ok_or_else(|| format!("no preview key with kid `{k}` in [tokens]"))?,
                None => match keys.as_slice() {
                    [one] => one,
                    [] => return Err("no [[tokens.preview_keys]] configured".into()),
                    _ => return Err("several preview keys are configured: choose one with --kid".into()),
                },
            };
            let secret;
            let pem;
            let key = match (spec.alg, &spec.secret_env, &key_file) {
                (KeyAlg::HS256, Some(var), _) => {
                    secret = std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
                    mint::SigningKey::Hs256(secret.as_bytes())
                }
                (alg, _, Some(file)) if alg != KeyAlg::HS256 => {
                    pem = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    mint::SigningKey::Pem(alg, &pem)
                }
                (alg, _, _) => return Err(format!("key `{}` is {alg:?}: pass its private key with --key-file", spec.kid)),
            };
            let now = miosa_edge::clock::unix_now();
            // The kid is always written, so the token keeps working when keys are added.
            mint::preview_token(key, Some(&spec.kid), &sandbox, port, now, now + ttl)
        }
        TokenCommand::Share { password: with_password } => {
            let (token, sha) = mint::share_token()?;
            let mut out = serde_json::json!({ "token": token, "token_sha256": sha });
            if with_password {
                use std::io::{BufRead, IsTerminal};
                if std::io::stdin().is_terminal() {
                    eprint!("password: ");
                }
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read the password: {e}"))?;
                let pw = line.trim_end_matches(['\r', '\n']);
                if pw.is_empty() {
                    return Err("the password is empty".into());
                }
                out["password_hash"] = password::hash(pw)?.into();
            }
            Ok(out.to_string())
        }
    }
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
        Command::Token { command } => match token_command(command) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, upgrade } => {
            init_logs();
            let cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    report(&e);
                    return ExitCode::FAILURE;
                }
            };
            match miosa_edge::server::run(cfg, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
