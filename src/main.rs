//! The command line: `run` (the default), `check-config`, `route`.

/// jemalloc rather than glibc's malloc: a login allocates kilobytes for a few milliseconds
/// between a session's long-lived allocations; glibc then leaves those holes in the heap, while
/// jemalloc keeps sizes apart (the side-by-side figures are in BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};

use imapgate::config::{self, Config};
use imapgate::shutdown::{self, Shutdown};

/// sysexits.h EX_CONFIG-ish: a config that cannot be used.
const EXIT_BAD_CONFIG: u8 = 64;

/// `imapgate --version`: the crate version and the git revision it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision ",
    env!("IMAPGATE_REVISION"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "imapgate",
    version = VERSION,
    about = "A transparent IMAP proxy and load balancer",
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default). Without --config, runs on the embedded default.
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Worker threads (one runtime and one set of listening sockets each); default: one
        /// per CPU.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Validate a config file; prints the error and exits 64 if it is unusable.
    CheckConfig { file: PathBuf },
    /// Print the backends USER would be sent to, in the order they would be tried.
    Route {
        /// The login name, as a client would send it.
        #[arg(required_unless_present = "stdin")]
        user: Option<String>,
        #[arg(long, short)]
        config: PathBuf,
        /// Read login names from standard input, one per line; print one line each:
        /// the name, a tab, and the backends in the order they would be tried, comma-separated.
        #[arg(long, conflicts_with = "user")]
        stdin: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command.unwrap_or(Command::Run {
        config: None,
        threads: None,
    }) {
        Command::Run { config, threads } => run(config, threads),
        Command::CheckConfig { file } => match config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Route {
            user,
            config,
            stdin,
        } => match config::load(&config) {
            Ok(c) => {
                let printed = match user {
                    Some(user) if !stdin => route_one(&c, &user),
                    _ => route_many(&c, std::io::stdin().lock()),
                };
                match printed {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("route: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
    }
}

/// One user: a line per backend, `position, name, address`.
fn route_one(c: &Config, user: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for (n, i) in imapgate::backends_for(c, user).into_iter().enumerate() {
        let b = &c.backends[i];
        writeln!(out, "{}\t{}\t{}", n + 1, b.name, b.address)?;
    }
    out.flush()
}

/// Many users, one a line (`user TAB backend,backend`): to compare replicas' configs, or to
/// see who moves before a backend is added.
fn route_many(c: &Config, input: impl BufRead) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in input.lines() {
        let line = line?;
        let user = line.trim_end_matches('\r');
        let names: Vec<&str> = imapgate::backends_for(c, user)
            .into_iter()
            .map(|i| &*c.backends[i].name)
            .collect();
        writeln!(out, "{user}\t{}", names.join(","))?;
    }
    out.flush()
}

fn run(path: Option<PathBuf>, threads: Option<usize>) -> ExitCode {
    let loaded = match &path {
        Some(p) => config::load(p),
        None => config::embedded_default(),
    };
    let config: Config = match loaded {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if path.is_none() {
        info!(
            "no --config given: running on the embedded default (listen 127.0.0.1:1143, backend 127.0.0.1:143)"
        );
    } else {
        info!(config = %config.source, "configuration loaded");
    }
    // Each proxied session holds two descriptors: take the hard limit, not the soft default.
    if !imapgate::raise_fd_limit() {
        warn!("cannot raise the open-file limit to the hard limit");
    }
    let config = Arc::new(config);
    let services = imapgate::Services::new(config.clone());
    let shutdown = Shutdown::new();
    let workers = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    // The first worker's runtime; the server starts the others (see server.rs).
    let primary = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("imapgate-0")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let served = primary.block_on(async {
        let bound = imapgate::bind(&config).await?;
        // Every socket is bound and listening (connections wait in the backlog until the
        // workers accept): ready, for systemd's Type=notify.
        sd_notify("READY=1");
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            shutdown::signal().await;
            info!("shutdown requested");
            sd_notify("STOPPING=1");
            on_signal.begin();
        });
        tokio::spawn(reload_on_sighup(services.clone()));
        imapgate::Server::new(bound, services, shutdown, workers)
            .run()
            .await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP: reload the whole configuration (certificates included). Whatever happens, the
/// process goes on: an invalid file leaves the old configuration in use (see reload.rs).
async fn reload_on_sighup(services: Arc<imapgate::Services>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot watch SIGHUP; reload with POST /reload instead");
        return;
    };
    while hup.recv().await.is_some() {
        info!("SIGHUP: reloading the configuration");
        // The outcome is logged and counted by the reload itself.
        let _ = imapgate::reload(&services).await;
    }
}

/// Tells systemd (`Type=notify`) a state change: one datagram to `$NOTIFY_SOCKET`, a path or
/// an abstract name (`@…`). Nothing happens outside systemd; a failure is logged, not fatal.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(socket.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&socket)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        warn!(error = %e, state, "cannot notify systemd");
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMAPGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
