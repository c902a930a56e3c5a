//! A real Prometheus (Debian `prometheus`) scrapes a live imapgate while a client works through
//! it; every PromQL expression in the Grafana dashboard and in the alert rules must return data.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, Proxy, config, http_get, tool_available};

/// The dashboard's expressions with its variables filled in the way "All" does.
fn dashboard_expressions() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/imapgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Its datasource is a variable, not an import input: Grafana's import fills inputs in,
    // its dashboard sidecar (deploy/kubernetes) does not.
    assert!(
        dashboard.get("__inputs").is_none() && !dashboard.to_string().contains("DS_PROMETHEUS"),
        "the dashboard takes its datasource from the `datasource` variable"
    );
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "instance", "backend"]);
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$backend", ".*")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            out.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

/// The alert rules' queries, without their threshold comparison (a healthy system does not
/// fire them, but the series they watch must exist).
fn alert_expressions() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml");
    let rules: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap().trim();
            let cut = [" == ", " > ", " < ", " >= ", " <= ", " != "]
                .iter()
                .filter_map(|op| expr.rfind(op))
                .max()
                .unwrap_or_else(|| panic!("no comparison in {expr}"));
            out.push((
                rule["alert"].as_str().unwrap().to_string(),
                expr[..cut].to_string(),
            ));
        }
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: imapgate\n    static_configs: [{{ targets: [\"{target}\"] }}]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run prometheus");
    Prometheus {
        child,
        port,
        _dir: dir,
    }
}

/// Runs `expr` through Prometheus's HTTP API; the number of series in the result, or None
/// while Prometheus is not answering yet.
async fn query(prometheus: &Prometheus, expr: &str) -> Option<usize> {
    let addr = format!("127.0.0.1:{}", prometheus.port).parse().unwrap();
    let connect = tokio::net::TcpStream::connect(addr).await;
    if connect.is_err() {
        return None;
    }
    drop(connect);
    let (status, body) = http_get(addr, &format!("/api/v1/query?query={}", url_encode(expr))).await;
    if status != 200 {
        panic!("Prometheus refused {expr}: {status} {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(v["data"]["result"].as_array().map_or(0, Vec::len))
}

/// Some traffic of every kind the dashboard shows: logins (good and bad), commands (ok, NO,
/// BAD), bytes, a pre-login rejection.
async fn work(proxy: &Proxy) {
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("w0 LOGIN bob wrong\r\nw1 LOGIN bob bob-secret\r\n")
        .await;
    c.until_tagged("w1").await;
    c.send("w2 SELECT INBOX\r\nw3 SELECT nosuch\r\nw4 FROB\r\nw5 NOOP\r\nw6 LOGOUT\r\n")
        .await;
    c.until_tagged("w6").await;
    let mut bad = proxy.connect().await;
    bad.line().await.unwrap();
    bad.send("x SELECT INBOX\r\nx2 LOGOUT\r\n").await;
    bad.until_tagged("x2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data() {
    if !dovecot::available() || !tool_available("prometheus", "prometheus") {
        return;
    }
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        // Each round has a wrong password: without the penalty off they would wait 2, 4, 8 s...
        "health: { interval: 200ms }\nlimits: { login_penalty: { base: 0s } }\n",
    ))
    .await;
    let prometheus = start_prometheus(proxy.admin);
    let mut expressions = dashboard_expressions();
    expressions.extend(alert_expressions());
    assert!(expressions.len() >= 15, "{expressions:?}");

    // Work through the proxy until every query has data or the deadline passes.
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    loop {
        work(&proxy).await;
        let mut empty = Vec::new();
        for (what, expr) in &expressions {
            if query(&prometheus, expr).await.unwrap_or(0) == 0 {
                empty.push(format!("{what}: {expr}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let addr = format!("127.0.0.1:{}", prometheus.port).parse().unwrap();
            let (_, targets) = http_get(addr, "/api/v1/targets").await;
            panic!(
                "queries without data:\n{}\ntargets: {targets}",
                empty.join("\n")
            );
        }
    }
    proxy.stop().await;
}

#[test]
fn promtool_accepts_the_alert_rules() {
    if !tool_available("promtool", "prometheus") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
