//! An auth_http service's answer head, as the HTTP directory source reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imapgate::fuzzing::auth_http_answer(data);
});
