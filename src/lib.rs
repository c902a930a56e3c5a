//! imapgate: a transparent IMAP proxy and load balancer.
//!
//! A `Server` takes bound sockets, the shared services (config snapshot, metrics, ...) and a
//! shutdown handle, so that the binary and the tests (which bind port 0) start it the same way.

pub(crate) mod abuse;
pub(crate) mod admin;
pub(crate) mod backend;
pub mod config;
pub(crate) mod directory;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod health;
pub(crate) mod imap;
pub(crate) mod limits;
pub(crate) mod listener;
pub(crate) mod metrics;
pub(crate) mod proxy_header;
pub(crate) mod reload;
pub(crate) mod route;
pub(crate) mod server;
pub(crate) mod services;
pub(crate) mod session;
pub mod shutdown;
pub(crate) mod stream;
pub(crate) mod tap;
pub(crate) mod tls;
pub(crate) mod trace;

// The public façade, for the binaries, the integration tests and the benches; everything else
// is the crate's own (so the compiler reports what nothing uses).
pub use backend::mechanism_warnings;
pub use directory::ask_once as ask_directory;
pub use imap::scan::{CommandId, CommandSink, Completion, Observer};
pub use reload::{ReloadError, reload};
pub use route::backends_for;
pub use server::{Bound, BoundListener, Server, bind, raise_fd_limit};
pub use services::Services;
pub use session::relay::{BackendTuning, relay};
pub use stream::Stream;
pub use tap::{Tap, Way};
pub use tls::ServerTls;
