//! The LDAP source: a subtree search under `base` with the configured filter, the user put in
//! for `%u` (`%n`, `%d`) escaped per RFC 4515, so that no user name can widen the filter to
//! another user's entry (`*`, `(`, `)`, `\` and NUL become `\2a`, `\28`, `\29`, `\5c`, `\00`).
//! Exactly one entry is the user: its host attribute (`mailHost`: `host` or `host:port`) and
//! optionally its port attribute give the backend. No entry: not found. Two or more: an error
//! (the filter is ambiguous), never a guess.
//!
//! Connections are bound once (simple bind, or anonymous) and kept: at most `pool_size`, each
//! carrying one search at a time; more lookups wait for one; one unused for a minute is closed. A kept connection that fails is
//! dropped and the lookup tried once more on a new one (the server may have closed an idle
//! connection); the whole lookup has `timeout`.

use std::collections::HashMap;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions};
use tokio::sync::Semaphore;

use super::idle::Idle;
use super::{Answer, LookupError, Route, server_address, split_host_port};
use crate::config::LdapLookup;

/// A result code that says the search found more than the size limit (2) allows.
const SIZE_LIMIT_EXCEEDED: u32 = 4;

pub(crate) struct LdapSource {
    config: LdapLookup,
    filter: Vec<Part>,
    /// Bound connections not in use.
    idle: Idle<Ldap>,
    /// One per connection: a lookup holds one while it uses a connection.
    slots: Semaphore,
}

/// A piece of the filter template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `%u`: the whole user name.
    User,
    /// `%n`: the part before the last `@` (the whole name without one).
    Local,
    /// `%d`: the part after the last `@` (empty without one).
    Domain,
}

/// Whether `filter` is a usable template: known placeholders only, at least one of them (or
/// every user would find the same entries), and an LDAP filter once filled in.
pub(crate) fn check_filter(filter: &str) -> Result<(), String> {
    let parts = parse_template(filter)?;
    if parts.iter().all(|p| matches!(p, Part::Text(_))) {
        return Err("has no %u, %n or %d: every user would find the same entries".into());
    }
    let sample = expand(&parts, "user@example.net");
    ldap3::parse_filter(&sample)
        .map(|_| ())
        .map_err(|()| "is not an LDAP filter (RFC 4515), e.g. (uid=%u)".into())
}

fn parse_template(filter: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = filter.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        let part = match chars.next() {
            Some('%') => {
                text.push('%');
                continue;
            }
            Some('u') => Part::User,
            Some('n') => Part::Local,
            Some('d') => Part::Domain,
            Some(other) => return Err(format!("has an unknown placeholder %{other}")),
            None => return Err("ends in a lone %".into()),
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(part);
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// The filter for `user`, every piece of the user escaped.
fn expand(parts: &[Part], user: &str) -> String {
    let (local, domain) = user.rsplit_once('@').unwrap_or((user, ""));
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::User => escape_into(&mut out, user),
            Part::Local => escape_into(&mut out, local),
            Part::Domain => escape_into(&mut out, domain),
        }
    }
    out
}

/// RFC 4515 section 3: `*`, `(`, `)`, `\` and NUL as `\XX`; other control characters too, so
/// that the filter stays one printable line. Everything else (UTF-8 included) as it is.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '*' | '(' | ')' | '\\') || c.is_ascii_control() {
            out.push_str(&format!("\\{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
}

impl LdapSource {
    /// Connects nothing: the first lookup does.
    pub(crate) fn new(config: &LdapLookup) -> Self {
        LdapSource {
            // Checked at config load; a filter that no longer parses finds nobody.
            filter: parse_template(&config.filter).unwrap_or_default(),
            slots: Semaphore::new(config.pool_size),
            idle: Idle::new(),
            config: config.clone(),
        }
    }

    /// Where `user` (the routing key) goes.
    /// How long one question may take (`Directory` holds it to that).
    pub(crate) fn timeout(&self) -> std::time::Duration {
        self.config.timeout
    }

    pub(crate) async fn ask(&self, user: &str) -> Result<Answer, LookupError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| LookupError::Failed("closed".into()))?;
        let filter = expand(&self.filter, user);
        if let Some(ldap) = self.idle.pop(|ldap| !ldap.is_closed()) {
            match self.search(ldap, &filter).await {
                Ok(answer) => return answer,
                // The kept connection is gone; a new one gets the same question.
                Err(_broken) => {}
            }
        }
        let ldap = self.connect().await?;
        self.search(ldap, &filter).await?
    }

    /// A new connection, bound.
    async fn connect(&self) -> Result<Ldap, LookupError> {
        let url = &self.config.url;
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.config.timeout)
            .set_starttls(self.config.starttls);
        if let Some(tls) = &self.config.tls {
            settings = settings.set_config(tls.clone());
        }
        let (connection, mut ldap) = LdapConnAsync::with_settings(settings, url)
            .await
            .map_err(|e| LookupError::Failed(format!("connect to {url}: {e}")))?;
        tokio::spawn(async move {
            // Ends when the last handle is dropped, or the server goes.
            let _ = connection.drive().await;
        });
        if let Some((dn, password)) = &self.config.bind {
            ldap.simple_bind(dn, password.expose())
                .await
                .and_then(|r| r.success())
                .map_err(|e| LookupError::Failed(format!("bind as {dn:?}: {e}")))?;
        }
        Ok(ldap)
    }

    /// One search on `ldap`. The outer error is the connection's (it is dropped); the inner
    /// result is the directory's answer (the connection is kept for the next lookup).
    async fn search(
        &self,
        mut ldap: Ldap,
        filter: &str,
    ) -> Result<Result<Answer, LookupError>, LookupError> {
        let mut attributes = vec![self.config.host_attribute.as_str()];
        if let Some(port) = &self.config.port_attribute {
            attributes.push(port);
        }
        // Two are enough to tell "one" from "several".
        let result = ldap
            .with_search_options(SearchOptions::new().sizelimit(2))
            .search(&self.config.base, Scope::Subtree, filter, attributes)
            .await
            .map_err(|e| LookupError::Failed(format!("search: {e}")))?;
        let ldap3::SearchResult(entries, status) = result;
        let answer = if status.rc == SIZE_LIMIT_EXCEEDED || entries.len() > 1 {
            Err(LookupError::Failed(format!(
                "the filter {filter} matches more than one entry under {:?}",
                self.config.base
            )))
        } else if status.rc != 0 {
            Err(LookupError::Failed(format!("search: {status}")))
        } else {
            match entries.into_iter().next() {
                None => Ok(Answer::NotFound),
                Some(entry) => self.route(&SearchEntry::construct(entry)),
            }
        };
        self.idle.push(ldap, self.config.pool_size);
        Ok(answer)
    }

    /// The backend an entry names.
    fn route(&self, entry: &SearchEntry) -> Result<Answer, LookupError> {
        let host_attribute = &self.config.host_attribute;
        let host_value = single(entry, host_attribute)?.ok_or_else(|| {
            LookupError::Failed(format!("{:?} has no {host_attribute}", entry.dn))
        })?;
        let (host, port_in_host) = split_host_port(host_value)?;
        let port_value = match &self.config.port_attribute {
            Some(attribute) => single(entry, attribute)?,
            None => None,
        };
        let port = match port_value {
            Some(p) => match p.trim().parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => {
                    return Err(LookupError::Failed(format!(
                        "{:?}: {p:?} is not a port",
                        entry.dn
                    )));
                }
            },
            None => port_in_host.unwrap_or(self.config.default_port),
        };
        Ok(Answer::Found(Route {
            server: server_address(host, port)?,
            user: None,
            password: None,
        }))
    }
}

