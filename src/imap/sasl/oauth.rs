//! XOAUTH2 and OAUTHBEARER (RFC 7628) initial responses: only the user is read, to route; the
//! message itself (token included) goes to the backend as it came and is never logged.
//!
//! ```text
//! XOAUTH2:     user=alice@example.net ^A auth=Bearer <token> ^A ^A
//! OAUTHBEARER: n,a=alice@example.net, ^A host=... ^A port=... ^A auth=Bearer <token> ^A ^A
//! ```

use super::{Refused, scram::saslname};

/// The user named in an XOAUTH2 initial response (`user=` field).
pub(crate) fn xoauth2_user(message: &[u8]) -> Result<String, Refused> {
    let fields = kvpairs(message).ok_or("XOAUTH2 needs user=...^Aauth=Bearer ...^A^A")?;
    let mut user = None;
    let mut auth = false;
    for field in fields {
        if let Some(u) = field.strip_prefix(b"user=") {
            if user.is_some() {
                return Err("XOAUTH2 has user= twice".into());
            }
            user = Some(u);
        } else if field.starts_with(b"auth=") {
            auth = true;
        }
    }
    let (Some(user), true) = (user, auth) else {
        return Err("XOAUTH2 needs both user= and auth=".into());
    };
    super::user_name(user.to_vec()).map_err(Refused::from)
}

/// The user of an OAUTHBEARER initial response: the GS2 header's `a=` authzid (RFC 7628 3.1).
/// Without it imapgate cannot know where to route, so it is required here. A `p=` flag asks
/// for channel binding, which OAUTHBEARER does not define and imapgate cannot give.
pub(crate) fn oauthbearer_user(message: &[u8]) -> Result<String, Refused> {
    // gs2-header = cbind-flag "," [authzid] "," then kvsep (^A) and the key/value pairs.
    let mut parts = message.splitn(3, |&c| c == b',');
    let (Some(flag), Some(authzid), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("OAUTHBEARER needs a GS2 header (n,a=user,)".into());
    };
    match flag {
        b"n" | b"y" => {}
        f if f.starts_with(b"p=") => return Err(Refused::channel_binding()),
        _ => return Err("OAUTHBEARER's GS2 flag must be n or y".into()),
    }
    let Some(fields) = rest.strip_prefix(b"\x01").and_then(kvpairs) else {
        return Err("OAUTHBEARER needs ^Akey=value pairs ending in ^A^A".into());
    };
    if !fields.iter().any(|f| f.starts_with(b"auth=")) {
        return Err("OAUTHBEARER needs auth=".into());
    }
    let Some(user) = authzid.strip_prefix(b"a=") else {
        return Err(Refused::no_user(
            "OAUTHBEARER without a=user in its GS2 header cannot be routed.",
        ));
    };
    saslname(user)
}

/// `key=value ^A key=value ^A ... ^A ^A`: the fields, or `None` when the framing is wrong.
fn kvpairs(message: &[u8]) -> Option<Vec<&[u8]>> {
    let body = message.strip_suffix(b"\x01\x01")?;
    let fields: Vec<&[u8]> = body.split(|&c| c == 1).collect();
    fields
        .iter()
        .all(|f| f.contains(&b'=') && !f.is_empty())
        .then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::response::Status;

    #[test]
    fn xoauth2() {
        let user = |m: &[u8]| xoauth2_user(m).map_err(|r| r.status);
        assert_eq!(
            user(b"user=alice@example.net\x01auth=Bearer tok\x01\x01"),
            Ok("alice@example.net".into())
        );
        assert_eq!(
            user(b"auth=Bearer tok\x01user=bob\x01\x01"),
            Ok("bob".into())
        );
        for bad in [
            &b""[..],
            b"user=alice\x01auth=Bearer tok",
            b"user=alice\x01\x01",
            b"auth=Bearer t\x01\x01",
            b"user=\x01auth=Bearer t\x01\x01",
            b"user=a\0b\x01auth=Bearer t\x01\x01",
            b"user=a\x01user=b\x01auth=Bearer t\x01\x01",
            b"user=a\x01\x01auth=Bearer t\x01\x01",
            b"user=\xff\x01auth=Bearer t\x01\x01",
        ] {
            assert_eq!(user(bad), Err(Status::Bad), "{bad:?}");
        }
    }

    #[test]
    fn oauthbearer() {
        let user = |m: &[u8]| oauthbearer_user(m).map_err(|r| r.status);
        assert_eq!(
            user(b"n,a=alice@example.net,\x01host=h\x01port=143\x01auth=Bearer tok\x01\x01"),
            Ok("alice@example.net".into())
        );
        assert_eq!(
            user(b"y,a=a=2Cb=3Dc,\x01auth=Bearer tok\x01\x01"),
            Ok("a,b=c".into())
        );
        assert_eq!(
            user(b"n,,\x01auth=Bearer tok\x01\x01"),
            Err(Status::No),
            "no authzid: nothing to route by"
        );
        assert_eq!(
            user(b"p=tls-unique,a=alice,\x01auth=Bearer tok\x01\x01"),
            Err(Status::No)
        );
        for bad in [
            &b""[..],
            b"n,a=alice",
            b"x,a=alice,\x01auth=Bearer t\x01\x01",
            b"n,a=alice,auth=Bearer t\x01\x01",
            b"n,a=alice,\x01host=h\x01\x01",
            b"n,a=al=2Xice,\x01auth=Bearer t\x01\x01",
            b"n,a=,\x01auth=Bearer t\x01\x01",
        ] {
            assert_eq!(user(bad), Err(Status::Bad), "{bad:?}");
        }
    }
}
