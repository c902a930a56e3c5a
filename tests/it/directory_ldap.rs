//! Routing from LDAP: a private slapd whose entries' `mailHost` (and `mailPort`) point at one of
//! two real Dovecots; `backend()` shows where each login landed.

use std::time::Duration;

use crate::support::dovecot::{self, Dovecot};
use crate::support::pki::Pki;
use crate::support::slapd::{self, BASE, BIND_DN, Slapd, person};
use crate::support::{Proxy, config, sample};

fn ldap_yaml(
    backends: &[(&str, String)],
    slapd: &Slapd,
    extra_ldap: &str,
    cache_and_fallback: &str,
) -> String {
    config(
        backends,
        &format!(
            "admin: {{ bind: \"127.0.0.1:9143\" }}\nhealth: {{ interval: 1h }}\nrouting:\n  lookup:\n    ldap:\n      url: \"{}\"\n      bind_dn: \"{BIND_DN}\"\n      bind_password_file: {:?}\n      base: \"{BASE}\"\n      filter: \"(&(objectClass=inetOrgPerson)(uid=%u))\"\n      host_attribute: mailHost\n      port_attribute: mailPort\n      timeout: 2s\n      pool_size: 2\n{extra_ldap}{cache_and_fallback}",
            slapd.url(),
            slapd.bind_password_file(),
        ),
    )
}

