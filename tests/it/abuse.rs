//! The abuse limits shared across connections (`limits.login_penalty`, `per_user`,
//! `connection_rate`) against a real Dovecot, from two client addresses: 127.0.0.1 and
//! 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux).

use std::time::{Duration, Instant};

use crate::support::dovecot::{self, Dovecot};
use crate::support::{DEADLINE, Proxy, Raw, config, metrics_when, sample};

/// A connection to the proxy from `local` (an address of this host).
async fn connect_from(proxy: &Proxy, local: &str) -> Raw {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{local}:0").parse().expect("address"))
        .expect("bind the client side");
    let stream = tokio::time::timeout(DEADLINE, socket.connect(proxy.addr))
        .await
        .expect("connect deadline")
        .expect("connect");
    Raw::new(stream)
}

/// Greeting, then LOGIN with `password`: how long the answer took, and the answer.
async fn login_timed(c: &mut Raw, user: &str, password: &str) -> (Duration, String) {
    let greeting = c.line().await.expect("greeting");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let started = Instant::now();
    c.send(format!("t LOGIN {user} {password}\r\n")).await;
    let (_, answer) = c.until_tagged("t").await;
    (started.elapsed(), answer)
}

fn rejections(metrics: &str, reason: &str) -> f64 {
    sample(
        metrics,
        "imapgate_prelogin_rejections_total",
        &format!("reason=\"{reason}\""),
    )
    .unwrap_or_else(|| panic!("no {reason} series:\n{metrics}"))
}

fn table_entries(metrics: &str, table: &str) -> Option<f64> {
    sample(
        metrics,
        "imapgate_abuse_table_entries",
        &format!("table=\"{table}\""),
    )
}

