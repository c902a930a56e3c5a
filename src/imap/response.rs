//! What imapgate itself says to clients: greeting, tagged and untagged status, continuations.
//! Response codes are RFC 5530's where one fits.

use super::sasl::AuthMechanism;

/// Capabilities imapgate offers before login: only what it does itself before login
/// (SASL-IR, ID), STARTTLS where it is on offer, and either the SASL mechanisms or
/// LOGINDISABLED (RFC 3501 6.2.3) where plaintext login is not allowed. After login the
/// backend's list (its tagged OK's `[CAPABILITY ...]` code, or one imapgate asked for) replaces
/// it.
///
/// Not LITERAL+, though the pre-login reader takes `{n+}`: a client may pipeline commands
/// behind its LOGIN before it sees the backend's list, and those go to a backend that may not
/// have LITERAL+ (Courier then runs a `{n+}` literal's lines as commands).
pub fn capabilities(starttls: bool, auth: bool, mechanisms: &[AuthMechanism]) -> String {
    let mut caps = String::from("IMAP4rev1 SASL-IR ID");
    if starttls {
        caps.push_str(" STARTTLS");
    }
    if auth {
        for m in mechanisms {
            caps.push_str(" AUTH=");
            caps.push_str(m.name());
        }
    } else {
        caps.push_str(" LOGINDISABLED");
    }
    caps
}

pub fn greeting(capabilities: &str, text: &str) -> Vec<u8> {
    format!("* OK [CAPABILITY {capabilities}] {text}\r\n").into_bytes()
}

pub fn capability(capabilities: &str, tag: &str) -> Vec<u8> {
    format!("* CAPABILITY {capabilities}\r\n{tag} OK Capability completed.\r\n").into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
        }
    }
}

/// `tag STATUS [CODE] text`; `code` is `""` for none.
pub fn tagged(tag: &str, status: Status, code: &str, text: &str) -> Vec<u8> {
    let code = if code.is_empty() {
        String::new()
    } else {
        format!("[{code}] ")
    };
    format!("{tag} {} {code}{text}\r\n", status.word()).into_bytes()
}

/// `* BYE [CODE] text`: the connection closes after it.
pub fn bye(code: &str, text: &str) -> Vec<u8> {
    if code.is_empty() {
        format!("* BYE {text}\r\n").into_bytes()
    } else {
        format!("* BYE [{code}] {text}\r\n").into_bytes()
    }
}

/// `+ text`: a continuation request (go on with the literal, or the next SASL step).
pub fn continuation(text: &str) -> Vec<u8> {
    format!("+ {text}\r\n").into_bytes()
}

/// Quotes `value` as an IMAP quoted string when it fits one, for ID answers.
pub fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        if c != '\r' && c != '\n' {
            out.push(c);
        }
    }
    out.push('"');
    out
}
