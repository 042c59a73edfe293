//! The weights protocol: a node without the model file fetches the model's manifest
//! from a peer, checks it against the model id, then fetches the tensors it needs
//! chunk by chunk, each checked against the manifest's hash of that chunk.
//!
//! One stream carries any number of requests, each answered before the next is read.

use serde::{Deserialize, Serialize};

use crate::model::ModelId;

pub const WEIGHTS_PROTOCOL_NAME: &str = "/allmende/weights/1";

/// Largest request a server reads: a tensor name is short.
pub const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightsRequest {
    /// The model's manifest, encoded ([`crate::Manifest::encode`]).
    Manifest { model: ModelId },
    /// Chunk `index` of a tensor ([`crate::manifest::CHUNK_BYTES`] bytes, the last
    /// one shorter).
    Chunk {
        model: ModelId,
        tensor: String,
        index: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightsReply {
    Manifest(#[serde(with = "serde_bytes")] Vec<u8>),
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// This node does not hold what was asked for (another model, a tensor of layers
    /// it does not host, a chunk it has not fetched yet): ask another.
    NotHeld,
    /// Asked too often: try again later or elsewhere.
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn requests_and_replies_round_trip() {
        let request = WeightsRequest::Chunk {
            model: ModelId([7; 32]),
            tensor: "blk.3.ffn_up.weight".into(),
            index: 12,
        };
        assert_eq!(
            decode::<WeightsRequest>(&encode(&request).unwrap()).unwrap(),
            request
        );
        let reply = WeightsReply::Chunk(vec![1, 2, 3]);
        let bytes = encode(&reply).unwrap();
        // A chunk's bytes travel as bytes, not as a list of numbers.
        assert!(bytes.len() <= 3 + 2);
        assert_eq!(decode::<WeightsReply>(&bytes).unwrap(), reply);
    }
}
