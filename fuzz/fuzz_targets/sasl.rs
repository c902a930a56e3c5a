//! The SASL decoders: a client's response line (base64, `=`, `*`) and the PLAIN / LOGIN
//! credential checks on what it decodes to (and on the raw octets).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imapgate::fuzzing::sasl(data);
});
