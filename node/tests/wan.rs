//! The swarm across the WAN lab: donors behind NAT routers, delays on every link, a
//! relay and hole punching, as at home. Each test builds its own lab inside a private
//! sandbox (network, mount and PID namespaces) and needs root; nothing it does reaches
//! the machine's own network.

mod support;

use std::time::{Duration, Instant};

use allmende_wan_lab::{sandboxed, Lab, Nat, Site};
use support::swarm::{allmende, ids, json_of};
use support::wan::{
    answering, forward_paths_of, paths_of, report_of, run_in, wait_for_status, LabNode,
};

const PROMPT: &str = "The capital of France is";

/// One lab at a time: their timing (hole punching's patience, a relayed session's
/// length) assumes the machine's two cores are not shared with another swarm.
fn one_lab_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LAB.lock().unwrap_or_else(|e| e.into_inner())
}
const JOIN: Duration = Duration::from_secs(90);

fn site(name: &str, nat: Nat, delay_ms: u64) -> Site {
    Site {
        delay: Duration::from_millis(delay_ms),
        ..Site::new(name, nat)
    }
}

fn local_ids(tokens: usize) -> Vec<u32> {
    let tokens = tokens.to_string();
    ids(&json_of(&allmende(&[
        "generate",
        "--local",
        "--prompt",
        PROMPT,
        "--max-tokens",
        &tokens,
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ])))
}

fn generate_args<'a>(bootstrap: &'a str, tokens: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--bootstrap",
        bootstrap,
        "--no-mdns",
        "--prompt",
        PROMPT,
        "--max-tokens",
        tokens,
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]
}

/// Three donors, one public and two behind separate NATs, and a client behind a
/// third: the client generates through all three, the NATed hops hole-punched. Then
/// a replica behind a fourth NAT takes over when the NATed donor in use is killed.
#[test]
fn a_client_behind_nat_generates_through_donors_behind_nat() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("a_client_behind_nat_generates_through_donors_behind_nat") {
        return;
    }
    let lab = Lab::build(&[
        site("public", Nat::Public, 5),
        site("home1", Nat::Cone, 5),
        site("home2", Nat::Cone, 5),
        site("client", Nat::Cone, 5),
        site("home4", Nat::Cone, 5),
    ])
    .unwrap();
    let public = LabNode::start(&lab, "public", "0..10", None, &[]);
    let boot = public.addr.clone();
    let mut home1 = LabNode::start(&lab, "home1", "10..20", Some(&boot), &[]);
    let home2 = LabNode::start(&lab, "home2", "20..30", Some(&boot), &[]);
    public.wait_reachability("publicly reachable", JOIN);
    home1.wait_reachability("behind NAT", JOIN);
    home2.wait_reachability("behind NAT", JOIN);
    let status = wait_for_status(&lab, "client", &boot, JOIN, |r| answering(r) == 3);
    assert_eq!(answering(&status), 3, "{status:#}");

    let relay_before = lab.link_counters("public");
    let out = run_in(&lab, "client", &generate_args(&boot, "24"));
    let relay_after = lab.link_counters("public");
    let report = report_of(&out);
    assert_eq!(ids(&report), local_ids(24), "{report:#}");
    let paths = paths_of(&report);
    let path_of = |peer: &str| paths.iter().find(|(p, _)| p == peer).unwrap().1.clone();
    assert_eq!(path_of(&public.peer_id), "direct", "{report:#}");
    assert_eq!(path_of(&home1.peer_id), "hole-punched", "{report:#}");
    assert_eq!(path_of(&home2.peer_id), "hole-punched", "{report:#}");
    // Between the servers: the public one reaches home1 on the connection home1
    // dialled; home1 reaches home2 by a hole punch of its own.
    let forwards = forward_paths_of(&report);
    let forward_of = |peer: &str| forwards.iter().find(|(p, _)| p == peer).unwrap().1.clone();
    assert_eq!(forward_of(&public.peer_id), "direct", "{report:#}");
    assert_eq!(forward_of(&home1.peer_id), "hole-punched", "{report:#}");
    assert_eq!(forward_of(&home2.peer_id), "none", "{report:#}");
    eprintln!(
        "relay's link during the generation: {} bytes in, {} out",
        relay_after.up.bytes - relay_before.up.bytes,
        relay_after.down.bytes - relay_before.down.bytes
    );

    // Mid-generation, a replica of home1's layers joins from behind a fourth NAT and
    // home1 is killed: the session moves to the replica, and the tokens stay those
    // of one process.
    let tokens = 480;
    let generation = support::swarm::Generation::start_with(support::wan::allmende_in(
        &lab,
        "client",
        &generate_args(&boot, &tokens.to_string()),
    ));
    generation.wait_for_text(40);
    let home4 = LabNode::start(&lab, "home4", "10..20", Some(&boot), &[]);
    home4.wait_reachability("behind NAT", JOIN);
    home1.kill();
    let (status, stdout, stderr) = generation.finish();
    assert!(status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(ids(&report), local_ids(tokens), "{report:#}");
    let failovers = report["failovers"].as_array().unwrap();
    assert!(
        !failovers.is_empty(),
        "the killed donor's session moved: {report:#}"
    );
    let paths = paths_of(&report);
    assert!(
        paths
            .iter()
            .any(|(peer, path)| *peer == home4.peer_id && path == "hole-punched"),
        "{report:#}"
    );
}

