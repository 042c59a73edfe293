//! Servers of two numerics versions in one swarm: a client routes over servers of its
//! own version while they cover the model, fails over to a replica of its own version
//! rather than to a faster-looking server of another, and uses the other version only
//! when its own leaves layers uncovered. Real processes on loopback, the real model.

mod support;

use std::time::Duration;

use allmende_protocol::NUMERICS_VERSION;
use serde_json::{json, Value};
use support::swarm::{allmende, ids, json_of, wait_for_status, Generation, Node};

const PROMPT: &str = "Once upon a time, in a small village,";
const TOKENS: &str = "300";
const OTHER: u32 = NUMERICS_VERSION + 1;

fn generate_args<'a>(bootstrap: &'a str, tokens: &'a str, local: bool) -> Vec<&'a str> {
    let mut args = vec!["generate"];
    if local {
        args.push("--local");
    } else {
        args.extend(["--bootstrap", bootstrap, "--no-mdns"]);
    }
    args.extend([
        "--prompt",
        PROMPT,
        "--max-tokens",
        tokens,
        "--temperature",
        "0",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ]);
    args
}

/// A server of `layers` announcing the numerics version `other`, if given.
fn start(layers: &str, bootstrap: Option<&str>, other: Option<u32>) -> Node {
    let version = other.map(|v| v.to_string());
    let extra: Vec<&str> = match &version {
        Some(v) => vec!["--numerics-version-override", v],
        None => vec![],
    };
    Node::start(layers, bootstrap, &extra)
}

/// `status --json` once it lists `count` servers.
fn wait_for_peers(bootstrap: &str, count: usize) -> Value {
    let report = wait_for_status(bootstrap, Duration::from_secs(20), |r| {
        r["peers"].as_array().is_some_and(|p| p.len() == count)
    });
    assert_eq!(
        report["peers"].as_array().map(Vec::len),
        Some(count),
        "{report}"
    );
    report
}

fn numerics_of<'a>(report: &'a Value, peer: &str) -> &'a Value {
    let peers = report["peers"].as_array().expect("peers");
    let server = peers.iter().find(|p| p["peer"] == peer).expect("listed");
    &server["numerics_version"]
}

fn route_peers(report: &Value) -> Vec<String> {
    let route = report["route"].as_array().expect("route");
    route
        .iter()
        .map(|hop| hop["peer"].as_str().expect("peer").to_string())
        .collect()
}

#[test]
fn routes_and_failover_keep_to_the_clients_numerics_version() {
    let undisturbed = ids(&json_of(&allmende(&generate_args("", TOKENS, true))));

    // One hop through `other` would be the cheapest route, were it not of another
    // numerics version.
    let a = start("0..15", None, None);
    let mut b = start("15..30", Some(&a.addr), None);
    let other = start("0..30", Some(&a.addr), Some(OTHER));
    let status = wait_for_peers(&a.addr, 3);
    assert_eq!(status["numerics_version"], NUMERICS_VERSION, "{status}");
    assert_eq!(*numerics_of(&status, &b.peer_id), NUMERICS_VERSION);
    assert_eq!(*numerics_of(&status, &other.peer_id), OTHER);

    let generation = Generation::start(&generate_args(&a.addr, TOKENS, false));
    generation.wait_for_text(20);
    let replica = start("15..30", Some(&a.addr), None);
    wait_for_peers(&a.addr, 4);
    generation.wait_for_text(200);
    b.kill();
    let (status, stdout, stderr) = generation.finish();
    assert!(status.success(), "generation failed:\n{stderr}");
    let report: Value = serde_json::from_str(stdout.lines().last().expect("output")).unwrap();
    assert_eq!(ids(&report), undisturbed, "tokens differ from --local");
    // The kill of `b` caused the only failover, so the route was `a`, `b` before it.
    let failovers = report["failovers"].as_array().expect("failovers");
    assert_eq!(failovers.len(), 1, "{failovers:?}");
    assert_eq!(failovers[0]["peer"], b.peer_id.as_str());
    let replaced_by = &failovers[0]["replaced_by"];
    assert_eq!(
        replaced_by,
        &json!([{
            "peer": replica.peer_id,
            "range": {"start": 15, "end": 30},
            "numerics_version": NUMERICS_VERSION,
        }]),
        "{report}"
    );
    assert_eq!(
        route_peers(&report),
        [a.peer_id.clone(), replica.peer_id.clone()]
    );
    for hop in report["route"].as_array().unwrap() {
        assert_eq!(hop["numerics_version"], NUMERICS_VERSION, "{hop}");
    }

    // With no server of the client's version left for 15..30, the other version serves.
    drop(replica);
    let out = allmende(&generate_args(&a.addr, "8", false));
    let fallback = json_of(&out);
    let route = route_peers(&fallback);
    assert!(route.contains(&other.peer_id), "{fallback}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("numerics version"), "{stderr}");
}
