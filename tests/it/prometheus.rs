//! A real Prometheus (Debian `prometheus`) scrapes a live imapgate while a client works through
//! it; every PromQL expression in the Grafana dashboard and in the alert rules must return data.
//! promtool checks the rules and runs their unit tests (deploy/prometheus/alerts_test.yaml).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::dovecot::{self, Dovecot};
use crate::support::pki::Pki;
use crate::support::{DEADLINE, Proxy, Raw, config, http_get, tls_client, tool_available};

/// The dashboard's rows, in order.
const ROWS: [&str; 6] = [
    "Overview", "Logins", "Commands", "Backends", "TLS", "Process",
];

/// Every panel of the dashboard, rows included, and the panels inside collapsed rows.
fn all_panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        out.push(panel);
        if let Some(inner) = panel.get("panels").and_then(|p| p.as_array()) {
            out.extend(inner);
        }
    }
    out
}

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
    assert_eq!(variables, ["datasource", "instance", "backend", "command"]);
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
    let panels = all_panels(&dashboard);
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    assert_eq!(rows, ROWS);
    assert!(
        panels.iter().any(|p| p["type"] == "state-timeline"),
        "backend state is a state timeline"
    );
    // Panel ids are unique and no two panels overlap on the grid.
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "duplicate panel ids");
    let rect = |p: &serde_json::Value| {
        let g = &p["gridPos"];
        let n = |k: &str| g[k].as_u64().unwrap();
        (n("x"), n("y"), n("x") + n("w"), n("y") + n("h"))
    };
    for (i, a) in panels.iter().enumerate() {
        let (ax0, ay0, ax1, ay1) = rect(a);
        assert!(ax1 <= 24, "{} is wider than the grid", a["title"]);
        for b in &panels[i + 1..] {
            let (bx0, by0, bx1, by1) = rect(b);
            let apart = ax1 <= bx0 || bx1 <= ax0 || ay1 <= by0 || by1 <= ay0;
            assert!(apart, "{} overlaps {}", a["title"], b["title"]);
        }
    }
    let mut out = Vec::new();
    for panel in panels.into_iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap();
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: the datasource variable"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$backend", ".*")
                .replace("$instance", ".*")
                .replace("$command", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m");
            assert!(!expr.contains('$'), "{title}: a variable left in {expr}");
            out.push((title.to_string(), expr));
        }
    }
    out
}

fn alert_rules() -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml");
    let rules: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// The alert rules' queries with every comparison against a number made `bool` (so
/// `rate > 0.1 and on (job) volume >= 20` keeps every series it watches, at 0 or 1: a healthy
/// system does not fire them, but the series they watch must exist). `absent(x)` watches `x`.
fn alert_expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rule in alert_rules() {
        let mut expr = rule["expr"].as_str().unwrap().trim();
        if let Some(inner) = expr.strip_prefix("absent(") {
            expr = inner.strip_suffix(')').unwrap();
        }
        let watched = comparisons_to_bool(expr);
        assert!(watched.contains(" bool "), "no comparison in {expr}");
        out.push((rule["alert"].as_str().unwrap().to_string(), watched));
    }
    out
}

