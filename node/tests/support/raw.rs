//! A protocol-level client for tests: raw inference streams to a node, so tests can
//! send exactly the messages (good or bad) they need.

use std::time::Duration;

use allmende_node::network::framing::{read_message, write_message};
use allmende_node::network::{Network, NetworkConfig};
use allmende_protocol::{ClientMessage, LayerRange, ModelId, ServerMessage, WireDType, WireTensor};
use libp2p::{PeerId, Stream};

use super::swarm::Node;

/// A node joined to the swarm at `node`, listening on `listen`, once it has a peer.
pub async fn joined(node: &Node, listen: Vec<libp2p::Multiaddr>, dht_server: bool) -> Network {
    let network = Network::start(NetworkConfig {
        keypair: libp2p::identity::Keypair::generate_ed25519(),
        swarm_key: None,
        listen,
        bootstrap: vec![node.addr.parse().unwrap()],
        dht_server,
        services: allmende_node::network::Services {
            mdns: false,
            relay: None,
            upnp: false,
        },
        external: vec![],
    })
    .await
    .unwrap();
    network
        .wait_for_peers(Duration::from_secs(10), "node")
        .await
        .unwrap();
    network
}

pub struct RawClient {
    pub network: Network,
    pub peer: PeerId,
    pub model: ModelId,
}

impl RawClient {
    /// A client-mode node on the swarm, bootstrapped from `node`.
    pub async fn connect(node: &Node) -> RawClient {
        let model =
            allmende_node::model::model_id(&super::model_path(), &indicatif::ProgressBar::hidden())
                .unwrap();
        let network = joined(node, vec![], false).await;
        RawClient {
            network,
            peer: node.peer_id.parse().unwrap(),
            model,
        }
    }

    pub async fn stream(&self) -> Stream {
        self.network.open_stream(self.peer).await.unwrap()
    }

    /// Opens a session over `range`; returns the stream and the server's reply.
    pub async fn open(&self, range: LayerRange, max_len: u32) -> (Stream, ServerMessage<'static>) {
        let mut stream = self.stream().await;
        let open = ClientMessage::Open {
            model: self.model,
            range,
            max_len,
            dtype: WireDType::F32,
        };
        let reply = ask(&mut stream, &open).await;
        (stream, reply)
    }
}

pub async fn ask(stream: &mut Stream, message: &ClientMessage<'_>) -> ServerMessage<'static> {
    write_message(stream, message).await.expect("request sent");
    read_message(stream, allmende_protocol::MAX_MESSAGE_BYTES)
        .await
        .expect("a reply")
}

/// Hidden states `[1, seq, width]` filled with `value`.
pub fn hidden(seq: u32, width: u32, value: f32) -> WireTensor<'static> {
    let values = vec![value; (seq * width) as usize];
    WireTensor::from_f32(&[1, seq, width], &values, WireDType::F32).unwrap()
}
