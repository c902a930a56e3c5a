//! One integration-test binary (faster to build than many). Tests that need a real server or
//! tool fail when it is missing, unless IMAPGATE_SKIP_EXTERNAL=1 asks for a loud skip
//! (`support::external`).

mod abuse;
mod backends_smoke;
mod bind;
mod capabilities;
mod clients;
mod compress;
mod config_corpus;
mod deploy;
mod directory;
mod directory_ldap;
mod directory_sql;
mod faults;
mod fd_limit;
mod image;
mod interop;
mod live_ops;
mod load_tool;
mod login;
mod metrics;
mod prelogin;
mod prometheus;
mod relay;
mod replicas;
mod sasl;
mod secrets;
mod support;
mod tls;
mod trace;
