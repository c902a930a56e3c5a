//! The pre-login command reader: arbitrary bytes in arbitrary reads. Input: 4 octets of
//! parameters (line_max, literal_max, read-size seed), then the client's stream. Checks: no
//! panic, the buffer stays within its caps, and the same stream read in random pieces gives
//! the same answers as read in the largest pieces the session allows.
#![no_main]

use imapgate::fuzzing::{Cuts, prelogin_reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, stream @ ..] = data else {
        return;
    };
    // Small caps so the limits are reached often; 1024 is the smallest allowed line_max.
    let line_max = 16 + (*a as usize) * 8;
    let literal_max = (*b as usize) * 16;
    let seed = u32::from_be_bytes([*c, *d, 0x5a, 0xa5]);
    let whole = prelogin_reader(line_max, literal_max, stream, None);
    let pieces = prelogin_reader(line_max, literal_max, stream, Some(Cuts::new(seed)));
    assert_eq!(whole, pieces, "read boundaries changed the answers");
});
