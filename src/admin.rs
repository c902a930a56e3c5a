//! The admin HTTP server (its own bind address). Plain hyper, one task per connection;
//! nothing here touches the relay.
//!
//! | endpoint | token | what |
//! |---|---|---|
//! | `GET /metrics`, `/healthz`, `/readyz` | no | Prometheus text; liveness; readiness |
//! | `GET /backends` | no | every backend: address, weight, health, mode, sessions |
//! | `POST /backends/{name}/drain`, `/maintenance[?grace=30s]`, `/enable` | yes | operator mode |
//! | `GET /sessions?user=&backend=&id=&limit=` | yes | logged-in sessions |
//! | `POST /sessions/kick?user=` / `?backend=` / `?id=` | yes | BYE at a response boundary |
//! | `GET /route?user=` | yes | where a user goes, and why |
//! | `POST /reload` | yes | reload the config file |
//! | `POST /cache/flush[?user=]` | yes | forget the directory's answers (one user's, or all) |
//!
//! "token": `Authorization: Bearer <admin.token_file's content>` when a token is configured
//! (required on non-loopback binds). The server bounds what a client can hold: connections
//! (`MAX_CONNECTIONS`), time to send a request's head (`HEAD_TIMEOUT`), a connection's life
//! (`CONNECTION_MAX`) and request bodies (`BODY_MAX`; no endpoint reads one).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::backend::state::{Health, Mode};
use crate::config::file::duration;
use crate::directory::http::url_decode;
use crate::reload;
use crate::route;
use crate::services::Services;
use crate::session::table::{Filter, Kick};
use crate::shutdown::Shutdown;
use crate::trace::{self, StartError, Trace};

/// Admin connections at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// Time to send a request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one admin connection (keep-alive scrapers reconnect).
const CONNECTION_MAX: Duration = Duration::from_secs(300);
/// Largest request body accepted (none is read).
const BODY_MAX: u64 = 64 * 1024;
/// `/sessions` without `limit`.
const SESSIONS_DEFAULT_LIMIT: usize = 1000;

/// Serves until the cut; rebinds when a reload moves `admin.bind`.
pub(crate) async fn serve(mut listener: TcpListener, services: Arc<Services>, shutdown: Shutdown) {
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, "admin server listening");
    }
    // The configured address this listener was bound for (tests bind port 0 instead).
    let mut bound_for = services.config().admin.as_ref().map(|a| a.bind);
    let mut changes = services.changes();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let wanted = services.config().admin.as_ref().map(|a| a.bind);
                match wanted {
                    Some(addr) if Some(addr) != bound_for => match TcpListener::bind(addr).await {
                        Ok(new) => {
                            info!(address = %addr, "admin server moved");
                            listener = new;
                            bound_for = Some(addr);
                        }
                        Err(e) => error!(address = %addr, error = %e, "cannot move the admin server; it stays where it is"),
                    },
                    Some(_) => {}
                    None => warn!("admin removed from the config; the admin server runs on until restart"),
                }
                continue;
            }
            _ = shutdown.cut.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("admin connection refused: too many open");
            continue;
        };
        let (services, shutdown) = (services.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (services, shutdown) = (services.clone(), shutdown.clone());
                async move { Ok::<_, Infallible>(answer(&services, &shutdown, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_MAX, connection).await;
            drop(slot);
        });
    }
}

