//! Anything a server can send a client.
#![no_main]

use allmende_protocol::{decode, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode::<ServerMessage>(data) {
        Ok(ServerMessage::Hidden { hidden, .. }) => {
            let _ = hidden.to_f32();
        }
        Ok(ServerMessage::Info(info)) => {
            let _ = info.validate();
        }
        _ => {}
    }
});
