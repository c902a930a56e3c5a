//! The backend greeting / login-response checks that are pure functions of a line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imapgate::fuzzing::backend_line(data);
});
