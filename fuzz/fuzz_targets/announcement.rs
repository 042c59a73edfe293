//! DHT records: the signed envelope, the server info inside, and the full check a
//! node runs before storing or routing by a record.
#![no_main]

use allmende_node::network::record;
use allmende_protocol::announcement::SignedAnnouncement;
use allmende_protocol::{decode, ServerInfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = decode::<SignedAnnouncement>(data) {
        let _ = a.check(1_800_000_000, 90);
        if let Ok(info) = decode::<ServerInfo>(&a.info) {
            let _ = info.validate();
        }
    }
    let key = libp2p::kad::RecordKey::new(&"/allmende/server/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq");
    let _ = record::verify_stored(&key, data);
});
