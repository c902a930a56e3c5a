//! The relay observer against imap-codec: for a client stream of valid commands (as
//! imap-codec decodes them, re-encoded with non-synchronizing literals), the observer, reading
//! it in random pieces, reports as many commands, with the same names, as the codec found.
//! Input: 4 octets of read-size seed, then the client's octets.
#![no_main]

use imapgate::Way;
use imapgate::fuzzing::{Reads, codec_commands, observe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, client @ ..] = data else {
        return;
    };
    let Some((stream, mut expected)) = codec_commands(client) else {
        return;
    };
    let seed = u32::from_be_bytes([*a, *b, *c, *d]);
    let mut seen: Vec<&str> = observe(&[(Way::ClientToBackend, &stream)], Reads::Cut(seed))
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    // In-flight commands are reported at the end in table order, not necessarily sent order.
    expected.sort_unstable();
    seen.sort_unstable();
    assert_eq!(
        seen,
        expected,
        "stream {:?}",
        String::from_utf8_lossy(&stream)
    );
});
