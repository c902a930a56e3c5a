//! The container image, proven without a container runtime (this sandbox refuses to run one):
//! its filesystem comes out of `podman create` + `podman export`, and its own entrypoint and
//! command run from that root (chroot, in a private mount namespace; the root read-only as
//! with readOnlyRootFilesystem, /etc/imapgate mounted as the pod mounts it) as its numeric
//! user, in front of a real Dovecot that it finds by name through DNS. A login and a FETCH go
//! through it, plainly and over TLS.
//!
//! `.ci/run` builds the image (`deploy/dist.sh image`) and names it in `IMAPGATE_TEST_IMAGE`.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::deploy::{CONFIGS, etc_imapgate, read, run};
use crate::support::dns::Dns;
use crate::support::dovecot::{self, Dovecot};
use crate::support::pki::Pki;
use crate::support::{DEADLINE, LogLines, Raw, http, http_get, sample, tool_available};

/// The size the issue allows.
const MAX_IMAGE_BYTES: u64 = 15_000_000;

/// What a container runtime does before it starts the entrypoint, and no more: mounts the
/// configuration read-only at /etc/imapgate, /proc and /dev, makes the root read-only, and
/// starts the command as the image's user. `$1` the root, `$2` the config dir, then the command.
const START: &str = r#"set -e
root=$1; etc=$2; shift 2
mount --bind "$etc" "$root/etc/imapgate"
mount -o remount,bind,ro "$root/etc/imapgate"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind "$root" "$root"
mount -o remount,bind,ro "$root"
exec chroot --userspec="$USERSPEC" "$root" "$@"
"#;

fn image() -> Option<String> {
    match std::env::var("IMAPGATE_TEST_IMAGE") {
        Ok(image) if !image.is_empty() => Some(image),
        _ => {
            crate::support::external(
                false,
                "no IMAPGATE_TEST_IMAGE: build the image (deploy/dist.sh image) and set it to the tag",
            );
            None
        }
    }
}

/// `podman image inspect`'s object for `image`.
fn inspect(image: &str) -> Value {
    let out = run(Command::new("podman").args(["image", "inspect", image]));
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all[0].clone()
}

/// The image's filesystem, as `podman export` writes a container made from it.
fn export(image: &str, root: &Path) {
    let out = run(Command::new("podman").args(["create", image]));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let tar = root.with_extension("tar");
    let exported = Command::new("podman")
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&id)
        .output();
    run(Command::new("podman").args(["rm", &id]));
    let exported = exported.unwrap();
    assert!(exported.status.success(), "{exported:?}");
    std::fs::create_dir_all(root).unwrap();
    run(Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(root));
    std::fs::remove_file(&tar).unwrap();
}

fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            files_under(root, &entry.path(), out);
        } else {
            let path = entry.path();
            out.insert(format!("/{}", path.strip_prefix(root).unwrap().display()));
        }
    }
}