/// `a > 0.1 and b >= 20` → `a > bool 0.1 and b >= bool 20`: comparison operators outside label
/// matchers and strings, followed by a number.
fn comparisons_to_bool(expr: &str) -> String {
    let mut out = String::new();
    let (mut braces, mut quoted, mut escaped) = (0u32, false, false);
    let mut rest = expr;
    while let Some(c) = rest.chars().next() {
        if braces == 0 {
            let op = ["==", "!=", ">=", "<=", ">", "<"]
                .into_iter()
                .find(|op| rest.starts_with(op));
            if let Some(op) = op {
                out.push_str(op);
                rest = &rest[op.len()..];
                if rest
                    .trim_start()
                    .starts_with(|c: char| c.is_ascii_digit() || c == '-')
                {
                    out.push_str(" bool");
                }
                continue;
            }
        }
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' if braces > 0 => quoted = !quoted,
            '{' if !quoted => braces += 1,
            '}' if !quoted => braces -= 1,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[test]
fn alert_expressions_keep_what_they_watch() {
    assert_eq!(
        comparisons_to_bool(r#"sum(rate(x{a!="b",c=~"d>e"}[5m])) / y > 0.1 and on (j) z >= 20"#),
        r#"sum(rate(x{a!="b",c=~"d>e"}[5m])) / y > bool 0.1 and on (j) z >= bool 20"#
    );
    assert_eq!(comparisons_to_bool("a == b"), "a == b");
    assert_eq!(
        comparisons_to_bool(r#"x{a="}\"<1"} < 1"#),
        r#"x{a="}\"<1"} < bool 1"#
    );
}

/// Every alert has a summary, a description and a runbook entry: a `### Name` heading in the
/// README's "Alerts and runbook" section, which its `runbook` annotation points at.
#[test]
fn every_alert_has_a_runbook_entry() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("\n## Alerts and runbook\n")
        .nth(1)
        .expect("README has an \"Alerts and runbook\" section");
    let section = section.split("\n## ").next().unwrap();
    let mut names = Vec::new();
    for rule in alert_rules() {
        let name = rule["alert"].as_str().unwrap();
        let annotations = &rule["annotations"];
        for key in ["summary", "description"] {
            assert!(
                annotations[key].as_str().is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        assert_eq!(
            annotations["runbook"],
            format!("README.md#{}", name.to_lowercase()),
            "{name}'s runbook annotation"
        );
        assert!(
            section.contains(&format!("\n### {name}\n")),
            "README's \"Alerts and runbook\" has no `### {name}`"
        );
        assert!(["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap()));
        names.push(name.to_string());
    }
    // And no entry for an alert that is gone.
    for line in section.lines() {
        if let Some(name) = line.strip_prefix("### ") {
            assert!(
                names.iter().any(|n| n == name),
                "README has a runbook for {name}, which is no alert"
            );
        }
    }
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
/// BAD; fast and slow ones), bytes, a pre-login rejection, and a login over implicit TLS
/// (listener `imaps`, the second).
async fn work(proxy: &Proxy, pki: &Pki) {
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("w0 LOGIN bob wrong\r\nw1 LOGIN bob bob-secret\r\n")
        .await;
    c.until_tagged("w1").await;
    c.send(
        "w2 SELECT INBOX\r\nw3 SELECT nosuch\r\nw4 FROB\r\nw5 NOOP\r\n\
         w6 UID SEARCH ALL\r\nw7 UID FETCH 1:* (FLAGS)\r\nw8 LOGOUT\r\n",
    )
    .await;
    c.until_tagged("w8").await;
    let mut bad = proxy.connect().await;
    bad.line().await.unwrap();
    bad.send("x SELECT INBOX\r\nx2 LOGOUT\r\n").await;
    bad.until_tagged("x2").await;
    let tcp = tokio::net::TcpStream::connect(proxy.addrs[1])
        .await
        .unwrap();
    let mut tls = Raw::new(tls_client(tcp, "imap.test", &pki.ca()).await);
    tls.login("bob", "bob-secret").await;
    tls.send("t1 NOOP\r\nt2 LOGOUT\r\n").await;
    tls.until_tagged("t2").await;
}

/// imapgate with a plain listener (plaintext logins from loopback) and an implicit-TLS one,
/// with a default certificate and an SNI one. The failed-login penalty is off: each round has
/// a wrong password, and the next rounds would wait 2, 4, 8 s...
fn live_config(b1: &Dovecot, pki: &Pki) -> String {
    let (proxy, sni) = (pki.pair("proxy"), pki.pair("sni"));
    config(
        &[("b1", b1.address())],
        &format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:1\" }}\n  - {{ name: imaps, bind: \"127.0.0.1:2\", tls: implicit }}\n\
             tls:\n  cert: \"{}\"\n  key: \"{}\"\n  sni:\n    - {{ names: [other.test], cert: \"{}\", key: \"{}\" }}\n\
             health: {{ interval: 200ms }}\n\
             limits: {{ login_penalty: {{ base: 0s }} }}\n",
            proxy.cert.display(),
            proxy.key.display(),
            sni.cert.display(),
            sni.key.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data() {
    if !dovecot::available() || !tool_available("prometheus", "prometheus") {
        return;
    }
    let b1 = Dovecot::start("b1");
    let pki = Pki::new();
    let proxy = Proxy::start(&live_config(&b1, &pki)).await;
    let prometheus = start_prometheus(proxy.admin);
    let mut expressions = dashboard_expressions();
    expressions.extend(alert_expressions());
    assert!(expressions.len() >= 50, "{expressions:?}");

    // Work through the proxy until every query has data or the deadline passes.
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    loop {
        work(&proxy, &pki).await;
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

/// The rules' unit tests: synthetic series under which each alert fires, and others under
/// which it must stay silent (deploy/prometheus/alerts_test.yaml).
#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    if !tool_available("promtool", "prometheus") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts_test.yaml");
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules {}:\n{}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert is tested.
    let tests = std::fs::read_to_string(&path).unwrap();
    for rule in alert_rules() {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}\n")),
            "{name} has no unit test in {}",
            path.display()
        );
    }
}
