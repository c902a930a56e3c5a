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
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::Config;
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
    backend: String,
    mechanism: MechanismLabel,
    result: LoginResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    backend: String,
    command: String,
    status: StatusLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandDurationLabels {
    backend: String,
    command: String,
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
    }
}

impl From<Mechanism> for MechanismLabel {
    fn from(m: Mechanism) -> Self {
        match m {
            Mechanism::Login => MechanismLabel::Login,
            Mechanism::Plain => MechanismLabel::Plain,
            Mechanism::SaslLogin => MechanismLabel::SaslLogin,
        }
    }
}

label_values! {
    /// How a login attempt on one backend ended.
    pub enum LoginResult {
        /// The backend accepted the credentials.
        Ok => "ok",
        /// The backend said NO or BAD.
        Rejected => "rejected",
        /// The backend could not be reached (refused, timeout, BYE greeting).
        Unavailable => "unavailable",
        /// The backend answered out of protocol, or failed the login after the credentials
        /// were sent (BYE, close, no answer in time).
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
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs … ~105 s, ×2 per bucket.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

pub struct Metrics {
    registry: Registry,
    connections_total: Family<ListenerLabels, Counter>,
    connections_active: Family<ListenerLabels, Gauge>,
    accept_errors: Family<AcceptErrorLabels, Counter>,
    prelogin_rejections: Family<ReasonLabels, Counter>,
    backend: BackendFamilies,
    sessions_closed: Family<KickLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_success: Gauge<f64, AtomicU64>,
    config_info: Family<ConfigLabels, Gauge>,
}

/// The families with a `backend` label; `Metrics::backend` hands out one backend's series.
struct BackendFamilies {
    up: Family<BackendLabels, Gauge>,
    logins: Family<LoginLabels, Counter>,
    login_duration: HistogramFamily<BackendLabels>,
    sessions_active: Family<BackendLabels, Gauge>,
    commands: Family<CommandLabels, Counter>,
    command_duration: HistogramFamily<CommandDurationLabels>,
    bytes: Family<BytesLabels, Counter>,
    connect_duration: HistogramFamily<BackendLabels>,
}

/// One backend's hot-path handles.
pub struct BackendMetrics {
    /// `[command][status]`, by `CommandId` and `StatusLabel::index`.
    commands: Vec<[Counter; StatusLabel::ALL.len()]>,
    durations: Vec<Histogram>,
    pub bytes_to_backend: Counter<u64, AtomicU64>,
    pub bytes_to_client: Counter<u64, AtomicU64>,
    pub sessions_active: Gauge,
    /// `[mechanism][result]`, by `MechanismLabel::index` and `LoginResult::index`.
    logins: [[Counter; LoginResult::ALL.len()]; MechanismLabel::ALL.len()],
    login_duration: Histogram,
    connect_duration: Histogram,
    up: Gauge,
}

impl BackendMetrics {
    /// A login attempt on this backend.
    pub fn login(&self, mechanism: Mechanism, result: LoginResult, took: Duration) {
        self.logins[MechanismLabel::from(mechanism).index()][result.index()].inc();
        if result == LoginResult::Ok || result == LoginResult::Rejected {
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
}

impl CommandSink for BackendMetrics {
    fn command(&self, command: CommandId, completion: Completion, latency: Option<Duration>) {
        let status = StatusLabel::from(completion).index();
        let i = command.0 as usize;
        self.commands[i][status].inc();
        if let Some(latency) = latency {
            self.durations[i].observe(latency.as_secs_f64());
        }
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
            "Login attempts on a backend, by outcome",
            logins_total.clone(),
        );
        let login_duration: HistogramFamily<BackendLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "login_duration_seconds",
            "Time from the client's login command to the backend's answer, connect included",
            login_duration.clone(),
        );
        let sessions_active = Family::<BackendLabels, Gauge>::default();
        r.register(
            "sessions_active",
            "Logged-in sessions being relayed",
            sessions_active.clone(),
        );
        let commands_total = Family::<CommandLabels, Counter>::default();
        r.register(
            "commands",
            "Commands relayed after login, by completion",
            commands_total.clone(),
        );
        let command_duration: HistogramFamily<CommandDurationLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "command_duration_seconds",
            "From a command's last octet to its tagged completion (IDLE excluded)",
            command_duration.clone(),
        );
        let bytes_total = Family::<BytesLabels, Counter>::default();
        r.register("bytes", "Octets relayed after login", bytes_total.clone());
        let backend_up = Family::<BackendLabels, Gauge>::default();
        r.register(
            "backend_up",
            "1 when the last health checks found the backend greeting, else 0",
            backend_up.clone(),
        );
        let backend_connect_duration: HistogramFamily<BackendLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "backend_connect_duration_seconds",
            "TCP connect time to a backend",
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
        r.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (start or reload), Unix time",
            last_reload_success.clone(),
        );
        let config_info = Family::<ConfigLabels, Gauge>::default();
        r.register(
            "config_info",
            "Always 1, for the configuration in use: hash is the start of the file's SHA-256",
            config_info.clone(),
        );

        Metrics {
            registry,
            connections_total,
            connections_active,
            accept_errors,
            prelogin_rejections,
            backend: BackendFamilies {
                up: backend_up,
                logins: logins_total,
                login_duration,
                sessions_active,
                commands: commands_total,
                command_duration,
                bytes: bytes_total,
                connect_duration: backend_connect_duration,
            },
            sessions_closed,
            reloads,
            last_reload_success,
            config_info,
        }
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
        let logins = MechanismLabel::ALL.map(|mechanism| {
            LoginResult::ALL.map(|result| {
                f.logins
                    .get_or_create(&LoginLabels {
                        backend: name.to_string(),
                        mechanism,
                        result,
                    })
                    .clone()
            })
        });
        let commands = COMMAND_NAMES
            .iter()
            .map(|command| {
                StatusLabel::ALL.map(|status| {
                    f.commands
                        .get_or_create(&CommandLabels {
                            backend: name.to_string(),
                            command: command.to_string(),
                            status,
                        })
                        .clone()
                })
            })
            .collect();
        let durations = COMMAND_NAMES
            .iter()
            .map(|command| {
                f.command_duration
                    .get_or_create(&CommandDurationLabels {
                        backend: name.to_string(),
                        command: command.to_string(),
                    })
                    .clone()
            })
            .collect();
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
            bytes_to_backend: bytes(DirectionLabel::ClientToBackend),
            bytes_to_client: bytes(DirectionLabel::BackendToClient),
            sessions_active: f.sessions_active.get_or_create(&labels).clone(),
            logins,
            login_duration: f.login_duration.get_or_create(&labels).clone(),
            connect_duration: f.connect_duration.get_or_create(&labels).clone(),
            up: f.up.get_or_create(&labels).clone(),
        })
    }

    /// A reload was tried; on success `hash` names the configuration now in use.
    pub fn reloaded(&self, result: ReloadResult, hash: Option<&str>) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
        if let Some(hash) = hash {
            self.config_in_use(hash);
        }
    }

    /// `hash` is in use from now on (at start and after each successful reload).
    pub fn config_in_use(&self, hash: &str) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&ConfigLabels {
                hash: hash.to_string(),
            })
            .set(1);
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
            fd_limit: error(AcceptError::FdLimit),
            other_error: error(AcceptError::Other),
        }
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

    #[test]
    fn classic_format_names_counters_with_total() {
        let om = "# HELP imapgate_connections Client connections accepted.\n# TYPE imapgate_connections counter\nimapgate_connections_total{listener=\"imap\"} 3\n# HELP x_seconds A gauge.\n# TYPE x_seconds gauge\n# UNIT x_seconds seconds\nx_seconds 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP imapgate_connections_total Client connections accepted.\n# TYPE imapgate_connections_total counter\nimapgate_connections_total{listener=\"imap\"} 3\n# HELP x_seconds A gauge.\n# TYPE x_seconds gauge\nx_seconds 1\n"
        );
    }
}
