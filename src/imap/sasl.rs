//! Credentials as a client presents them (LOGIN, AUTHENTICATE PLAIN, AUTHENTICATE LOGIN), checked
//! so that the user imapgate routes is exactly the user the backend logs in; and the relayed
//! mechanisms (XOAUTH2, OAUTHBEARER, SCRAM-SHA-*), of which imapgate reads only the user from the
//! first message (`oauth`, `scram`) and relays the rest of the exchange untouched.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::response::Status;
use super::secret::Secret;

pub(crate) mod oauth;
pub(crate) mod scram;

/// How the client logged in. Also the `mechanism` in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// The LOGIN command.
    Login,
    /// AUTHENTICATE PLAIN.
    Plain,
    /// AUTHENTICATE LOGIN (the legacy SASL mechanism).
    SaslLogin,
    /// AUTHENTICATE XOAUTH2 (relayed).
    XOAuth2,
    /// AUTHENTICATE OAUTHBEARER (relayed).
    OAuthBearer,
    /// AUTHENTICATE SCRAM-SHA-1 (relayed).
    ScramSha1,
    /// AUTHENTICATE SCRAM-SHA-256 (relayed).
    ScramSha256,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Login => "login",
            Mechanism::Plain => "plain",
            Mechanism::SaslLogin => "sasl_login",
            Mechanism::XOAuth2 => "xoauth2",
            Mechanism::OAuthBearer => "oauthbearer",
            Mechanism::ScramSha1 => "scram_sha_1",
            Mechanism::ScramSha256 => "scram_sha_256",
        }
    }

    /// The command as a trace or log shows it.
    pub fn command(self) -> &'static str {
        match self {
            Mechanism::Login => "LOGIN",
            Mechanism::Plain => "AUTHENTICATE PLAIN",
            Mechanism::SaslLogin => "AUTHENTICATE LOGIN",
            Mechanism::XOAuth2 => "AUTHENTICATE XOAUTH2",
            Mechanism::OAuthBearer => "AUTHENTICATE OAUTHBEARER",
            Mechanism::ScramSha1 => "AUTHENTICATE SCRAM-SHA-1",
            Mechanism::ScramSha256 => "AUTHENTICATE SCRAM-SHA-256",
        }
    }

    /// The SASL mechanism relayed to the backend as the client's own messages (imapgate read
    /// only the user): `None` for the password logins imapgate replays itself.
    pub fn relayed(self) -> Option<AuthMechanism> {
        match self {
            Mechanism::XOAuth2 => Some(AuthMechanism::XOAuth2),
            Mechanism::OAuthBearer => Some(AuthMechanism::OAuthBearer),
            Mechanism::ScramSha1 => Some(AuthMechanism::ScramSha1),
            Mechanism::ScramSha256 => Some(AuthMechanism::ScramSha256),
            Mechanism::Login | Mechanism::Plain | Mechanism::SaslLogin => None,
        }
    }
}

/// A SASL mechanism `auth.mechanisms` may enable: advertised as `AUTH=<name>` before login and
/// accepted by AUTHENTICATE. A closed set: CRAM-MD5 and DIGEST-MD5 cannot be relayed (the
/// server's challenge comes before the client names its user, so imapgate could not route),
/// and `-PLUS` variants cannot be (channel binding ends with TLS at imapgate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum AuthMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "LOGIN")]
    Login,
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
    #[serde(rename = "SCRAM-SHA-1")]
    ScramSha1,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
}

impl AuthMechanism {
    pub const ALL: [AuthMechanism; 6] = [
        AuthMechanism::Plain,
        AuthMechanism::Login,
        AuthMechanism::XOAuth2,
        AuthMechanism::OAuthBearer,
        AuthMechanism::ScramSha1,
        AuthMechanism::ScramSha256,
    ];
    /// `auth.mechanisms` when unset.
    pub const DEFAULT: [AuthMechanism; 2] = [AuthMechanism::Plain, AuthMechanism::Login];

