//! The soak: an attacker cycles through every attack of the adversary suite against a
//! 3-node swarm for five minutes (`ALLMENDE_SOAK_SECS`), each round with fresh peer
//! ids, while an honest client generates continuously through the same swarm. Every
//! honest generation must give the same tokens, no node may exit, and each node's
//! memory cgroup must stay under its budget.
//!
//! Long, so not part of `cargo test`: `scripts/soak.sh` runs it.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allmende_node::network::framing::{read_message, write_message};
use allmende_protocol::inference::TOKEN_BYTES;
use allmende_protocol::{ClientMessage, LayerRange, ServerMessage, WireDType, WireTensor};
use futures::AsyncWriteExt;
use libp2p::Stream;
use support::attack::{honest_tokens, replay_flood_frame, BUDGET};
use support::cgroup::MemoryCage;
use support::raw::{hidden, RawClient};
use support::swarm::Node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a five-minute soak: scripts/soak.sh"]
async fn a_swarm_under_every_attack_keeps_serving_honest_clients() {
    let secs: u64 = std::env::var("ALLMENDE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let cages: Vec<MemoryCage> = (0..3).map(|_| MemoryCage::new(BUDGET)).collect();
    let first = Node::start_caged(&cages[0], "0..10", &[]);
    let mut nodes = vec![first];
    for (i, layers) in [(1, "10..20"), (2, "20..30")] {
        let bootstrap = nodes[0].addr.clone();
        nodes.push(Node::start_caged_joining(
            &cages[i],
            layers,
            Some(&bootstrap),
            &[],
        ));
    }
    let ranges = [
        LayerRange::new(0, 10),
        LayerRange::new(10, 20),
        LayerRange::new(20, 30),
    ];
    let entry = nodes[0].addr.clone();
    let expected = honest_tokens(&entry).await;
    assert!(!expected.is_empty());

    let stop = Arc::new(AtomicBool::new(false));
    let (good, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let honest = {
        let (stop, good, bad, entry) = (stop.clone(), good.clone(), bad.clone(), entry.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match honest_tokens(&entry).await == expected {
                    true => good.fetch_add(1, Ordering::Relaxed),
                    false => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while Instant::now() < deadline {
        for (node, &range) in nodes.iter().zip(&ranges) {
            let attacker = RawClient::connect(node).await;
            for attack in 0..6 {
                let run = run_attack(attack, &attacker, range);
                // An attack that hangs (a stream the node closed, a ban) just ends.
                let _ = tokio::time::timeout(Duration::from_secs(20), run).await;
            }
        }
        rounds += 1;
        for (i, node) in nodes.iter_mut().enumerate() {
            assert!(node.child.try_wait().unwrap().is_none(), "node {i} exited");
        }
    }
    stop.store(true, Ordering::Relaxed);
    honest.await.unwrap();

    let peaks: Vec<u64> = cages.iter().map(|c| c.peak() >> 20).collect();
    let (good, bad) = (good.load(Ordering::Relaxed), bad.load(Ordering::Relaxed));
    eprintln!(
        "soak: {secs} s, {rounds} rounds of 6 attacks on each of 3 nodes; honest \
         generations {good} good, {bad} failed; peak memory per node {peaks:?} MiB \
         (budget {} MiB)",
        BUDGET >> 20
    );
    assert_eq!(bad, 0, "honest generations failed");
    assert!(good > 0);
    for (i, cage) in cages.iter().enumerate() {
        assert_eq!(cage.oom_kills(), 0, "node {i} was killed for memory");
        assert!(
            cage.peak() < BUDGET,
            "node {i} peaked at {} MiB",
            cage.peak() >> 20
        );
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        assert!(node.child.try_wait().unwrap().is_none(), "node {i} exited");
    }
}

/// A stream to the attacked node, unless it refuses (a ban, a full share).
async fn stream(attacker: &RawClient) -> Option<Stream> {
    attacker.network.open_stream(attacker.peer).await.ok()
}

async fn ask(s: &mut Stream, message: &ClientMessage<'_>) -> Option<ServerMessage<'static>> {
    write_message(s, message).await.ok()?;
    read_message(s, allmende_protocol::MAX_MESSAGE_BYTES)
        .await
        .ok()
}

/// Opens a session over `range`, if the node lets it.
async fn open(attacker: &RawClient, range: LayerRange, max_len: u32) -> Option<(Stream, u64)> {
    let mut s = stream(attacker).await?;
    let open = ClientMessage::Open {
        model: attacker.model,
        range,
        max_len,
        dtype: WireDType::F32,
    };
    match ask(&mut s, &open).await? {
        ServerMessage::Opened { session, .. } => Some((s, session)),
        _ => None,
    }
}

/// One attack of the adversary suite, as a hostile peer would send it.
async fn run_attack(attack: usize, attacker: &RawClient, range: LayerRange) -> Option<()> {
    match attack {
        // A step with a batch axis.
        0 => {
            let (mut s, session) = open(attacker, range, 16).await?;
            let values = vec![0.1; 2000 * 576];
            let step = ClientMessage::Step {
                session,
                step: 1,
                position: 0,
                forward: vec![],
                hidden: WireTensor::from_f32(&[2000, 1, 576], &values, WireDType::F32).ok()?,
            };
            ask(&mut s, &step).await?;
        }
        // A 64 MiB frame of empty tensors.
        1 => {
            let frame = replay_flood_frame();
            let mut s = stream(attacker).await?;
            s.write_all(&(frame.len() as u32).to_le_bytes())
                .await
                .ok()?;
            s.write_all(&frame).await.ok()?;
            s.flush().await.ok()?;
            read_message::<ServerMessage, _>(&mut s, allmende_protocol::MAX_MESSAGE_BYTES)
                .await
                .ok()?;
        }
        // Every stream it can get, held for a while.
        2 => {
            let mut held = Vec::new();
            for _ in 0..60 {
                held.extend(stream(attacker).await);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // Every session it can get, kept alive by probes only.
        3 => {
            let mut held = Vec::new();
            while let Some((s, _)) = open(attacker, range, 64).await {
                held.push(s);
                if held.len() == 16 {
                    break;
                }
            }
            for _ in 0..4 {
                for s in &mut held {
                    let _ = write_message(s, &ClientMessage::Info).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        // Forwarded steps with forged tokens.
        4 => {
            let mut s = stream(attacker).await?;
            for session in 0..50 {
                let forged = ClientMessage::Forwarded {
                    session,
                    step: 1,
                    proof: [7; TOKEN_BYTES],
                    position: 0,
                    forward: vec![],
                    hidden: hidden(1, 576, 0.1),
                };
                write_message(&mut s, &forged).await.ok()?;
            }
        }
        // Garbage, and an oversized length prefix.
        _ => {
            let mut s = stream(attacker).await?;
            let _ = s
                .write_all(&[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4])
                .await;
            let mut s = stream(attacker).await?;
            s.write_all(&u32::MAX.to_le_bytes()).await.ok()?;
            s.flush().await.ok()?;
            let _ = read_message::<ServerMessage, _>(&mut s, allmende_protocol::MAX_MESSAGE_BYTES)
                .await;
        }
    }
    Some(())
}
