//! Out of file descriptors: imapgate keeps the sessions it has, stops accepting (the kernel
//! holds new connections in the backlog), logs it once, counts it, and accepts again by itself
//! once descriptors are free. Runs the real binary under a low `RLIMIT_NOFILE`.

use std::os::unix::process::CommandExt;

use tokio::net::TcpStream;
use tokio::process::Command;

use crate::support::{DEADLINE, LogLines, Raw, free_port, http_get, nowhere, sample};

/// Low enough to reach with a handful of connections, high enough to start.
const FILE_LIMIT: libc::rlim_t = 40;

#[tokio::test]
async fn out_of_descriptors_backs_off_and_recovers() {
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("imapgate.yaml");
    std::fs::write(
        &config_path,
        format!(
            "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\nadmin: {{ bind: \"127.0.0.1:{admin_port}\" }}\nhealth: {{ interval: 1h }}\n",
            nowhere()
        ),
    )
    .unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_imapgate"));
    command
        .args(["run", "--threads", "1", "--config"])
        .arg(&config_path)
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: FILE_LIMIT,
                rlim_max: FILE_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Command::from(command).kill_on_drop(true).spawn().unwrap();
    let mut logs = LogLines::new(child.stderr.take().unwrap());
    logs.wait_for("listening").await;

    // Connect until imapgate reports a failed accept. Linux hands out the descriptor before it
    // looks for a connection, so the report comes as soon as the last descriptor is taken: the
    // client that triggered it may or may not have been accepted. From then on every
    // descriptor is in use until a session ends.
    let mut clients = Vec::new();
    let last = loop {
        assert!(clients.len() < FILE_LIMIT as usize, "never ran out");
        let mut client = Raw::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        tokio::select! {
            greeting = client.line() => {
                assert!(greeting.unwrap().starts_with("* OK"));
                clients.push(client);
            }
            _ = logs.wait_for("accept failed; backing off") => break client,
        }
    };
    assert!(clients.len() > 5, "only {} sessions fit", clients.len());
    // This one waits in the kernel's backlog.
    let waiting = Raw::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());

    // The sessions imapgate has keep working.
    let first = &mut clients[0];
    first.send("a NOOP\r\n").await;
    assert!(first.until_tagged("a").await.1.starts_with("a OK"));

    // Sessions end: their descriptors let the waiting connections in, by themselves, with one
    // to spare (so the accept loop finds an empty backlog, not an empty descriptor table).
    for _ in 0..4 {
        let mut gone = clients.pop().unwrap();
        gone.send("z LOGOUT\r\n").await;
        gone.rest().await;
    }
    for mut client in [last, waiting] {
        let greeting = client.line().await.expect("the waiting client is served");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        clients.push(client);
    }
    logs.wait_for("accepting again").await;

    let (status, metrics) = http_get(([127, 0, 0, 1], admin_port).into(), "/metrics").await;
    assert_eq!(status, 200);
    let failed = sample(
        &metrics,
        "imapgate_accept_errors_total",
        "listener=\"imap\",reason=\"fd_limit\"",
    )
    .unwrap_or_else(|| panic!("no fd_limit count in\n{metrics}"));
    assert!(failed >= 1.0, "{failed}");

    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    drop(clients);
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let log = logs.rest().await;
    assert_eq!(
        log.matches("accept failed").count(),
        1,
        "logged once per episode:\n{log}"
    );
}
