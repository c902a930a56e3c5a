//! imapgate's TLS (rustls's unbuffered API, `stream/tls.rs`) against a peer sending arbitrary
//! octets, cut at arbitrary points: as the server (a client's ClientHello and records) or as
//! the client (a server's flight).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imapgate::fuzzing::tls_peer(data);
});
