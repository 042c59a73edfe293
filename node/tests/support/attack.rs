//! What the adversary tests share: an honest client's generation, and the checks that
//! a node under attack survived within its memory budget.

use allmende_protocol::{ErrorKind, ServerMessage};

use super::cgroup::MemoryCage;
use super::swarm::{allmende, ids, json_of, Node};

/// The node's memory budget: several times what it uses serving (the model file's
/// pages, its KV caches and its buffers), far below what the attacks would take.
pub const BUDGET: u64 = 1 << 30;

/// An honest generation through the node at `addr`: greedy, so always the same tokens.
pub async fn honest_tokens(addr: &str) -> Vec<u32> {
    let addr = addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        allmende(&[
            "generate",
            "--bootstrap",
            &addr,
            "--no-mdns",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ])
    })
    .await
    .unwrap();
    ids(&json_of(&out))
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
