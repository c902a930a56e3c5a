//! What ships beside the binary (deploy/, grafana/): the example configurations pass
//! `check-config`; the Kubernetes manifests render with kustomize and validate strictly, and
//! say what the configuration says (ports, drain time, reload); the PrometheusRule is the alert
//! file; the systemd unit verifies, with the exposure score the README reports; `imapgate
//! generate` writes the man pages and completions; `--version` names the revision.
//!
//! The container image and the Debian package are built by `deploy/dist.sh` (in `.ci/run`):
//! the image is tested in image.rs, the package installed by `.ci/run` itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::support::pki::Pki;
use crate::support::tool_available;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(path: &str) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a command; panics with its output unless it succeeds.
pub fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The configurations that ship, each read at /etc/imapgate/imapgate.yaml somewhere.
pub const CONFIGS: &[&str] = &[
    "deploy/imapgate.example.yaml",
    "deploy/debian/imapgate.yaml",
    "deploy/kubernetes/base/imapgate.yaml",
    "deploy/kubernetes/overlays/example/imapgate.yaml",
];

/// /etc/imapgate as the shipped configurations expect it (the pod's projected volume, the
/// package's example), in `dir`: tls/tls.crt and tls/tls.key (a certificate from `pki`),
/// tls/backend-ca.pem (its CA), admin-token.
pub fn etc_imapgate(dir: &Path, pki: &Pki) {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let pair = pki.pair("proxy");
    std::fs::copy(&pair.cert, tls.join("tls.crt")).unwrap();
    std::fs::copy(&pair.key, tls.join("tls.key")).unwrap();
    std::fs::copy(pki.ca(), tls.join("backend-ca.pem")).unwrap();
    std::fs::write(
        dir.join("admin-token"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
}

/// `yaml` with its /etc/imapgate/ paths moved into `dir` (for a check outside a chroot).
fn moved(yaml: &str, dir: &Path) -> String {
    yaml.replace("/etc/imapgate/", &format!("{}/", dir.display()))
}

#[test]
fn the_shipped_configs_pass_check_config() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    etc_imapgate(dir.path(), &pki);
    for config in CONFIGS {
        let path = dir.path().join("imapgate.yaml");
        std::fs::write(&path, moved(&read(config), dir.path())).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The PrometheusRule's text: a header, then alerts.yaml (without its comment) under `spec:`.
fn prometheus_rule(alerts: &str) -> String {
    let mut out = String::from(
        "# Generated from deploy/prometheus/alerts.yaml: edit that file, then\n\
         # `IMAPGATE_REGENERATE=1 cargo test prometheus_rule` rewrites this one (the test fails while\n\
         # they differ).\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: imapgate\n  labels:\n    app.kubernetes.io/name: imapgate\n\
         spec:\n",
    );
    let body = alerts
        .lines()
        .skip_while(|l| l.starts_with('#') || l.trim().is_empty());
    for line in body {
        if !line.trim().is_empty() {
            out.push_str("  ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn prometheus_rule_is_generated_from_the_alert_file() {
    let alerts = read("deploy/prometheus/alerts.yaml");
    let wanted = prometheus_rule(&alerts);
    let path = repo().join("deploy/kubernetes/base/prometheusrule.yaml");
    if std::env::var_os("IMAPGATE_REGENERATE").is_some() {
        std::fs::write(&path, &wanted).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == wanted,
        "{} is not alerts.yaml: run `IMAPGATE_REGENERATE=1 cargo test prometheus_rule`",
        path.display()
    );
    // And the same rules once parsed, not only the same text.
    let rule: Value = serde_saphyr::from_str(&have).unwrap();
    let alerts: Value = serde_saphyr::from_str(&alerts).unwrap();
    assert_eq!(rule["spec"], alerts);
}

/// The newest two Kubernetes minor versions kubernetes-validate has schemas for.
fn newest_kubernetes_versions() -> Vec<String> {
    let out = run(Command::new("python3").args([
        "-c",
        "from kubernetes_validate.utils import all_versions\n\
         from packaging.version import Version\n\
         newest = {}\n\
         for v in all_versions():\n\
         \x20   newest[Version(v).release[:2]] = v\n\
         print(' '.join(newest[k] for k in sorted(newest)[-2:]))",
    ]));
    let versions: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(versions.len(), 2, "{versions:?}");
    versions
}

fn python_module(module: &str, package: &str) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("python3 cannot import {module} but CI is set: pip install {package}");
        }
        eprintln!(
            "\n!!!!! SKIPPED: python3 module {module} ({package}) is missing; this test did not run !!!!!\n"
        );
    }
    found
}

/// The rendered objects of a kustomization, by `kind/name`.
struct Rendered {
    text: String,
    objects: Vec<Value>,
}

impl Rendered {
    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind}/{name} in:\n{}", self.text))
    }
}

fn kustomize(dir: &Path) -> Rendered {
    let out = run(Command::new("kubectl").arg("kustomize").arg(dir));
    let text = String::from_utf8(out.stdout).unwrap();
    let objects = serde_saphyr::from_multiple::<Value>(&text).unwrap();
    Rendered { text, objects }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[test]
fn kubernetes_manifests_render_validate_and_agree_with_the_config() {
    if !tool_available("kubectl", "kubectl (with kustomize)")
        || !tool_available("kubernetes-validate", "pip install kubernetes-validate")
        || !tool_available("promtool", "prometheus")
        || !python_module(
            "cloudcoil.models.prometheus_operator",
            "cloudcoil-models-prometheus-operator",
        )
    {
        return;
    }
    // A copy of the tree, with the Secrets' files the README has the operator make.
    let tree = tempfile::tempdir().unwrap();
    copy_tree(
        &repo().join("deploy/kubernetes"),
        &tree.path().join("deploy/kubernetes"),
    );
    copy_tree(&repo().join("grafana"), &tree.path().join("grafana"));
    let overlay = tree.path().join("deploy/kubernetes/overlays/example");
    let pki = Pki::new();
    std::fs::copy(pki.pair("proxy").cert, overlay.join("tls.crt")).unwrap();
    std::fs::copy(pki.pair("proxy").key, overlay.join("tls.key")).unwrap();
    std::fs::write(
        overlay.join("admin-token"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();

    let versions = newest_kubernetes_versions();
    let rendered_dir = tempfile::tempdir().unwrap();
    let mut renders = Vec::new();
    for (name, dir) in [
        ("base", tree.path().join("deploy/kubernetes/base")),
        ("example", overlay.clone()),
    ] {
        let rendered = kustomize(&dir);
        let file = rendered_dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered.text).unwrap();
        for version in &versions {
            let out = run(Command::new("kubernetes-validate")
                .args(["--strict", "--kubernetes-version", version])
                .arg(&file));
            // It only warns about kinds it has no schema for: those must be the CRDs
            // validate_crds.py checks, and nothing else.
            let said = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            for line in said.lines().filter(|l| !l.starts_with("INFO")) {
                assert!(
                    line.contains("monitoring.coreos.com/v1"),
                    "{name} on {version}: {line}"
                );
            }
            let passed = said.lines().filter(|l| l.contains(" passed ")).count();
            assert_eq!(passed, rendered.objects.len() - 2, "{name}: {said}");
        }
        let crds = repo().join("tests/it/support/validate_crds.py");
        let out = run(Command::new("python3").arg(&crds).arg(&file));
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(said.matches("OK ").count(), 2, "{said}");
        renders.push(rendered);
    }
    let example = &renders[1];
    assert_eq!(
        example.get("Deployment", "imapgate")["metadata"]["namespace"],
        "mail"
    );

    for rendered in &renders {
        check_the_rendered_manifests(rendered, tree.path());
    }
}

/// What the manifests say against what the configuration in their ConfigMap says.
fn check_the_rendered_manifests(r: &Rendered, tree: &Path) {
    let config_text = r.get("ConfigMap", "imapgate-config")["data"]["imapgate.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let pki = Pki::new();
    let etc = tempfile::tempdir().unwrap();
    etc_imapgate(etc.path(), &pki);
    let config = imapgate::config::parse(&moved(&config_text, etc.path()), "ConfigMap")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.reload.watch, "reload on ConfigMap change");

    let deployment = r.get("Deployment", "imapgate");
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().unwrap() >= 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["securityContext"]["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let spread: Vec<&str> = pod["topologySpreadConstraints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["topologyKey"].as_str().unwrap())
        .collect();
    assert!(spread.contains(&"kubernetes.io/hostname"), "{spread:?}");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let security = &c["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));

    // Container ports: the configuration's, unprivileged, by name.
    let port = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    for l in &config.listeners {
        assert_eq!(port(&l.name) as u16, l.bind.port(), "listener {}", l.name);
        assert!(l.bind.port() >= 1024, "unprivileged: {}", l.bind);
    }
    let admin = config
        .admin
        .as_ref()
        .expect("an admin server for the probes");
    assert_eq!(port("admin") as u16, admin.bind.port());
    assert!(
        !admin.bind.ip().is_loopback(),
        "probes reach the pod's address"
    );
    assert!(admin.token.is_some(), "a token guards the admin API");

    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");

    // The drain fits: preStop, then shutdown_grace, then up to 10 s for the response in
    // flight before the BYE, all inside the grace period.
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let shutdown = seconds(config.timeouts.shutdown_grace);
    assert!(
        grace > pre_stop + shutdown + 10,
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + shutdown_grace {shutdown} + 10"
    );

    // The config file, the Secrets and the mount agree on paths.
    let mount = &c["volumeMounts"][0];
    assert_eq!(mount["mountPath"], "/etc/imapgate");
    assert_eq!(mount["readOnly"], true);
    let sources = pod["volumes"][0]["projected"]["sources"]
        .as_array()
        .unwrap();
    let mut files = Vec::new();
    for source in sources {
        let (kind, from) = if source.get("configMap").is_some() {
            ("ConfigMap", &source["configMap"])
        } else {
            ("Secret", &source["secret"])
        };
        let name = from["name"].as_str().unwrap();
        let is_generated = r
            .objects
            .iter()
            .any(|o| o["kind"] == kind && o["metadata"]["name"] == name);
        // The base leaves the Secrets to the overlay.
        let in_base = !r.text.contains("kind: Secret");
        assert!(
            is_generated || (kind == "Secret" && in_base),
            "{kind} {name}"
        );
        for item in from["items"].as_array().unwrap() {
            files.push(format!("/etc/imapgate/{}", item["path"].as_str().unwrap()));
        }
    }
    for wanted in ["/etc/imapgate/imapgate.yaml", "/etc/imapgate/admin-token"] {
        assert!(files.iter().any(|f| f == wanted), "{wanted} in {files:?}");
    }
    for path in ["tls/tls.crt", "tls/tls.key"] {
        let wanted = format!("/etc/imapgate/{path}");
        assert!(config_text.contains(&wanted), "the config reads {wanted}");
        assert!(files.contains(&wanted), "{wanted} in {files:?}");
    }

    // The clients' Service: 143 and 993 onto the named container ports; the source kept.
    let service = r.get("Service", "imapgate");
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
    let mapped: Vec<(u64, &str)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["targetPort"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(mapped, [(143, "imap"), (993, "imaps")]);
    let admin_service = r.get("Service", "imapgate-admin");
    assert_eq!(admin_service["spec"]["type"], "ClusterIP");

    assert_eq!(
        r.get("PodDisruptionBudget", "imapgate")["spec"]["maxUnavailable"],
        1
    );
    let hpa = r.get("HorizontalPodAutoscaler", "imapgate");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");

    // The admin port only from the monitoring namespace; IMAP from anywhere.
    let policy = r.get("NetworkPolicy", "imapgate");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    for rule in rules {
        let ports: Vec<&str> = rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_str().unwrap())
            .collect();
        if ports.contains(&"admin") {
            assert_eq!(ports, ["admin"]);
            assert_eq!(
                rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                "monitoring"
            );
        } else {
            assert!(rule.get("from").is_none(), "{rule}");
        }
    }

    let monitor = r.get("ServiceMonitor", "imapgate");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "admin");
    // The alert rules expect job="imapgate": the Service label jobLabel names must say so.
    let job_label = monitor["spec"]["jobLabel"].as_str().unwrap();
    assert_eq!(admin_service["metadata"]["labels"][job_label], "imapgate");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        admin_service["metadata"]["labels"]
    );

    // The PrometheusRule is the alert file, and promtool takes its rules.
    let rule = r.get("PrometheusRule", "imapgate");
    let alerts: Value = serde_saphyr::from_str(&read("deploy/prometheus/alerts.yaml")).unwrap();
    assert_eq!(rule["spec"], alerts);
    let rules_file = tree.join("rules-from-the-manifest.json");
    std::fs::write(&rules_file, rule["spec"].to_string()).unwrap();
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_file));

    // The dashboard for Grafana's sidecar is the dashboard file itself.
    let dashboard = r.get("ConfigMap", "imapgate-grafana-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        dashboard["data"]["imapgate.json"].as_str().unwrap(),
        read("grafana/imapgate.json")
    );
}

