//! Session limits: a full node says `Busy` and the client goes elsewhere; thousands of
//! opened, closed and abandoned sessions leave no memory behind.

mod support;

use std::time::Duration;

use allmende_node::network::framing::{read_message, write_message};
use allmende_node::network::PREVIOUS_INFERENCE_PROTOCOL;
use allmende_protocol::inference::{PREVIOUS_PROTOCOL_NAME, PROTOCOL_NAME};
use allmende_protocol::{ClientMessage, ErrorKind, LayerRange, ServerMessage};
use support::raw::{ask, hidden, RawClient};
use support::swarm::{allmende, ids, json_of, wait_for_status, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_says_busy_and_the_client_uses_another_replica() {
    let full = Node::start("0..30", None, &["--max-sessions", "1"]);
    let spare = Node::start("0..30", Some(&full.addr), &[]);
    let client = RawClient::connect(&full).await;
    let everything = LayerRange::new(0, 30);
    let (_held, reply) = client.open(everything, 64).await;
    assert!(matches!(reply, ServerMessage::Opened { .. }), "{reply:?}");
    let (_, reply) = client.open(everything, 64).await;
    assert!(matches!(reply, ServerMessage::Busy { .. }), "{reply:?}");

    let addr = full.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        allmende(&[
            "generate",
            "--bootstrap",
            &addr,
            "--no-mdns",
            "--prompt",
            "Hello there",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ])
    })
    .await
    .unwrap();
    let report = json_of(&out);
    assert_eq!(ids(&report).len(), 4);
    assert_eq!(report["route"][0]["peer"], spare.peer_id.as_str());
}

/// A node of the previous version opens a session the way it knows: it is told which
/// version each side speaks, not left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_the_previous_version_is_told_both_versions() {
    let node = Node::start("0..30", None, &[]);
    let client = RawClient::connect(&node).await;
    let mut stream = client
        .network
        .open_stream_of(client.peer, PREVIOUS_INFERENCE_PROTOCOL)
        .await
        .expect("the previous version's streams are accepted");
    write_message(&mut stream, &ClientMessage::Info)
        .await
        .unwrap();
    let reply = read_message(&mut stream, allmende_protocol::MAX_MESSAGE_BYTES).await;
    match reply {
        Ok(ServerMessage::Error {
            kind: ErrorKind::BadRequest,
            message,
        }) => {
            assert!(message.contains(PROTOCOL_NAME), "{message}");
            assert!(message.contains(PREVIOUS_PROTOCOL_NAME), "{message}");
            assert!(message.contains("upgrade"), "{message}");
        }
        other => panic!("expected an error naming both versions, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_budget_is_never_over_committed() {
    // A position costs 2 × 192 values × 2 B (f16) × 30 layers = 22.5 KiB, so 4 MiB
    // hold 182.
    let node = Node::start("0..30", None, &["--max-cache-mb", "4"]);
    let client = RawClient::connect(&node).await;
    let everything = LayerRange::new(0, 30);
    let (_first, reply) = client.open(everything, 100).await;
    assert!(matches!(reply, ServerMessage::Opened { .. }), "{reply:?}");
    let (_, reply) = client.open(everything, 100).await;
    match reply {
        ServerMessage::Busy { reason } => assert!(reason.contains("KV-cache budget"), "{reason}"),
        other => panic!("expected Busy, got {other:?}"),
    }
    let (_, reply) = client.open(everything, 10).await;
    assert!(
        matches!(reply, ServerMessage::Opened { .. }),
        "a small session still fits: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_leave_no_memory_behind() {
    // Three layers keep the compute cheap; each session still reserves a KV cache of
    // 256 positions (0.6 MB), so 40 abandoned ones hold about 24 MB until they time out
    // (one peer may hold three quarters of the node's 64 sessions).
    let node = Node::start(
        "0..3",
        None,
        &["--max-sessions", "64", "--idle-timeout", "5"],
    );
    let pid = node.child.id();
    let client = RawClient::connect(&node).await;
    let everything = LayerRange::new(0, 3);

    // One session's life: open, a prefill and a few decode steps, then close (or not).
    let session = |close: bool| {
        let client = &client;
        async move {
            let (mut stream, reply) = client.open(everything, 300).await;
            let ServerMessage::Opened { session, .. } = reply else {
                panic!("not opened: {reply:?}");
            };
            let mut position = 0;
            for seq in [8, 1, 1] {
                let step = ClientMessage::Step {
                    session,
                    step: position.into(),
                    position,
                    hidden: hidden(seq, 576, 0.05),
                    forward: vec![],
                };
                assert!(matches!(
                    ask(&mut stream, &step).await,
                    ServerMessage::Hidden { .. }
                ));
                position += seq;
            }
            if close {
                let _ = allmende_node::network::framing::write_message(
                    &mut stream,
                    &ClientMessage::Close { session },
                )
                .await;
            }
            stream
        }
    };
    for _ in 0..10 {
        drop(session(true).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = support::rss_bytes(pid);

    for _ in 0..200 {
        drop(session(true).await);
    }
    // Abandoned: the streams stay open, the client just goes silent.
    let mut abandoned = Vec::new();
    for _ in 0..40 {
        abandoned.push(session(false).await);
    }
    let peak = support::rss_bytes(pid);
    let status = wait_for_status(&node.addr, Duration::from_secs(1), |_| true);
    let free = status["peers"][0]["free_sessions"].as_u64().unwrap();
    assert!(
        free < 64 - 25,
        "the abandoned sessions are still held: {status}"
    );

    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = support::rss_bytes(pid);
    let status = wait_for_status(&node.addr, Duration::from_secs(1), |_| true);
    assert_eq!(
        status["peers"][0]["free_sessions"], 64,
        "idle sessions were freed"
    );
    eprintln!(
        "RSS: baseline {:.1} MB, with 40 abandoned sessions {:.1} MB, after idle timeouts {:.1} MB",
        baseline as f64 / 1e6,
        peak as f64 / 1e6,
        after as f64 / 1e6
    );
    assert!(
        after as f64 <= baseline as f64 * 1.10,
        "RSS {after} is more than 10% above the baseline {baseline}"
    );
    drop(abandoned);
}

/// A client that finds every server busy waits its turn, as a busy web server's clients
/// do, and gets its session once another ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waits_for_a_busy_node() {
    let node = Node::start("0..30", None, &["--max-sessions", "1"]);
    let expected = support::attack::honest_tokens(&node.addr).await;
    let holder = RawClient::connect(&node).await;
    let (held, reply) = holder.open(LayerRange::new(0, 30), 64).await;
    assert!(matches!(reply, ServerMessage::Opened { .. }), "{reply:?}");
    let waiting = tokio::spawn({
        let addr = node.addr.clone();
        async move { support::attack::honest_tokens(&addr).await }
    });
    // Longer than discovery's patience: the client must wait, not give up.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        !waiting.is_finished(),
        "the client did not wait for the busy node"
    );
    drop(held);
    assert_eq!(waiting.await.unwrap(), expected);
}