/// Every request's answer. Only what it needs of the request is read: the head.
async fn answer(
    services: &Services,
    shutdown: &Shutdown,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.body().size_hint().upper().is_none_or(|n| n > BODY_MAX) {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().as_str().to_string();
    let open = matches!(
        (method.as_str(), segments.as_slice()),
        ("GET", ["metrics" | "healthz" | "readyz" | "backends"])
    );
    if !open && !authorized(services, &req) {
        return text_with(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required\n",
            Some(("www-authenticate", "Bearer")),
        );
    }
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["metrics"]) => metrics(services, &req),
        ("GET", ["healthz"]) => text(StatusCode::OK, "ok\n"),
        ("GET", ["readyz"]) => readyz(services, shutdown),
        ("GET", ["backends"]) => json(StatusCode::OK, backends(services)),
        ("POST", ["backends", name, action]) => set_mode(services, name, action, &query),
        ("GET", ["sessions"]) => {
            let limit = query
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(SESSIONS_DEFAULT_LIMIT);
            let body = services.sessions.to_json(&query.filter(), limit);
            json_text(StatusCode::OK, body)
        }
        ("POST", ["sessions", "kick"]) => {
            let filter = query.filter();
            if filter.is_empty() {
                return text(
                    StatusCode::BAD_REQUEST,
                    "say which sessions: ?user=, ?backend= or ?id=\n",
                );
            }
            let kicked = services.sessions.kick(&filter, Kick::Admin);
            info!(user = ?filter.user, backend = ?filter.backend, id = ?filter.id, kicked, "sessions kicked");
            json(StatusCode::OK, serde_json::json!({ "kicked": kicked }))
        }
        ("GET", ["route"]) => match query.get("user") {
            Some(user) => json(StatusCode::OK, route_of(services, user)),
            None => text(StatusCode::BAD_REQUEST, "?user= is required\n"),
        },
        ("POST", ["cache", "flush"]) => {
            let flushed = services.directory_cache.flush(
                query
                    .get("user")
                    .map(|u| services.config().routing.normalize(u))
                    .as_deref(),
            );
            info!(user = ?query.get("user"), flushed, "directory cache flushed");
            json(StatusCode::OK, serde_json::json!({ "flushed": flushed }))
        }
        ("POST", ["reload"]) => match reload::reload(services).await {
            Ok(hash) => json(
                StatusCode::OK,
                serde_json::json!({ "result": "ok", "hash": hash }),
            ),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "result": "error", "error": e.to_string() }),
            ),
        },
        ("POST", ["trace"]) => start_trace(services, &query),
        ("GET", ["trace"]) => json(StatusCode::OK, traces(services)),
        ("GET", ["trace", id]) => match services.traces.get(id) {
            Some(trace) => trace_text(&trace),
            None => text(StatusCode::NOT_FOUND, "no such trace\n"),
        },
        ("DELETE", ["trace", id]) => {
            if services.traces.stop(id) {
                json(StatusCode::OK, serde_json::json!({ "stopped": id }))
            } else {
                text(StatusCode::NOT_FOUND, "no such trace\n")
            }
        }
        (_, ["metrics" | "healthz" | "readyz" | "backends" | "sessions" | "route" | "trace"])
        | (_, ["trace", _])
        | (_, ["reload"])
        | (_, ["cache", "flush"])
        | (_, ["sessions", "kick"])
        | (_, ["backends", _, _]) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /trace?user=&seconds=[&bodies=true]`: starts recording the user's sessions, the
/// running ones and the ones that log in while it runs.
fn start_trace(services: &Services, query: &Query) -> Response<Full<Bytes>> {
    let Some(user) = query.get("user") else {
        return text(StatusCode::BAD_REQUEST, "?user= is required\n");
    };
    let seconds = match query.get("seconds").map(str::parse::<u64>) {
        None => 60,
        Some(Ok(n)) if (1..=trace::MAX_SECONDS).contains(&n) => n,
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "?seconds= must be a whole number from 1 to 3600\n",
            );
        }
    };
    let bodies = query.get("bodies") == Some("true");
    let config = services.config();
    let limits = config
        .admin
        .as_ref()
        .map_or_else(crate::config::TraceLimits::default, |a| a.trace.clone());
    let trace = match services
        .traces
        .start(&limits, user, Duration::from_secs(seconds), bodies)
    {
        Ok(trace) => trace,
        Err(StartError::TooMany(n)) => {
            return json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({ "error": format!("at most {n} traces run at once (admin.trace.max_active)") }),
            );
        }
        Err(StartError::AlreadyTraced(id)) => {
            return json(
                StatusCode::CONFLICT,
                serde_json::json!({ "error": "this user is traced already", "id": id }),
            );
        }
        Err(StartError::BodiesNotAllowed) => {
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({ "error": "bodies=true needs admin.trace.allow_bodies: true" }),
            );
        }
    };
    let running = services.sessions.find(&Filter {
        user: Some(user.to_string()),
        ..Filter::default()
    });
    for s in &running {
        s.trace.attach(
            trace.clone(),
            s.id,
            &format!(
                "joined: logged in earlier as {} from {} on backend {}",
                s.user, s.client, s.backend
            ),
        );
    }
    info!(trace = %trace.id, user, seconds, bodies, sessions = running.len(), "trace started");
    json(
        StatusCode::CREATED,
        serde_json::json!({
            "id": trace.id,
            "user": trace.user,
            "seconds": seconds,
            "bodies": bodies,
            "sessions": running.len(),
        }),
    )
}

/// `GET /trace`: every trace still kept.
fn traces(services: &Services) -> serde_json::Value {
    let list: Vec<serde_json::Value> = services
        .traces
        .list()
        .iter()
        .map(|t| {
            let (text, truncated, sessions) = t.transcript();
            serde_json::json!({
                "id": t.id,
                "user": t.user,
                "running": t.is_running(),
                "seconds_left": t.seconds_left(),
                "sessions": sessions,
                "bytes": text.len(),
                "truncated": truncated,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// `GET /trace/{id}`: the transcript so far, as text; whether it still runs in a header.
fn trace_text(trace: &Trace) -> Response<Full<Bytes>> {
    let (body, _, _) = trace.transcript();
    let started = trace
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let head = format!(
        "# trace {} of user {} from {} (Unix time), {}\n",
        trace.id,
        trace.user,
        started,
        if trace.is_running() {
            "running"
        } else {
            "finished"
        }
    );
    let mut response = Response::new(Full::new(Bytes::from(head + &body)));
    let state = if trace.is_running() {
        "running"
    } else {
        "finished"
    };
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        hyper::header::HeaderName::from_static("imapgate-trace"),
        hyper::header::HeaderValue::from_static(state),
    );
    response
}

/// Whether the request carries the configured token (or none is configured).
fn authorized(services: &Services, req: &Request<Incoming>) -> bool {
    let config = services.config();
    let Some(token) = config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
        return true;
    };
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|offered| token.matches(offered))
}

fn metrics(services: &Services, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let openmetrics = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (content_type, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            services.metrics.encode_openmetrics(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            services.metrics.encode_prometheus(),
        )
    };
    Response::builder()
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Ready while not shutting down and some backend takes logins (or is not checked yet).
fn readyz(services: &Services, shutdown: &Shutdown) -> Response<Full<Bytes>> {
    if shutdown.drain.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let snapshot = services.snapshot();
    if snapshot.backends.iter().any(|b| b.health() == Health::Up) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "no backend reachable\n")
    }
}

fn backends(services: &Services) -> serde_json::Value {
    let snapshot = services.snapshot();
    let list: Vec<serde_json::Value> = snapshot
        .config
        .backends
        .iter()
        .zip(&snapshot.backends)
        .map(|(b, state)| {
            serde_json::json!({
                "name": &*b.name,
                "address": b.address,
                "weight": b.weight,
                "health": state.health().as_str(),
                "mode": state.mode().as_str(),
                "takes_logins": state.takes_logins(),
                "sessions": state.sessions(),
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

fn set_mode(services: &Services, name: &str, action: &str, query: &Query) -> Response<Full<Bytes>> {
    let mode = match action {
        "drain" => Mode::Draining,
        "maintenance" => Mode::Maintenance,
        "enable" => Mode::Active,
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    let grace = match query.get("grace").map(duration::parse) {
        None => Duration::ZERO,
        Some(Some(d)) => d,
        Some(None) => {
            return text(
                StatusCode::BAD_REQUEST,
                "grace: a duration such as 30s, 500ms or 2m\n",
            );
        }
    };
    let snapshot = services.snapshot();
    let Some((_, state)) = snapshot.backend(name) else {
        return text(StatusCode::NOT_FOUND, "no such backend\n");
    };
    let before = state.set_mode(mode);
    info!(
        backend = name,
        from = before.as_str(),
        to = mode.as_str(),
        "backend mode changed"
    );
    let mut kicked_later = false;
    if mode == Mode::Maintenance {
        // Kick its sessions after the grace, unless it was enabled again meanwhile.
        let (sessions, state) = (services.sessions.clone(), state.clone());
        let filter = Filter {
            backend: Some(name.to_string()),
            ..Filter::default()
        };
        kicked_later = true;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if state.mode() == Mode::Maintenance {
                let kicked = sessions.kick(&filter, Kick::Maintenance);
                info!(backend = %state.name, kicked, "maintenance: sessions closed");
            }
        });
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "backend": name,
            "mode": mode.as_str(),
            "previous": before.as_str(),
            "sessions": state.sessions(),
            "kick_after_seconds": kicked_later.then_some(grace.as_secs_f64()),
        }),
    )
}

fn route_of(services: &Services, user: &str) -> serde_json::Value {
    let snapshot = services.snapshot();
    let config = &snapshot.config;
    let route = route::route(config, user);
    let candidates = route.candidates(config.routing.failover, |i| {
        snapshot.backends[i].takes_logins()
    });
    let order: Vec<serde_json::Value> = route
        .order
        .iter()
        .map(|&i| {
            let state = &snapshot.backends[i];
            serde_json::json!({
                "backend": &*state.name,
                "health": state.health().as_str(),
                "mode": state.mode().as_str(),
                "takes_logins": state.takes_logins(),
            })
        })
        .collect();
    let directory = snapshot.directory.as_ref().map(|d| match d.cached(&route.key) {
        Some((Some(found), age)) => serde_json::json!({
            "cached": true, "age_seconds": age.as_secs_f64(), "server": found.server, "user": found.user,
        }),
        Some((None, age)) => serde_json::json!({
            "cached": true, "age_seconds": age.as_secs_f64(), "server": null,
        }),
        None => serde_json::json!({ "cached": false }),
    });
    serde_json::json!({
        "key": route.key,
        "directory": directory,
        "by": if route.pinned.is_some() { "static" } else { "hash" },
        "failover": config.routing.failover,
        "order": order,
        "tries": candidates.iter().map(|&i| &*snapshot.backends[i].name).collect::<Vec<_>>(),
    })
}

/// The query string's parameters, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn filter(&self) -> Filter {
        let field = |k| self.get(k).filter(|v| !v.is_empty()).map(str::to_string);
        Filter {
            user: field("user"),
            backend: field("backend"),
            id: field("id"),
        }
    }
}

fn percent_decode(text: &str) -> String {
    // Query strings write a space as `+`; `%2B` is a plus.
    String::from_utf8_lossy(&url_decode(&text.replace('+', " "))).into_owned()
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    json_text(status, value.to_string())
}

fn json_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    text_with(status, body, None)
}

fn text_with(
    status: StatusCode,
    body: &'static str,
    header: Option<(&'static str, &'static str)>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    if let Some((name, value)) = header {
        response.headers_mut().insert(
            hyper::header::HeaderName::from_static(name),
            hyper::header::HeaderValue::from_static(value),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_durations() {
        let q = Query::parse("user=Alice%40example.net&limit=5&backend=");
        assert_eq!(q.get("user"), Some("Alice@example.net"));
        assert_eq!(q.get("limit"), Some("5"));
        let f = q.filter();
        assert_eq!(f.user.as_deref(), Some("Alice@example.net"));
        assert!(f.backend.is_none(), "empty means not given");
        assert_eq!(percent_decode("a%2"), "a%2", "short escape kept");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(duration::parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(duration::parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(duration::parse("soon"), None);
    }
}
