//! A generation survives the loss of a server: killed (SIGKILL) or leaving gracefully
//! (SIGTERM), the session moves to a replica and the tokens are those of an
//! undisturbed run. Real processes on loopback, the real model.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::swarm::{allmende, ids, json_of, wait_for_status, Generation, Node};

const PROMPT: &str = "Once upon a time, in a small village,";
const TOKENS: &str = "300";

/// The undisturbed run's tokens, computed once for the whole file.
fn undisturbed() -> &'static [u32] {
    static IDS: OnceLock<Vec<u32>> = OnceLock::new();
    IDS.get_or_init(|| {
        ids(&json_of(&allmende(&[
            "generate",
            "--local",
            "--prompt",
            PROMPT,
            "--max-tokens",
            TOKENS,
            "--temperature",
            "0",
            "--ignore-eos",
            "--threads",
            "1",
            "--json",
        ])))
    })
}

fn start_generation(bootstrap: &str, extra: &[&str]) -> Generation {
    let mut args = vec![
        "generate",
        "--bootstrap",
        bootstrap,
        "--no-mdns",
        "--prompt",
        PROMPT,
        "--max-tokens",
        TOKENS,
        "--temperature",
        "0",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    Generation::start(&args)
}

/// Waits until `status` lists two servers for layers 15..30.
fn wait_for_replica(bootstrap: &str) {
    let report = wait_for_status(bootstrap, Duration::from_secs(20), |r| {
        r["peers"].as_array().is_some_and(|p| {
            p.iter()
                .filter(|s| s["layers"] == serde_json::json!([15, 30]))
                .count()
                == 2
        })
    });
    assert_eq!(report["peers"].as_array().unwrap().len(), 3, "{report}");
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON last line")
}

fn run_with_loss(graceful: bool) -> serde_json::Value {
    let a = Node::start("0..15", None, &[]);
    let mut b = Node::start("15..30", Some(&a.addr), &[]);
    let generation = start_generation(&a.addr, &[]);
    generation.wait_for_text(20);
    let c = Node::start("15..30", Some(&a.addr), &[]);
    wait_for_replica(&a.addr);
    generation.wait_for_text(200);
    if graceful {
        b.terminate();
    } else {
        b.kill();
    }
    let (status, stdout, stderr) = generation.finish();
    assert!(status.success(), "generation failed:\n{stderr}");
    let report = last_json(&stdout);
    assert_eq!(
        ids(&report),
        undisturbed(),
        "tokens differ from an undisturbed run"
    );
    let failovers = report["failovers"].as_array().expect("failovers");
    assert_eq!(failovers.len(), 1, "{failovers:?}");
    assert_eq!(failovers[0]["peer"], b.peer_id.as_str());
    assert_eq!(failovers[0]["replaced_by"][0]["peer"], c.peer_id.as_str());
    // The first server forwarded its outputs to the second before the loss and to the
    // replacement after it (the loss comes within the first ~60 of 300 steps).
    let forwarded = report["hops"]["forwarded_by_servers"].as_u64().unwrap();
    assert!(forwarded >= 250, "{}", report["hops"]);
    if graceful {
        let exit = b
            .wait_exit(Duration::from_secs(40))
            .expect("the leaving node exits");
        assert!(exit.success(), "{exit:?}");
    }
    eprintln!(
        "{}: stall {:.0} ms, slowest step {:.0} ms",
        if graceful { "SIGTERM" } else { "SIGKILL" },
        failovers[0]["stall_ms"].as_f64().unwrap(),
        report["timings"]["max_step_ms"].as_f64().unwrap()
    );
    failovers[0].clone()
}

#[test]
fn a_killed_server_is_replaced_and_the_tokens_are_unchanged() {
    let event = run_with_loss(false);
    assert_eq!(event["kind"], "crash");
}

#[test]
fn a_leaving_server_hands_its_session_over_without_a_failed_step() {
    let event = run_with_loss(true);
    // "drain": the session moved while the old server still served, so no step
    // failed and waited for a new route.
    assert_eq!(event["kind"], "drain");
}

#[test]
fn with_no_replica_left_the_error_names_the_missing_layers() {
    let a = Node::start("0..15", None, &[]);
    let mut b = Node::start("15..30", Some(&a.addr), &[]);
    let generation = start_generation(&a.addr, &["--failover-timeout", "3"]);
    generation.wait_for_text(40);
    b.kill();
    let killed = Instant::now();
    let (status, _, stderr) = generation.finish();
    assert!(!status.success());
    assert!(
        stderr.contains("no server for layers 15..30 of model"),
        "{stderr}"
    );
    let waited = killed.elapsed();
    assert!(waited < Duration::from_secs(30), "gave up after {waited:?}");
}

/// A stream of forwarded steps between two servers lives as long as it carries steps:
/// a route in full use outlasts the servers' idle timeout with every step forwarded,
/// nothing sent twice and nobody failed over.
#[test]
fn forwarding_outlasts_the_idle_timeout() {
    let a = Node::start("0..15", None, &["--idle-timeout", "1"]);
    let _b = Node::start("15..30", Some(&a.addr), &["--idle-timeout", "1"]);
    let out = allmende(&[
        "generate",
        "--bootstrap",
        &a.addr,
        "--no-mdns",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "1500",
        "--ignore-eos",
        "--json",
    ]);
    let report = json_of(&out);
    assert_eq!(ids(&report).len(), 1500);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(report["failovers"], serde_json::json!([]), "{stderr}");
    let hops = &report["hops"];
    assert_eq!(hops["relayed_by_client"], 0, "{hops}");
    assert_eq!(hops["resent_by_client"], 0, "{hops}");
    let seconds = report["timings"]["total_ms"].as_f64().unwrap_or(0.0) / 1e3;
    eprintln!("{hops} in {seconds:.1} s");
}
