//! The relay observer in both directions. Input: 4 octets of read-size seed, then the session
//! as steps separated by 0xFF; a step starting with `C` goes client → backend, any other
//! first octet backend → client (the first octet is not part of the step). Oracle: the
//! session read whole, cut into random reads, and cut with literal octets spliced past the
//! observer (as the relay does) gives the same observations.
#![no_main]

use imapgate::Way;
use imapgate::fuzzing::{Reads, observe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, session @ ..] = data else {
        return;
    };
    let seed = u32::from_be_bytes([*a, *b, *c, *d]);
    let steps: Vec<(Way, &[u8])> = session
        .split(|&o| o == 0xff)
        .filter_map(|step| {
            let (&first, bytes) = step.split_first()?;
            let way = if first == b'C' {
                Way::ClientToBackend
            } else {
                Way::BackendToClient
            };
            Some((way, bytes))
        })
        .collect();
    let whole = observe(&steps, Reads::Whole);
    assert_eq!(whole, observe(&steps, Reads::Cut(seed)), "cut reads");
    assert_eq!(
        whole,
        observe(&steps, Reads::Spliced(seed)),
        "spliced literals"
    );
});
