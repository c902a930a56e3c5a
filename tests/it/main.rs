//! One integration-test binary (faster to build than many). Tests that need Dovecot return early
//! with a loud message when it is missing, and fail when `CI` is set.

mod backends_smoke;
mod capabilities;
mod clients;
mod config_corpus;
mod deploy;
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
mod support;
mod tls;
