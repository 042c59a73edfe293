//! The swarm end to end: real `allmende serve` processes on loopback, real libp2p, the
//! real model; answers compared with `generate --local`.

mod support;

use support::swarm::{allmende, ids, json_of, Node};

const PROMPT: &str = "Once upon a time, in a small village,";

fn generate(bootstrap: &str, max_tokens: &str) -> serde_json::Value {
    generate_with(bootstrap, max_tokens, &[])
}

fn generate_with(bootstrap: &str, max_tokens: &str, extra: &[&str]) -> serde_json::Value {
    let args = [
        "generate",
        "--bootstrap",
        bootstrap,
        "--no-mdns",
        "--prompt",
        PROMPT,
        "--max-tokens",
        max_tokens,
        "--temperature",
        "0",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ];
    json_of(&allmende(&[&args[..], extra].concat()))
}

/// How many servers' inputs came from the previous server, and how many from the client.
fn hops(report: &serde_json::Value) -> (u64, u64) {
    let count = |key: &str| report["hops"][key].as_u64().expect("hop counts");
    (count("forwarded_by_servers"), count("relayed_by_client"))
}

fn local(max_tokens: &str) -> Vec<u32> {
    ids(&json_of(&allmende(&[
        "generate",
        "--local",
        "--prompt",
        PROMPT,
        "--max-tokens",
        max_tokens,
        "--temperature",
        "0",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ])))
}

fn route(report: &serde_json::Value) -> Vec<(String, u32, u32)> {
    report["route"]
        .as_array()
        .expect("a route")
        .iter()
        .map(|hop| {
            let layers = &hop["layers"];
            (
                hop["peer"].as_str().unwrap().to_string(),
                layers[0].as_u64().unwrap() as u32,
                layers[1].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

#[test]
fn three_nodes_generate_exactly_what_one_process_does() {
    let a = Node::start("0..10", None, &[]);
    let b = Node::start("10..20", Some(&a.addr), &[]);
    let c = Node::start("20..30", Some(&a.addr), &[]);
    let report = generate(&a.addr, "32");
    let expected = local("32");
    assert_eq!(ids(&report), expected);
    assert_eq!(
        route(&report),
        vec![
            (a.peer_id.clone(), 0, 10),
            (b.peer_id.clone(), 10, 20),
            (c.peer_id.clone(), 20, 30)
        ]
    );
    // Every output went from server to server (two hops per step on three servers).
    let (forwarded, relayed) = hops(&report);
    assert!(forwarded >= 2 * 32 && forwarded % 2 == 0, "{forwarded}");
    assert_eq!(relayed, 0);

    // The client relaying every output instead gives the same tokens.
    let relayed_report = generate_with(&a.addr, "32", &["--no-forward"]);
    assert_eq!(ids(&relayed_report), expected);
    assert_eq!(hops(&relayed_report), (0, forwarded));
}

#[test]
fn overlapping_replicas_give_a_valid_route_and_the_same_tokens() {
    let a = Node::start("0..20", None, &[]);
    let b = Node::start("10..30", Some(&a.addr), &[]);
    let c = Node::start("0..30", Some(&a.addr), &[]);
    let report = generate(&b.addr, "16");
    assert_eq!(ids(&report), local("16"));
    let hops = route(&report);
    let served = |peer: &str| {
        [(&a, 0, 20), (&b, 10, 30), (&c, 0, 30)]
            .into_iter()
            .find(|(n, _, _)| n.peer_id == peer)
            .map(|(_, s, e)| (s, e))
            .expect("a known peer")
    };
    let mut layer = 0;
    for (peer, start, end) in &hops {
        let (s, e) = served(peer);
        assert!(
            s <= *start && *end <= e,
            "hop {start}..{end} outside {peer}'s {s}..{e}"
        );
        assert_eq!(*start, layer, "route is contiguous: {hops:?}");
        layer = *end;
    }
    assert_eq!(layer, 30, "route covers the model: {hops:?}");
    eprintln!("chosen route: {hops:?}");
}

#[test]
fn missing_layers_are_named_and_a_late_joiner_is_found() {
    let a = Node::start("0..15", None, &[]);
    let started = std::time::Instant::now();
    let out = allmende(&[
        "generate",
        "--bootstrap",
        &a.addr,
        "--no-mdns",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "4",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no server for layers 15..30 of model"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "the error came without a hang"
    );

    let status = json_of(&allmende(&[
        "status",
        "--bootstrap",
        &a.addr,
        "--no-mdns",
        "--json",
    ]));
    assert_eq!(status["missing"], serde_json::json!([[15, 30]]));
    assert_eq!(status["peers"].as_array().unwrap().len(), 1);

    let b = Node::start("15..30", Some(&a.addr), &[]);
    let report = generate(&a.addr, "8");
    assert_eq!(ids(&report), local("8"));
    let peers: Vec<String> = route(&report).into_iter().map(|h| h.0).collect();
    assert_eq!(peers, vec![a.peer_id.clone(), b.peer_id.clone()]);

    let status = json_of(&allmende(&[
        "status",
        "--bootstrap",
        &a.addr,
        "--no-mdns",
        "--json",
    ]));
    assert_eq!(status["missing"], serde_json::json!([]));
    let layers: Vec<serde_json::Value> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["layers"].clone())
        .collect();
    assert_eq!(
        layers,
        vec![serde_json::json!([0, 15]), serde_json::json!([15, 30])]
    );
}

#[test]
fn half_precision_hidden_states_travel_too() {
    let a = Node::start("0..15", None, &[]);
    let _b = Node::start("15..30", Some(&a.addr), &[]);
    for dtype in ["f16", "bf16"] {
        let report = json_of(&allmende(&[
            "generate",
            "--bootstrap",
            &a.addr,
            "--no-mdns",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--ignore-eos",
            "--wire-dtype",
            dtype,
            "--json",
        ]));
        // Rounding hidden states to 16 bits may change a near-tie, so only the first
        // tokens, far from any tie here, are compared.
        assert_eq!(ids(&report).len(), 8);
        assert_eq!(ids(&report)[..2], local("2")[..]);
    }
}

#[test]
fn a_bootstrap_address_without_a_peer_id_works() {
    let a = Node::start("0..30", None, &[]);
    let bare = a.addr.split("/p2p/").next().unwrap().to_string();
    let report = generate(&bare, "4");
    assert_eq!(ids(&report), local("4"));
}
