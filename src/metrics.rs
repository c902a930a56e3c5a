//! Every metric family, registered in one struct (prefix `imapgate_`), plus the process
//! collector (`process_*`). Label values come from closed sets: listener and backend names from
//! the config, the command names of `imap::scan::COMMAND_NAMES`, and the enums below. No label
//! ever holds a user name or anything else a client chose.
//!
//! The relay's per-chunk and per-command updates go through handles resolved once per backend
//! at start (`BackendMetrics`): an array index and an atomic add, no family lookup, no lock
//! (histograms take their own short mutex per observation).

mod process;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::config::{Config, ListenerTls};
use crate::imap::sasl::Mechanism;
use crate::imap::scan::{COMMAND_NAMES, CommandId, CommandSink, Completion};

/// A closed set of label values: the enum, each value's text as exported, `ALL` in a fixed order
/// and `index()` into it, so per-value handles live in arrays indexed without a search.
macro_rules! label_values {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        #[allow(dead_code)]
        impl $name {
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The position in `ALL`.
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

/// One unit of a gauge (an open connection, a logged-in session), given back when dropped.
pub struct Held(Gauge);

impl Held {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

label_values! {
    /// How a client's TLS handshake ended.
    pub enum TlsResult {
        Ok => "ok",
        Error => "error",
        Timeout => "timeout",
    }
}

label_values! {
    /// The TLS version a handshake agreed on (`none` when it failed).
    pub enum TlsVersion {
        Tls12 => "TLSv1.2",
        Tls13 => "TLSv1.3",
        None => "none",
    }
}

label_values! {
    /// Whether a handshake resumed an earlier session (ticket or session id).
    pub enum Resumed {
        No => "false",
        Yes => "true",
    }
}

label_values! {
    /// Whether a listener's session came in over TLS (implicit or after STARTTLS).
    pub enum OverTls {
        No => "false",
        Yes => "true",
    }
}

/// A client TLS handshake's outcome, as `imapgate_tls_handshakes_total` counts it.
#[derive(Clone, Copy, Debug)]
pub enum TlsOutcome {
    Ok { version: TlsVersion, resumed: bool },
    Error,
    Timeout,
}

impl TlsOutcome {
    fn labels(self) -> (TlsResult, TlsVersion, Resumed) {
        match self {
            TlsOutcome::Ok { version, resumed } => (
                TlsResult::Ok,
                version,
                if resumed { Resumed::Yes } else { Resumed::No },
            ),
            TlsOutcome::Error => (TlsResult::Error, TlsVersion::None, Resumed::No),
            TlsOutcome::Timeout => (TlsResult::Timeout, TlsVersion::None, Resumed::No),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsHandshakeLabels {
    listener: String,
    result: TlsResult,
    version: TlsVersion,
    resumed: Resumed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerSessionLabels {
    listener: String,
    tls: OverTls,
}

label_values! {
    /// Why an accept failed: out of file descriptors (EMFILE/ENFILE, the one that matters) or
    /// anything else.
    pub enum AcceptError {
        FdLimit => "fd_limit",
        Other => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptErrorLabels {
    listener: String,
    reason: AcceptError,
}

/// One listener's handles, resolved once by its accept loop.
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub open: Gauge,
    /// Logged-in sessions from this listener, by `OverTls::index`.
    pub sessions: [Gauge; OverTls::ALL.len()],
    pub fd_limit: Counter,
    pub other_error: Counter,
}

impl ListenerMetrics {
    pub fn accept_failed(&self, reason: AcceptError) {
        match reason {
            AcceptError::FdLimit => self.fd_limit.inc(),
            AcceptError::Other => self.other_error.inc(),
        };
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    mechanism: MechanismLabel,
    result: LoginResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    backend: String,
    result: AttemptResult,
}

/// `imapgate_commands_total`: by command (and by backend with `metrics.command_by_backend`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
    status: StatusLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandDurationLabels {
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendCommandLabels {
    backend: String,
    command: String,
    status: StatusLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendCommandDurationLabels {
    backend: String,
    command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendStatusLabels {
    backend: String,
    status: StatusLabel,
}

/// The per-command families: one set for the whole process (the default, so that a fleet of
/// backends does not multiply them), or the full backend × command matrix.
enum CommandFamilies {
    /// The handles every backend shares, `[command][status]` and `[command]`.
    Shared {
        commands: Vec<[Counter; StatusLabel::ALL.len()]>,
        durations: Vec<Histogram>,
    },
    ByBackend {
        commands: Family<BackendCommandLabels, Counter>,
        durations: HistogramFamily<BackendCommandDurationLabels>,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    backend: String,
    direction: DirectionLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: Rejection,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    source: &'static str,
    result: DirectoryResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheUses {
    result: CacheUse,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KickLabels {
    reason: Kick,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabels {
    hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
    /// The git commit (build.rs), or `unknown`.
    revision: String,
}

label_values! {
    enum MechanismLabel {
        Login => "login",
        Plain => "plain",
        SaslLogin => "sasl_login",
        XOAuth2 => "xoauth2",
        OAuthBearer => "oauthbearer",
        ScramSha1 => "scram_sha_1",
        ScramSha256 => "scram_sha_256",
    }
}

impl From<Mechanism> for MechanismLabel {
    fn from(m: Mechanism) -> Self {
        match m {
            Mechanism::Login => MechanismLabel::Login,
            Mechanism::Plain => MechanismLabel::Plain,
            Mechanism::SaslLogin => MechanismLabel::SaslLogin,
            Mechanism::XOAuth2 => MechanismLabel::XOAuth2,
            Mechanism::OAuthBearer => MechanismLabel::OAuthBearer,
            Mechanism::ScramSha1 => MechanismLabel::ScramSha1,
            Mechanism::ScramSha256 => MechanismLabel::ScramSha256,
        }
    }
}

label_values! {
    /// How a client's login ended, once, whatever it took (failovers included).
    pub enum LoginResult {
        /// Logged in.
        Ok => "ok",
        /// Wrong credentials: the backend said NO or BAD, or the directory refused.
        Rejected => "rejected",
        /// No backend could be reached (or the directory was down with `fallback: refuse`).
        Unavailable => "unavailable",
        /// A backend answered out of protocol, or failed the login after the credentials were
        /// sent (BYE, close, no answer in time).
        Error => "error",
        /// The backend accepted, `limits.per_user` refused (NO [LIMIT]).
        RefusedByLimit => "refused_by_limit",
    }
}

label_values! {
    /// How one login attempt on one backend ended.
    pub enum AttemptResult {
        Ok => "ok",
        Rejected => "rejected",
        /// Not reached before the credentials went out (refused, timeouts, BYE greeting, TLS).
        Unavailable => "unavailable",
        Error => "error",
    }
}

label_values! {
    /// Why imapgate closed a logged-in session (each has its own BYE, see session/table.rs).
    pub enum Kick {
        /// `POST /sessions/kick`.
        Admin => "admin",
        /// Its backend was put in maintenance.
        Maintenance => "maintenance",
        /// The shutdown grace period ran out.
        Shutdown => "shutdown",
    }
}

label_values! {
    /// How a directory lookup ended.
    pub enum DirectoryResult {
        Ok => "ok",
        NotFound => "not_found",
        /// The service refused the login itself (`send_password`).
        Refused => "refused",
        Error => "error",
        Timeout => "timeout",
    }
}

label_values! {
    /// How a login used the directory cache.
    pub enum CacheUse {
        Hit => "hit",
        Miss => "miss",
        /// The directory failed and a kept (expired) route was used.
        Stale => "stale",
    }
}

label_values! {
    /// How a configuration reload ended.
    pub enum ReloadResult {
        /// The new configuration is in use.
        Ok => "ok",
        /// It did not load or validate (or a new listener could not bind); the old one stays.
        Error => "error",
    }
}

label_values! {
    enum StatusLabel {
        Ok => "ok",
        No => "no",
        Bad => "bad",
        Bye => "bye",
        Unfinished => "unfinished",
    }
}

impl From<Completion> for StatusLabel {
    fn from(c: Completion) -> Self {
        match c {
            Completion::Ok => StatusLabel::Ok,
            Completion::No => StatusLabel::No,
            Completion::Bad => StatusLabel::Bad,
            Completion::Bye => StatusLabel::Bye,
            Completion::Unfinished => StatusLabel::Unfinished,
        }
    }
}

label_values! {
    enum DirectionLabel {
        ClientToBackend => "client_to_backend",
        BackendToClient => "backend_to_client",
    }
}

label_values! {
    /// Why imapgate refused or ended a connection before login.
    pub enum Rejection {
        /// A command line over `limits.line_max` (BYE).
        LineTooLong => "line_too_long",
        /// A literal over `limits.literal_max` (BAD, or BYE for a non-synchronizing one).
        LiteralTooLarge => "literal_too_large",
        /// A command imapgate could not parse (BAD).
        Syntax => "syntax",
        /// A command that needs a login (BAD).
        NeedsLogin => "needs_login",
        /// AUTHENTICATE with a mechanism imapgate does not offer (NO).
        UnsupportedMechanism => "unsupported_mechanism",
        /// Malformed credentials: PLAIN fields, NUL, a user name that is not UTF-8 (BAD).
        BadCredentials => "bad_credentials",
        /// `limits.login_attempts` failed logins (BYE).
        LoginAttempts => "login_attempts",
        /// `limits.bad_commands` syntax errors in a row.
        BadCommands => "bad_commands",
        /// `timeouts.prelogin` passed (BYE).
        PreloginTimeout => "prelogin_timeout",
        /// `limits.max_connections` or `limits.per_ip` (BYE).
        ConnectionLimit => "connection_limit",
        /// imapgate is shutting down (BYE).
        Shutdown => "shutdown",
        /// LOGIN/AUTHENTICATE without TLS where plaintext login is off (NO [PRIVACYREQUIRED]).
        PrivacyRequired => "privacy_required",
        /// On a PROXY listener: a peer not in trusted_proxies, or no valid header (closed).
        ProxyHeader => "proxy_header",
        /// A TLS handshake that failed or timed out (closed).
        TlsHandshake => "tls_handshake",
        /// A failed login answered late: `limits.login_penalty` for the client's address.
        LoginPenalty => "login_penalty",
        /// A login the backend accepted, refused by `limits.per_user` and logged out (NO [LIMIT]).
        PerUser => "per_user",
        /// A connection over `limits.connection_rate` for its address (BYE [UNAVAILABLE]).
        ConnectionRate => "connection_rate",
    }
}

label_values! {
    /// The shared abuse tables (abuse.rs).
    pub enum AbuseTable {
        /// Recent failed logins per client address.
        LoginPenalty => "login_penalty",
        /// New-connection token buckets per client address.
        ConnectionRate => "connection_rate",
        /// Logged-in sessions per user (never evicted: an entry lives while its sessions do).
        PerUser => "per_user",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: AbuseTable,
}

/// One abuse table's size and evictions.
#[derive(Clone)]
pub struct TableMetrics {
    pub entries: Gauge,
    pub evicted: Counter,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets, sub-millisecond to a minute: 13 bounds, so a histogram is 16 series (with
/// +Inf, sum and count); chosen for the series budget (README, Metrics).
const LATENCY_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    /// By `AbuseTable::index`.
    abuse_tables: [TableMetrics; AbuseTable::ALL.len()],
    connections_total: Family<ListenerLabels, Counter>,
    connections_active: Family<ListenerLabels, Gauge>,
    accept_errors: Family<AcceptErrorLabels, Counter>,
    prelogin_rejections: Family<ReasonLabels, Counter>,
    /// `[mechanism][result]`, by `MechanismLabel::index` and `LoginResult::index`.
    logins: [[Counter; LoginResult::ALL.len()]; MechanismLabel::ALL.len()],
    failovers: Counter,
    backend: BackendFamilies,
    sessions_closed: Family<KickLabels, Counter>,
    lookups: Family<LookupLabels, Counter>,
    lookup_duration: HistogramFamily<SourceLabels>,
    lookup_cache: Family<CacheUses, Counter>,
    lookup_cache_entries: Gauge,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_success: Gauge<f64, AtomicU64>,
    config_info: Family<ConfigLabels, Gauge>,
    tls_handshakes: Family<TlsHandshakeLabels, Counter>,
    certificate_not_after: Family<CertificateLabels, Gauge>,
    listener_sessions: Family<ListenerSessionLabels, Gauge>,
}

/// The families with a `backend` label; `Metrics::backend` hands out one backend's series.
struct BackendFamilies {
    up: Family<BackendLabels, Gauge>,
    in_service: Family<BackendLabels, Gauge>,
    attempts: Family<AttemptLabels, Counter>,
    sessions_active: Family<BackendLabels, Gauge>,
    commands: CommandFamilies,
    /// Per backend: commands by status, and one latency histogram for all its commands.
    status_totals: Family<BackendStatusLabels, Counter>,
    duration_totals: HistogramFamily<BackendLabels>,
    bytes: Family<BytesLabels, Counter>,
    /// Process-wide (not per backend: the series budget).
    login_duration: Histogram,
    connect_duration: Histogram,
    compress_errors: Counter,
}

/// One backend's hot-path handles.
pub struct BackendMetrics {
    /// `[command][status]`, by `CommandId` and `StatusLabel::index` (shared by every backend
    /// unless `metrics.command_by_backend`).
    commands: Vec<[Counter; StatusLabel::ALL.len()]>,
    durations: Vec<Histogram>,
    /// This backend's commands by status, and their latency.
    status_totals: [Counter; StatusLabel::ALL.len()],
    duration_total: Histogram,
    pub bytes_to_backend: Counter<u64, AtomicU64>,
    pub bytes_to_client: Counter<u64, AtomicU64>,
    pub sessions_active: Gauge,
    /// By `AttemptResult::index`.
    attempts: [Counter; AttemptResult::ALL.len()],
    login_duration: Histogram,
    connect_duration: Histogram,
    /// Process-wide: `imapgate_compress_observe_errors_total`.
    compress_errors: Counter,
    up: Gauge,
    in_service: Gauge,
}

impl BackendMetrics {
    /// A login attempt on this backend ended with `result` after `took` (the latency
    /// histogram takes successful logins only: a rejected one waits for the backend's own
    /// failure delay).
    pub fn attempt(&self, result: AttemptResult, took: Duration) {
        self.attempts[result.index()].inc();
        if result == AttemptResult::Ok {
            self.login_duration.observe(took.as_secs_f64());
        }
    }

    /// A TCP connect to this backend took `took`.
    pub fn connected(&self, took: Duration) {
        self.connect_duration.observe(took.as_secs_f64());
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Whether the operator has the backend in service (mode active, weight above 0).
    pub fn set_in_service(&self, in_service: bool) {
        self.in_service.set(i64::from(in_service));
    }
}

impl CommandSink for BackendMetrics {
    fn command(&self, command: CommandId, completion: Completion, latency: Option<Duration>) {
        let status = StatusLabel::from(completion).index();
        let i = command.0 as usize;
        self.commands[i][status].inc();
        self.status_totals[status].inc();
        if let Some(latency) = latency {
            let seconds = latency.as_secs_f64();
            self.durations[i].observe(seconds);
            self.duration_total.observe(seconds);
        }
    }

    fn compress_error(&self) {
        self.compress_errors.inc();
    }
}

impl Metrics {
    pub fn new(config: &Config) -> Self {
        let mut registry = Registry::default();
        process::register(&mut registry);
        let r = registry.sub_registry_with_prefix("imapgate");

        let connections_total = Family::<ListenerLabels, Counter>::default();
        r.register(
            "connections",
            "Client connections accepted",
            connections_total.clone(),
        );
        let connections_active = Family::<ListenerLabels, Gauge>::default();
        r.register(
            "connections_active",
            "Client connections open",
            connections_active.clone(),
        );
        let accept_errors = Family::<AcceptErrorLabels, Counter>::default();
        r.register(
            "accept_errors",
            "Failed accepts; fd_limit means out of file descriptors (accepting pauses, open sessions go on)",
            accept_errors.clone(),
        );
        let logins_total = Family::<LoginLabels, Counter>::default();
        r.register(
            "logins",
            "Client logins, once each, by final outcome (failovers and retries inside it not counted again)",
            logins_total.clone(),
        );
        let logins = MechanismLabel::ALL.map(|mechanism| {
            LoginResult::ALL.map(|result| {
                logins_total
                    .get_or_create(&LoginLabels { mechanism, result })
                    .clone()
            })
        });
        let attempts = Family::<AttemptLabels, Counter>::default();
        r.register(
            "backend_login_attempts",
            "Login attempts on each backend, by result",
            attempts.clone(),
        );
        let failovers = Counter::default();
        r.register(
            "failovers",
            "Logins that went on to the next backend after one could not be reached",
            failovers.clone(),
        );
        let login_duration = latency_histogram();
        r.register_with_unit(
            "login_duration",
            "From dialling the backend to its OK, for successful logins",
            Unit::Seconds,
            login_duration.clone(),
        );
        let sessions_active = Family::<BackendLabels, Gauge>::default();
        r.register(
            "sessions_active",
            "Logged-in sessions being relayed",
            sessions_active.clone(),
        );
        let (commands_help, durations_help) = (
            "Commands relayed after login, by completion",
            "From a command's last octet to its tagged completion (IDLE excluded)",
        );
        let commands = if config.metrics.command_by_backend {
            let commands = Family::<BackendCommandLabels, Counter>::default();
            r.register("commands", commands_help, commands.clone());
            let durations: HistogramFamily<BackendCommandDurationLabels> =
                Family::new_with_constructor(latency_histogram);
            r.register_with_unit(
                "command_duration",
                durations_help,
                Unit::Seconds,
                durations.clone(),
            );
            CommandFamilies::ByBackend {
                commands,
                durations,
            }
        } else {
            let family = Family::<CommandLabels, Counter>::default();
            r.register("commands", commands_help, family.clone());
            let durations_family: HistogramFamily<CommandDurationLabels> =
                Family::new_with_constructor(latency_histogram);
            r.register_with_unit(
                "command_duration",
                durations_help,
                Unit::Seconds,
                durations_family.clone(),
            );
            CommandFamilies::Shared {
                commands: COMMAND_NAMES
                    .iter()
                    .map(|command| {
                        StatusLabel::ALL.map(|status| {
                            family
                                .get_or_create(&CommandLabels {
                                    command: command.to_string(),
                                    status,
                                })
                                .clone()
                        })
                    })
                    .collect(),
                durations: COMMAND_NAMES
                    .iter()
                    .map(|command| {
                        durations_family
                            .get_or_create(&CommandDurationLabels {
                                command: command.to_string(),
                            })
                            .clone()
                    })
                    .collect(),
            }
        };
        let status_totals = Family::<BackendStatusLabels, Counter>::default();
        r.register(
            "backend_commands",
            "Commands relayed after login to each backend, by completion",
            status_totals.clone(),
        );
        let duration_totals: HistogramFamily<BackendLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register_with_unit(
            "backend_command_duration",
            "Latency of all commands on each backend (IDLE excluded)",
            Unit::Seconds,
            duration_totals.clone(),
        );
        let bytes_total = Family::<BytesLabels, Counter>::default();
        r.register("bytes", "Octets relayed after login", bytes_total.clone());
        let compress_errors = Counter::default();
        r.register(
            "compress_observe_errors",
            "Compressed sessions (COMPRESS=DEFLATE) whose stream could not be inflated: relayed on, no longer observed",
            compress_errors.clone(),
        );
        let backend_up = Family::<BackendLabels, Gauge>::default();
        r.register(
            "backend_up",
            "1 when the last health checks found the backend greeting, else 0",
            backend_up.clone(),
        );
        let backend_in_service = Family::<BackendLabels, Gauge>::default();
        r.register(
            "backend_in_service",
            "1 when the operator has the backend in service (mode active and weight above 0), 0 when drained, in maintenance or weight 0",
            backend_in_service.clone(),
        );
        let backend_connect_duration = latency_histogram();
        r.register_with_unit(
            "backend_connect_duration",
            "TCP connect time to backends, at login",
            Unit::Seconds,
            backend_connect_duration.clone(),
        );
        let prelogin_rejections = Family::<ReasonLabels, Counter>::default();
        r.register(
            "prelogin_rejections",
            "Commands refused and connections ended by imapgate before login, by reason",
            prelogin_rejections.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        r.register(
            "build_info",
            "Always 1; the version and the git revision are in the labels",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                revision: env!("IMAPGATE_REVISION").to_string(),
            })
            .set(1);

        let table_entries = Family::<TableLabels, Gauge>::default();
        r.register(
            "abuse_table_entries",
            "Entries in a shared abuse table (client addresses or users)",
            table_entries.clone(),
        );
        let table_evictions = Family::<TableLabels, Counter>::default();
        r.register(
            "abuse_table_evictions",
            "Entries dropped from a full abuse table before they expired, least recently used first",
            table_evictions.clone(),
        );
        let abuse_tables = AbuseTable::ALL.map(|table| TableMetrics {
            entries: table_entries.get_or_create(&TableLabels { table }).clone(),
            evicted: table_evictions
                .get_or_create(&TableLabels { table })
                .clone(),
        });

        // Every series exists from the start (at 0), so dashboards and rate() have data.
        for reason in Rejection::ALL {
            let _ = prelogin_rejections.get_or_create(&ReasonLabels { reason });
        }
        for l in &config.listeners {
            let labels = ListenerLabels {
                listener: l.name.clone(),
            };
            let _ = connections_total.get_or_create(&labels);
            let _ = connections_active.get_or_create(&labels);
            for reason in AcceptError::ALL {
                let _ = accept_errors.get_or_create(&AcceptErrorLabels {
                    listener: l.name.clone(),
                    reason,
                });
            }
        }
        let sessions_closed = Family::<KickLabels, Counter>::default();
        r.register(
            "sessions_closed",
            "Logged-in sessions imapgate closed with a BYE (admin kick, maintenance, shutdown)",
            sessions_closed.clone(),
        );
        for reason in Kick::ALL {
            let _ = sessions_closed.get_or_create(&KickLabels { reason });
        }
        let lookups = Family::<LookupLabels, Counter>::default();
        r.register(
            "directory_lookups",
            "Directory lookups (routing.lookup), by source and result",
            lookups.clone(),
        );
        let lookup_duration: HistogramFamily<SourceLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register_with_unit(
            "directory_lookup_duration",
            "Time a directory lookup took",
            Unit::Seconds,
            lookup_duration.clone(),
        );
        let lookup_cache = Family::<CacheUses, Counter>::default();
        r.register(
            "directory_cache",
            "Directory cache use per login: hit, miss, or stale (the directory failed, a kept route was used)",
            lookup_cache.clone(),
        );
        let lookup_cache_entries = Gauge::default();
        r.register(
            "directory_cache_entries",
            "Users in the directory cache",
            lookup_cache_entries.clone(),
        );
        if let Some(lookup) = &config.routing.lookup {
            for result in DirectoryResult::ALL {
                let _ = lookups.get_or_create(&LookupLabels {
                    source: lookup.source.kind(),
                    result,
                });
            }
            for result in CacheUse::ALL {
                let _ = lookup_cache.get_or_create(&CacheUses { result });
            }
        }
        let reloads = Family::<ReloadLabels, Counter>::default();
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP, POST /reload, file watch), by result",
            reloads.clone(),
        );
        for result in ReloadResult::ALL {
            let _ = reloads.get_or_create(&ReloadLabels { result });
        }
        let last_reload_success = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "config_last_reload_success_timestamp",
            "When the configuration in use was loaded (start or reload), Unix time",
            Unit::Seconds,
            last_reload_success.clone(),
        );
        let config_info = Family::<ConfigLabels, Gauge>::default();
        r.register(
            "config_info",
            "Always 1, for the configuration in use: hash is the start of the file's SHA-256",
            config_info.clone(),
        );

        let tls_handshakes = Family::<TlsHandshakeLabels, Counter>::default();
        r.register(
            "tls_handshakes",
            "Client TLS handshakes (implicit TLS and STARTTLS), by listener, result, version and resumption",
            tls_handshakes.clone(),
        );
        let certificate_not_after = Family::<CertificateLabels, Gauge>::default();
        r.register_with_unit(
            "tls_certificate_not_after_timestamp",
            "When each listener certificate expires, Unix time; certificate is `default` or its first SNI name",
            Unit::Seconds,
            certificate_not_after.clone(),
        );
        let listener_sessions = Family::<ListenerSessionLabels, Gauge>::default();
        r.register(
            "listener_sessions_active",
            "Logged-in sessions by the listener they came in on and whether the client side is TLS",
            listener_sessions.clone(),
        );

        Metrics {
            registry,
            tls_handshakes,
            certificate_not_after,
            listener_sessions,
            logins,
            failovers,
            abuse_tables,
            connections_total,
            connections_active,
            accept_errors,
            prelogin_rejections,
            backend: BackendFamilies {
                up: backend_up,
                in_service: backend_in_service,
                attempts,
                sessions_active,
                commands,
                status_totals,
                duration_totals,
                bytes: bytes_total,
                login_duration,
                connect_duration: backend_connect_duration,
                compress_errors,
            },
            sessions_closed,
            lookups,
            lookup_duration,
            lookup_cache,
            lookup_cache_entries,
            reloads,
            last_reload_success,
            config_info,
        }
    }

    /// A directory lookup by `source` ended with `result` after `took`.
    pub fn directory_lookup(&self, source: &'static str, result: DirectoryResult, took: Duration) {
        self.lookups
            .get_or_create(&LookupLabels { source, result })
            .inc();
        self.lookup_duration
            .get_or_create(&SourceLabels { source })
            .observe(took.as_secs_f64());
    }

    /// How one login used the directory cache.
    pub fn directory_cache(&self, result: CacheUse) {
        self.lookup_cache.get_or_create(&CacheUses { result }).inc();
    }

    pub fn directory_cache_entries(&self, n: usize) {
        self.lookup_cache_entries
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A client's login ended (once per login command, whatever it took).
    pub fn login(&self, mechanism: Mechanism, result: LoginResult) {
        self.logins[MechanismLabel::from(mechanism).index()][result.index()].inc();
    }

    /// A login went on to the next backend.
    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// imapgate closed a logged-in session.
    pub fn session_closed(&self, reason: Kick) {
        self.sessions_closed
            .get_or_create(&KickLabels { reason })
            .inc();
    }

    /// One backend's series (created at 0 the first time, the same ones after a reload).
    pub fn backend(&self, name: &str) -> Arc<BackendMetrics> {
        let f = &self.backend;
        let labels = BackendLabels {
            backend: name.to_string(),
        };
        let attempts = AttemptResult::ALL.map(|result| {
            f.attempts
                .get_or_create(&AttemptLabels {
                    backend: name.to_string(),
                    result,
                })
                .clone()
        });
        let (commands, durations) = match &f.commands {
            CommandFamilies::Shared {
                commands,
                durations,
            } => (commands.clone(), durations.clone()),
            CommandFamilies::ByBackend {
                commands,
                durations,
            } => (
                COMMAND_NAMES
                    .iter()
                    .map(|command| {
                        StatusLabel::ALL.map(|status| {
                            commands
                                .get_or_create(&BackendCommandLabels {
                                    backend: name.to_string(),
                                    command: command.to_string(),
                                    status,
                                })
                                .clone()
                        })
                    })
                    .collect(),
                COMMAND_NAMES
                    .iter()
                    .map(|command| {
                        durations
                            .get_or_create(&BackendCommandDurationLabels {
                                backend: name.to_string(),
                                command: command.to_string(),
                            })
                            .clone()
                    })
                    .collect(),
            ),
        };
        let status_totals = StatusLabel::ALL.map(|status| {
            f.status_totals
                .get_or_create(&BackendStatusLabels {
                    backend: name.to_string(),
                    status,
                })
                .clone()
        });
        let bytes = |direction| {
            f.bytes
                .get_or_create(&BytesLabels {
                    backend: name.to_string(),
                    direction,
                })
                .clone()
        };
        Arc::new(BackendMetrics {
            commands,
            durations,
            status_totals,
            duration_total: f.duration_totals.get_or_create(&labels).clone(),
            bytes_to_backend: bytes(DirectionLabel::ClientToBackend),
            bytes_to_client: bytes(DirectionLabel::BackendToClient),
            sessions_active: f.sessions_active.get_or_create(&labels).clone(),
            attempts,
            login_duration: f.login_duration.clone(),
            connect_duration: f.connect_duration.clone(),
            compress_errors: f.compress_errors.clone(),
            up: f.up.get_or_create(&labels).clone(),
            in_service: f.in_service.get_or_create(&labels).clone(),
        })
    }

    /// A reload was tried (a successful one has installed its config already).
    pub fn reloaded(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// `config` is in use from now on: its hash, its certificates' expiry, and its listeners'
    /// TLS and session series (at 0, so rate() and dashboards have data from the start).
    pub fn config_in_use(&self, config: &Config) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&ConfigLabels {
                hash: config.hash.clone(),
            })
            .set(1);
        self.certificate_not_after.clear();
        for (certificate, not_after) in config.tls.iter().flat_map(|tls| &tls.expiry) {
            self.certificate_not_after
                .get_or_create(&CertificateLabels {
                    certificate: certificate.clone(),
                })
                .set(*not_after);
        }
        for l in &config.listeners {
            let with_tls: &[OverTls] = match l.tls {
                ListenerTls::Plain => &[OverTls::No],
                ListenerTls::Starttls(_) => &[OverTls::No, OverTls::Yes],
                ListenerTls::Implicit(_) => &[OverTls::Yes],
            };
            for &tls in with_tls {
                let _ = self.listener_session(&l.name, tls);
            }
            if !matches!(l.tls, ListenerTls::Plain) {
                let versions = [TlsVersion::Tls12, TlsVersion::Tls13];
                let ok = versions.into_iter().flat_map(|version| {
                    [false, true].map(|resumed| TlsOutcome::Ok { version, resumed })
                });
                for outcome in ok.chain([TlsOutcome::Error, TlsOutcome::Timeout]) {
                    let (result, version, resumed) = outcome.labels();
                    let _ = self.tls_handshakes.get_or_create(&TlsHandshakeLabels {
                        listener: l.name.clone(),
                        result,
                        version,
                        resumed,
                    });
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_reload_success.set(now);
    }

    /// OpenMetrics 1.0 text, what Prometheus asks for.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The classic Prometheus text format (0.0.4), for everything that does not ask for
    /// OpenMetrics (curl, promtool, older scrapers).
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }

    /// Handles for one listener's connection counters.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let labels = ListenerLabels {
            listener: name.to_string(),
        };
        let error = |reason| {
            self.accept_errors
                .get_or_create(&AcceptErrorLabels {
                    listener: name.to_string(),
                    reason,
                })
                .clone()
        };
        ListenerMetrics {
            accepted: self.connections_total.get_or_create(&labels).clone(),
            open: self.connections_active.get_or_create(&labels).clone(),
            sessions: OverTls::ALL.map(|tls| self.listener_session(name, tls)),
            fd_limit: error(AcceptError::FdLimit),
            other_error: error(AcceptError::Other),
        }
    }

    /// Handles for one abuse table's size and evictions.
    pub fn abuse_table(&self, table: AbuseTable) -> TableMetrics {
        self.abuse_tables[table.index()].clone()
    }

    /// A client TLS handshake on `listener` ended with `outcome`.
    pub fn tls_handshake(&self, listener: &str, outcome: TlsOutcome) {
        let (result, version, resumed) = outcome.labels();
        self.tls_handshakes
            .get_or_create(&TlsHandshakeLabels {
                listener: listener.to_string(),
                result,
                version,
                resumed,
            })
            .inc();
    }

    /// The gauge of logged-in sessions from `listener` with or without TLS.
    fn listener_session(&self, listener: &str, tls: OverTls) -> Gauge {
        self.listener_sessions
            .get_or_create(&ListenerSessionLabels {
                listener: listener.to_string(),
                tls,
            })
            .clone()
    }

    pub fn rejected(&self, reason: Rejection) {
        self.prelogin_rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// OpenMetrics names a counter family `x` and its sample `x_total`; the classic format names
/// both `x_total`. It also has no `# UNIT` and no `# EOF`. The samples are the same.
fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut help: Option<&str> = None;
    for line in text.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.splitn(4, ' ').nth(3).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series budget: 100 backends, every series there is, one replica.
    #[test]
    fn a_fleet_fits_the_series_budget() {
        let mut yaml = String::from("backends:\n");
        for n in 0..100 {
            yaml.push_str(&format!(
                "  - {{ name: mail{n}, address: \"10.0.{}.{}:143\" }}\n",
                n / 250,
                n % 250 + 1
            ));
        }
        let config = crate::config::parse(&yaml, "test").unwrap();
        let metrics = Metrics::new(&config);
        let handles: Vec<_> = config
            .backends
            .iter()
            .map(|b| metrics.backend(&b.name))
            .collect();
        // Every command seen on every backend, every way.
        for (i, b) in handles.iter().enumerate() {
            for c in 0..COMMAND_NAMES.len() {
                b.command(
                    CommandId(c as u8),
                    Completion::Ok,
                    Some(Duration::from_millis(i as u64)),
                );
                b.command(CommandId(c as u8), Completion::No, None);
            }
        }
        let text = metrics.encode_prometheus();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        eprintln!("{} series, {} bytes", series.len(), text.len());
        assert!(
            series.len() <= 5000,
            "{} series for 100 backends",
            series.len()
        );
        assert!(text.len() <= 400 * 1024, "{} bytes per scrape", text.len());
        let one = series
            .iter()
            .filter(|l| l.contains("backend=\"mail7\""))
            .count();
        assert!(one <= 30, "{one} series per backend");
        // The full matrix is there for who asks for it.
        let config = crate::config::parse(
            &format!("{yaml}metrics: {{ command_by_backend: true }}\n"),
            "test",
        )
        .unwrap();
        let metrics = Metrics::new(&config);
        let _ = metrics.backend("mail7");
        let text = metrics.encode_prometheus();
        assert!(text.contains(
            "imapgate_commands_total{backend=\"mail7\",command=\"FETCH\",status=\"ok\"}"
        ));
    }

    /// TLS listeners get their handshake and session series at 0, each certificate its
    /// expiry, and the timing metrics their OpenMetrics unit.
    #[test]
    fn tls_series_certificate_expiry_and_units() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["imap.example.net".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let yaml = format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:0\", tls: starttls }}\n  - {{ name: imaps, bind: \"127.0.0.1:0\", tls: implicit }}\ntls: {{ cert: \"{}\", key: \"{}\", sni: [ {{ names: [other.example.net], cert: \"{}\", key: \"{}\" }} ] }}\nbackends:\n  - {{ name: b, address: \"127.0.0.1:143\" }}\n",
            cert_path.display(),
            key_path.display(),
            cert_path.display(),
            key_path.display()
        );
        let config = crate::config::parse(&yaml, "test").unwrap();
        let metrics = Metrics::new(&config);
        metrics.config_in_use(&config);
        metrics.tls_handshake(
            "imaps",
            TlsOutcome::Ok {
                version: TlsVersion::Tls13,
                resumed: true,
            },
        );
        let text = metrics.encode_openmetrics();
        // 2031-05-17T00:00:00Z
        for line in [
            "imapgate_tls_certificate_not_after_timestamp_seconds{certificate=\"default\"} 1936742400",
            "imapgate_tls_certificate_not_after_timestamp_seconds{certificate=\"other.example.net\"} 1936742400",
            "# UNIT imapgate_tls_certificate_not_after_timestamp_seconds seconds",
            "# UNIT imapgate_login_duration_seconds seconds",
            "# UNIT imapgate_command_duration_seconds seconds",
            "imapgate_tls_handshakes_total{listener=\"imaps\",result=\"ok\",version=\"TLSv1.3\",resumed=\"true\"} 1",
            "imapgate_tls_handshakes_total{listener=\"imap\",result=\"timeout\",version=\"none\",resumed=\"false\"} 0",
            "imapgate_listener_sessions_active{listener=\"imap\",tls=\"false\"} 0",
            "imapgate_listener_sessions_active{listener=\"imap\",tls=\"true\"} 0",
            "imapgate_listener_sessions_active{listener=\"imaps\",tls=\"true\"} 0",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        assert!(!text.contains("listener=\"imaps\",tls=\"false\""));
    }

    #[test]
    fn classic_format_names_counters_with_total() {
        let om = "# HELP imapgate_connections Client connections accepted.\n# TYPE imapgate_connections counter\nimapgate_connections_total{listener=\"imap\"} 3\n# HELP x_seconds A gauge.\n# TYPE x_seconds gauge\n# UNIT x_seconds seconds\nx_seconds 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP imapgate_connections_total Client connections accepted.\n# TYPE imapgate_connections_total counter\nimapgate_connections_total{listener=\"imap\"} 3\n# HELP x_seconds A gauge.\n# TYPE x_seconds gauge\nx_seconds 1\n"
        );
    }
}
