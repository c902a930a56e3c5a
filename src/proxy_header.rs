//! The PROXY protocol (HAProxy's spec): reading a v1 or v2 header from a trusted L4 balancer,
//! and writing one to a backend. Exactly the header's octets are read, never more: on an
//! implicit-TLS listener the ClientHello follows at once and belongs to the TLS handshake.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// v2's 12-octet signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1's longest line (spec: 107 octets, CRLF included).
const V1_MAX: usize = 107;
/// Longest v2 address block and TLVs taken. The spec allows 65,535; balancers send the
/// addresses (12 or 36 octets) and a few TLVs, so more is refused, not buffered.
const V2_MAX: usize = 1024;

/// The source address the header carries; `None` for `UNKNOWN` / `LOCAL` (health checks of the
/// balancer itself), where the connection's own address stands.
pub async fn read<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<Option<SocketAddr>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut header = vec![0u8; 16];
    stream.read_exact(&mut header[..6]).await?;
    if header.starts_with(b"PROXY ") {
        header.truncate(6);
        // v1: a text line; read it one octet at a time so nothing past CRLF is taken.
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX {
                return Err(invalid("PROXY v1 line too long"));
            }
            header.push(stream.read_u8().await?);
        }
    } else if header[..6] == V2_SIGNATURE[..6] {
        stream.read_exact(&mut header[6..16]).await?;
        if &header[..12] != V2_SIGNATURE {
            return Err(invalid("bad PROXY v2 signature"));
        }
        let length = u16::from_be_bytes([header[14], header[15]]) as usize;
        if length > V2_MAX {
            return Err(invalid("PROXY v2 header too long"));
        }
        header.resize(16 + length, 0);
        stream.read_exact(&mut header[16..]).await?;
    } else {
        return Err(invalid("no PROXY header"));
    }
    let source = match ppp::HeaderResult::parse(&header) {
        ppp::HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(h)) => Ok(match h.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            ppp::v2::Addresses::IPv6(a) => {
                Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
        }),
        _ => Err(invalid("malformed PROXY header")),
    }?;
    // A balancer names a real client: 0.0.0.0, ::, port 0 (a block of zeros) are not one.
    if let Some(client) = source
        && (client.ip().is_unspecified() || client.port() == 0)
    {
        return Err(invalid("PROXY header names no client address"));
    }
    Ok(source)
}

/// A v1 header line for `client` → `local`.
pub fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = (canonical(client), canonical(local));
    let family = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    )
    .into_bytes()
}

/// A v2 header for `client` → `local`.
pub fn v2(client: SocketAddr, local: SocketAddr) -> io::Result<Vec<u8>> {
    let (client, local) = (canonical(client), canonical(local));
    let addresses: ppp::v2::Addresses = if client.is_ipv4() == local.is_ipv4() {
        (client, local).into()
    } else {
        ppp::v2::Addresses::Unspecified
    };
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        addresses,
    )
    .build()
}

/// A v2 header with the LOCAL command: a connection of the proxy's own (health checks).
pub fn v2_local() -> io::Result<Vec<u8>> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
}

/// `::ffff:1.2.3.4` as `1.2.3.4`, so a v4 client on a dual-stack socket is sent as TCP4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let client: SocketAddr = "203.0.113.7:51234".parse().unwrap();
        let local: SocketAddr = "10.0.0.1:993".parse().unwrap();
        for header in [v1(client, local), v2(client, local).unwrap()] {
            let mut input = header.clone();
            input.extend_from_slice(b"\x16\x03\x01 client hello");
            let mut reader = &input[..];
            assert_eq!(read(&mut reader).await.unwrap(), Some(client));
            assert_eq!(
                reader, b"\x16\x03\x01 client hello",
                "nothing past the header"
            );
        }
        let mut unknown = &b"PROXY UNKNOWN\r\n"[..];
        assert_eq!(read(&mut unknown).await.unwrap(), None);
        let mut plain = &b"a1 LOGIN x y\r\n"[..];
        assert!(read(&mut plain).await.is_err());
        let mut endless = vec![b'P'];
        endless.extend_from_slice(b"ROXY ");
        endless.extend(vec![b'1'; 200]);
        assert!(read(&mut &endless[..]).await.is_err());
    }

    #[tokio::test]
    async fn v2_is_read_strictly() {
        // 65,535 octets of zeros as the address block: refused before they are read.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        huge.extend(vec![0u8; 65_535]);
        let error = read(&mut &huge[..]).await.unwrap_err();
        assert!(error.to_string().contains("too long"), "{error}");
        // A well-formed header naming 0.0.0.0:0 names no client.
        let zeros = v2(
            "0.0.0.0:0".parse().unwrap(),
            "10.0.0.1:143".parse().unwrap(),
        )
        .unwrap();
        assert!(read(&mut &zeros[..]).await.is_err());
        let v1_zeros = b"PROXY TCP4 0.0.0.0 10.0.0.1 0 143\r\n";
        assert!(read(&mut &v1_zeros[..]).await.is_err());
        // An address block shorter than its family needs.
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert!(read(&mut &short[..]).await.is_err());
        // LOCAL: the balancer's own connection, no client.
        let local = v2_local().unwrap();
        assert_eq!(read(&mut &local[..]).await.unwrap(), None);
    }
}
