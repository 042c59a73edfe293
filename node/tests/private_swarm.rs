//! Private swarms: only holders of the pre-shared key can connect, join the DHT, or
//! generate.

mod support;

use std::process::Command;

use support::swarm::{allmende, binary, ids, json_of, Node};

fn keygen(path: &std::path::Path) -> std::process::Output {
    Command::new(binary())
        .arg("keygen")
        .arg(path)
        .output()
        .expect("keygen runs")
}

fn generate(bootstrap: &str, key: Option<&str>) -> std::process::Output {
    let mut args = vec![
        "generate",
        "--bootstrap",
        bootstrap,
        "--no-mdns",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    if let Some(key) = key {
        args.extend(["--swarm-key", key]);
    }
    allmende(&args)
}

#[test]
fn only_key_holders_join_a_private_swarm() {
    let dir = tempfile::tempdir().unwrap();
    let (key, other) = (dir.path().join("swarm.key"), dir.path().join("other.key"));
    assert!(keygen(&key).status.success());
    assert!(keygen(&other).status.success());
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(
        text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"),
        "{text}"
    );
    let again = keygen(&key);
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );
    let key = key.to_str().unwrap().to_string();
    let other = other.to_str().unwrap().to_string();

    let a = Node::start("0..15", None, &["--swarm-key", &key]);
    let b = Node::start("15..30", Some(&a.addr), &["--swarm-key", &key]);

    // Inside the swarm, generation works and matches one process.
    let inside = json_of(&generate(&a.addr, Some(&key)));
    let local = json_of(&allmende(&[
        "generate",
        "--local",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(ids(&inside), ids(&local));
    let peers: Vec<&str> = inside["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["peer"].as_str().unwrap())
        .collect();
    assert_eq!(peers, vec![a.peer_id.as_str(), b.peer_id.as_str()]);

    // Without the key, or with another, nothing connects.
    for key in [None, Some(other.as_str())] {
        let out = generate(&a.addr, key);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("no peer reachable at"), "{err}");
    }

    // A node with the wrong key cannot join: it keeps redialling and says so.
    let mut intruder = Command::new(binary())
        .args([
            "serve",
            "--layers",
            "0..30",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ])
        .args(["--bootstrap", &a.addr, "--swarm-key", &other])
        .arg("--identity")
        .arg(dir.path().join("intruder.key"))
        .env("ALLMENDE_MODEL", support::model_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(6));
    let _ = intruder.kill();
    let intruder = intruder.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&intruder.stderr);
    assert!(log.contains("no peer reachable yet at"), "{log}");
    assert!(log.contains("does it hold the same swarm key?"), "{log}");

    // The swarm's DHT knows exactly its two members.
    let status = json_of(&allmende(&[
        "status",
        "--bootstrap",
        &a.addr,
        "--no-mdns",
        "--swarm-key",
        &key,
        "--json",
    ]));
    let members: Vec<&str> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 2, "{status}");
    assert!(members.contains(&a.peer_id.as_str()) && members.contains(&b.peer_id.as_str()));

    // QUIC cannot carry the key, so a private node refuses to listen on it.
    let quic = Command::new(binary())
        .args([
            "serve",
            "--layers",
            "0..30",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ])
        .args(["--no-mdns", "--swarm-key", &key])
        .arg("--identity")
        .arg(dir.path().join("quic.key"))
        .env("ALLMENDE_MODEL", support::model_path())
        .output()
        .unwrap();
    assert!(!quic.status.success());
    assert!(
        String::from_utf8_lossy(&quic.stderr).contains("QUIC cannot carry a private swarm's key")
    );
}