/// Wrong passwords from one address, each on a new connection (so `login_attempts` never ends
/// one): each NO comes later than the one before, as configured; another address is not
/// delayed, and neither is a right password from the punished one.
///
/// Dovecot answers every failure late too, on its failure timer (every 500 ms, even with
/// `auth_failure_delay = 0`; the test instances have Dovecot's own per-address penalty off). So
/// the configured delays are lower bounds, and "not delayed" means no later than the first,
/// unpunished failure plus less than the least penalty.
#[tokio::test]
async fn failed_logins_cost_their_address_more_each_time() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let base = Duration::from_millis(300);
    let max = Duration::from_secs(1);
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        "limits:\n  login_penalty: { base: 300ms, max: 1s, forget_after: 10m }\n",
    ))
    .await;

    // The schedule for failures 1 to 6: 0, base, 2 × base, then the cap.
    let configured = [Duration::ZERO, base, 2 * base, max, max, max];
    let mut took = Vec::new();
    for expected in configured {
        let mut c = connect_from(&proxy, "127.0.0.1").await;
        let (t, answer) = login_timed(&mut c, "bob", "wrong").await;
        assert!(
            answer.starts_with("t NO [AUTHENTICATIONFAILED]"),
            "{answer}"
        );
        assert!(
            t >= expected,
            "failure {}: answered after {t:?}, the penalty is {expected:?}",
            took.len() + 1
        );
        took.push(t);
    }
    eprintln!("failures answered after {took:?}");
    let unpunished = took[0];
    let m = proxy.metrics().await;
    assert_eq!(rejections(&m, "login_penalty"), 5.0, "five delayed NOs");
    assert_eq!(table_entries(&m, "login_penalty"), Some(1.0));

    // Another address: its first failure is not delayed.
    let mut other = connect_from(&proxy, "127.0.0.2").await;
    let (t, answer) = login_timed(&mut other, "bob", "wrong").await;
    assert!(
        answer.starts_with("t NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );
    assert!(
        t < unpunished + base,
        "another address waited {t:?} (an unpunished failure: {unpunished:?})"
    );
    // The punished address still logs in at once with the right password.
    let mut right = connect_from(&proxy, "127.0.0.1").await;
    let (t, answer) = login_timed(&mut right, "bob", "bob-secret").await;
    assert!(answer.starts_with("t OK"), "{answer}");
    assert!(t < base, "a successful login waited {t:?}");
    let m = proxy.metrics().await;
    assert_eq!(rejections(&m, "login_penalty"), 5.0, "no more delays");
    assert_eq!(table_entries(&m, "login_penalty"), Some(2.0));
    proxy.stop().await;
}

/// `per_user: 1`: a second session of the same user (spelled in capitals: the normalised
/// routing key counts) is authenticated by the backend, then refused with NO [LIMIT] and
/// logged out of the backend; the first session goes on, and once it ends the user may log
/// in again. A wrong password is a failed login, not a limit: the check comes after the
/// backend's verdict.
#[tokio::test]
async fn per_user_limit_refuses_a_second_session() {
    if !dovecot::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let proxy = Proxy::start(&config(
        &[("b1", b1.address())],
        "limits: { per_user: 1 }\n",
    ))
    .await;
    let mut first = proxy.connect().await;
    first.login("alice", "alice-secret").await;

    let mut second = proxy.connect().await;
    let (_, answer) = login_timed(&mut second, "ALICE", "alice-secret").await;
    assert_eq!(answer, "t NO [LIMIT] Too many sessions for this user.\r\n");
    // The backend's login was undone with a LOGOUT, not left open or cut.
    b1.wait_for_info_line(|l| l.contains("imap(alice)") && l.contains("Logged out"))
        .await;
    second.send("w LOGIN alice wrong\r\n").await;
    let (_, answer) = second.until_tagged("w").await;
    assert!(
        answer.starts_with("w NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );

    // Other users are not counted against alice.
    let mut bob = proxy.connect().await;
    bob.login("bob", "bob-secret").await;
    // The first session still works.
    first.send("f1 SELECT INBOX\r\n").await;
    assert!(first.until_tagged("f1").await.1.starts_with("f1 OK"));
    let m = proxy.metrics().await;
    assert_eq!(rejections(&m, "per_user"), 1.0);
    assert_eq!(table_entries(&m, "per_user"), Some(2.0), "alice and bob");

    // Once the first session is over, alice may log in again (on the connection that was
    // refused: it is still in pre-login).
    first.send("f2 LOGOUT\r\n").await;
    first.rest().await;
    metrics_when(&proxy, |m| table_entries(m, "per_user") == Some(1.0)).await;
    second.send("a LOGIN alice alice-secret\r\n").await;
    let (_, answer) = second.until_tagged("a").await;
    assert!(answer.starts_with("a OK"), "{answer}");
    second.send("s SELECT INBOX\r\n").await;
    assert!(second.until_tagged("s").await.1.starts_with("s OK"));
    proxy.stop().await;
}

/// `connection_rate`: a burst of new connections from one address beyond the bucket gets
/// `* BYE [UNAVAILABLE]` and the close; another address has a bucket of its own. No backend is
/// needed: the refusal comes before the greeting.
#[tokio::test]
async fn connections_over_the_rate_get_bye() {
    let nowhere = crate::support::nowhere();
    // One new token per 10 s: none comes back while the test runs.
    let proxy = Proxy::start(&config(
        &[("b1", nowhere)],
        "limits:\n  connection_rate: { per_second: 0.1, burst: 3 }\n",
    ))
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = proxy.connect().await;
        let greeting = c.line().await.expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        open.push(c);
    }
    for _ in 0..2 {
        let mut over = proxy.connect().await;
        assert_eq!(
            over.rest().await,
            "* BYE [UNAVAILABLE] Too many connections from your address, try again later.\r\n"
        );
    }
    // Closing connections gives no tokens back: it is a rate, not a cap.
    drop(open);
    let mut over = proxy.connect().await;
    assert!(over.rest().await.starts_with("* BYE [UNAVAILABLE]"));

    let mut other = connect_from(&proxy, "127.0.0.2").await;
    let greeting = other.line().await.expect("greeting");
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let m = proxy.metrics().await;
    assert_eq!(rejections(&m, "connection_rate"), 3.0);
    assert_eq!(rejections(&m, "connection_limit"), 0.0, "not the caps");
    assert_eq!(table_entries(&m, "connection_rate"), Some(2.0));
    proxy.stop().await;
}

/// Behind a PROXY balancer every connection comes from the balancer: the rate is kept for the
/// address each header carries, so one client over its rate does not shut out the others.
#[tokio::test]
async fn behind_a_proxy_balancer_the_rate_is_per_client() {
    let nowhere = crate::support::nowhere();
    let proxy = Proxy::start(&config(
        &[("b1", nowhere)],
        "listeners:\n  - { name: lb, bind: \"127.0.0.1:1\", proxy_protocol: required, trusted_proxies: [\"127.0.0.1\"] }\n\
         limits:\n  connection_rate: { per_second: 0.1, burst: 2 }\n",
    ))
    .await;
    let via_balancer = |client: &'static str| {
        let proxy = &proxy;
        async move {
            let mut c = proxy.connect().await;
            c.send(format!("PROXY TCP4 {client} 127.0.0.1 40001 143\r\n"))
                .await;
            c.line().await.unwrap_or_default()
        }
    };
    for _ in 0..2 {
        assert!(via_balancer("203.0.113.7").await.starts_with("* OK"));
    }
    assert!(
        via_balancer("203.0.113.7")
            .await
            .starts_with("* BYE [UNAVAILABLE]")
    );
    assert!(via_balancer("203.0.113.8").await.starts_with("* OK"));
    let m = proxy.metrics().await;
    assert_eq!(rejections(&m, "connection_rate"), 1.0);
    assert_eq!(table_entries(&m, "connection_rate"), Some(2.0));
    proxy.stop().await;
}
