//! Anything a client can send a server: decoding never panics, and decoded tensors
//! are checked without trusting their declared shapes.
#![no_main]

use allmende_protocol::inference::NextHop;
use allmende_protocol::{decode, ClientMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode::<ClientMessage>(data) {
        Ok(ClientMessage::Step {
            hidden, forward, ..
        })
        | Ok(ClientMessage::Forwarded {
            hidden, forward, ..
        }) => {
            let _ = hidden.to_f32();
            let _ = NextHop::check_list(&forward, &[&[7u8; 38]]);
        }
        Ok(ClientMessage::Replay { steps, .. }) => {
            for step in steps {
                let _ = step.to_f32();
            }
        }
        _ => {}
    }
});
