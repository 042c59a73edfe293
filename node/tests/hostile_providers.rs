//! Servers anyone can announce, as a client meets them: a provider that answers with
//! the largest replies a frame can carry, and an announcement whose addresses point
//! where no node should dial. The honest server and every client are `allmende`
//! processes on real sockets; the hostile provider is a libp2p node in this test's
//! process, announcing itself in the DHT as a server does.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allmende_node::network::framing::{write_message, FrameReader};
use allmende_node::network::keys::{model_key, server_key};
use allmende_node::network::Network;
use allmende_protocol::inference::PROTOCOL_VERSION;
use allmende_protocol::{ClientMessage, LayerRange, ModelId, ServerInfo, ServerMessage};
use futures::{AsyncWriteExt, StreamExt};
use serde_json::json;
use support::cgroup::MemoryCage;
use support::http::{free_port, request, wait_until_serving};
use support::swarm::{allmende, binary, ids, json_of, Node};

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
        numerics_version: allmende_protocol::NUMERICS_VERSION,
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

/// What the hostile provider answers to an `Open` (and, for `HugeInfo`, to a probe).
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// A probe's answer listing millions of empty addresses, which would cost some
    /// 24 bytes of memory for every 8 bytes of frame if decoded; `Open`s as `HugeError`.
    HugeInfo,
    /// An error whose message fills the frame.
    HugeError,
    /// A `Busy` whose reason fills the frame.
    HugeBusy,
    /// A prefix announcing the largest frame, a little of it, then nothing.
    Stalled,
}

const FILL: usize = 60 << 20;

