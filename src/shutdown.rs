//! Graceful shutdown. `drain` stops the listeners and says BYE to sessions still in pre-login;
//! logged-in sessions go on until they end or until `cut`, which `run` cancels once
//! `timeouts.shutdown_grace` has passed.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub cut: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the shutdown: what SIGTERM and SIGINT do.
    pub fn begin(&self) {
        self.drain.cancel();
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops imapgate");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
