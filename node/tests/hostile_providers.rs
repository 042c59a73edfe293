//! Servers anyone can announce, as a client meets them: a provider that answers with
//! the largest replies a frame can carry, and an announcement whose addresses point
//! where no node should dial. The honest server and every client are `allmende`
//! processes on real sockets; the hostile provider is a libp2p node in this test's
//! process, announcing itself in the DHT as a server does.

mod support;

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allmende_node::network::framing::{write_message, FrameReader};
use allmende_node::network::keys::{model_key, server_key};
use allmende_node::network::Network;
use allmende_protocol::inference::PROTOCOL_VERSION;
use allmende_protocol::{ClientMessage, LayerRange, ModelId, ServerInfo, ServerMessage};
use futures::{AsyncWriteExt, StreamExt};
use support::swarm::{allmende, ids, json_of, Node};

const PROMPT: &str = "The capital of France is";

/// A DHT-server node joining at `honest`, listening on loopback.
async fn joined(honest: &Node) -> Network {
    let listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    support::raw::joined(honest, listen, true).await
}

fn model() -> ModelId {
    allmende_node::model::model_id(&support::model_path(), &indicatif::ProgressBar::hidden())
        .unwrap()
}

/// A server of every layer of `model` at `addrs`, claiming to be very fast so that
/// clients try it.
fn hostile_info(model: ModelId, addrs: Vec<String>) -> ServerInfo {
    ServerInfo {
        model,
        model_name: "hostile".into(),
        block_count: 30,
        range: LayerRange::new(0, 30),
        protocol_version: PROTOCOL_VERSION,
        throughput: 10_000.0,
        free_sessions: 8,
        max_sessions: 8,
        addrs,
        draining: false,
    }
}

/// Announces `network` as [`hostile_info`].
async fn announce(network: &Network, model: ModelId, addrs: Vec<String>) {
    let value = network
        .sign_announcement(&hostile_info(model, addrs))
        .unwrap();
    network
        .put_record(
            server_key(&network.peer_id()),
            value,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    network.start_providing(model_key(&model)).await.unwrap();
}

fn generate(bootstrap: &str, local: bool) -> (Vec<u32>, usize) {
    let mut args = vec!["generate", "--no-mdns", "--prompt", PROMPT];
    args.extend(["--max-tokens", "8", "--ignore-eos", "--json"]);
    match local {
        true => args.push("--local"),
        false => args.extend(["--bootstrap", bootstrap]),
    }
    let out = allmende(&args);
    (ids(&json_of(&out)), out.stdout.len() + out.stderr.len())
}

/// What the hostile provider answers to an `Open`.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// An error whose message fills the frame.
    HugeError,
    /// A `Busy` whose reason fills the frame.
    HugeBusy,
    /// A prefix announcing the largest frame, a little of it, then nothing.
    Stalled,
}

const FILL: usize = 60 << 20;

async fn answer(mut stream: libp2p::Stream, reply: Reply, opens: Arc<AtomicUsize>) {
    let mut reader = FrameReader::default();
    while let Ok(message) = reader.read_message::<ClientMessage, _>(&mut stream).await {
        match message {
            ClientMessage::Info => {
                // A valid answer: the client should find the server usable.
                let info = ServerMessage::Info(hostile_info(model(), vec![]));
                if write_message(&mut stream, &info).await.is_err() {
                    return;
                }
            }
            ClientMessage::Open { .. } => {
                opens.fetch_add(1, Ordering::SeqCst);
                let _ = match reply {
                    Reply::HugeError => {
                        let message = ServerMessage::Error {
                            kind: allmende_protocol::ErrorKind::Internal,
                            message: "e".repeat(FILL),
                        };
                        write_message(&mut stream, &message).await
                    }
                    Reply::HugeBusy => {
                        let reason = "b".repeat(FILL);
                        write_message(&mut stream, &ServerMessage::Busy { reason }).await
                    }
                    Reply::Stalled => {
                        let prefix = (allmende_protocol::MAX_MESSAGE_BYTES as u32).to_le_bytes();
                        let _ = stream.write_all(&prefix).await;
                        let _ = stream.write_all(&[0u8; 1024]).await;
                        let _ = stream.flush().await;
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        Ok(())
                    }
                };
            }
            _ => return,
        }
    }
}

