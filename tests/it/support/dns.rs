//! A DNS server that knows one name: enough for a resolver (glibc's, in the image's chroot) to
//! find a backend by name through a real UDP query on port 53, as in a cluster.
//!
//! It listens on an address of its own in 127.0.0.0/8 (port 53 on 127.0.0.1 may be taken by a
//! local resolver) and answers an A query for `name` with `address`, every other query with
//! no records (NOERROR, as for an AAAA of a name with only A records) or NXDOMAIN.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

pub struct Dns {
    /// Where it listens; `nameserver <ip>` in a resolv.conf.
    pub addr: SocketAddr,
    /// A queries answered for the name.
    pub answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Dns {
    pub fn start(name: &str, address: Ipv4Addr) -> Dns {
        let socket = (2..250)
            .find_map(|i| UdpSocket::bind((Ipv4Addr::new(127, 53, 0, i), 53)).ok())
            .expect("a free 127.53.0.x:53");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let (answered, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let wanted = name.trim_end_matches('.').to_ascii_lowercase();
        let (count, stopped) = (answered.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::SeqCst) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some((reply, is_answer)) = answer(&buf[..n], &wanted, address) {
                    if is_answer {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        Dns {
            addr,
            answered,
            stop,
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The reply to one query, and whether it carries the A record; `None` for what is not a
/// one-question query.
fn answer(query: &[u8], wanted: &str, address: Ipv4Addr) -> Option<(Vec<u8>, bool)> {
    let header = query.get(..12)?;
    if u16::from_be_bytes([header[4], header[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let known = labels.join(".") == wanted;
    let is_answer = known && qtype == 1;

    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&header[..2]); // the query's id
    // QR, the query's RD, RA; NXDOMAIN for names it does not know.
    reply.push(0x80 | (header[2] & 0x01));
    reply.push(if known { 0x80 } else { 0x83 });
    reply.extend_from_slice(&[0, 1, 0, u8::from(is_answer), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if is_answer {
        // A pointer to the question's name, A, IN, a TTL of 5 s, 4 octets.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        reply.extend_from_slice(&address.octets());
    }
    Some((reply, is_answer))
}