    /// The SASL name (RFC 4422), as in `AUTH=<name>` and AUTHENTICATE.
    pub fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::Login => "LOGIN",
            AuthMechanism::XOAuth2 => "XOAUTH2",
            AuthMechanism::OAuthBearer => "OAUTHBEARER",
            AuthMechanism::ScramSha1 => "SCRAM-SHA-1",
            AuthMechanism::ScramSha256 => "SCRAM-SHA-256",
        }
    }

    /// From an AUTHENTICATE's (upper-cased) mechanism name.
    pub fn from_name(name: &str) -> Option<AuthMechanism> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A login refused before any backend sees it: the tagged status, RFC 5530 code and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub status: Status,
    pub code: &'static str,
    pub text: &'static str,
}

impl From<&'static str> for Refused {
    /// Malformed input: `BAD [CLIENTBUG]`.
    fn from(text: &'static str) -> Self {
        Refused {
            status: Status::Bad,
            code: "CLIENTBUG",
            text,
        }
    }
}

impl Refused {
    /// The client asked for channel binding (gs2 `p=`): well-formed, but impossible here.
    pub(crate) fn channel_binding() -> Self {
        Refused {
            status: Status::No,
            code: "",
            text: "Channel binding is not available through this proxy (TLS ends here); use the mechanism without -PLUS.",
        }
    }

    /// Well-formed, but without a user to route by.
    pub(crate) fn no_user(text: &'static str) -> Self {
        Refused {
            status: Status::No,
            code: "",
            text,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub mechanism: Mechanism,
    /// PLAIN's authorization identity, when the client gave one: the user to route, and it is
    /// replayed as it came so the backend decides whether `user` may act as it.
    pub authzid: Option<String>,
    /// The authentication identity.
    pub user: String,
    /// The password; for a relayed mechanism (`Mechanism::relayed`), the client's first SASL
    /// message as it came (token or SCRAM client-first), replayed to the backend untouched.
    pub password: Secret<Vec<u8>>,
}

impl Credentials {
    /// The mailbox owner: authzid when present, else the login name.
    pub fn routing_user(&self) -> &str {
        self.authzid.as_deref().unwrap_or(&self.user)
    }

    /// From a LOGIN command or AUTHENTICATE LOGIN.
    pub fn from_login(
        mechanism: Mechanism,
        user: Vec<u8>,
        password: Secret<Vec<u8>>,
    ) -> Result<Credentials, &'static str> {
        if password.expose().contains(&0) {
            return Err("NUL is not allowed in a password");
        }
        Ok(Credentials {
            mechanism,
            authzid: None,
            user: user_name(user)?,
            password,
        })
    }

    /// From the decoded PLAIN message `[authzid] NUL authcid NUL password`.
    pub fn from_plain(message: &Secret<Vec<u8>>) -> Result<Credentials, &'static str> {
        let mut fields = message.expose().split(|&c| c == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err("PLAIN needs exactly three fields: authzid NUL authcid NUL password");
        };
        let authzid = if authzid.is_empty() {
            None
        } else {
            Some(user_name(authzid.to_vec())?)
        };
        Ok(Credentials {
            mechanism: Mechanism::Plain,
            authzid,
            user: user_name(authcid.to_vec())?,
            password: Secret::new(password.to_vec()),
        })
    }

    /// From the first message of a relayed mechanism: only the user is read.
    pub fn relayed(mechanism: Mechanism, message: Secret<Vec<u8>>) -> Result<Credentials, Refused> {
        let (user, authzid) = match mechanism {
            Mechanism::XOAuth2 => (oauth::xoauth2_user(message.expose())?, None),
            Mechanism::OAuthBearer => (oauth::oauthbearer_user(message.expose())?, None),
            Mechanism::ScramSha1 | Mechanism::ScramSha256 => {
                let first = scram::client_first(message.expose())?;
                (first.user, first.authzid)
            }
            Mechanism::Login | Mechanism::Plain | Mechanism::SaslLogin => {
                return Err("not a relayed mechanism".into());
            }
        };
        Ok(Credentials {
            mechanism,
            authzid,
            user,
            password: message,
        })
    }

