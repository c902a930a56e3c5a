//! The PROXY v1/v2 header reader on an arbitrary stream: no panic, never more than the
//! header taken, no unspecified client address accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = imapgate::fuzzing::proxy_header(data);
});
