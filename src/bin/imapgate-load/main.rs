//! imapgate-load: a load generator for IMAP proxies and a fake IMAP backend.
//!
//! ```text
//! imapgate-load serve --listen 127.0.0.1:10143 --body-size 1000000 [--tls-cert c.pem --tls-key k.pem]
//! imapgate-load login --target 127.0.0.1:1143 --workers 50 --seconds 5 [--pid PID]
//! imapgate-load noop  --target ... --workers 1
//! imapgate-load fetch --target ... --workers 1
//! imapgate-load idle  --target ... --sessions 2000 --hold 10 --pid PID
//! imapgate-load fetch --target 127.0.0.1:1993 --tls implicit --ca ca.pem --server-name imap.test
//! imapgate-load tls   --target 127.0.0.1:1993 --ca ca.pem --server-name imap.test [--resume]
//! imapgate-load auth-http --listen 127.0.0.1:9000 --backend 127.0.0.1:10143
//! imapgate-load prelogin --target ... --size 8192 --commands 1000 --pid PID
//! imapgate-load soak --target ... --seconds 120 --user soak --users 8
//! ```
//! Each scenario prints one JSON line on stdout and a human summary on stderr.

mod auth_http;
mod client_tls;
mod fake_backend;
mod prelogin;
mod scenarios;
mod soak;
mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load generator and fake backend for IMAP proxies")]
struct Cli {
    /// Threads of the load tool's runtime, for its clients and its servers alike (default: one
    /// per core, work-stealing). `1` runs everything on one thread, without work stealing: the
    /// load tool then costs less per login, but shares the cores with the proxy differently
    /// (BENCHMARKS.md, "The load tool on one thread").
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The fake backend.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Size of the message `FETCH 1 BODY[]` returns.
        #[arg(long, default_value_t = 1_000_000)]
        body_size: usize,
        /// Speak implicit TLS with this certificate chain (PEM; needs `--tls-key`).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Connect, LOGIN, LOGOUT, close, in a loop per worker.
    Login(Common),
    /// One session per worker, NOOP round trips.
    Noop(Common),
    /// One session per worker, `FETCH 1 BODY[]` in a loop.
    Fetch(Common),
    /// Many logged-in sessions in IDLE; the target's RSS per session.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Seconds to hold them.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
        /// Source addresses 127.0.0.2 and up to spread connections over.
        #[arg(long, default_value_t = 4)]
        sources: u8,
    },
    /// TLS handshakes on an implicit-TLS listener: connect, handshake, greeting, close
    /// (needs `--ca`).
    Tls {
        #[command(flatten)]
        common: Common,
        /// Keep a session cache, so handshakes after a worker's first one can resume.
        #[arg(long)]
        resume: bool,
    },
    /// Pre-login commands of many short lines (`a SEARCH` + ` TEXT {0+}` line ends), one
    /// segment per line; CPU per KiB of the target and of the sender.
    Prelogin {
        #[arg(long)]
        target: SocketAddr,
        /// Octets per command, at most.
        #[arg(long, default_value_t = 8192)]
        size: usize,
        /// Commands to send, one after the other.
        #[arg(long, default_value_t = 1000)]
        commands: u64,
        /// Microseconds to pause after each line (0: none), so lines arrive one at a time.
        #[arg(long, default_value_t = 0)]
        pause_us: u64,
        /// The target's processes, comma-separated, for their CPU time.
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        #[arg(long, default_value = "target")]
        label: String,
    },
    /// A mixed load for soak runs: logins, IDLE, SELECT/APPEND/FETCH/EXPUNGE, abrupt
    /// disconnects, wrong passwords; counts what was not as expected.
    Soak(SoakArgs),
    /// Answers nginx's auth_http: every login OK, to `--backend`.
    AuthHttp {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        backend: SocketAddr,
    },
}

#[derive(Args)]
struct Common {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value = "load")]
    user: String,
    /// Log in as `USER0` … `USER{N-1}` in turn (login scenario) instead of `USER` every time:
    /// a directory cache then sees N users.
    #[arg(long)]
    users: Option<u64>,
    #[arg(long, default_value = "secret")]
    password: String,
    /// The target's processes, comma-separated, for their CPU time and RSS.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// A name for the target in the output.
    #[arg(long, default_value = "target")]
    label: String,
    /// TLS towards the target (login, noop, fetch, idle): from the first octet or by STARTTLS.
    #[arg(long, value_enum, requires = "ca")]
    tls: Option<client_tls::TlsMode>,
    /// PEM file with the CA that signed the target's certificate.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// The name to ask for (SNI) and to verify.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[derive(Args)]
