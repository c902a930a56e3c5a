//! One instance per address: whoever holds a listener's address already, another imapgate
//! included, makes the start fail with a clear error; SO_REUSEPORT is for imapgate's own workers.

use tokio::process::Command;

use crate::support::{DEADLINE, LogLines, Proxy, Raw, nowhere};

fn listener_config(port: u16) -> String {
    format!(
        "listeners:\n  - {{ name: imap, bind: \"127.0.0.1:{port}\" }}\nbackends:\n  - {{ name: b1, address: \"{}\" }}\nhealth: {{ interval: 1h }}\n",
        nowhere()
    )
}

/// `imapgate::bind` must fail: returns its error.
async fn bind_error(yaml: &str) -> std::io::Error {
    let config = imapgate::config::parse(yaml, "t").expect("valid config");
    match imapgate::bind(&config).await {
        Ok(_) => panic!("bound an address that is in use"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn an_address_another_process_holds_fails_the_start() {
    // A plain listener, as any other server would have: no SO_REUSEPORT.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let e = bind_error(&listener_config(addr.port())).await;
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(
        e.to_string(),
        format!("listener imap: {addr} is already in use by another process")
    );
}

/// The case SO_REUSEPORT used to let through: the second instance's sockets would have joined
/// the first's and taken a share of its connections.
#[tokio::test]
async fn a_second_imapgate_fails_and_the_first_serves_on() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = listener_config(port);
    let first = match Proxy::start_bound(&yaml).await {
        Ok(p) => p,
        Err(e) => panic!("the first imapgate binds: {e}"),
    };

    // In process, as the tests start imapgate...
    let e = bind_error(&yaml).await;
    assert_eq!(
        e.to_string(),
        format!("listener imap: 127.0.0.1:{port} is already in use by another process")
    );
    // ... and as an operator would: the binary exits with the error in its log.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imapgate.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["run", "--threads", "1", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logs = LogLines::new(second.stderr.take().unwrap());
    let status = tokio::time::timeout(DEADLINE, second.wait())
        .await
        .expect("the second imapgate exits")
        .unwrap();
    assert!(!status.success(), "{status}");
    let log = logs.rest().await;
    assert!(
        log.contains(&format!(
            "listener imap: 127.0.0.1:{port} is already in use by another process"
        )),
        "{log}"
    );

    // The first is unaffected: it accepts and greets as before.
    for _ in 0..20 {
        let mut c = Raw::connect(first.addr).await;
        let greeting = c.line().await.expect("a greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
    }
    first.stop().await;
}
