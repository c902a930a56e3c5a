//! The `tls` scenario: handshakes on an implicit-TLS (993-style) listener. Each worker loops:
//! TCP connect, TLS handshake, read the greeting, close. With resumption each worker keeps its
//! own rustls session cache, so after its first handshake the server may resume (TLS 1.3
//! tickets or a 1.2 session id); without, every handshake is a full one.

use std::path::Path;
use std::time::Instant;

use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::scenarios::{Common, Report, micros, run_workers};

/// What one handshake turned out to be.
enum Handshake {
    Full,
    Resumed,
}

pub async fn tls(common: &Common, ca: &Path, server_name: &str, resume: bool) -> Report {
    // One client config (and so one session cache) per worker, as each real client keeps its
    // own: a shared cache would cap how many tickets 50 concurrent workers find.
    let connectors = match (0..common.workers)
        .map(|_| crate::client_tls::connector(ca, resume))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(c) => c,
        Err(e) => return failed(common, &e.to_string()),
    };
    let name = match ServerName::try_from(server_name.to_string()) {
        Ok(n) => n,
        Err(e) => return failed(common, &e.to_string()),
    };
    let target = common.target;
    let started = Instant::now();
    let (mut lat, errors, resumed, cpu) = run_workers(common, |worker, until| {
        let (connector, name) = (connectors[worker].clone(), name.clone());
        async move {
            let (mut lat, mut errors, mut resumed) = (Vec::new(), 0, 0);
            while Instant::now() < until {
                let t = Instant::now();
                match handshake(&connector, &name, target).await {
                    Ok(kind) => {
                        lat.push(micros(t.elapsed()));
                        if let Handshake::Resumed = kind {
                            resumed += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors, resumed)
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let n = lat.0.len() as f64;
    let rate = n / elapsed;
    let (p50, p99) = (lat.percentile(0.5), lat.percentile(0.99));
    let cpu_per_1k = if n > 0.0 { cpu / n * 1000.0 } else { 0.0 };
    Report {
        json: json!({"scenario": "tls", "target": common.label, "workers": common.workers,
            "resumption": resume, "seconds": elapsed, "handshakes": n, "resumed": resumed,
            "errors": errors, "handshakes_per_s": rate, "p50_us": p50, "p99_us": p99,
            "target_cpu_s": cpu, "cpu_s_per_1k_handshakes": cpu_per_1k}),
        summary: format!(
            "tls    {:>10}: {rate:>9.0} handshakes/s ({resumed} resumed)  p50 {p50} µs  p99 {p99} µs  errors {errors}  CPU {cpu_per_1k:.3} s/1k",
            common.label
        ),
    }
}

/// The scenario could not start (unreadable CA file, bad server name).
fn failed(common: &Common, error: &str) -> Report {
    Report {
        json: json!({"scenario": "tls", "target": common.label, "error": error}),
        summary: format!("tls    {:>10}: cannot start: {error}", common.label),
    }
}

async fn handshake(
    connector: &TlsConnector,
    name: &ServerName<'static>,
    target: std::net::SocketAddr,
) -> std::io::Result<Handshake> {
    let tcp = TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let tls = connector.connect(name.clone(), tcp).await?;
    let kind = match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => Handshake::Resumed,
        _ => Handshake::Full,
    };
    let mut greeting = Vec::new();
    BufReader::new(tls).read_until(b'\n', &mut greeting).await?;
    if greeting.starts_with(b"* OK") {
        Ok(kind)
    } else {
        Err(std::io::Error::other("no greeting"))
    }
}
