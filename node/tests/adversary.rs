//! Attacks on a node's memory and on honest clients' requests. Each test runs a real
//! node in a memory control group whose limit is its budget (the kernel catches every
//! spike, where polling RSS would miss them), sends the attack over real libp2p
//! streams, and checks that the node is alive, was never over its budget, and still
//! gives an honest client the same tokens as before the attack.

mod support;

use allmende_node::network::framing::read_message;
use allmende_protocol::{
    ClientMessage, ErrorKind, LayerRange, ServerMessage, WireDType, WireTensor, MAX_MESSAGE_BYTES,
};
use futures::AsyncWriteExt;
use support::attack::{
    error_kind, generation, honest_tokens, replay_flood_frame, send_frames_in_part, survived,
    BUDGET,
};
use support::cgroup::MemoryCage;
use support::raw::{ask, RawClient};
use support::swarm::{allmende, ids, json_of, Node};

/// Steps carry one sequence. A batch axis would multiply every allocation behind the
/// checks (KV caches, activations) by a number the peer chooses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_with_a_batch_axis_is_refused() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &[]);
    let before = honest_tokens(&node.addr).await;

    let attacker = RawClient::connect(&node).await;
    let (mut s, reply) = attacker.open(LayerRange::new(0, 30), 16).await;
    let ServerMessage::Opened { session, .. } = reply else {
        panic!("session not opened: {reply:?}");
    };
    let step = |batch: u32, position| {
        let values = vec![0.1; (batch * 576) as usize];
        ClientMessage::Step {
            session,
            step: u64::from(batch),
            position,
            hidden: WireTensor::from_f32(&[batch, 1, 576], &values, WireDType::F32).unwrap(),
            forward: vec![],
        }
    };
    assert_eq!(
        error_kind(ask(&mut s, &step(2, 0)).await),
        ErrorKind::BadTensor
    );
    // 46 MB on the wire; as a batch, gigabytes of caches and activations.
    assert_eq!(
        error_kind(ask(&mut s, &step(20_000, 0)).await),
        ErrorKind::BadTensor
    );
    // The session itself is unharmed.
    assert!(matches!(
        ask(&mut s, &step(1, 0)).await,
        ServerMessage::Hidden { position: 0, .. }
    ));
    survived(&mut node, &cage, &before).await;
}

/// The frame limit bounds bytes, not what decoding them allocates: one frame of three-byte
/// empty tensors would decode to gigabytes before any session is looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_millions_of_empty_tensors_is_refused_while_decoding() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &[]);
    let before = honest_tokens(&node.addr).await;

    let frame = replay_flood_frame();
    let count = frame.len() / 3;
    assert!(count > 10_000_000 && frame.len() <= MAX_MESSAGE_BYTES);

    let attacker = RawClient::connect(&node).await;
    let peak_before = cage.peak();
    let mut s = attacker.stream().await;
    s.write_all(&(frame.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&frame).await.unwrap();
    s.flush().await.unwrap();
    drop(frame);
    let reply: ServerMessage = read_message(&mut s, MAX_MESSAGE_BYTES)
        .await
        .expect("an error reply");
    assert_eq!(error_kind(reply), ErrorKind::BadRequest);
    // Reading the frame takes its size; decoding it may take little more.
    let grown = cage.peak().saturating_sub(peak_before);
    assert!(
        grown < MAX_MESSAGE_BYTES as u64 + (16 << 20),
        "decoding one frame took {} MiB",
        grown >> 20
    );
    survived(&mut node, &cage, &before).await;
}

/// A prompt longer than a server's step limit goes in steps every server accepts, with
/// the tokens of the whole prompt computed at once in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_a_servers_step_limit_is_sent_in_steps() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &["--max-step-positions", "512"]);
    let prompt = "The river runs past the old mill and on to the sea. ".repeat(100);
    let args = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--prompt",
            &prompt,
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            json_of(&allmende(&args))
        })
    };
    let local = run(args(&["--local"])).await.unwrap();
    let swarm = run(args(&["--bootstrap", &node.addr, "--no-mdns"]))
        .await
        .unwrap();
    let prompt_tokens = swarm["prompt_token_ids"].as_array().map_or(0, Vec::len);
    assert!(prompt_tokens > 1024, "a prompt of {prompt_tokens} tokens");
    assert_eq!(ids(&swarm), ids(&local));
    assert!(node.child.try_wait().unwrap().is_none(), "the node died");
    assert!(cage.peak() < BUDGET);
}

/// A frame's buffer grows with the bytes that arrive, charged to the node's budget for
/// frames in flight: peers that announce the largest frames and send most of them, then
/// stall, get `Busy` once that budget is held (their frames read and thrown away),
/// instead of making the node hold every frame they started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_in_part_and_stalled_are_held_within_a_budget() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &["--max-sessions", "48"]);
    let before = honest_tokens(&node.addr).await;

    const STREAMS_PER_PEER: usize = 4;
    const SENT: usize = 48 << 20;
    let mut attackers = Vec::new();
    for _ in 0..6 {
        attackers.push(RawClient::connect(&node).await);
    }
    let mut streams = Vec::new();
    for attacker in &attackers {
        for _ in 0..STREAMS_PER_PEER {
            streams.push(attacker.stream().await);
        }
    }
    send_frames_in_part(&mut streams, SENT).await;
    // Held in full, the frames would take 24 × 48 MiB, past the node's budget: the node
    // holds at most its frame budget of them (the rest are read and thrown away).
    let peak = cage.peak();
    eprintln!(
        "peak {} MiB with {} stalled frames",
        peak >> 20,
        streams.len()
    );
    assert!(peak < 640 << 20, "peak {} MiB", peak >> 20);
    survived(&mut node, &cage, &before).await;
    drop(streams);
}

/// One address sending frames slowly holds at most its share of the frame budget: a
/// long prompt from another peer is still taken while it holds all it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_the_frame_budget() {
    let cage = MemoryCage::new(BUDGET);
    let mut node = Node::start_caged(&cage, "0..30", &["--max-sessions", "48"]);
    let before = honest_tokens(&node.addr).await;

    // 16 frames of 32 MiB each, sent in part: twice the node's whole frame budget.
    const SENT: usize = 32 << 20;
    let attacker = RawClient::connect(&node).await;
    let mut streams = Vec::new();
    for _ in 0..16 {
        streams.push(attacker.stream().await);
    }
    send_frames_in_part(&mut streams, SENT).await;

    // A prompt of a few hundred tokens: its prefill is a frame of hundreds of KB.
    let prompt = "The capital of France is Paris, and the capital of Italy is Rome. ".repeat(24);
    let report = generation(&node.addr, &prompt, 4).await;
    assert!(
        report["prompt_token_ids"].as_array().unwrap().len() > 300,
        "{report:#}"
    );
    assert_eq!(ids(&report).len(), 4, "{report:#}");
    survived(&mut node, &cage, &before).await;
    drop(streams);
}

/// A frame trickled in on an idle stream holds its buffer for nothing: past its
/// patience (10 s for a small frame) the stream is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_trickled_in_is_cut_off() {
    let node = Node::start("0..30", None, &[]);
    let attacker = RawClient::connect(&node).await;
    let mut s = attacker.stream().await;
    s.write_all(&1000u32.to_le_bytes()).await.unwrap();
    s.write_all(&[1u8; 10]).await.unwrap();
    s.flush().await.unwrap();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let end = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        futures::AsyncReadExt::read(&mut s, &mut byte),
    )
    .await
    .expect("the stream stayed open past the frame's patience");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    let waited = started.elapsed();
    assert!(waited.as_secs() >= 9, "closed after {waited:?}");
}
