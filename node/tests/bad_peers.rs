//! A node survives whatever a peer sends: unknown sessions, wrong shapes, overlong
//! sequences, oversized frames and garbage each get an error reply or a closed stream,
//! and the node keeps serving everyone else.

mod support;

use allmende_node::network::framing::{read_message, write_message, FrameIoError};
use allmende_protocol::inference::{forward_proof, NextHop};
use allmende_protocol::{
    ClientMessage, ErrorKind, LayerRange, ModelId, ServerMessage, WireDType, WireTensor,
};
use futures::AsyncWriteExt;
use libp2p::Stream;
use support::raw::{ask, hidden, RawClient};
use support::swarm::{allmende, ids, json_of, Node};

fn error_kind(reply: ServerMessage) -> ErrorKind {
    match reply {
        ServerMessage::Error { kind, .. } => kind,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// After a fatal frame the server replies once, then closes the stream.
async fn expect_error_then_close(stream: &mut Stream) {
    let reply: ServerMessage = read_message(stream, allmende_protocol::MAX_MESSAGE_BYTES)
        .await
        .expect("an error reply");
    assert_eq!(error_kind(reply), ErrorKind::BadRequest);
    let next = read_message::<ServerMessage, _>(stream, allmende_protocol::MAX_MESSAGE_BYTES).await;
    assert!(
        matches!(next, Err(FrameIoError::Closed) | Err(FrameIoError::Io(_))),
        "{next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_node_keeps_serving() {
    let mut node = Node::start("0..30", None, &["--max-session-len", "8"]);
    let client = RawClient::connect(&node).await;
    let (network, peer, model) = (&client.network, client.peer, client.model);

    // A step for a session that does not exist; the stream stays usable.
    let mut s = network.open_stream(peer).await.unwrap();
    let step = ClientMessage::Step {
        session: 77,
        step: 1,
        position: 0,
        hidden: hidden(1, 576, 0.1),
        forward: vec![],
    };
    assert_eq!(
        error_kind(ask(&mut s, &step).await),
        ErrorKind::UnknownSession
    );
    assert!(matches!(
        ask(&mut s, &ClientMessage::Info).await,
        ServerMessage::Info(_)
    ));

    // Wrong model and layers outside the server's range.
    let open = |model, range, max_len| ClientMessage::Open {
        model,
        range,
        max_len,
        dtype: WireDType::F32,
    };
    let reply = ask(&mut s, &open(ModelId([9; 32]), LayerRange::new(0, 30), 8)).await;
    assert_eq!(error_kind(reply), ErrorKind::WrongModel);
    let reply = ask(&mut s, &open(model, LayerRange::new(10, 40), 8)).await;
    assert_eq!(error_kind(reply), ErrorKind::WrongModel);

    // A real session, then bad steps on it, then a good one.
    let ServerMessage::Opened {
        session, max_len, ..
    } = ask(&mut s, &open(model, LayerRange::new(0, 30), 100)).await
    else {
        panic!("session not opened");
    };
    assert_eq!(
        max_len, 8,
        "the server caps the session at --max-session-len"
    );
    let step = |position: u32, hidden| ClientMessage::Step {
        session,
        step: position.into(),
        position,
        hidden,
        forward: vec![],
    };
    assert_eq!(
        error_kind(ask(&mut s, &step(0, hidden(1, 100, 0.1))).await),
        ErrorKind::BadTensor
    );
    assert_eq!(
        error_kind(ask(&mut s, &step(0, hidden(1, 576, f32::NAN))).await),
        ErrorKind::BadTensor
    );
    assert_eq!(
        error_kind(ask(&mut s, &step(3, hidden(1, 576, 0.1))).await),
        ErrorKind::BadRequest
    );
    assert_eq!(
        error_kind(ask(&mut s, &step(0, hidden(9, 576, 0.1))).await),
        ErrorKind::TooLong
    );
    let wrong_length = WireTensor {
        shape: vec![1, 1, 576],
        dtype: WireDType::F32,
        values: vec![0.0; 10].into(),
    };
    assert_eq!(
        error_kind(ask(&mut s, &step(0, wrong_length)).await),
        ErrorKind::BadTensor
    );
    match ask(&mut s, &step(0, hidden(2, 576, 0.1))).await {
        ServerMessage::Hidden {
            position: 0,
            hidden,
            ..
        } => assert_eq!(hidden.shape, vec![1, 2, 576]),
        other => panic!("expected hidden states, got {other:?}"),
    }

    // A replay is checked whole before any of it runs: one bad step refuses it all.
    let replay = |position: u32, steps| ClientMessage::Replay {
        session,
        step: 100 + u64::from(position),
        position,
        steps,
    };
    let bad_replay = replay(2, vec![hidden(1, 576, 0.1), hidden(1, 7, 0.1)]);
    assert_eq!(
        error_kind(ask(&mut s, &bad_replay).await),
        ErrorKind::BadTensor
    );
    let too_long = replay(2, vec![hidden(3, 576, 0.1), hidden(4, 576, 0.1)]);
    assert_eq!(error_kind(ask(&mut s, &too_long).await), ErrorKind::TooLong);
    assert_eq!(
        error_kind(ask(&mut s, &replay(2, vec![])).await),
        ErrorKind::BadRequest
    );
    match ask(
        &mut s,
        &replay(2, vec![hidden(1, 576, 0.3), hidden(2, 576, 0.1)]),
    )
    .await
    {
        ServerMessage::Hidden {
            position: 2,
            hidden,
            ..
        } => assert_eq!(hidden.shape, vec![1, 3, 576]),
        other => panic!("expected hidden states, got {other:?}"),
    }

    // A frame whose length prefix is over the limit.
    let mut s2 = network.open_stream(peer).await.unwrap();
    s2.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    s2.flush().await.unwrap();
    expect_error_then_close(&mut s2).await;

    // Garbage that is not a message.
    let mut s3 = network.open_stream(peer).await.unwrap();
    s3.write_all(&[6, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0xff, 0x17])
        .await
        .unwrap();
    s3.flush().await.unwrap();
    expect_error_then_close(&mut s3).await;

    // The first stream's session is unaffected by all this.
    match ask(&mut s, &step(5, hidden(1, 576, 0.2))).await {
        ServerMessage::Hidden { position: 5, .. } => {}
        other => panic!("expected hidden states, got {other:?}"),
    }
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node is still running"
    );

    // And a real generation through the node still works.
    let addr = node.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        allmende(&[
            "generate",
            "--bootstrap",
            &addr,
            "--no-mdns",
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ])
    })
    .await
    .unwrap();
    assert_eq!(ids(&json_of(&out)).len(), 4);
    node.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_of_ragged_bytes_is_a_bad_frame() {
    let mut node = Node::start("0..30", None, &[]);
    let client = RawClient::connect(&node).await;
    let (network, peer) = (&client.network, client.peer);

    // A step whose tensor bytes are not whole f32 values: a malformed message, refused
    // while its values are being decoded.
    let step_bytes = allmende_protocol::encode(&ClientMessage::Step {
        session: 999,
        step: 1,
        position: 0,
        hidden: WireTensor::from_f32(&[1, 1, 1], &[1.0], WireDType::F32).unwrap(),
        forward: vec![],
    })
    .unwrap();
    let (head, data) = step_bytes.split_at(step_bytes.len() - 5);
    assert_eq!(data[0], 4, "a 4-byte data field ends the message");
    let mut ragged = head.to_vec();
    ragged.push(3);
    ragged.extend_from_slice(&data[1..4]);
    let mut s = network.open_stream(peer).await.unwrap();
    s.write_all(&(ragged.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&ragged).await.unwrap();
    s.flush().await.unwrap();
    expect_error_then_close(&mut s).await;

    assert!(still_served(&client).await, "one bad frame is not a ban");
    node.kill();
}

/// Whether `client` can still open a stream to its node and get an answer.
async fn still_served(client: &RawClient) -> bool {
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.network.open_stream(client.peer),
    )
    .await
    else {
        return false;
    };
    let exchange = async {
        allmende_node::network::framing::write_message(&mut stream, &ClientMessage::Info)
            .await
            .ok()?;
        read_message::<ServerMessage, _>(&mut stream, allmende_protocol::MAX_MESSAGE_BYTES)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), exchange).await,
        Ok(Some(ServerMessage::Info(_)))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_and_oversized_frames_get_a_peer_cut_off_while_others_generate() {
    let node = Node::start("0..30", None, &["--max-sessions-per-peer", "2"]);
    let generation = support::swarm::Generation::start(&[
        "generate",
        "--bootstrap",
        &node.addr,
        "--no-mdns",
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "48",
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
    ]);
    generation.wait_for_text(1);

    // One attacker floods session opens: two are allowed, then it is told it is busy,
    // and after repeated attempts it is banned.
    let flooder = RawClient::connect(&node).await;
    assert!(still_served(&flooder).await);
    let mut held = Vec::new();
    let mut busy = 0;
    for _ in 0..8 {
        let Ok(mut stream) = flooder.network.open_stream(flooder.peer).await else {
            break;
        };
        let open = ClientMessage::Open {
            model: flooder.model,
            range: LayerRange::new(0, 30),
            max_len: 16,
            dtype: WireDType::F32,
        };
        if allmende_node::network::framing::write_message(&mut stream, &open)
            .await
            .is_err()
        {
            break;
        }
        match read_message::<ServerMessage, _>(&mut stream, allmende_protocol::MAX_MESSAGE_BYTES)
            .await
        {
            Ok(ServerMessage::Busy { .. }) => busy += 1,
            Ok(_) => {}
            Err(_) => break,
        }
        held.push(stream);
    }
    assert!(busy >= 1, "the flooder was told the node is busy");
    assert!(!still_served(&flooder).await, "the flooder is cut off");

    // Another sends frames over the size limit until it is cut off.
    let oversized = RawClient::connect(&node).await;
    for _ in 0..3 {
        let Ok(mut s) = oversized.network.open_stream(oversized.peer).await else {
            break;
        };
        let _ = s.write_all(&[0xff, 0xff, 0xff, 0x7f]).await;
        let _ = s.flush().await;
        let _ =
            read_message::<ServerMessage, _>(&mut s, allmende_protocol::MAX_MESSAGE_BYTES).await;
    }
    assert!(
        !still_served(&oversized).await,
        "the sender of oversized frames is cut off"
    );

    // Meanwhile the well-behaved client finished its generation.
    let (status, stdout, stderr) = generation.finish();
    assert!(status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(ids(&report).len(), 48);
    // And a new well-behaved client is served.
    let newcomer = RawClient::connect(&node).await;
    assert!(still_served(&newcomer).await);
}

async fn send(stream: &mut Stream, message: ClientMessage<'_>) {
    write_message(stream, &message).await.expect("message sent");
}

/// The session and token of an `Opened` reply.
fn opened(reply: ServerMessage<'_>) -> (u64, allmende_protocol::inference::SessionToken) {
    match reply {
        ServerMessage::Opened { session, token, .. } => (session, token),
        other => panic!("not opened: {other:?}"),
    }
}

/// Step `id` of one position of `value`s at `position` of `session`.
fn step(session: u64, id: u64, position: u32, value: f32) -> ClientMessage<'static> {
    ClientMessage::Step {
        session,
        step: id,
        position,
        forward: vec![],
        hidden: hidden(1, 576, value),
    }
}

/// Steps forwarded into a session, as the previous server of a route sends them, reach
/// it only with the proof its client made for that sender, step and position: the
/// session's client gets the output, the same as for the step sent directly. A step
/// that arrives both ways is answered once, a stale or misdirected forward reaches
/// nothing, and forged proofs never get their sender banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_steps_need_the_clients_proof() {
    let node = Node::start("0..30", None, &[]);
    let client = RawClient::connect(&node).await;
    let all = LayerRange::new(0, 30);
    let (mut direct, reply) = client.open(all, 16).await;
    let (direct_id, _) = opened(reply);
    let expected = match ask(&mut direct, &step(direct_id, 1, 0, 0.1)).await {
        ServerMessage::Hidden { hidden, .. } => hidden,
        other => panic!("expected hidden states, got {other:?}"),
    };

    let (mut s, reply) = client.open(all, 16).await;
    let (session, token) = opened(reply);
    // Another peer plays the previous server of the route.
    let upstream = RawClient::connect(&node).await;
    let mut from_upstream = upstream.stream().await;
    let proof = |forwarder: &RawClient, id, position| {
        let forwarder = forwarder.network.peer_id().to_bytes();
        forward_proof(&token, &forwarder, session, id, position)
    };
    let forwarded = |id, position, proof| ClientMessage::Forwarded {
        session,
        step: id,
        proof,
        position,
        forward: vec![],
        hidden: hidden(1, 576, 0.1),
    };
    send(&mut from_upstream, forwarded(1, 0, proof(&upstream, 1, 0))).await;
    match read_message::<ServerMessage, _>(&mut s, allmende_protocol::MAX_MESSAGE_BYTES)
        .await
        .unwrap()
    {
        ServerMessage::Hidden {
            step: 1,
            position: 0,
            hidden,
            forwarded: None,
            ..
        } => assert_eq!(hidden, expected),
        other => panic!("expected the forwarded step's output, got {other:?}"),
    }

    // None of these gets an answer, so the session's next reply is its client's own
    // step's: the same step again (it is not newer than the last one computed); a
    // proof made for another forwarder; a proof for another step; a forged proof.
    send(&mut from_upstream, forwarded(1, 0, proof(&upstream, 1, 0))).await;
    send(&mut from_upstream, forwarded(2, 1, proof(&client, 2, 1))).await;
    send(&mut from_upstream, forwarded(3, 1, proof(&upstream, 2, 1))).await;
    let mut forged = proof(&upstream, 2, 1);
    forged[0] ^= 1;
    send(&mut from_upstream, forwarded(2, 1, forged)).await;
    assert!(matches!(
        ask(&mut s, &step(session, 4, 1, 0.2)).await,
        ServerMessage::Hidden {
            step: 4,
            position: 1,
            ..
        }
    ));

    // Forged proofs are never held against the sender: an honest server forwards to
    // whatever hop its client names, so a client could otherwise get it banned. After
    // many, the sender's next forward with the right proof is still delivered.
    for _ in 0..20 {
        send(&mut from_upstream, forwarded(5, 2, forged)).await;
    }
    send(&mut from_upstream, forwarded(5, 2, proof(&upstream, 5, 2))).await;
    match read_message::<ServerMessage, _>(&mut s, allmende_protocol::MAX_MESSAGE_BYTES)
        .await
        .unwrap()
    {
        ServerMessage::Hidden {
            step: 5,
            position: 2,
            ..
        } => {}
        other => panic!("expected the forwarded step's output, got {other:?}"),
    }
    assert!(still_served(&upstream).await, "the forwarder was banned");

    // The client sends the step it just got forwarded (it tired of waiting for the
    // forward): answered once already, so the next reply is the next step's.
    write_message(&mut s, &step(session, 5, 2, 0.1))
        .await
        .unwrap();
    assert!(matches!(
        ask(&mut s, &step(session, 6, 3, 0.3)).await,
        ServerMessage::Hidden {
            step: 6,
            position: 3,
            ..
        }
    ));
}