/// A provider answering `Open` with each oversized reply in turn: the client leaves it
/// for the honest server, with the tokens of `--local`, and what it prints stays small
/// (a reason of 60 MiB is refused while it is decoded, not copied into errors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_with_oversized_replies_leaves_clients_their_tokens() {
    let honest = Node::start("0..30", None, &[]);
    let local = tokio::task::spawn_blocking(|| generate("", true).0)
        .await
        .unwrap();
    let hostile = joined(&honest).await;
    let addrs = hostile.listen_addrs().await.unwrap();
    announce(
        &hostile,
        model(),
        addrs.iter().map(|a| a.to_string()).collect(),
    )
    .await;
    let mut incoming = hostile.accept().unwrap();
    let opens = Arc::new(AtomicUsize::new(0));
    let mode = Arc::new(std::sync::Mutex::new(Reply::HugeError));
    {
        let (opens, mode) = (opens.clone(), mode.clone());
        tokio::spawn(async move {
            while let Some((_, stream)) = incoming.next().await {
                let reply = *mode.lock().unwrap();
                tokio::spawn(answer(stream, reply, opens.clone()));
            }
        });
    }

    for reply in [Reply::HugeError, Reply::HugeBusy, Reply::Stalled] {
        *mode.lock().unwrap() = reply;
        let before = opens.load(Ordering::SeqCst);
        // The client picks among two servers; it may pick the honest one first.
        for attempt in 0..6 {
            let bootstrap = honest.addr.clone();
            let (tokens, printed) =
                tokio::task::spawn_blocking(move || generate(&bootstrap, false))
                    .await
                    .unwrap();
            assert_eq!(tokens, local, "{reply:?}, attempt {attempt}");
            assert!(
                printed < 64 << 10,
                "{reply:?}: the client printed {printed} bytes"
            );
            if opens.load(Ordering::SeqCst) > before {
                break;
            }
        }
        assert!(
            opens.load(Ordering::SeqCst) > before,
            "no client tried the hostile provider with {reply:?}"
        );
    }
}

/// An announcement whose addresses are names (`/dns4/localhost/...`): a client reading
/// it must not resolve and dial them, or anyone could make every client connect
/// wherever a name points (here, a port on the client's own machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_in_an_announcement_are_not_dialled() {
    let honest = Node::start("0..30", None, &[]);
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = trap.local_addr().unwrap().port();
    let dialled = Arc::new(AtomicUsize::new(0));
    {
        let dialled = dialled.clone();
        std::thread::spawn(move || {
            for mut conn in trap.incoming().flatten() {
                dialled.fetch_add(1, Ordering::SeqCst);
                let _ = conn.read(&mut [0u8; 64]);
            }
        });
    }
    // The announcing node leaves once its records are stored: only the records say
    // where it is.
    let fake = joined(&honest).await;
    let fake_peer = fake.peer_id().to_string();
    let addr = format!("/dns4/localhost/tcp/{port}");
    announce(&fake, model(), vec![addr]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(fake);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let local = tokio::task::spawn_blocking(|| generate("", true).0)
        .await
        .unwrap();
    let bootstrap = honest.addr.clone();
    let (tokens, _) = tokio::task::spawn_blocking(move || generate(&bootstrap, false))
        .await
        .unwrap();
    assert_eq!(tokens, local);
    // The announcement was read: `status` lists the server it names.
    let bootstrap = honest.addr.clone();
    let status = tokio::task::spawn_blocking(move || {
        json_of(&allmende(&[
            "status",
            "--bootstrap",
            &bootstrap,
            "--no-mdns",
            "--json",
        ]))
    })
    .await
    .unwrap();
    let listed = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["peer"] == fake_peer.as_str());
    assert!(listed, "the announcement was never read: {status:#}");
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        0,
        "a client dialled a name from an announcement"
    );
}
