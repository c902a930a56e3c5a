//! Routing from PostgreSQL: a private cluster with a `mailbox` table whose rows point at one of
//! two real Dovecots; `backend()` shows where each login landed.

use std::time::Duration;

use crate::support::dovecot::{self, Dovecot};
use crate::support::postgres::{self, Postgres};
use crate::support::{Proxy, config, sample};

fn sql_yaml(
    backends: &[(&str, String)],
    pg: &Postgres,
    extra_sql: &str,
    cache_and_fallback: &str,
) -> String {
    config(
        backends,
        &format!(
            "admin: {{ bind: \"127.0.0.1:9143\" }}\nhealth: {{ interval: 1h }}\nrouting:\n  lookup:\n    sql:\n      url: \"{}\"\n      password_file: {:?}\n      query: \"SELECT host, port FROM mailbox WHERE username = $1\"\n      timeout: 2s\n      pool_size: 2\n{extra_sql}{cache_and_fallback}",
            pg.url(),
            pg.password_file(),
        ),
    )
}

fn lookups(metrics: &str, result: &str) -> f64 {
    sample(
        metrics,
        "imapgate_directory_lookups_total",
        &format!("source=\"sql\",result=\"{result}\""),
    )
    .unwrap_or(0.0)
}

fn table(pg: &Postgres, rows: &[(&str, String, Option<u16>)]) {
    let mut sql = String::from(
        "CREATE TABLE mailbox (username text PRIMARY KEY, host text, port integer);\n",
    );
    for (user, host, port) in rows {
        let port = port.map_or("NULL".to_string(), |p| p.to_string());
        sql.push_str(&format!(
            "INSERT INTO mailbox VALUES ('{user}', '{host}', {port});\n"
        ));
    }
    pg.execute(&sql);
}

#[tokio::test]
async fn directory_sql_routes_each_user_to_its_row_and_names_are_only_values() {
    if !dovecot::available() || !postgres::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let pg = Postgres::start();
    // alice: host and port; bob: port NULL (default_port); carol: host:port in the host
    // column; erin: host NULL; dave: no row.
    table(
        &pg,
        &[
            ("alice", "127.0.0.1".into(), Some(b2.port)),
            ("bob", "127.0.0.1".into(), None),
            ("carol", b2.address(), None),
        ],
    );
    pg.execute("INSERT INTO mailbox VALUES ('erin', NULL, NULL);");
    let proxy = Proxy::start(&sql_yaml(
        &[("b1", b1.address()), ("b2", b2.address())],
        &pg,
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

    // Not in the table: refused as an unknown user.
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN dave dave-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(
        answer.starts_with("a NO [AUTHENTICATIONFAILED]"),
        "{answer}"
    );

    // Quotes, `;` and comments in a name are characters of the value $1, not SQL: no row has
    // such a name, and the table is still there afterwards.
    let attempts = [
        "alice' OR '1'='1",
        "x'; DROP TABLE mailbox; --",
        "alice'--",
        "\\\"; SELECT 1; --",
        "alice%",
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
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, "b2", "the table is still there");

    let metrics = proxy.metrics().await;
    assert_eq!(lookups(&metrics, "ok"), 5.0, "{metrics}");
    assert_eq!(lookups(&metrics, "error"), 0.0, "{metrics}");
    assert_eq!(lookups(&metrics, "not_found"), 1.0 + attempts.len() as f64);

    // A row without a host is the table's mistake: an error (refuse: UNAVAILABLE).
    let mut c = proxy.connect().await;
    c.line().await.unwrap();
    c.send("a LOGIN erin erin-secret\r\n").await;
    let (_, answer) = c.until_tagged("a").await;
    assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
    proxy.stop().await;
}

#[tokio::test]
async fn directory_sql_outage_is_served_from_the_cache_then_the_fallback_and_recovers() {
    if !dovecot::available() || !postgres::available() {
        return;
    }
    let (b1, b2) = (Dovecot::start("b1"), Dovecot::start("b2"));
    let hash_config = imapgate::config::parse(
        &config(&[("b1", b1.address()), ("b2", b2.address())], ""),
        "h",
    )
    .unwrap();
    let hashed = |user: &str| {
        hash_config.backends[imapgate::backends_for(&hash_config, user)[0]]
            .name
            .to_string()
    };
    // Each user's row names the backend the hash would not pick, so the cache (alice) and
    // the table (bob, at the end) are what send them there.
    let other = |name: &str| {
        if name == "b1" {
            ("b2", b2.port)
        } else {
            ("b1", b1.port)
        }
    };
    let (alice_home, alice_port) = other(&hashed("alice"));
    let bob_hashed = hashed("bob");
    let (bob_home, bob_port) = other(&bob_hashed);
    let mut pg = Postgres::start();
    table(
        &pg,
        &[
            ("alice", "127.0.0.1".into(), Some(alice_port)),
            ("bob", "127.0.0.1".into(), Some(bob_port)),
        ],
    );
    let proxy = Proxy::start(&sql_yaml(
        &[("b1", b1.address()), ("b2", b2.address())],
        &pg,
        "",
        "    cache: { ttl: 0s, stale_max_age: 1h }\n    fallback: hash\n",
    ))
    .await;
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(c.backend().await, alice_home);

    pg.stop();
    let mut c = proxy.connect().await;
    c.login("alice", "alice-secret").await;
    assert_eq!(
        c.backend().await,
        alice_home,
        "served from the cache while PostgreSQL is down"
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
    assert_eq!(lookups(&metrics, "error"), 2.0, "{metrics}");

    // Back: the kept connection died with the server; a new one is made.
    pg.restart();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = proxy.connect().await;
    c.login("bob", "bob-secret").await;
    assert_eq!(c.backend().await, bob_home, "PostgreSQL answers again");
    assert_eq!(lookups(&proxy.metrics().await, "ok"), 2.0);
    proxy.stop().await;
}
