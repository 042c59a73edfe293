//! Peers running the previous version of the inference protocol: each stream gets one
//! error naming both versions, so the user of an older node learns why it is not
//! served rather than seeing a silent server.

use allmende_protocol::inference::{PREVIOUS_PROTOCOL_NAME, PROTOCOL_NAME};
use allmende_protocol::{ErrorKind, ServerMessage};
use futures::StreamExt;
use libp2p::Stream;

use crate::network::framing::{write_message, FrameReader};
use crate::network::{Network, PREVIOUS_INFERENCE_PROTOCOL};

/// How long a peer of the previous version may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers streams of the previous protocol version until the network stops. Their
/// messages are the previous version's, so none is decoded: the first frame is read
/// and answered with an `Error`, which both versions encode alike.
pub async fn refuse_previous_version(network: Network) {
    let mut incoming = match network.accept_protocol(PREVIOUS_INFERENCE_PROTOCOL) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::warn!("cannot answer peers of the previous protocol version: {e}");
            return;
        }
    };
    while let Some((peer, stream)) = incoming.next().await {
        tracing::info!(%peer, "a peer speaks {PREVIOUS_PROTOCOL_NAME}, this node {PROTOCOL_NAME}");
        tokio::spawn(refuse(stream));
    }
}

async fn refuse(mut stream: Stream) {
    let mut reader = FrameReader::new(64 << 10, None);
    let first = reader.read_frame(&mut stream);
    if tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first)
        .await
        .is_err()
    {
        return;
    }
    let reply = ServerMessage::Error {
        kind: ErrorKind::BadRequest,
        message: format!(
            "this server speaks {PROTOCOL_NAME} and your node {PREVIOUS_PROTOCOL_NAME}: \
             upgrade allmende"
        ),
    };
    let _ = write_message(&mut stream, &reply).await;
}