struct SoakArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Users are USER0, USER1, …
    #[arg(long, default_value = "soak")]
    user: String,
    /// How many users there are (at least the mail workers: each appends as its own).
    #[arg(long, default_value_t = 8)]
    users: usize,
    #[arg(long, default_value = "secret")]
    password: String,
    /// Connect, LOGIN, a command, LOGOUT.
    #[arg(long, default_value_t = 4)]
    login_workers: usize,
    /// SELECT, IDLE for 1 s to --idle-max, DONE.
    #[arg(long, default_value_t = 20)]
    idle_workers: usize,
    /// SELECT, APPEND / NOOP / FETCH ×4, STORE + EXPUNGE.
    #[arg(long, default_value_t = 4)]
    mail_workers: usize,
    /// Connections dropped mid-LOGIN, mid-APPEND (RST), with a FETCH in flight, in IDLE.
    #[arg(long, default_value_t = 2)]
    abrupt_workers: usize,
    /// LOGIN with a wrong password.
    #[arg(long, default_value_t = 2)]
    wrong_workers: usize,
    /// Milliseconds between a worker's rounds (±50%).
    #[arg(long, default_value_t = 200)]
    pace_ms: u64,
    /// Longest IDLE, seconds.
    #[arg(long, default_value_t = 20.0)]
    idle_max: f64,
    /// Longest round, seconds; a longer one counts as unexpected.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

impl Common {
    fn into_scenario(self) -> scenarios::Common {
        let tls = match (self.tls, &self.ca) {
            (Some(mode), Some(ca)) => {
                match client_tls::ClientTls::new(mode, ca, &self.server_name, false) {
                    Ok(tls) => Some(tls),
                    Err(e) => {
                        eprintln!("imapgate-load: TLS client: {e}");
                        std::process::exit(2);
                    }
                }
            }
            _ => None,
        };
        scenarios::Common {
            tls,
            target: self.target,
            workers: self.workers.max(1),
            seconds: self.seconds,
            user: self.user,
            users: self.users,
            password: self.password,
            pids: self.pid,
            label: self.label,
        }
    }
}

fn main() -> std::io::Result<()> {
    imapgate::raise_fd_limit();
    let cli = Cli::parse();
    let runtime = match cli.threads {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> std::io::Result<()> {
    let report = match command {
        Command::Serve {
            listen,
            body_size,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => match fake_backend::acceptor(&cert, &key) {
                    Ok(acceptor) => Some(acceptor),
                    Err(e) => {
                        eprintln!("imapgate-load serve: TLS: {e}");
                        std::process::exit(2);
                    }
                },
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(listen).await?;
            eprintln!("fake backend on {}", listener.local_addr()?);
            return fake_backend::run(listener, body_size, tls).await;
        }
        Command::AuthHttp { listen, backend } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            return auth_http::run(listener, backend).await;
        }
        Command::Login(c) => scenarios::login(&c.into_scenario()).await,
        Command::Prelogin {
            target,
            size,
            commands,
            pause_us,
            pid,
            label,
        } => {
            let opts = prelogin::Options {
                target,
                size,
                commands,
                pause: (pause_us > 0).then(|| Duration::from_micros(pause_us)),
                pids: pid,
                label,
            };
            // Blocking sockets on a thread of its own: one write per line, no runtime between.
            std::thread::spawn(move || prelogin::run(&opts))
                .join()
                .expect("the prelogin thread")
        }
        Command::Soak(a) => {
            soak::soak(soak::Options {
                target: a.target,
                seconds: a.seconds,
                user: a.user,
                users: a.users,
                password: a.password,
                login_workers: a.login_workers,
                idle_workers: a.idle_workers,
                mail_workers: a.mail_workers,
                abrupt_workers: a.abrupt_workers,
                wrong_workers: a.wrong_workers,
                pace: Duration::from_millis(a.pace_ms),
                idle_max: Duration::from_secs_f64(a.idle_max),
                timeout: Duration::from_secs_f64(a.timeout),
            })
            .await
        }
        Command::Noop(c) => scenarios::noop(&c.into_scenario()).await,
        Command::Fetch(c) => scenarios::fetch(&c.into_scenario()).await,
        Command::Tls { common, resume } => {
            let Some(ca) = common.ca.clone() else {
                eprintln!("imapgate-load tls: --ca is required");
                std::process::exit(2);
            };
            let server_name = common.server_name.clone();
            tls::tls(&common.into_scenario(), &ca, &server_name, resume).await
        }
        Command::Idle {
            common,
            sessions,
            hold,
            sources,
        } => {
            scenarios::idle(
                &common.into_scenario(),
                sessions,
                Duration::from_secs_f64(hold),
                sources,
            )
            .await
        }
    };
    println!("{}", report.json);
    eprintln!("{}", report.summary);
    Ok(())
}