/// deploy/grafana/: a Prometheus data source of the type the dashboard's `datasource` variable
/// lists, and a file provider for the directory the README installs grafana/imapgate.json into.
#[test]
fn the_grafana_provisioning_example_loads_the_dashboard() {
    let datasources: Value =
        serde_saphyr::from_str(&read("deploy/grafana/datasource.yaml")).unwrap();
    let dashboard: Value = serde_json::from_str(&read("grafana/imapgate.json")).unwrap();
    let variable = &dashboard["templating"]["list"][0];
    assert_eq!(variable["type"], "datasource");
    assert_eq!(datasources["apiVersion"], 1);
    let source = &datasources["datasources"][0];
    assert_eq!(source["type"], variable["query"]);
    assert_eq!(
        source["isDefault"], true,
        "the variable starts on the default"
    );

    let providers: Value = serde_saphyr::from_str(&read("deploy/grafana/dashboards.yaml")).unwrap();
    assert_eq!(providers["apiVersion"], 1);
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"], "file");
    let path = provider["options"]["path"].as_str().unwrap();
    let install = format!("grafana/imapgate.json {path}/imapgate.json");
    for doc in ["README.md", "deploy/grafana/dashboards.yaml"] {
        assert!(
            read(doc).contains(&install),
            "{doc} installs the dashboard into {path}"
        );
    }
}

