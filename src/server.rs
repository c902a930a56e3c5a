//! One `Server`: the client listeners on one or more worker threads, the health checks and
//! the admin server, and the drain at shutdown. `main` and the integration tests start it the
//! same way; only the number of workers differs.
//!
//! Each worker is a single-threaded runtime with its own listening sockets on the configured
//! addresses (SO_REUSEPORT): the kernel spreads connections over them, a session lives on one
//! thread and its wakeups never cross threads; the config snapshot, metrics, caps and session
//! table are shared. The first worker is the caller's runtime.
//!
//! ```text
//! run ─► health checks, admin server ─► workers accept ─► shutdown.drain: stop accepting,
//!        BYE to pre-login sessions ─► logged-in sessions get shutdown_grace ─► cut ─► stopped
//! ```

use std::sync::Arc;

use tracing::{error, info};

use crate::shutdown::Shutdown;
use crate::{Bound, Services, bind_more, into_bound, serve_listeners, start_services};

pub struct Server {
    bound: Bound,
    services: Arc<Services>,
    shutdown: Shutdown,
    workers: usize,
}

impl Server {
    /// A server on `bound` (see `bind`) with `workers` worker threads in all (at least one:
    /// the caller's runtime).
    pub fn new(bound: Bound, services: Arc<Services>, shutdown: Shutdown, workers: usize) -> Self {
        Server {
            bound,
            services,
            shutdown,
            workers: workers.max(1),
        }
    }

    /// Serves until `shutdown.drain` is cancelled, lets logged-in sessions finish for
    /// `timeouts.shutdown_grace` on every worker, then cuts what is left and returns. Further
    /// workers bind their own sockets; an error there is returned before anything is served.
    pub async fn run(self) -> std::io::Result<()> {
        let Server {
            bound,
            services,
            shutdown,
            workers,
        } = self;
        let mut others = Vec::with_capacity(workers - 1);
        for n in 1..workers {
            let listeners = bind_more(&services.config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (services, shutdown) = (services.clone(), shutdown.clone());
            let handle = std::thread::Builder::new()
                .name(format!("imapgate-{n}"))
                .spawn(move || {
                    runtime.block_on(async {
                        match into_bound(listeners) {
                            Ok(bound) => serve_listeners(bound, services, shutdown).await,
                            Err(e) => error!(error = %e, "worker cannot use its listeners"),
                        }
                    });
                })?;
            others.push(handle);
        }
        info!(workers, "workers started");
        start_services(bound.admin, &services, &shutdown);
        serve_listeners(bound.listeners, services, shutdown.clone()).await;
        // Every worker drains within the same grace period; only then is the rest cut.
        let _ = tokio::task::spawn_blocking(move || {
            for handle in others {
                let _ = handle.join();
            }
        })
        .await;
        // Stops the admin server and anything else still waiting on `cut`.
        shutdown.cut.cancel();
        info!("stopped");
        Ok(())
    }
}