/// Whether an ELF executable asks for a dynamic loader (a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "64-bit");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entry_size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * entry_size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// The image's command in its root, as `userspec`, with `etc` at /etc/imapgate.
fn in_image(root: &Path, etc: &Path, userspec: &str, command: &[String]) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        START,
        "sh",
    ])
    .arg(root)
    .arg(etc)
    .args(command)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    .env("USERSPEC", userspec);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status_line(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn the_image_runs_from_its_exported_rootfs_in_front_of_dovecot() {
    let Some(image) = image() else {
        return;
    };
    if !dovecot::available()
        || !tool_available("podman", "podman")
        || !tool_available("unshare", "util-linux")
    {
        return;
    }

    // The image's own configuration.
    let inspected = inspect(&image);
    let config = &inspected["Config"];
    let size = inspected["Size"].as_u64().unwrap();
    assert!(size <= MAX_IMAGE_BYTES, "the image is {size} bytes");
    eprintln!("image {image}: {size} bytes");
    let user = config["User"].as_str().unwrap();
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let (uid, gid): (u32, u32) = (uid.parse().unwrap(), gid.parse().unwrap());
    assert!(uid != 0 && gid != 0, "a numeric non-root user: {user}");
    assert_eq!(config["StopSignal"], "SIGTERM");
    let exposed: BTreeSet<&str> = config["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from(["1143/tcp", "1993/tcp", "9143/tcp"])
    );
    let labels = &config["Labels"];
    let version = labels["org.opencontainers.image.version"].as_str().unwrap();
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert!(revision != "unknown" && !revision.is_empty(), "{labels}");
    assert!(labels.get("org.opencontainers.image.source").is_some());
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let entrypoint = strings(&config["Entrypoint"]);
    let command: Vec<String> = entrypoint
        .iter()
        .cloned()
        .chain(strings(&config["Cmd"]))
        .collect();
    assert!(
        command.ends_with(&["--config".into(), "/etc/imapgate/imapgate.yaml".into()]),
        "{command:?}"
    );

    // Its filesystem: the binary, statically linked, and three files in /etc. No shell.
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("rootfs");
    export(&image, &root);
    let mut files = BTreeSet::new();
    files_under(&root, &root, &mut files);
    let expected: BTreeSet<String> = [
        entrypoint[0].as_str(),
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files, expected);
    let binary = std::fs::read(root.join(entrypoint[0].trim_start_matches('/'))).unwrap();
    assert!(!has_interpreter(&binary), "a static binary");

    // What the runtime provides: mount points, /etc/hosts, /etc/resolv.conf (the cluster's
    // DNS: here a server that knows the backend's name).
    for dir in ["proc", "dev", "etc/imapgate"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let dns = Dns::start("dovecot.imapgate.test", std::net::Ipv4Addr::LOCALHOST);
    std::fs::write(
        root.join("etc/resolv.conf"),
        format!(
            "nameserver {}\nsearch imapgate.test\noptions timeout:1 attempts:3\n",
            dns.addr.ip()
        ),
    )
    .unwrap();
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();

    // /etc/imapgate as a pod has it: root's files, readable by the image's group only.
    let pki = Pki::new();
    let etc = scratch.path().join("etc-imapgate");
    std::fs::create_dir(&etc).unwrap();
    etc_imapgate(&etc, &pki);
    let b1 = Dovecot::start("b1");
    let (port, tls_port, admin_port) = (free_port(), free_port(), free_port());
    std::fs::write(
        etc.join("imapgate.yaml"),
        format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\n  - {{ name: imaps, bind: \"127.0.0.1:{tls_port}\", tls: implicit }}\n\
             tls: {{ cert: /etc/imapgate/tls/tls.crt, key: /etc/imapgate/tls/tls.key }}\n\
             backends:\n  - {{ name: b1, address: \"dovecot:{}\" }}\n\
             admin: {{ bind: \"127.0.0.1:{admin_port}\", token_file: /etc/imapgate/admin-token }}\n\
             health: {{ interval: 200ms }}\ntimeouts: {{ shutdown_grace: 1s }}\n",
            b1.port
        ),
    )
    .unwrap();
    for (n, shipped) in CONFIGS.iter().enumerate() {
        std::fs::write(etc.join(format!("shipped-{n}.yaml")), read(shipped)).unwrap();
    }
    restrict(&etc, gid);
    let userspec = format!("{uid}:{gid}");

    // The shipped configurations, as they are, at the paths they name.
    for (n, shipped) in CONFIGS.iter().enumerate() {
        let check = [
            entrypoint[0].clone(),
            "check-config".into(),
            format!("/etc/imapgate/shipped-{n}.yaml"),
        ];
        let out = in_image(&root, &etc, &userspec, &check).output().unwrap();
        assert!(
            out.status.success(),
            "{shipped} in the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&mut in_image(
        &root,
        &etc,
        &userspec,
        &[entrypoint[0].clone(), "--version".into()],
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("imapgate {version} (revision {revision})\n"),
        "the labels say what the binary says"
    );

    // The entrypoint and command, as the image's user.
    let mut child = tokio::process::Command::from(in_image(&root, &etc, &userspec, &command));
    child.stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = child.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut logs = LogLines::new(child.stderr.take().unwrap());
    logs.wait_for("listening").await;
    assert_eq!(status_line(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_line(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(status_line(pid, "CapEff"), "0000000000000000");

    // Ready once the backend, found through DNS, passes its health check.
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            logs.rest().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dns.answered.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the name was resolved through DNS"
    );

    // A login and a FETCH through it.
    let message =
        "From: a@example.net\r\nSubject: through the image\r\n\r\nHello from the rootfs.\r\n";
    let mut c = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    c.login("alice", "alice-secret").await;
    c.send(format!(
        "a APPEND INBOX {{{}+}}\r\n{message}\r\n",
        message.len()
    ))
    .await;
    assert!(c.until_tagged("a").await.1.starts_with("a OK"));
    c.send("s SELECT INBOX\r\n").await;
    assert!(c.until_tagged("s").await.1.starts_with("s OK"));
    c.send("f FETCH 1 BODY[]\r\n").await;
    let head = c.line().await.unwrap();
    assert!(
        head.starts_with("* 1 FETCH") && head.contains(&format!("{{{}}}", message.len())),
        "{head}"
    );
    assert_eq!(c.bytes(message.len()).await, message.as_bytes());
    assert!(c.until_tagged("f").await.1.starts_with("f OK"));

    // And over implicit TLS, with the certificate from the mounted Secret.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port))
        .await
        .unwrap();
    let mut t = Raw::new(crate::support::tls_client(tcp, "imap.test", &pki.ca()).await);
    t.login("bob", "bob-secret").await;
    assert_eq!(t.backend().await, "b1");

    // The metrics name the build; the token file guards the admin API.
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_build_info",
            &format!("version=\"{version}\",revision=\"{revision}\"")
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(http(admin, "GET", "/sessions", None).await.0, 401);
    let token = "0123456789abcdef0123456789abcdef";
    assert_eq!(http(admin, "GET", "/sessions", Some(token)).await.0, 200);

    // SIGTERM (the image's STOPSIGNAL): the drain, then a clean exit.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = logs.rest().await;
    assert!(status.success(), "{status}: {log}");
    assert!(c.rest().await.contains("* BYE [UNAVAILABLE]"), "{log}");
}

/// Owned by root, readable by `gid` and nobody else (a Secret with fsGroup and mode 0440).
fn restrict(dir: &Path, gid: u32) {
    std::os::unix::fs::chown(dir, Some(0), Some(gid)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            restrict(&path, gid);
        } else {
            std::os::unix::fs::chown(&path, Some(0), Some(gid)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        }
    }
}