/// The unit with ExecStart's binary moved to the one cargo built (systemd-analyze verify
/// checks that the binary exists); `.ci/run` verifies the installed unit as it is, man page
/// included.
#[test]
fn the_systemd_unit_verifies_and_the_readme_reports_its_exposure() {
    if !tool_available("systemd-analyze", "systemd") {
        return;
    }
    let unit = read("deploy/systemd/imapgate.service");
    for wanted in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=1048576",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.lines().any(|l| l == wanted), "{wanted}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/imapgate", env!("CARGO_BIN_EXE_imapgate")),
    )
    .unwrap();
    // The man page its Documentation= names is installed by the package, not here.
    run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path));

    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path));
    let text = String::from_utf8_lossy(&out.stdout);
    let score = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for imapgate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"))
        .to_string();
    assert!(
        score.parse::<f64>().unwrap() < 2.0,
        "exposure {score}:\n{text}"
    );
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("exposure level of {score}")),
        "the README reports `systemd-analyze security` as \"exposure level of {score}\""
    );
}

#[test]
fn generate_writes_man_pages_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .arg("generate")
        .arg(dir.path()));
    let page = std::fs::read_to_string(dir.path().join("man/imapgate.1")).unwrap();
    assert!(page.contains(".TH imapgate 1"), "{page}");
    assert!(page.contains(env!("IMAPGATE_REVISION")), "{page}");
    for sub in ["run", "check-config", "route"] {
        let sub_page = dir.path().join(format!("man/imapgate-{sub}.1"));
        assert!(sub_page.exists(), "{}", sub_page.display());
    }
    assert!(
        !dir.path().join("man/imapgate-generate.1").exists(),
        "the hidden packaging command has no page"
    );
    for file in ["imapgate.bash", "_imapgate", "imapgate.fish"] {
        let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
        assert!(text.contains("check-config"), "{file}");
    }
    if tool_available("bash", "bash") {
        run(Command::new("bash")
            .arg("-n")
            .arg(dir.path().join("completions/imapgate.bash")));
    }
}

#[test]
fn version_names_the_git_revision() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_imapgate")).arg("--version"));
    let revision = env!("IMAPGATE_REVISION");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "imapgate {} (revision {revision})\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    // In a checkout (CI's is one), the revision is the commit the test binary was built
    // from: build.rs reran when HEAD moved.
    if let Ok(head) = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output()
        && head.status.success()
        && std::env::var_os("IMAPGATE_REVISION").is_none()
    {
        assert_eq!(String::from_utf8_lossy(&head.stdout).trim(), revision);
    }
}

/// `Type=notify`: READY=1 once the listeners are bound (the port takes connections when systemd
/// hears it), STOPPING=1 at SIGTERM.
#[test]
fn the_binary_tells_systemd_when_it_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(crate::support::DEADLINE))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("imapgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\n",
            crate::support::nowhere()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "--threads", "1", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within the deadline");
    assert_eq!(&buf[..n], b"READY=1");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listening when ready");

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = socket
        .recv(&mut buf)
        .expect("STOPPING=1 within the deadline");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}
