//! One identity, one running node: a second `allmende serve` given the identity file
//! that a running node holds refuses to start and names `--identity`, and a node that
//! was SIGKILLed leaves nothing behind that blocks its restart under the same peer id.

mod support;

use std::process::Command;

use support::swarm::{binary, Node};

#[test]
fn a_second_node_refuses_a_held_identity_and_a_killed_node_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("shared.key");
    let mut first = Node::start_with_identity(&identity, "0..10", &[]);

    let second = Command::new(binary())
        .args([
            "serve",
            "--layers",
            "10..20",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args(["--no-mdns", "--threads", "1", "--identity"])
        .arg(&identity)
        .env("ALLMENDE_MODEL", support::model_path())
        .output()
        .expect("allmende runs");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second node ran: {stderr}");
    assert!(stderr.contains("held by another running node"), "{stderr}");
    assert!(stderr.contains("--identity"), "{stderr}");
    assert!(stderr.contains(&first.peer_id), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("serving layers"),
        "the refused node must not serve"
    );

    let peer_id = first.peer_id.clone();
    first.kill(); // SIGKILL: no chance to clean up
    let restarted = Node::start_with_identity(&identity, "0..10", &[]);
    assert_eq!(restarted.peer_id, peer_id, "the peer id survives a restart");
}
