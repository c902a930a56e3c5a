//! SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802, RFC 7677): the client-first message is read for the
//! user to route; it and every later message go to the backend untouched (the proof never
//! passes through imapgate in a form it could use, and is never logged).
//!
//! ```text
//! client-first = gs2-header client-first-bare
//! gs2-header   = ("n" | "y" | "p=" cb-name) "," ["a=" saslname] ","
//! client-first-bare = ["m=" ext ","] "n=" saslname "," "r=" nonce ["," ext]
//! ```
//!
//! Channel binding cannot survive imapgate: TLS ends here, so the client's TLS channel is not
//! the backend's. imapgate never advertises `-PLUS`; a client that asks for binding (`p=`) gets
//! NO (it could only fail at the backend, or worse, be bound to the wrong channel); `y` ("I could
//! bind, but you do not offer it") is true of imapgate and relayed as it is.
//!
//! Names: `=2C` and `=3D` decode to `,` and `=`; any other `=` is malformed. imapgate applies no
//! SASLprep mapping of its own: RFC 5802 5.1 has the client prepare the name before sending it,
//! and Dovecot looks the name up as sent, so routing on the same octets (then
//! `routing.normalize`, as for every login) routes to the backend that will look it up. Control
//! characters are refused (SASLprep prohibits them).

use super::Refused;

/// What imapgate reads of a client-first message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClientFirst {
    /// `n=`: the authentication identity.
    pub(crate) user: String,
    /// The GS2 header's `a=`: the identity to act as, when given.
    pub(crate) authzid: Option<String>,
}

pub(crate) fn client_first(message: &[u8]) -> Result<ClientFirst, Refused> {
    let mut parts = message.splitn(3, |&c| c == b',');
    let (Some(flag), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("SCRAM needs a GS2 header (n,,) before n=user,r=nonce".into());
    };
    match flag {
        b"n" | b"y" => {}
        f if f.starts_with(b"p=") => return Err(Refused::channel_binding()),
        _ => return Err("SCRAM's GS2 flag must be n, y or p=".into()),
    }
    let authzid = match authzid {
        b"" => None,
        a => match a.strip_prefix(b"a=") {
            Some(name) => Some(saslname(name)?),
            None => return Err("SCRAM's authzid must be a=name".into()),
        },
    };
    let mut attributes = bare.split(|&c| c == b',');
    let mut first = attributes.next().unwrap_or_default();
    if first.starts_with(b"m=") {
        return Err("SCRAM mandatory extensions (m=) are not supported".into());
    }
    let Some(user) = first.strip_prefix(b"n=") else {
        return Err("SCRAM's client-first needs n=user".into());
    };
    let user = saslname(user)?;
    first = attributes.next().unwrap_or_default();
    match first.strip_prefix(b"r=") {
        Some(nonce) if !nonce.is_empty() && nonce.iter().all(|c| c.is_ascii_graphic()) => {}
        _ => return Err("SCRAM's client-first needs r=nonce after n=user".into()),
    }
    Ok(ClientFirst { user, authzid })
}

/// A SCRAM `saslname` (also OAUTHBEARER's authzid): `=2C` → `,`, `=3D` → `=`; UTF-8, not
/// empty, no control characters.
pub(crate) fn saslname(encoded: &[u8]) -> Result<String, Refused> {
    let mut name = Vec::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some((&c, tail)) = rest.split_first() {
        if c == b'=' {
            match tail.get(..2) {
                Some(b"2C" | b"2c") => name.push(b','),
                Some(b"3D" | b"3d") => name.push(b'='),
                _ => return Err("a SASL name may only escape =2C and =3D".into()),
            }
            rest = &tail[2..];
        } else {
            name.push(c);
            rest = tail;
        }
    }
    let name = super::user_name(name)?;
    if name.chars().any(char::is_control) {
        return Err("control characters are not allowed in a user name".into());
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::response::Status;

    fn first(m: &[u8]) -> Result<(String, Option<String>), Status> {
        client_first(m)
            .map(|c| (c.user, c.authzid))
            .map_err(|r| r.status)
    }

    #[test]
    fn names_and_flags() {
        assert_eq!(
            first(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"),
            Ok(("user".into(), None))
        );
        assert_eq!(first(b"y,,n=a=2Cb=3Dc,r=abc"), Ok(("a,b=c".into(), None)));
        assert_eq!(
            first(b"n,a=boss,n=admin,r=abc,x=ext"),
            Ok(("admin".into(), Some("boss".into())))
        );
        assert_eq!(first(b"n,,n=j\xc3\xb6rg,r=x"), Ok(("jörg".into(), None)));
        assert_eq!(
            first(b"p=tls-server-end-point,,n=user,r=abc"),
            Err(Status::No),
            "channel binding cannot be given"
        );
    }

    #[test]
    fn malformed() {
        for bad in [
            &b""[..],
            b"n,,",
            b"n",
            b"n,,n=user",
            b"n,,n=user,r=",
            b"n,,r=abc,n=user",
            b"n,,m=ext,n=user,r=abc",
            b"x,,n=user,r=abc",
            b"n,b=x,n=user,r=abc",
            b"n,,n=,r=abc",
            b"n,,n=us=2Xer,r=abc",
            b"n,,n=user=,r=abc",
            b"n,,n=user=2,r=abc",
            b"n,,n=us\0er,r=abc",
            b"n,,n=us\x7fer,r=abc",
            b"n,,n=\xff,r=abc",
            b"n,a=,n=user,r=abc",
            b"n,,n=user,r=a b",
        ] {
            assert_eq!(first(bad), Err(Status::Bad), "{bad:?}");
        }
    }
}
