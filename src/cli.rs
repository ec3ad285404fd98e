//! The command line: `serve`, `migrate`, directory management, token
//! minting and the demo. Every command reads the same settings.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::auth::Minter;
use crate::config::{ConfigError, Overrides, Profile, ResolvedSettings, Settings};
use crate::directory::Directory;
use crate::telemetry::Telemetry;

const ENVIRONMENT_HELP: &str = "\
Settings come from, lowest priority first: built-in defaults, the TOML file
given with --config (keys are the lower-case names below without the
prefix), CELLGATE_* environment variables, then command-line flags.

Environment:
  CELLGATE_PROFILE                dev (default) or production
  CELLGATE_LISTEN_ADDR            Socket.IO + HTTP API address [127.0.0.1:3000]
  CELLGATE_METRICS_ADDR           /metrics address [127.0.0.1:9091]
  CELLGATE_DATA_DIR               development files [.cellgate]
  CELLGATE_DATABASE_URL           postgres://… or sqlite://… (required in production)
  CELLGATE_JWT_SECRET             HS256/384/512 shared secret
  CELLGATE_JWT_PUBLIC_KEY_FILE    PEM public key (RS*, PS256, ES256/384, EdDSA)
  CELLGATE_JWT_ALGORITHMS         accepted algorithms, e.g. [\"RS256\"] [all of the key's kind]
  CELLGATE_JWT_PREVIOUS_SECRETS   older HMAC secrets still accepted (rotation), e.g. [\"…\"]
  CELLGATE_JWT_KEY_ID             kid of the secret or public key; minted tokens carry it
  CELLGATE_JWKS_URL               JWKS URL of an identity provider's signing keys
  CELLGATE_JWKS_REFRESH_SECS      how often the key set is fetched again [300]
  CELLGATE_JWKS_COOLDOWN_SECS     shortest gap between fetches caused by unknown kids [30]
  CELLGATE_JWT_ISSUER             expected iss claim
  CELLGATE_JWT_AUDIENCE           expected aud claim
  CELLGATE_JWT_LEEWAY_SECS        clock leeway [30]
  CELLGATE_ALLOW_QUERY_TOKEN      accept ?token= on the handshake [false]
  CELLGATE_DIRECTORY_CACHE_TTL_SECS  directory cache lifetime [30]
  CELLGATE_DIRECTORY_STALE_SECS   during a database outage, answers this recent still stand [300]
  CELLGATE_DEFAULT_SEATS          seats of a new classroom [200]
  CELLGATE_MAX_BODY_BYTES         largest ingest body [524288]
  CELLGATE_NODE_ID                this pod's name [host name]
  CELLGATE_LOG_FORMAT             auto, text or json [auto]
  CELLGATE_AUTO_MIGRATE           apply migrations at start [true in dev]
  CELLGATE_REDIS_URL              redis://… or rediss://… (TLS): cluster mode (several pods; Redis 7 or later)
  CELLGATE_REDIS_CA_FILE          rediss://: PEM file of CAs trusted besides the system's (a private CA)
  CELLGATE_DRAIN_SECS             on SIGTERM, close connections spread over this window [10]
  CELLGATE_SESSION_TTL_SECS       cluster mode: a crashed pod's dashboards leave presence after this [30]
  CELLGATE_REDIS_PREFIX           cluster mode: prefix of Redis keys and channels; one cluster per prefix [cellgate]

Limits (see the README's Limits section):
  CELLGATE_HANDSHAKES_PER_MINUTE  dashboard handshakes per client address and minute, 0: off [120]
  CELLGATE_HANDSHAKE_BURST        handshakes one address may start at once [60]
  CELLGATE_INGEST_PER_MINUTE      ingest requests per student token and minute, 0: off [600]
  CELLGATE_INGEST_BURST           ingest requests one token may send at once [120]
  CELLGATE_MAX_SOCKET_PAYLOAD_BYTES  largest Socket.IO payload a dashboard sends, polling
                                  body or WebSocket message [65536]
  CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR  dashboards of one instructor on this pod [20]
  CELLGATE_MAX_SOCKETS            dashboards on this pod [10000]
  CELLGATE_SOCKET_QUEUE_PACKETS   packets queued per dashboard; a full queue disconnects it [4096]
  CELLGATE_ALLOWED_ORIGINS        browser origins for CORS and the Socket.IO Origin check,
                                  e.g. https://dash.example.edu; * for any, without
                                  credentials [dev: *, production: the gateway's own origin]
  CELLGATE_TRUSTED_PROXIES        proxies whose X-Forwarded-For names the client, e.g.
                                  10.0.0.0/8 [none: the TCP peer is the client]
  RUST_LOG                        log filter [info]";

/// cellgate: lets instructors watch a live classroom.
#[derive(Debug, Parser)]
#[command(version, about, after_long_help = ENVIRONMENT_HELP)]
pub struct Cli {
    /// TOML settings file
    #[arg(long, global = true, env = "CELLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// dev (embedded defaults) or production (every required setting must be given)
    /// [env: CELLGATE_PROFILE]
    #[arg(long, global = true, value_enum)]
    pub profile: Option<Profile>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    #[command(after_long_help = ENVIRONMENT_HELP)]
    Serve(Overrides),
    /// Apply the database schema (PostgreSQL or SQLite).
    Migrate,
    /// Manage instructors.
    #[command(subcommand)]
    Instructors(InstructorsCommand),
    /// Manage classrooms and their staff.
    #[command(subcommand)]
    Classrooms(ClassroomsCommand),
    /// Mint a token with the configured secret (development and tests).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the gateway with a simulated 200-seat classroom.
    Demo(DemoArgs),
}

/// `cellgate instructors …`
#[derive(Debug, Subcommand)]
pub enum InstructorsCommand {
    /// Add an active instructor.
    Add {
        /// Their e-mail, the `sub` of their tokens.
        email: String,
        /// Display name.
        #[arg(long)]
        name: String,
    },
    /// List every instructor.
    List,
    /// Refuse this instructor's future connections.
    Deactivate {
        /// Their e-mail.
        email: String,
    },
    /// Let a deactivated instructor in again.
    Activate {
        /// Their e-mail.
        email: String,
    },
}

/// `cellgate classrooms …`
#[derive(Debug, Subcommand)]
pub enum ClassroomsCommand {
    /// Create a classroom.
    Add {
        /// Classroom id, e.g. cls-101.
        id: String,
        /// Number of seats [default: CELLGATE_DEFAULT_SEATS, 200].
        #[arg(long)]
        seats: Option<u32>,
    },
    /// Let an instructor watch a classroom.
    Staff {
        /// Classroom id.
        id: String,
        /// The instructor's e-mail.
        email: String,
    },
    /// List every classroom.
    List,
}

/// `cellgate token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// An instructor token (prints only the token).
    Instructor {
        /// The instructor's e-mail.
        email: String,
        /// Lifetime in seconds (at least 1).
        #[arg(long, default_value_t = 8 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
        ttl: u64,
    },
    /// A student token (prints only the token).
    Student {
        /// Student id, e.g. s-0042.
        id: String,
        /// The classroom it may post to.
        #[arg(long)]
        classroom: String,
        /// Seat number.
        #[arg(long)]
        seat: Option<u32>,
        /// Lifetime in seconds (at least 1).
        #[arg(long, default_value_t = 8 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
        ttl: u64,
    },
}

/// `cellgate demo`
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Gateway settings.
    #[command(flatten)]
    pub overrides: Overrides,
    /// Simulated students.
    #[arg(long, default_value_t = 200)]
    pub students: u32,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_secs: Option<u64>,
}

/// Runs the parsed command line; the exit code says how it went.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<ConfigError>() {
            Some(config) => {
                eprintln!("{config}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Loads the settings and installs logging (and, for the commands that run
/// the gateway, trace export when `OTEL_*` asks for it).
fn resolve(
    cli_config: Option<&PathBuf>,
    overrides: &Overrides,
    traces: bool,
) -> anyhow::Result<(ResolvedSettings, Telemetry)> {
    let settings = Settings::load(cli_config.map(PathBuf::as_path), overrides)?;
    let telemetry = crate::telemetry::init(settings.log_format, settings.profile, traces);
    Ok((settings.resolve()?, telemetry))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = match &cli.command {
        Command::Serve(overrides) => overrides.clone(),
        Command::Demo(args) => args.overrides.clone(),
        _ => Overrides::default(),
    };
    overrides.profile = cli.profile.or(overrides.profile);
    let traces = matches!(cli.command, Command::Serve(_) | Command::Demo(_));
    let (settings, telemetry) = resolve(cli.config.as_ref(), &overrides, traces)?;
    let result = execute(cli.command, settings).await;
    telemetry.shutdown().await;
    result
}

async fn execute(command: Command, settings: ResolvedSettings) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => {
            let running = crate::server::start(settings).await?;
            running.run_until(crate::server::shutdown_signal()).await
        }
        Command::Migrate => {
            let directory = Directory::connect_lazy(&settings.database_url)?;
            let applied = directory.migrate().await.context("migration failed")?;
            match applied {
                0 => println!("schema is up to date: nothing to apply"),
                1 => println!("applied 1 migration; schema is up to date"),
                n => println!("applied {n} migrations; schema is up to date"),
            }
            Ok(())
        }
        Command::Instructors(command) => instructors(&settings, command).await,
        Command::Classrooms(command) => classrooms(&settings, command).await,
        Command::Token(command) => token(&settings, command),
        Command::Demo(args) => crate::demo::run(settings, args.students, args.duration_secs).await,
    }
}

async fn instructors(
    settings: &ResolvedSettings,
    command: InstructorsCommand,
) -> anyhow::Result<()> {
    let directory = crate::server::open_directory(settings, false).await?;
    match command {
        InstructorsCommand::Add { email, name } => {
            let added = directory.add_instructor(&email, &name).await?;
            println!(
                "added instructor {} ({}) with id {}",
                added.email, added.name, added.id
            );
        }
        InstructorsCommand::List => {
            let all = directory.list_instructors().await?;
            println!("{:<32} {:<24} {:<8} CLASSROOMS", "EMAIL", "NAME", "ACTIVE");
            for i in all {
                let active = if i.is_active { "yes" } else { "no" };
                println!(
                    "{:<32} {:<24} {:<8} {}",
                    i.email,
                    i.name,
                    active,
                    i.classrooms.join(",")
                );
            }
        }
        InstructorsCommand::Deactivate { email } => {
            directory.set_active(&email, false).await?;
            println!(
                "deactivated {email}; open dashboards keep their connection until they reconnect"
            );
        }
        InstructorsCommand::Activate { email } => {
            directory.set_active(&email, true).await?;
            println!("activated {email}");
        }
    }
    directory.close().await;
    Ok(())
}

async fn classrooms(settings: &ResolvedSettings, command: ClassroomsCommand) -> anyhow::Result<()> {
    let directory = crate::server::open_directory(settings, false).await?;
    match command {
        ClassroomsCommand::Add { id, seats } => {
            let seats = seats.unwrap_or(settings.settings.default_seats);
            let added = directory.add_classroom(&id, seats).await?;
            println!("added classroom {} with {} seats", added.id, added.seats);
        }
        ClassroomsCommand::Staff { id, email } => {
            directory.add_staff(&id, &email).await?;
            println!("{email} now staffs {id}");
        }
        ClassroomsCommand::List => {
            println!("{:<24} SEATS", "CLASSROOM");
            for c in directory.list_classrooms().await? {
                println!("{:<24} {}", c.id, c.seats);
            }
        }
    }
    directory.close().await;
    Ok(())
}

fn token(settings: &ResolvedSettings, command: TokenCommand) -> anyhow::Result<()> {
    let minter = Minter::new(&settings.settings, settings.key.as_ref())?;
    let token = match command {
        TokenCommand::Instructor { email, ttl } => {
            minter.instructor(&email, Duration::from_secs(ttl))?
        }
        TokenCommand::Student {
            id,
            classroom,
            seat,
            ttl,
        } => {
            if seat == Some(0) {
                anyhow::bail!("--seat counts from 1");
            }
            minter.student(&id, &classroom, seat, Duration::from_secs(ttl))?
        }
    };
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    #[test]
    fn a_token_that_would_be_born_expired_is_refused_before_anything_is_minted() {
        for kind in [
            &["cellgate", "token", "instructor", "a@example.edu"][..],
            &["cellgate", "token", "student", "s-1", "--classroom", "c"][..],
        ] {
            let zero = [kind, &["--ttl", "0"]].concat();
            let error = Cli::try_parse_from(zero).expect_err("--ttl 0 must be refused");
            assert_eq!(error.kind(), ErrorKind::ValueValidation);
            assert!(error.to_string().contains("--ttl"), "{error}");

            let one = [kind, &["--ttl", "1"]].concat();
            Cli::try_parse_from(one).expect("a one-second token is allowed");
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