/// A public node (`public`, with `public_args`) and a donor of layers 10..30 behind a
/// symmetric NAT (`carrier`), which serves through the public node's relay, found by
/// a client behind a cone NAT (`client`); `delay_ms` on every access link.
struct RelayedSwarm {
    lab: Lab,
    boot: String,
    donor: LabNode,
    /// Bound by name where the swarm is taken apart: it must outlive the test.
    _public: LabNode,
}

fn relayed_swarm(delay_ms: u64, public_args: &[&str]) -> RelayedSwarm {
    let lab = Lab::build(&[
        site("public", Nat::Public, delay_ms),
        site("carrier", Nat::Symmetric, delay_ms),
        site("client", Nat::Cone, delay_ms),
    ])
    .unwrap();
    let public = LabNode::start(&lab, "public", "0..10", None, public_args);
    let boot = public.addr.clone();
    let donor = LabNode::start(&lab, "carrier", "10..30", Some(&boot), &[]);
    donor.wait_reachability("behind NAT", JOIN);
    let status = wait_for_status(&lab, "client", &boot, JOIN, |r| answering(r) == 2);
    assert_eq!(answering(&status), 2, "{status:#}");
    RelayedSwarm {
        lab,
        boot,
        donor,
        _public: public,
    }
}

/// Behind a symmetric NAT hole punching fails; the donor serves through the relay,
/// says so, and a relayed session runs past libp2p's default circuit limits (two
/// minutes, 128 KiB) with the tokens of one process.
#[test]
fn a_donor_behind_symmetric_nat_serves_through_the_relay() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("a_donor_behind_symmetric_nat_serves_through_the_relay") {
        return;
    }
    let RelayedSwarm {
        lab,
        boot,
        donor,
        _public,
    } = relayed_swarm(25, &[]);

    let tokens = 640;
    let relay_before = lab.link_counters("public");
    let started = Instant::now();
    let out = run_in(&lab, "client", &generate_args(&boot, &tokens.to_string()));
    let took = started.elapsed();
    let relay_after = lab.link_counters("public");
    let report = report_of(&out);
    assert_eq!(ids(&report), local_ids(tokens), "{report:#}");
    let paths = paths_of(&report);
    let donor_path = &paths.iter().find(|(p, _)| *p == donor.peer_id).unwrap().1;
    assert_eq!(donor_path, "relayed", "{report:#}");
    assert!(
        report["failovers"].as_array().unwrap().is_empty(),
        "{report:#}"
    );
    assert!(
        took > Duration::from_secs(120),
        "the session lasted {took:?}"
    );
    // Each token's hidden state (576 floats) came from the donor to the client
    // through the relay: into its link and out again.
    let relayed = relay_after.up.bytes - relay_before.up.bytes;
    let hidden_bytes = tokens as u64 * 576 * 4;
    assert!(
        relayed > hidden_bytes,
        "{relayed} bytes left the relay; the hidden states alone are {hidden_bytes}"
    );
}

/// A relay's circuit ends mid-session (its limit cut to 8 s here): the client does
/// not blame the donor, moves the session back to it over a new circuit, and the
/// tokens stay those of one process.
#[test]
fn a_relayed_session_outlives_its_circuit() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("a_relayed_session_outlives_its_circuit") {
        return;
    }
    let RelayedSwarm {
        lab,
        boot,
        donor,
        _public,
    } = relayed_swarm(5, &["--relay-circuit-secs", "8"]);

    let tokens = 400;
    let out = run_in(&lab, "client", &generate_args(&boot, &tokens.to_string()));
    let report = report_of(&out);
    assert_eq!(ids(&report), local_ids(tokens), "{report:#}");
    let failovers = report["failovers"].as_array().unwrap();
    assert!(
        !failovers.is_empty() && failovers.iter().all(|f| f["kind"] == "relay"),
        "{report:#}"
    );
    // The donor is the only server of its layers: the session came back to it.
    let paths = paths_of(&report);
    let donor_path = &paths.iter().find(|(p, _)| *p == donor.peer_id).unwrap().1;
    assert_eq!(donor_path, "relayed", "{report:#}");
}