async fn answer(mut stream: libp2p::Stream, reply: Reply, contacts: Arc<AtomicUsize>) {
    let mut reader = FrameReader::default();
    while let Ok(message) = reader.read_message::<ClientMessage, _>(&mut stream).await {
        match message {
            ClientMessage::Info => {
                let addrs = match reply {
                    Reply::HugeInfo => {
                        contacts.fetch_add(1, Ordering::SeqCst);
                        vec![String::new(); FILL / 8]
                    }
                    // A valid answer: the client should find the server usable.
                    _ => vec![],
                };
                let info = ServerMessage::Info(hostile_info(model(), addrs));
                if write_message(&mut stream, &info).await.is_err() {
                    return;
                }
            }
            ClientMessage::Open { .. } => {
                contacts.fetch_add(1, Ordering::SeqCst);
                let _ = match reply {
                    Reply::HugeError | Reply::HugeInfo => {
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
    let provider = HostileProvider::start(&honest).await;
    for reply in [Reply::HugeError, Reply::HugeBusy, Reply::Stalled] {
        provider.set(reply);
        let before = provider.contacts();
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
            if provider.contacts() > before {
                break;
            }
        }
        assert!(
            provider.contacts() > before,
            "no client tried the hostile provider with {reply:?}"
        );
    }
}

/// A gateway's memory, far above what it holds (the tokenizer, embedding and head of
/// the test model, and generations' buffers), far below what the replies above
/// would cost it if decoded or copied.
const GATEWAY_MEMORY: u64 = 1 << 30;

/// The same provider against a gateway in a memory group of its own, as it would run
/// on a small machine facing the internet: anyone may make it look at the swarm
/// (`GET /api/swarm`) and send it requests, and every honest request gets the tokens
/// of `--local` while the gateway stays inside its memory, with each kind of reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_in_its_memory_serves_honest_users_past_a_hostile_provider() {
    let honest = Node::start("0..30", None, &[]);
    let local = tokio::task::spawn_blocking(|| {
        let out = allmende(&[
            "generate",
            "--local",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "8",
            "--json",
        ]);
        json_of(&out)["text"].as_str().unwrap().to_string()
    })
    .await
    .unwrap();
    let provider = HostileProvider::start(&honest).await;
    let completion = json!({"prompt": PROMPT, "max_tokens": 8, "temperature": 0});
    for reply in [
        Reply::HugeInfo,
        Reply::HugeError,
        Reply::HugeBusy,
        Reply::Stalled,
    ] {
        provider.set(reply);
        let before = provider.contacts();
        let cage = MemoryCage::new(GATEWAY_MEMORY);
        let bootstrap = honest.addr.clone();
        let (completion, cage) = (completion.clone(), Arc::new(cage));
        let (gateway_cage, contacts) = (cage.clone(), provider.contacts.clone());
        let tries = tokio::task::spawn_blocking(move || {
            let gateway = CagedGateway::start(&gateway_cage, &bootstrap);
            let mut texts = Vec::new();
            for _ in 0..6 {
                let (status, _) = request(gateway.addr, "GET", "/api/swarm", None);
                assert_eq!(status, 200, "{reply:?}: /api/swarm");
                let (status, body) =
                    request(gateway.addr, "POST", "/v1/completions", Some(&completion));
                assert_eq!(status, 200, "{reply:?}: {body}");
                texts.push(body["choices"][0]["text"].as_str().unwrap().to_string());
                if texts.len() >= 2 && contacts.load(Ordering::SeqCst) > before {
                    break;
                }
            }
            texts
        });
        let texts = tries.await.unwrap();
        assert!(
            texts.iter().all(|t| *t == local),
            "{reply:?}: {texts:?}, --local wrote {local:?}"
        );
        assert!(
            provider.contacts() > before,
            "the gateway never tried the hostile provider with {reply:?}"
        );
        assert_eq!(
            cage.oom_kills(),
            0,
            "{reply:?}: the gateway ran out of memory"
        );
        eprintln!(
            "{reply:?}: the gateway's memory peaked at {} MiB",
            cage.peak() >> 20
        );
    }
}

/// A libp2p node in this process announcing itself as a fast server of every layer,
/// answering as [`Reply`] says.
struct HostileProvider {
    _network: Network,
    mode: Arc<std::sync::Mutex<Reply>>,
    /// Probes and opens answered as asked.
    contacts: Arc<AtomicUsize>,
}

impl HostileProvider {
    async fn start(honest: &Node) -> HostileProvider {
        let network = joined(honest).await;
        let addrs = network.listen_addrs().await.unwrap();
        announce(
            &network,
            model(),
            addrs.iter().map(|a| a.to_string()).collect(),
        )
        .await;
        let mut incoming = network.accept().unwrap();
        let mode = Arc::new(std::sync::Mutex::new(Reply::HugeError));
        let contacts = Arc::new(AtomicUsize::new(0));
        let (answering, counting) = (mode.clone(), contacts.clone());
        tokio::spawn(async move {
            while let Some((_, stream)) = incoming.next().await {
                let reply = *answering.lock().unwrap();
                tokio::spawn(answer(stream, reply, counting.clone()));
            }
        });
        HostileProvider {
            _network: network,
            mode,
            contacts,
        }
    }

    fn set(&self, reply: Reply) {
        *self.mode.lock().unwrap() = reply;
    }

    fn contacts(&self) -> usize {
        self.contacts.load(Ordering::SeqCst)
    }
}

/// `allmende gateway` joining at `bootstrap`, in `cage` from its first instruction.
struct CagedGateway {
    child: Child,
    addr: SocketAddr,
}

impl CagedGateway {
    fn start(cage: &MemoryCage, bootstrap: &str) -> CagedGateway {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("sh")
            .args(["-c", r#"echo $$ > "$0" && exec "$@""#])
            .arg(cage.procs())
            .arg(binary())
            .args([
                "gateway",
                "--no-mdns",
                "--threads",
                "1",
                "--bootstrap",
                bootstrap,
            ])
            .args(["--api", &addr.to_string()])
            .env("ALLMENDE_MODEL", support::model_path())
            .stdout(Stdio::null())
            .spawn()
            .expect("allmende gateway starts");
        wait_until_serving(addr);
        CagedGateway { child, addr }
    }
}

impl Drop for CagedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
