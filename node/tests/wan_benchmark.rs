//! The WAN benchmark (ignored by `cargo test`; `scripts/wan-bench.sh` runs it): three
//! servers and a client in the WAN lab, one-way delay d between any two of them.
//! It prints a Markdown table of decode step times against their floor, prefill
//! times, and relayed against direct paths: the client is behind a NAT, and in the
//! relayed swarm the last server is behind a symmetric NAT, so its output reaches
//! the client through a relay.

mod support;

use std::time::Duration;

use allmende_wan_lab::{sandboxed, Lab, Nat, Site};
use support::swarm::{allmende, json_of};
use support::wan::{answering, report_of, run_in, wait_for_status, LabNode};

const TOKENS: &str = "64";
const ROUNDS: usize = 3;
const SERVERS: [(&str, &str); 3] = [("s1", "0..10"), ("s2", "10..20"), ("s3", "20..30")];

fn long_prompt() -> String {
    "The quick brown fox jumps over the lazy dog while the farmer watches. ".repeat(14)
}

fn sites(nat_of_s3: Nat, uplink_bps: Option<u64>) -> Vec<Site> {
    let site = |name: &str, nat| Site {
        uplink_bps,
        ..Site::new(name, nat)
    };
    // The client at home, behind a NAT that keeps ports: a relayed server behind a
    // symmetric NAT cannot dial it, so that server's results come through the relay.
    vec![
        site("client", Nat::Cone),
        site("s1", Nat::Public),
        site("s2", Nat::Public),
        site("s3", nat_of_s3),
    ]
}

/// A lab with its three servers up and found by the client.
struct Swarm {
    lab: Lab,
    boot: String,
    _nodes: Vec<LabNode>,
}

impl Swarm {
    fn start(nat_of_s3: Nat, uplink_bps: Option<u64>) -> Swarm {
        let lab = Lab::build(&sites(nat_of_s3, uplink_bps)).unwrap();
        let first = LabNode::start(&lab, "s1", SERVERS[0].1, None, &[]);
        let boot = first.addr.clone();
        let mut nodes = vec![first];
        for (site, layers) in &SERVERS[1..] {
            nodes.push(LabNode::start(&lab, site, layers, Some(&boot), &[]));
        }
        if nat_of_s3 != Nat::Public {
            nodes[2].wait_reachability("behind NAT", Duration::from_secs(60));
        }
        let status = wait_for_status(&lab, "client", &boot, Duration::from_secs(60), |r| {
            answering(r) == 3
        });
        assert_eq!(answering(&status), 3, "{status:#}");
        Swarm {
            lab,
            boot,
            _nodes: nodes,
        }
    }

    /// One-way delay `d` between any two sites: half on each access link.
    fn set_delay(&self, d: Duration) {
        for site in ["client", "s1", "s2", "s3"] {
            self.lab.set_delay(site, d / 2);
        }
    }

    /// A generation's timings and route.
    fn generate(&self, prompt: &str, tokens: &str) -> serde_json::Value {
        let out = run_in(
            &self.lab,
            "client",
            &[
                "generate",
                "--bootstrap",
                &self.boot,
                "--no-mdns",
                "--prompt",
                prompt,
                "--max-tokens",
                tokens,
                "--temperature",
                "0",
                "--ignore-eos",
                "--json",
            ],
        );
        report_of(&out)
    }
}

fn step_ms(report: &serde_json::Value) -> f64 {
    1e3 / report["timings"]["decode_tokens_per_s"].as_f64().unwrap()
}

fn prefill_ms(report: &serde_json::Value) -> f64 {
    report["timings"]["prefill_ms"].as_f64().unwrap()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The decode step of one process with every layer: the compute in the floor.
fn local_step_ms() -> f64 {
    let runs = (0..ROUNDS)
        .map(|_| {
            step_ms(&json_of(&allmende(&[
                "generate",
                "--local",
                "--prompt",
                "The capital of France is",
                "--max-tokens",
                TOKENS,
                "--temperature",
                "0",
                "--ignore-eos",
                "--json",
                "--threads",
                "1",
            ])))
        })
        .collect();
    median(runs)
}

#[test]
#[ignore = "a benchmark: scripts/wan-bench.sh"]
fn wan_benchmark() {
    if !sandboxed("wan_benchmark") {
        return;
    }
    let compute = local_step_ms();
    let prompt = long_prompt();
    println!("compute (one process, all layers): {compute:.2} ms per decode step\n");

    let direct = Swarm::start(Nat::Public, None);
    let relayed = Swarm::start(Nat::Symmetric, None);
    println!("| one-way delay d | floor 4d + compute | decode step | over the floor | steps/s | steps/s x RTT | prefill, {} tokens | prefill, s3 relayed | decode step, s3 relayed |", prompt_tokens(&direct, &prompt));
    println!("|---|---|---|---|---|---|---|---|---|");
    for d_ms in [0u64, 10, 25, 50] {
        let d = Duration::from_millis(d_ms);
        direct.set_delay(d);
        relayed.set_delay(d);
        let (mut steps, mut prefills, mut relayed_steps, mut relayed_prefills) =
            (vec![], vec![], vec![], vec![]);
        // Alternate the two sides so that drift on the machine hits both alike.
        for _ in 0..ROUNDS {
            steps.push(step_ms(
                &direct.generate("The capital of France is", TOKENS),
            ));
            relayed_steps.push(step_ms(
                &relayed.generate("The capital of France is", TOKENS),
            ));
            prefills.push(prefill_ms(&direct.generate(&prompt, "1")));
            relayed_prefills.push(prefill_ms(&relayed.generate(&prompt, "1")));
        }
        let step = median(steps);
        let floor = 4.0 * d_ms as f64 + compute;
        let steps_per_s = 1e3 / step;
        println!(
            "| {d_ms} ms | {floor:.1} ms | {step:.1} ms | {:+.1} ms ({:.0}%) | {steps_per_s:.2} | {:.3} | {:.0} ms | {:.0} ms | {:.1} ms |",
            step - floor,
            100.0 * (step - floor) / floor,
            steps_per_s * 2.0 * d_ms as f64 / 1e3,
            median(prefills),
            median(relayed_prefills),
            median(relayed_steps),
        );
    }
    drop(relayed);
    drop(direct);

    // Home uplinks: 20 Mbit/s on every site, d = 25 ms.
    let slow = Swarm::start(Nat::Public, Some(20_000_000));
    slow.set_delay(Duration::from_millis(25));
    let prefills = (0..ROUNDS)
        .map(|_| prefill_ms(&slow.generate(&prompt, "1")))
        .collect();
    let steps = (0..ROUNDS)
        .map(|_| step_ms(&slow.generate("The capital of France is", TOKENS)))
        .collect();
    println!(
        "\n20 Mbit/s uplinks, d = 25 ms: prefill {:.0} ms, decode step {:.1} ms",
        median(prefills),
        median(steps)
    );
}

fn prompt_tokens(swarm: &Swarm, prompt: &str) -> usize {
    swarm.generate(prompt, "1")["prompt_token_ids"]
        .as_array()
        .unwrap()
        .len()
}