/// A donor started before its bootstrap node keeps dialling, joins when the
/// bootstrap node comes up, and rejoins after it restarts; it knows that node by a
/// DNS name, among several bootstrap addresses.
#[test]
fn a_donor_joins_when_its_bootstrap_node_comes_up_and_after_it_restarts() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("a_donor_joins_when_its_bootstrap_node_comes_up_and_after_it_restarts") {
        return;
    }
    let lab = Lab::build(&[
        site("public", Nat::Public, 5),
        site("home", Nat::Cone, 5),
        site("client", Nat::Cone, 5),
    ])
    .unwrap();
    // The donor knows its bootstrap node by a DNS name, and also a second address
    // where nothing answers.
    let _hosts = support::wan::resolve_in_sandbox("bootstrap.lab.test", lab.wan_ip("public"));
    let boot = format!("/ip4/{}/tcp/{}", lab.wan_ip("public"), support::wan::PORT);
    let named = format!("/dns4/bootstrap.lab.test/tcp/{}", support::wan::PORT);
    let dead = format!("/ip4/{}/tcp/{}", lab.wan_ip("client"), support::wan::PORT);
    let donor = LabNode::spawn(
        &lab,
        "home",
        "15..30",
        Some(&dead),
        &["--bootstrap", &named],
        None,
    );
    donor
        .stderr
        .wait_for("no peer reachable yet", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the donor did not say it waits: {}", donor.stderr.text()));
    assert!(
        donor
            .stdout
            .wait_for("serving layers", Duration::from_secs(60))
            .is_some(),
        "the donor serves while it waits: {}",
        donor.stderr.text()
    );
    std::thread::sleep(Duration::from_secs(5));

    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("public.key");
    let mut public = LabNode::spawn(&lab, "public", "0..15", None, &[], Some(&identity));
    let status = wait_for_status(&lab, "client", &boot, JOIN, |r| answering(r) == 2);
    assert_eq!(answering(&status), 2, "the donor joined: {status:#}");

    public.kill();
    std::thread::sleep(Duration::from_secs(3));
    let _public = LabNode::spawn(&lab, "public", "0..15", None, &[], Some(&identity));
    let status = wait_for_status(&lab, "client", &boot, JOIN, |r| answering(r) == 2);
    assert_eq!(answering(&status), 2, "the donor rejoined: {status:#}");
}

/// With no relay in the swarm, a donor behind NAT says it cannot be reached and
/// announces no address; `status` from elsewhere lists it as unreachable.
#[test]
fn a_donor_nobody_can_reach_says_so() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("a_donor_nobody_can_reach_says_so") {
        return;
    }
    let lab = Lab::build(&[
        site("public", Nat::Public, 5),
        site("home", Nat::Cone, 5),
        site("client", Nat::Cone, 5),
    ])
    .unwrap();
    let public = LabNode::start(&lab, "public", "0..15", None, &["--no-relay-service"]);
    let boot = public.addr.clone();
    let donor = LabNode::start(&lab, "home", "15..30", Some(&boot), &[]);
    let line = donor.wait_reachability("not reachable", JOIN);
    assert!(line.contains("--external-address"), "{line}");
    let status = wait_for_status(&lab, "client", &boot, JOIN, |r| {
        r["peers"].as_array().is_some_and(|peers| {
            peers
                .iter()
                .any(|p| p["peer"] == donor.peer_id.as_str() && p["addrs"] == serde_json::json!([]))
        })
    });
    let listed = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == donor.peer_id.as_str())
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(listed["reachability"], "unreachable", "{status:#}");
    assert_eq!(listed["addrs"], serde_json::json!([]), "{status:#}");
}

/// Many users behind one address (an office, a carrier-grade NAT) share a node fairly
/// with everyone else: 64 streaming requests at once through 8 gateways (8 peer ids)
/// on one address, against a node at its default limits, all complete; meanwhile a
/// client from another address still gets a session, since one address holds at
/// most three quarters of the node's sessions.
#[test]
fn one_address_with_many_users_shares_a_node_with_others() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("one_address_with_many_users_shares_a_node_with_others") {
        return;
    }
    let lab = Lab::build(&[
        site("public", Nat::Public, 5),
        site("office", Nat::Cone, 5),
        site("home", Nat::Cone, 5),
    ])
    .unwrap();
    let server = LabNode::start(&lab, "public", "0..30", None, &[]);
    let boot = server.addr.clone();
    let gateways: Vec<_> = (0..8)
        .map(|i| {
            let api = format!("127.0.0.1:{}", 8100 + i);
            let args = [
                "gateway",
                "--bootstrap",
                &boot,
                "--no-mdns",
                "--api",
                &api,
                "--threads",
                "1",
                "--max-concurrent",
                "8",
            ];
            let mut cmd = support::wan::allmende_in(&lab, "office", &args);
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            support::wan::Killed(cmd.spawn().expect("gateway starts"))
        })
        .collect();
    let users = std::thread::spawn({
        let mut cmd = lab.command("office", "python3");
        cmd.arg("-c").arg(USERS).args(["8100", "8", "8"]);
        move || cmd.output().expect("python3 runs")
    });
    // While the office's users take their turns, another address generates.
    std::thread::sleep(Duration::from_secs(8));
    let out = run_in(&lab, "home", &generate_args(&boot, "16"));
    assert!(
        out.status.success(),
        "a client at another address was not served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let users = users.join().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&users.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&users.stderr)));
    drop(gateways);
    assert_eq!(report["completed"], 64, "{report:#}");
    eprintln!(
        "64 streams from one address: time to first token median {} s, p99 {} s, \
         busiest wait for a session {} s",
        report["ttft_median_s"], report["ttft_p99_s"], report["ttft_max_s"]
    );
}