    /// The PLAIN message for the backend, rebuilt from the checked fields.
    pub fn plain_message(&self) -> Secret<Vec<u8>> {
        let mut m = Vec::new();
        if let Some(authzid) = &self.authzid {
            m.extend_from_slice(authzid.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(self.user.as_bytes());
        m.push(0);
        m.extend_from_slice(self.password.expose());
        Secret::new(m)
    }
}

/// A user name must be UTF-8 without NUL or line ends: anything else could be read differently
/// by the backend than by the router.
pub(crate) fn user_name(bytes: Vec<u8>) -> Result<String, &'static str> {
    if bytes.is_empty() {
        return Err("empty user name");
    }
    if bytes.iter().any(|&c| c == 0 || c == b'\r' || c == b'\n') {
        return Err("NUL and line ends are not allowed in a user name");
    }
    String::from_utf8(bytes).map_err(|_| "a user name must be UTF-8")
}

/// A client's answer to a `+` challenge.
#[derive(Debug, PartialEq, Eq)]
pub enum SaslLine {
    Response(Secret<Vec<u8>>),
    /// A line of `*`: the client gives up (RFC 3501 6.2.2: answer BAD).
    Cancel,
}

pub fn decode_line(line: &[u8]) -> Result<SaslLine, &'static str> {
    if line == b"*" {
        return Ok(SaslLine::Cancel);
    }
    if line == b"=" || line.is_empty() {
        return Ok(SaslLine::Response(Secret::new(Vec::new())));
    }
    STANDARD
        .decode(line)
        .map(|b| SaslLine::Response(Secret::new(b)))
        .map_err(|_| "invalid base64 in the SASL response")
}

pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(bytes: &[u8]) -> Result<Credentials, &'static str> {
        Credentials::from_plain(&Secret::new(bytes.to_vec()))
    }

    #[test]
    fn plain_fields() {
        let c = plain(b"\0alice\0pw").unwrap();
        assert_eq!((c.authzid.as_deref(), c.user.as_str()), (None, "alice"));
        assert_eq!(c.routing_user(), "alice");
        let c = plain(b"bob\0admin\0pw").unwrap();
        assert_eq!(c.routing_user(), "bob");
        assert_eq!(c.plain_message().expose(), b"bob\0admin\0pw");
        assert!(plain(b"alice\0pw").is_err());
        assert!(plain(b"a\0b\0c\0d").is_err());
        assert!(plain(b"\0\0pw").is_err());
        assert!(plain(b"\0al\xffice\0pw").is_err());
    }

    #[test]
    fn login_refuses_nul() {
        let ok = Credentials::from_login(
            Mechanism::Login,
            b"u".to_vec(),
            Secret::new(b"p w".to_vec()),
        );
        assert!(ok.is_ok());
        let nul = Credentials::from_login(
            Mechanism::Login,
            b"u".to_vec(),
            Secret::new(b"p\0w".to_vec()),
        );
        assert!(nul.is_err());
        let nul = Credentials::from_login(
            Mechanism::Login,
            b"u\0x".to_vec(),
            Secret::new(b"p".to_vec()),
        );
        assert!(nul.is_err());
    }

    #[test]
    fn lines() {
        assert_eq!(decode_line(b"*"), Ok(SaslLine::Cancel));
        assert_eq!(
            decode_line(b"dXNlcg=="),
            Ok(SaslLine::Response(Secret::new(b"user".to_vec())))
        );
        assert_eq!(
            decode_line(b"="),
            Ok(SaslLine::Response(Secret::new(vec![])))
        );
        assert!(decode_line(b"not base64!").is_err());
    }
}