/// A step at a position the session already holds, under a new id (a client sending
/// it again after a failover), replaces what the session held from there: its output
/// is that of a fresh session, and a stale forward of the older attempt reaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_attempt_at_a_step_replaces_the_older() {
    let node = Node::start("0..30", None, &[]);
    let client = RawClient::connect(&node).await;
    let all = LayerRange::new(0, 30);
    let output = |reply| match reply {
        ServerMessage::Hidden { hidden, .. } => hidden,
        other => panic!("expected hidden states, got {other:?}"),
    };
    // A fresh session's outputs for the inputs 0.1, 0.2.
    let (mut fresh, reply) = client.open(all, 16).await;
    let (fresh_id, _) = opened(reply);
    output(ask(&mut fresh, &step(fresh_id, 1, 0, 0.1)).await);
    let expected = output(ask(&mut fresh, &step(fresh_id, 2, 1, 0.2)).await);

    // Another session gets 0.1 then 0.5 (an attempt that went wrong), then position 1
    // again with 0.2 under a newer id.
    let (mut s, reply) = client.open(all, 16).await;
    let (session, token) = opened(reply);
    output(ask(&mut s, &step(session, 1, 0, 0.1)).await);
    output(ask(&mut s, &step(session, 2, 1, 0.5)).await);
    let again = output(ask(&mut s, &step(session, 3, 1, 0.2)).await);
    assert_eq!(again, expected, "the newer attempt replaced the older");

    // The older attempt's forward, arriving late with its valid proof, is dropped.
    let upstream = RawClient::connect(&node).await;
    let forwarder = upstream.network.peer_id().to_bytes();
    let late = ClientMessage::Forwarded {
        session,
        step: 2,
        proof: forward_proof(&token, &forwarder, session, 2, 1),
        position: 1,
        forward: vec![],
        hidden: hidden(1, 576, 0.5),
    };
    let mut from_upstream = upstream.stream().await;
    send(&mut from_upstream, late).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let next = ask(&mut s, &step(session, 4, 2, 0.3)).await;
    assert!(
        matches!(
            next,
            ServerMessage::Hidden {
                step: 4,
                position: 2,
                ..
            }
        ),
        "{next:?}"
    );
}

