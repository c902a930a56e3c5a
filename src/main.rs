//! The command line: `run` (the default), `check-config`, `route`; and `generate`, hidden, which
//! writes the man pages and shell completions the Debian package ships.

/// jemalloc rather than glibc's malloc: a login allocates kilobytes for a few milliseconds
/// between a session's long-lived allocations; glibc then leaves those holes in the heap, while
/// jemalloc keeps sizes apart (the side-by-side figures are in BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
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
    long_about = "A transparent IMAP proxy and load balancer.\n\nimapgate answers IMAP before login \
itself, reads the user from LOGIN or AUTHENTICATE, sends the login to that user's backend (a \
static map, then weighted rendezvous hashing over the backends, so every replica with the same \
configuration agrees) and from then on relays bytes both ways unchanged.",
    after_help = "Signals: SIGHUP reloads the configuration; SIGTERM or SIGINT drains and stops.\nLog level: IMAPGATE_LOG (e.g. debug; default info).",
    after_long_help = "Files:\n  /etc/imapgate/imapgate.yaml   the configuration of the packaged service; \
`imapgate check-config` validates a file\n\nSignals:\n  SIGHUP            reload the whole \
configuration; an invalid file leaves the old one in use\n  SIGTERM, SIGINT   drain: /readyz \
answers 503, the listeners close, logged-in sessions get timeouts.shutdown_grace, then a BYE\n\n\
Environment:\n  IMAPGATE_LOG      the log level or filter (default info)\n  NOTIFY_SOCKET     \
set by systemd (Type=notify): READY=1 once the listeners are bound\n\nThe operator's manual: \
README.md (/usr/share/doc/imapgate/README.md in the Debian package)."
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
    /// Write the man pages and the shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate { dir: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `check-config`'s best-effort look at the backends' `AUTH=` lists (`mechanism_warnings`).
fn mechanism_warnings(c: &imapgate::config::Config) -> Vec<String> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(imapgate::mechanism_warnings(
            c,
            std::time::Duration::from_secs(3),
        )),
        Err(e) => vec![format!("cannot check the backends' mechanisms: {e}")],
    }
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
            Ok(c) => {
                for warning in mechanism_warnings(&c) {
                    eprintln!("warning: {warning}");
                }
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
                    // The reader went away (`| head -1`): nothing more to say.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
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
        Command::Generate { dir } => match generate(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("generate: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

/// One user: a line per backend, `position, name, address`.
fn route_one(c: &Config, user: &str) -> std::io::Result<()> {
    // With a directory, what it answers now comes first (no cache: asked once).
    let directory = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()
        .and_then(|r| r.block_on(imapgate::ask_directory(c, user)));
    let mut out = std::io::stdout().lock();
    if let Some(line) = directory {
        writeln!(out, "{line}")?;
    }
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

/// `DIR/man/imapgate.1` (and one page per subcommand) from the CLI definition with
/// clap_mangen, and `DIR/completions/` for bash, zsh and fish with clap_complete: generated by
/// the binary itself, so they always describe the binary they ship with.
fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let command = Cli::command();
    clap_mangen::generate_to(command.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command.clone(), "imapgate", &completions)?;
    }
    Ok(())
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
        // The signal handlers before READY=1: from then on systemd may send SIGHUP (reload)
        // or SIGTERM (stop), and neither may meet the default action, which ends the process.
        let stop = shutdown::signal();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            stop.await;
            info!("shutdown requested");
            sd_notify("STOPPING=1");
            on_signal.begin();
        });
        tokio::spawn(reload_on_sighup(services.clone()));
        // Every socket is bound and listening (connections wait in the backlog until the
        // workers accept): ready, for systemd's Type=notify.
        sd_notify("READY=1");
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
/// process goes on: an invalid file leaves the old configuration in use (see reload.rs). The
/// handler is installed when this is called, before the future runs.
fn reload_on_sighup(services: Arc<imapgate::Services>) -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = signal(SignalKind::hangup());
    async move {
        let Ok(mut hup) = hup else {
            warn!("cannot watch SIGHUP; reload with POST /reload instead");
            return;
        };
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading the configuration");
            // The outcome is logged and counted by the reload itself.
            let _ = imapgate::reload(&services).await;
        }
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
    // Colour only for a person at a terminal: journald, `kubectl logs` and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