/// The office's users: `sys.argv` = first gateway port, gateways, requests each.
/// Each waits for its gateway to answer, then all stream a completion at once; prints
/// how many completed and the times to first token.
const USERS: &str = r#"
import http.client, json, sys, threading, time
first, gateways, each = (int(a) for a in sys.argv[1:4])
def ready(port):
    for _ in range(600):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/v1/models")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"gateway on {port} never answered")
ports = [first + i for i in range(gateways)]
for port in ports:
    ready(port)
results, errors = [], []
def user(port):
    body = json.dumps({"prompt": "The capital of France is",
                       "max_tokens": 16, "temperature": 0, "stream": True})
    started = time.monotonic()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            errors.append(f"{r.status} {r.read()[:200]!r}")
            return
        first, text, lines = None, "", []
        for line in r:
            line = line.decode().strip()
            lines.append(line[:300])
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(str(chunk["error"]))
                return
            piece = chunk["choices"][0].get("text", "")
            if piece and first is None:
                first = time.monotonic() - started
            text += piece
        if first is None or not text:
            errors.append(f"no text: {lines[-3:]!r}")
        results.append((first, text))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=user, args=(p,)) for p in ports for _ in range(each)]
for t in threads: t.start()
for t in threads: t.join()
firsts = sorted(f for f, _ in results if f is not None)
done = [t for f, t in results if f is not None and t]
pick = lambda q: round(firsts[min(len(firsts) - 1, int(q * len(firsts)))], 2) if firsts else None
print(json.dumps({"completed": len(done), "errors": errors[:5], "answered": len(results),
                  "failed": len(errors), "users": len(threads), "texts": len(set(done)),
                  "ttft_median_s": pick(0.5), "ttft_p99_s": pick(0.99),
                  "ttft_max_s": pick(1.0)}))
"#;

/// A donor whose router forwards ports on request (`--upnp`): it asks for its port,
/// becomes publicly reachable at the router's address, reserves no relay, and a client
/// behind another NAT reaches it directly.
#[test]
fn a_donor_behind_a_upnp_router_is_reached_directly() {
    let _lab = one_lab_at_a_time();
    if !sandboxed("a_donor_behind_a_upnp_router_is_reached_directly") {
        return;
    }
    let lab = Lab::build(&[
        site("public", Nat::Public, 5),
        site("home", Nat::Upnp, 5),
        site("client", Nat::Cone, 5),
    ])
    .unwrap();
    let public = LabNode::start(&lab, "public", "0..15", None, &[]);
    let boot = public.addr.clone();
    let donor = LabNode::start(&lab, "home", "15..30", Some(&boot), &["--upnp"]);
    let line = donor.wait_reachability("publicly reachable", JOIN);
    let router = format!("/ip4/{}/", lab.wan_ip("home"));
    assert!(
        line.contains(&router),
        "not at the router's address: {line}"
    );
    let mapped = format!(
        "forwards /ip4/{}/tcp/{} to this node (UPnP)",
        lab.wan_ip("home"),
        support::wan::PORT
    );
    assert!(
        donor.stderr.text().contains(&mapped),
        "{}",
        donor.stderr.text()
    );

    let status = wait_for_status(&lab, "client", &boot, JOIN, |r| answering(r) == 2);
    let listed = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer"] == donor.peer_id.as_str())
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(listed["reachability"], "public", "{status:#}");
    let out = run_in(&lab, "client", &generate_args(&boot, "24"));
    let report = report_of(&out);
    assert_eq!(ids(&report), local_ids(24), "{report:#}");
    let paths = paths_of(&report);
    assert!(
        paths
            .iter()
            .any(|(peer, path)| *peer == donor.peer_id && path == "direct"),
        "{report:#}"
    );
}