/// A client that names its own sessions on one server as the next hops (A1 → A2 → …)
/// would have one step computed many times for one request: a list of hops that
/// visits a server twice is refused, and the session stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_list_that_loops_back_is_refused() {
    let node = Node::start("0..30", None, &[]);
    let client = RawClient::connect(&node).await;
    let all = LayerRange::new(0, 30);
    let (mut first, reply) = client.open(all, 16).await;
    let (first_id, _) = opened(reply);
    let (_second, reply) = client.open(all, 16).await;
    let (second_id, second_token) = opened(reply);
    let me = node.peer_id.parse::<libp2p::PeerId>().unwrap().to_bytes();
    let looping = ClientMessage::Step {
        session: first_id,
        step: 1,
        position: 0,
        forward: vec![NextHop {
            peer: me.clone(),
            session: second_id,
            proof: forward_proof(&second_token, &me, second_id, 1, 0),
            addrs: vec![],
        }],
        hidden: hidden(1, 576, 0.1),
    };
    match ask(&mut first, &looping).await {
        ServerMessage::Error {
            kind: ErrorKind::BadRequest,
            message,
        } => assert!(message.contains("twice"), "{message}"),
        other => panic!("a looping list of hops was accepted: {other:?}"),
    }
    assert!(matches!(
        ask(&mut first, &step(first_id, 2, 0, 0.1)).await,
        ServerMessage::Hidden { .. }
    ));
}
