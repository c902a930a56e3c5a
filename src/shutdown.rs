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

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal that comes in between is not lost (nor fatal).
pub fn signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGINT; only SIGTERM stops imapgate");
                term.recv().await;
            }
            (Err(e), Ok(mut int)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops imapgate");
                int.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM or SIGINT");
                std::future::pending::<()>().await;
            }
        }
    }
}
