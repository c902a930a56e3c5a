//! The admin HTTP server (its own bind address): `GET /metrics`, `/healthz`, `/readyz`,
//! `/sessions`. Plain hyper, one task per connection; nothing here touches the relay.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::session::table::SessionTable;
use crate::shutdown::Shutdown;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub sessions: Arc<SessionTable>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cut.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(answer(&admin, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            let (content_type, body) = if openmetrics {
                (
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    admin.metrics.encode_openmetrics(),
                )
            } else {
                (
                    "text/plain; version=0.0.4; charset=utf-8",
                    admin.metrics.encode_prometheus(),
                )
            };
            Response::builder()
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if admin.health.any_up() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no backend reachable\n")
            }
        }
        "/sessions" => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(admin.sessions.to_json())))
            .unwrap_or_default(),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
