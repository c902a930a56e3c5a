//! The relay observer in both directions. Input: 4 octets of read-size seed, then the session
//! as steps separated by 0xFF; a step starting with `C` goes client → backend, any other
//! first octet backend → client (the first octet is not part of the step). Oracle: the
//! session read whole, cut into random reads, and cut with literal octets spliced past the
//! observer (as the relay does) gives the same observations; and the same session after
//! `COMPRESS DEFLATE` (each direction deflated, `fuzzing::compressed`), cut into random reads,
//! gives `COMPRESS` and then the same observations.
#![no_main]

use imapgate::fuzzing::{Reads, compressed, observe};
use imapgate::{Completion, Way};
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
    // A COMPRESS inside the session (in one step or across steps of a direction) would
    // start a second, nested compression: not comparable.
    let nested = [Way::ClientToBackend, Way::BackendToClient].into_iter().any(|way| {
        let joined: Vec<u8> = steps
            .iter()
            .filter(|(w, _)| *w == way)
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        joined
            .windows(8)
            .any(|w| w.eq_ignore_ascii_case(b"COMPRESS"))
    });
    if !nested {
        let deflated = compressed(&steps);
        let deflated: Vec<(Way, &[u8])> = deflated.iter().map(|(w, b)| (*w, &b[..])).collect();
        let mut expected = vec![("COMPRESS", Completion::Ok, true)];
        expected.extend(whole);
        assert_eq!(expected, observe(&deflated, Reads::Cut(seed)), "compressed");
    }
});