/// The one value of `attribute` (names compare case-insensitively), `None` without one, an
/// error with several.
fn single<'e>(entry: &'e SearchEntry, attribute: &str) -> Result<Option<&'e str>, LookupError> {
    let values = find(&entry.attrs, attribute);
    match values {
        None | Some([]) => Ok(None),
        Some([one]) => Ok(Some(one.as_str())),
        Some(_) => Err(LookupError::Failed(format!(
            "{:?} has several {attribute} values",
            entry.dn
        ))),
    }
}

fn find<'e>(attrs: &'e HashMap<String, Vec<String>>, name: &str) -> Option<&'e [String]> {
    attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(template: &str, user: &str) -> String {
        expand(&parse_template(template).unwrap(), user)
    }

    #[test]
    fn users_are_escaped_per_rfc_4515() {
        assert_eq!(filter("(uid=%u)", "alice"), "(uid=alice)");
        assert_eq!(filter("(uid=%u)", "*"), "(uid=\\2a)");
        assert_eq!(
            filter("(uid=%u)", "alice)(uid=*"),
            "(uid=alice\\29\\28uid=\\2a)"
        );
        assert_eq!(filter("(uid=%u)", "a\\b"), "(uid=a\\5cb)");
        assert_eq!(filter("(uid=%u)", "a\0b"), "(uid=a\\00b)");
        assert_eq!(filter("(uid=%u)", "a\r\nb"), "(uid=a\\0d\\0ab)");
        assert_eq!(filter("(uid=%u)", "jörg"), "(uid=jörg)");
        // Whatever the user, the filter is one equality match: it parses, and the user's
        // bytes never become filter syntax.
        for user in [
            "*",
            "alice)(uid=*",
            "a\\",
            "(|(uid=*))",
            "\0",
            "%u",
            "x)(|(a=*",
        ] {
            let f = filter("(&(objectClass=inetOrgPerson)(uid=%u))", user);
            assert!(ldap3::parse_filter(&f).is_ok(), "{f}");
            assert_eq!(f.matches('(').count(), 3, "{f}");
            assert!(!f[f.find("uid=").unwrap()..].contains('*'), "{f}");
        }
    }

    #[test]
    fn local_and_domain_parts() {
        let t = "(&(uid=%n)(associatedDomain=%d)(!(mail=%%)))";
        assert_eq!(
            filter(t, "bob@example.net"),
            "(&(uid=bob)(associatedDomain=example.net)(!(mail=%)))"
        );
        assert_eq!(filter("(uid=%n)", "a@b@c"), "(uid=a@b)");
        assert_eq!(filter("(dc=%d)", "plain"), "(dc=)");
    }

    #[test]
    fn templates_are_checked() {
        assert!(check_filter("(uid=%u)").is_ok());
        assert!(check_filter("(mail=%n@%d)").is_ok());
        assert!(check_filter("(uid=alice)").unwrap_err().contains("no %u"));
        assert!(check_filter("(uid=%x)").unwrap_err().contains("%x"));
        assert!(
            check_filter("(uid=%u")
                .unwrap_err()
                .contains("not an LDAP filter")
        );
        assert!(check_filter("(uid=%").is_err());
    }
}
