//! The weights protocol: requests a server reads, replies and manifests a fetching
//! node reads, and the check of a manifest's tensor table before a cache is laid out.
#![no_main]

use allmende_node::weights::cache::layout;
use allmende_protocol::weights::{WeightsReply, WeightsRequest};
use allmende_protocol::{decode, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<WeightsRequest>(data);
    if let Ok(WeightsReply::Manifest(bytes)) = decode::<WeightsReply>(data) {
        if let Ok(manifest) = Manifest::decode(&bytes) {
            let _ = layout(&manifest);
        }
    }
    if let Ok(manifest) = Manifest::decode(data) {
        let _ = layout(&manifest);
    }
});
