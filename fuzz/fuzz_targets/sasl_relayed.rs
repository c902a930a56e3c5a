//! The relayed SASL mechanisms' first messages: XOAUTH2, OAUTHBEARER (GS2 header, key/value
//! pairs) and SCRAM client-first (GS2 header, saslname `=2C`/`=3D` decoding).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imapgate::fuzzing::sasl_relayed(data);
});