fn lookups(metrics: &str, result: &str) -> f64 {
    sample(
        metrics,
        "imapgate_directory_lookups_total",
        &format!("source=\"ldap\",result=\"{result}\""),
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn directory_ldap_routes_each_user_to_its_mail_host_and_escapes_the_filter() {
    if !dovecot::available() || !slapd::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    // alice: host and port attributes; bob: host only (default_port); carol: host:port in
    // mailHost; erin: an entry without mailHost; dave: no entry.
    let entries = [
        person("alice", Some("127.0.0.1"), Some(b2.port)),
        person("bob", Some("127.0.0.1"), None),
        person("carol", Some(&b2.address()), None),
        person("erin", None, None),
    ]
    .concat();
    let ldap = Slapd::start(&entries);
    let proxy = Proxy::start(&ldap_yaml(
        &[("b1", b1.address()), ("b2", b2.address())],
        &ldap,
        &format!("      default_port: {}\n", b1.port),
        "    cache: { ttl: 0s, negative_ttl: 0s }\n    fallback: refuse\n",
    ))
    .await;
    for (user, password, expected) in [
        ("alice", "alice-secret", "b2"),
        ("bob", "bob-secret", "b1"),
        ("carol", "carol-secret", "b2"),
        ("alice", "alice-secret", "b2"),
    ] {
        let mut c = proxy.connect().await;
        c.login(user, password).await;
        assert_eq!(c.backend().await, expected, "{user}");
    }
    let metrics = proxy.metrics().await;
    assert_eq!(lookups(&metrics, "ok"), 4.0);

    // Not in the directory: refused as an unknown user, no backend asked.
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN dave dave-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(
        answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );

    // Filter injection: unescaped, `*` would match every entry, `al*` and `alice)(uid=*`
    // alice's; escaped, each is a user name nobody has. Every one is "not found" (not a
    // route, not an ambiguity error), and the client gets the unknown user's NO.
    let attempts = [
        "*",
        "al*",
        "alice)(uid=*",
        "*)(|(uid=*",
        "alice\\\\",
        "(uid=alice)",
    ];
    for user in attempts {
        let mut c = proxy.connect().await;
        c.line().await.unwrap();
        c.send(format!("a LOGIN \"{user}\" alice-secret\r\n")).await;
        let (_, answer) = c.until_tagged("a").await;
        assert!(
            answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
            "{user}: {answer}"
        );
    }
    let metrics = proxy.metrics().await;
    assert_eq!(lookups(&metrics, "ok"), 4.0, "no injection found an entry");
    assert_eq!(
        lookups(&metrics, "error"),
        0.0,
        "no injection widened the filter"
    );
    assert_eq!(
        lookups(&metrics, "not_found"),
        1.0 + attempts.len() as f64,
        "{metrics}"
    );

    // An entry without a host is the directory's mistake: an error, so the fallback for a
    // directory that cannot answer (refuse: UNAVAILABLE), not "unknown user".
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN erin erin-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    let metrics = proxy.metrics().await;
    assert_eq!(lookups(&metrics, "error"), 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn directory_ldap_outage_is_served_from_the_cache_then_the_fallback_and_recovers() {
    if !dovecot::available() || !slapd::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let hash_yaml = config(&[("b1", b1.address()), ("b2", b2.address())], "");
    let hash_config = imapgate::config::parse(&hash_yaml, "hash").unwrap();
    // Each user's entry names the backend the hash would not pick, so the cache (alice) and
    // the directory (bob, at the end) are what send them there.
    let bob_hashed = hash_config.backends[imapgate::backends_for(&hash_config, "bob")[0]]
        .name
        .to_string();
    let alice_hashed = hash_config.backends[imapgate::backends_for(&hash_config, "alice")[0]]
        .name
        .to_string();
    let (alice_home, alice_port) = if alice_hashed == "b1" {
        ("b2", b2.port)
    } else {
        ("b1", b1.port)
    };
    let (bob_home, bob_port) = if bob_hashed == "b1" {
        ("b2", b2.port)
    } else {
        ("b1", b1.port)
    };
    let mut ldap = Slapd::start(
        &[
            person("alice", Some("127.0.0.1"), Some(alice_port)),
            person("bob", Some("127.0.0.1"), Some(bob_port)),
        ]
        .concat(),
    );
    let proxy = Proxy::start(&ldap_yaml(
        &[("b1", b1.address()), ("b2", b2.address())],
        &ldap,
        "",
        "    cache: { ttl: 0s, stale_max_age: 1h }\n    fallback: hash\n",
    ))
    .await;
    // Warm: alice's route is kept (ttl 0: every login asks, the answer stays for outages).
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, alice_home);

    ldap.stop();
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(
        c.backend().await,
        alice_home,
        "served from the cache while LDAP is down"
    );
    let mut c = proxy.connect().await;
    c.login("bob", "bob-secret").await;
    assert_eq!(
        c.backend().await,
        bob_hashed,
        "never seen: the fallback (hash)"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "imapgate_directory_cache_total",
            "result=\"stale\""
        ),
        Some(1.0)
    );
    assert_eq!(lookups(&metrics, "error"), 2.0);

    // Back: the kept connection died with the server; a new one is made and bound.
    ldap.restart();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = proxy.connect().await;
    c.login("bob", "bob-secret").await;
    assert_eq!(c.backend().await, bob_home, "LDAP answers again");
    let metrics = proxy.metrics().await;
    assert_eq!(lookups(&metrics, "ok"), 2.0);
    proxy.stop().await;
}

#[tokio::test]
async fn directory_ldap_over_starttls_and_ldaps_verifies_the_server() {
    if !dovecot::available() || !slapd::available() {
        return;
    }
    let b1 = Dovecot::start("b1");
    let pki = Pki::new();
    // Its names: backend.test and 127.0.0.1, the host in the URLs.
    let pair = pki.pair("backend");
    let ldap = Slapd::start_tls(
        &person("alice", Some("127.0.0.1"), Some(b1.port)),
        &pair.cert,
        &pair.key,
    );
    let backends = [("b1", b1.address())];
    let refuse = "    cache: { ttl: 0s }\n    fallback: refuse\n";
    for (what, url, tls) in [
        ("StartTLS", ldap.url(), "      starttls: true\n"),
        ("ldaps", ldap.ldaps_url(), ""),
    ] {
        let yaml = ldap_yaml(
            &backends,
            &ldap,
            &format!("{tls}      ca: {:?}\n", pki.ca()),
            refuse,
        )
        .replace(
            &format!("url: \"{}\"", ldap.url()),
            &format!("url: \"{url}\""),
        );
        let proxy = Proxy::start(&yaml).await;
        let mut c = proxy.connect().await;
        c.login("alice", "alice-secret").await;
        assert_eq!(c.backend().await, "b1", "{what}");
        assert_eq!(lookups(&proxy.metrics().await, "ok"), 1.0, "{what}");
        proxy.stop().await;
    }

    // Without StartTLS the server refuses the bind: the StartTLS case above really was TLS.
    let proxy = Proxy::start(&ldap_yaml(&backends, &ldap, "", refuse)).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    proxy.stop().await;

    // A certificate from a CA imapgate does not trust: no lookup, so no route (refuse:
    // UNAVAILABLE), and nothing was sent to that server but the TLS handshake.
    let yaml = ldap_yaml(
        &backends,
        &ldap,
        &format!("      ca: {:?}\n", pki.rogue_ca()),
        refuse,
    )
    .replace(
        &format!("url: \"{}\"", ldap.url()),
        &format!("url: \"{}\"", ldap.ldaps_url()),
    );
    let proxy = Proxy::start(&yaml).await;
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN alice alice-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    assert_eq!(lookups(&proxy.metrics().await, "error"), 1.0);
    proxy.stop().await;
}
