//! Attacks on a node's slots: streams and sessions held by one peer, sessions kept
//! open without progress, and limits that would throttle an honest client at full
//! speed. Each test runs a real node in a memory control group (its budget), attacks
//! it over real libp2p streams, and checks that an honest client still gets the same
//! tokens.

mod support;

use std::time::Duration;

use allmende_node::network::framing::{read_message, write_message};
use allmende_protocol::{ClientMessage, LayerRange, ServerMessage};
use support::attack::{honest_tokens, survived, BUDGET};
use support::cgroup::MemoryCage;
use support::raw::{ask, hidden, RawClient};
use support::swarm::Node;

/// One peer opens every stream it can and holds them silently: the node keeps a
/// quarter of its streams for other peers, so an honest client still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_stream() {
    let cage = MemoryCage::new(BUDGET);
    // 4 sessions: room for 4 × 2 + 16 = 24 streams.
    let mut node = Node::start_caged(&cage, "0..30", &["--max-sessions", "4"]);
    let before = honest_tokens(&node.addr).await;

    let attacker = RawClient::connect(&node).await;
    let mut held = Vec::new();
    let mut answered = 0;
    for _ in 0..60 {
        let Ok(mut stream) = attacker.network.open_stream(attacker.peer).await else {
            continue;
        };
        // A stream the node refused says `Busy` and is closed: its probe gets no
        // `Info`.
        let probe = async {
            write_message(&mut stream, &ClientMessage::Info)
                .await
                .ok()?;
            read_message::<ServerMessage, _>(&mut stream, allmende_protocol::MAX_MESSAGE_BYTES)
                .await
                .ok()
        };
        if let Ok(Some(ServerMessage::Info(_))) =
            tokio::time::timeout(Duration::from_secs(5), probe).await
        {
            answered += 1;
        }
        held.push(stream);
    }
    // Three quarters of 24 streams, or half of that while the honest client's last
    // stream is still being closed.
    assert!(
        (9..=18).contains(&answered),
        "one peer got {answered} of 24 streams"
    );
    survived(&mut node, &cage, &before).await;
    drop(held);
}

/// One peer opens sessions until it is told the node is busy, and holds them: it gets
/// its fair share, and an honest client still finds a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_session() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &["--max-sessions", "8"]);
    let before = honest_tokens(&node.addr).await;

    let attacker = RawClient::connect(&node).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let (stream, reply) = attacker.open(LayerRange::new(0, 30), 64).await;
        match reply {
            ServerMessage::Opened { .. } => held.push(stream),
            ServerMessage::Busy { .. } => break,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    // Three quarters of 8 sessions, or half of that while the honest client's last
    // session is still being closed.
    assert!(
        (3..=6).contains(&held.len()),
        "one peer got {} of 8 sessions",
        held.len()
    );
    survived(&mut node, &cage, &before).await;
    drop(held);
}

/// A session that only sends `Info` makes no progress: it is closed after the idle
/// timeout like a silent one, and its slot goes back to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_do_not_keep_a_session_alive() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &["--idle-timeout", "2"]);
    let before = honest_tokens(&node.addr).await;

    let attacker = RawClient::connect(&node).await;
    let (mut stream, reply) = attacker.open(LayerRange::new(0, 30), 64).await;
    let ServerMessage::Opened { session, .. } = reply else {
        panic!("not opened: {reply:?}");
    };
    let mut closed = false;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if write_message(&mut stream, &ClientMessage::Info)
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        match tokio::time::timeout(
            Duration::from_secs(2),
            read_message::<ServerMessage, _>(&mut stream, allmende_protocol::MAX_MESSAGE_BYTES),
        )
        .await
        {
            Ok(Ok(ServerMessage::Info(_))) => {}
            _ => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "six seconds of probes kept a session with a 2 s idle timeout"
    );
    let step = ClientMessage::Step {
        session,
        step: 1,
        position: 0,
        forward: vec![],
        hidden: hidden(1, 576, 0.1),
    };
    let gone = match write_message(&mut stream, &step).await {
        Err(_) => true,
        Ok(()) => {
            read_message::<ServerMessage, _>(&mut stream, allmende_protocol::MAX_MESSAGE_BYTES)
                .await
                .is_err()
        }
    };
    assert!(gone, "the session's stream is closed");
    survived(&mut node, &cage, &before).await;
}

/// Decode steps as fast as one client can send them are never rate-limited: a session
/// is paced by its own steps, and the compute is shared fairly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_at_full_speed_is_never_throttled() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..2", &[]);
    let client = RawClient::connect(&node).await;
    let (mut stream, reply) = client.open(LayerRange::new(0, 2), 2048).await;
    let ServerMessage::Opened { session, .. } = reply else {
        panic!("not opened: {reply:?}");
    };
    // Far more steps than the default 200 requests per second with bursts of 400.
    let steps = 1500;
    let started = std::time::Instant::now();
    for position in 0..steps {
        let step = ClientMessage::Step {
            session,
            step: position.into(),
            position,
            forward: vec![],
            hidden: hidden(1, 576, 0.01),
        };
        match ask(&mut stream, &step).await {
            ServerMessage::Hidden { .. } => {}
            other => panic!("step {position} refused: {other:?}"),
        }
    }
    let rate = steps as f64 / started.elapsed().as_secs_f64();
    eprintln!("{steps} steps at {rate:.0} steps/s");
    assert!(node.child.try_wait().unwrap().is_none());
    let reply = ask(&mut stream, &ClientMessage::Info).await;
    assert!(
        matches!(reply, ServerMessage::Info(_)),
        "the client is not banned: {reply:?}"
    );
}
