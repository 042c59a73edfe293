//! A stream's bytes as the server reads them: a length prefix bounded before any
//! allocation, then one message.
#![no_main]

use allmende_protocol::frame::{payload_len, PREFIX_BYTES};
use allmende_protocol::{decode, ClientMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= PREFIX_BYTES {
        let prefix = [rest[0], rest[1], rest[2], rest[3]];
        let Ok(len) = payload_len(prefix) else { return };
        rest = &rest[PREFIX_BYTES..];
        if rest.len() < len {
            return;
        }
        let _ = decode::<ClientMessage>(&rest[..len]);
        rest = &rest[len..];
    }
});
