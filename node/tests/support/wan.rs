//! Real `allmende` processes in the WAN lab's sites: servers and clients behind NATs
//! and delays, as donors and users run them at home.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allmende_wan_lab::Lab;

use super::swarm::binary;

/// The port every lab node listens on (each site has its own network stack).
pub const PORT: u16 = 4001;

/// What a lab process printed so far.
#[derive(Clone, Default)]
pub struct Printed(Arc<Mutex<String>>);

impl Printed {
    fn collect(source: impl Read + Send + 'static) -> Printed {
        let printed = Printed::default();
        let sink = printed.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(source).lines().map_while(Result::ok) {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        printed
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until a printed line contains `needle`; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.text().lines().find(|l| l.contains(needle)) {
                return Some(line.to_string());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An `allmende serve` process in a lab site, killed when dropped.
pub struct LabNode {
    pub child: Child,
    pub site: String,
    pub peer_id: String,
    pub stdout: Printed,
    pub stderr: Printed,
    /// Its internet address with /p2p/<peer id>: for a public site, where others
    /// bootstrap from.
    pub addr: String,
    _dir: tempfile::TempDir,
}

/// A command running `allmende ARGS` in `site`, with the test model and the
/// network's log lines.
pub fn allmende_in(lab: &Lab, site: &str, args: &[&str]) -> Command {
    let mut cmd = lab.command(site, binary());
    cmd.args(args)
        .env("ALLMENDE_MODEL", super::model_path())
        .env("ALLMENDE_LOG", "warn,allmende_node::network=debug,allmende_node::server::announce=debug,allmende_node::server::forwarding=debug,libp2p_dcutr=debug,libp2p_relay=info,libp2p_mdns=error,libp2p_kad=error,libp2p_autonat=error");
    cmd
}

impl LabNode {
    /// Starts a server for `layers` in `site`, joining at `bootstrap`, and waits until
    /// it serves.
    pub fn start(
        lab: &Lab,
        site: &str,
        layers: &str,
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> LabNode {
        let node = Self::spawn(lab, site, layers, bootstrap, extra, None);
        node.stdout
            .wait_for("serving layers", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("node in {site} did not start: {}", node.stderr.text()));
        node
    }

    /// Starts a server without waiting for it; `identity` keeps its peer id across
    /// restarts.
    pub fn spawn(
        lab: &Lab,
        site: &str,
        layers: &str,
        bootstrap: Option<&str>,
        extra: &[&str],
        identity: Option<&std::path::Path>,
    ) -> LabNode {
        let dir = tempfile::tempdir().unwrap();
        let identity =
            identity.map_or_else(|| dir.path().join("identity.key"), |p| p.to_path_buf());
        let tcp = format!("/ip4/0.0.0.0/tcp/{PORT}");
        let quic = format!("/ip4/0.0.0.0/udp/{PORT}/quic-v1");
        let mut cmd = allmende_in(lab, site, &["serve", "--layers", layers, "--no-mdns"]);
        cmd.args(["--listen", &tcp, "--listen", &quic, "--threads", "1"])
            .arg("--identity")
            .arg(&identity)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().expect("allmende serve starts");
        let stdout = Printed::collect(child.stdout.take().unwrap());
        let stderr = Printed::collect(child.stderr.take().unwrap());
        let line = stdout
            .wait_for("peer id: ", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("node in {site} printed no peer id: {}", stderr.text()));
        let peer_id = line.trim_start_matches("peer id: ").trim().to_string();
        LabNode {
            addr: format!("/ip4/{}/tcp/{PORT}/p2p/{peer_id}", lab.wan_ip(site)),
            child,
            site: site.to_string(),
            peer_id,
            stdout,
            stderr,
            _dir: dir,
        }
    }

    /// Waits until the node reports `what` (e.g. "behind NAT") as its reachability.
    pub fn wait_reachability(&self, what: &str, timeout: Duration) -> String {
        let needle = format!("reachability: {what}");
        self.stdout.wait_for(&needle, timeout).unwrap_or_else(|| {
            panic!(
                "node in {} never reported {needle:?}; stdout:\n{}\nstderr:\n{}",
                self.site,
                self.stdout.text(),
                self.stderr.text()
            )
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- node in {} ({}) stdout:\n{}--- stderr:\n{}",
                self.site,
                self.peer_id,
                self.stdout.text(),
                self.stderr.text()
            );
        }
    }
}

/// Runs `allmende ARGS` in `site` to the end.
pub fn run_in(lab: &Lab, site: &str, args: &[&str]) -> Output {
    allmende_in(lab, site, args)
        .output()
        .expect("allmende runs")
}

/// `allmende status --json` from `site` until `ready` holds (or `timeout` passes).
pub fn wait_for_status(
    lab: &Lab,
    site: &str,
    bootstrap: &str,
    timeout: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let out = run_in(
            lab,
            site,
            &["status", "--bootstrap", bootstrap, "--no-mdns", "--json"],
        );
        let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        if ready(&report) {
            return report;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "status from {site} not ready; its stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return report;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Peers in a status report that answered.
pub fn answering(report: &serde_json::Value) -> usize {
    report["peers"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["answered"] == true).count())
}

/// A generation's JSON report (the last line of its output).
pub fn report_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "no JSON report; stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The path kind of each hop of a generation's route.
pub fn paths_of(report: &serde_json::Value) -> Vec<(String, String)> {
    hops(report, |hop| &hop["path"])
}

/// Each hop's peer and the path its server forwarded to the next one over ("none"
/// for the last hop).
pub fn forward_paths_of(report: &serde_json::Value) -> Vec<(String, String)> {
    hops(report, |hop| &hop["forwards_to_next"]["path"])
}

fn hops(
    report: &serde_json::Value,
    path: impl Fn(&serde_json::Value) -> &serde_json::Value,
) -> Vec<(String, String)> {
    report["route"]
        .as_array()
        .expect("a route")
        .iter()
        .map(|hop| {
            (
                hop["peer"].as_str().unwrap().to_string(),
                path(hop).as_str().unwrap_or("none").to_string(),
            )
        })
        .collect()
}

/// Makes `name` resolve to `ip` for every process of this sandbox: a hosts file
/// bind-mounted over /etc/hosts in the sandbox's own mount namespace (refused outside
/// a sandbox, where it would change the machine's).
pub fn resolve_in_sandbox(name: &str, ip: std::net::Ipv4Addr) -> tempfile::TempDir {
    assert!(
        allmende_wan_lab::in_sandbox(),
        "only inside the lab's sandbox"
    );
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{ip} {name}\n")).unwrap();
    let status = Command::new("mount")
        .arg("--bind")
        .arg(&hosts)
        .arg("/etc/hosts")
        .status()
        .expect("mount runs");
    assert!(status.success(), "cannot bind-mount a hosts file");
    dir
}

/// A process killed when the test lets go of it.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
