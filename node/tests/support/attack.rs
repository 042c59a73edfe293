//! What the adversary tests share: an honest client's generation, and the checks that
//! a node under attack survived within its memory budget.

use allmende_protocol::{
    ClientMessage, ErrorKind, ServerMessage, WireDType, WireTensor, MAX_MESSAGE_BYTES,
};

use futures::AsyncWriteExt;
use libp2p::Stream;

use super::cgroup::MemoryCage;
use super::swarm::{allmende, ids, json_of, Node};

/// The node's memory budget: several times what it uses serving (the model file's
/// pages, its KV caches and its buffers), far below what the attacks would take.
pub const BUDGET: u64 = 1 << 30;

/// An honest generation through the node at `addr`: greedy, so always the same tokens.
pub async fn honest_tokens(addr: &str) -> Vec<u32> {
    ids(&generation(addr, "The capital of France is", 12).await)
}

/// `generate --json`'s report of `max_tokens` greedy tokens after `prompt`, through the
/// node at `addr`; the generation must succeed.
pub async fn generation(addr: &str, prompt: &str, max_tokens: usize) -> serde_json::Value {
    let (addr, prompt, max_tokens) = (addr.to_string(), prompt.to_string(), max_tokens.to_string());
    let out = tokio::task::spawn_blocking(move || {
        allmende(&[
            "generate",
            "--bootstrap",
            &addr,
            "--no-mdns",
            "--prompt",
            &prompt,
            "--max-tokens",
            &max_tokens,
            "--ignore-eos",
            "--json",
        ])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_of(&out)
}

/// Starts a frame of the largest size on every stream and sends `bytes` of it, then
/// stalls: frames the node holds while waiting for the rest.
pub async fn send_frames_in_part(streams: &mut [Stream], bytes: usize) {
    let chunk = vec![0x5au8; 1 << 20];
    let sends = streams.iter_mut().map(|s| async {
        s.write_all(&(MAX_MESSAGE_BYTES as u32).to_le_bytes())
            .await?;
        for _ in 0..bytes / chunk.len() {
            s.write_all(&chunk).await?;
        }
        s.flush().await
    });
    futures::future::join_all(sends).await;
}

/// The node is running, stayed within its budget, and serves `before` again.
pub async fn survived(node: &mut Node, cage: &MemoryCage, before: &[u32]) {
    assert!(node.child.try_wait().unwrap().is_none(), "the node died");
    assert_eq!(cage.oom_kills(), 0, "the kernel killed the node for memory");
    assert!(
        cage.peak() < BUDGET,
        "peak memory {} MiB",
        cage.peak() >> 20
    );
    assert_eq!(honest_tokens(&node.addr).await, before);
    assert!(node.child.try_wait().unwrap().is_none(), "the node died");
}

pub fn error_kind(reply: ServerMessage) -> ErrorKind {
    match reply {
        ServerMessage::Error { kind, .. } => kind,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// Bincode's varint encoding of a length.
fn varint(n: u64) -> Vec<u8> {
    match n {
        0..=250 => vec![n as u8],
        251..=0xffff => [&[251u8][..], &(n as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(n as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &n.to_le_bytes()].concat(),
    }
}

/// One frame, within the size limit, of a `Replay` of millions of empty tensors: three
/// bytes each on the wire, a hundred each once decoded.
pub fn replay_flood_frame() -> Vec<u8> {
    let head = allmende_protocol::encode(&ClientMessage::Replay {
        session: 1,
        step: 1,
        position: 0,
        steps: vec![],
    })
    .unwrap();
    assert_eq!(
        head.last(),
        Some(&0),
        "the empty list's length ends the message"
    );
    let empty = allmende_protocol::encode(&WireTensor {
        shape: vec![],
        dtype: WireDType::F32,
        values: vec![].into(),
    })
    .unwrap();
    let count = (MAX_MESSAGE_BYTES - head.len() - 16) / empty.len();
    let mut frame = head[..head.len() - 1].to_vec();
    frame.extend(varint(count as u64));
    frame.extend(empty.repeat(count));
    frame
}
