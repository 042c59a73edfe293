//! `serve --max-memory`: a node hosts only the layers that fit beside its sessions'
//! caches and its own needs, stays within the cap while it serves, and refuses a cap
//! or a range that cannot fit with an error naming the sizes.

mod support;

use support::swarm::{allmende, greedy_24, Node};

/// Prefill steps of the protocol's size: a node's largest step's activations count
/// against its cap.
const STEP: &str = "512";

/// The layer range a node printed in its memory line, and the line.
fn memory_line(node: &Node) -> (u32, u32, String) {
    let line = node
        .started
        .iter()
        .find(|l| l.starts_with("memory: layers "))
        .unwrap_or_else(|| panic!("no memory line in {:?}", node.started))
        .clone();
    let range = line["memory: layers ".len()..].split(' ').next().unwrap();
    let (a, b) = range.split_once("..").unwrap();
    (a.parse().unwrap(), b.parse().unwrap(), line)
}

#[test]
fn a_capped_node_hosts_what_fits_and_stays_within_its_cap() {
    let cap_mib = 110;
    let cap = format!("{cap_mib}MiB");
    let capped = Node::start(
        "auto",
        None,
        &["--max-memory", &cap, "--max-step-positions", STEP],
    );
    let (start, end, line) = memory_line(&capped);
    eprintln!("{line}");
    assert_eq!(start, 0, "the first node takes the model's start: {line}");
    assert!(
        end > 0 && end < 30,
        "a cap of {cap} hosts part of the model: {line}"
    );
    assert!(
        line.ends_with(&format!("within --max-memory {cap_mib} MiB")),
        "{line}"
    );

    let rest = Node::start(&format!("{end}..30"), Some(&capped.addr), &[]);
    let through_swarm = greedy_24(&["--bootstrap", &rest.addr]);
    assert_eq!(through_swarm, greedy_24(&["--local"]));

    let peak = support::peak_rss_bytes(capped.child.id());
    eprintln!(
        "peak resident memory {:.1} MiB of a {cap_mib} MiB cap",
        peak as f64 / (1 << 20) as f64
    );
    assert!(peak <= cap_mib << 20, "peak {peak} bytes over the cap");
}

#[test]
fn a_cap_too_small_or_a_range_too_large_is_refused_by_name() {
    let serve = |layers: &str, cap: &str| {
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity.key");
        let out = allmende(&[
            "serve",
            "--layers",
            layers,
            "--max-memory",
            cap,
            "--max-step-positions",
            STEP,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--identity",
            identity.to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{layers} under {cap} must not start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let small = serve("auto", "20MiB");
    assert!(
        small.contains("--max-memory 20 MiB is too small"),
        "{small}"
    );
    let large = serve("0..30", "110MiB");
    assert!(
        large.contains("30 layers take") && large.contains("--max-memory 110 MiB"),
        "{large}"
    );
}
