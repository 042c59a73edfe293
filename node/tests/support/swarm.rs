//! Real `allmende serve` processes on loopback for integration tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::cgroup::MemoryCage;

/// A running server process, killed when dropped.
pub struct Node {
    pub child: Child,
    /// Its first listen address, with /p2p/<peer id>.
    pub addr: String,
    pub peer_id: String,
    /// What it printed until it served.
    pub started: Vec<String>,
    _dir: tempfile::TempDir,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_allmende")
}

impl Node {
    /// Starts `allmende serve --layers RANGE` on 127.0.0.1 and waits until it serves.
    pub fn start(layers: &str, bootstrap: Option<&str>, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity.key");
        Self::start_as(&identity, dir, layers, bootstrap, extra, None)
    }

    /// Like [`Node::start`], inside the memory control group `cage` from its first
    /// instruction, so every byte it maps or allocates counts against the cage's limit.
    pub fn start_caged(cage: &MemoryCage, layers: &str, extra: &[&str]) -> Node {
        Self::start_caged_joining(cage, layers, None, extra)
    }

    /// Like [`Node::start_caged`], joining the swarm at `bootstrap`.
    pub fn start_caged_joining(
        cage: &MemoryCage,
        layers: &str,
        bootstrap: Option<&str>,
        extra: &[&str],
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity.key");
        Self::start_as(&identity, dir, layers, bootstrap, extra, Some(cage))
    }

    /// Like [`Node::start`], with the identity key file `identity`.
    pub fn start_with_identity(identity: &Path, layers: &str, extra: &[&str]) -> Node {
        Self::start_as(
            identity,
            tempfile::tempdir().unwrap(),
            layers,
            None,
            extra,
            None,
        )
    }

    fn start_as(
        identity: &Path,
        dir: tempfile::TempDir,
        layers: &str,
        bootstrap: Option<&str>,
        extra: &[&str],
        cage: Option<&MemoryCage>,
    ) -> Node {
        let mut cmd = match cage {
            Some(cage) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
                    .arg(cage.procs())
                    .arg(binary());
                sh
            }
            None => Command::new(binary()),
        };
        cmd.args([
            "serve",
            "--layers",
            layers,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ])
        .arg("--identity")
        .arg(identity)
        .args(["--threads", "1"])
        .args(extra)
        .env("ALLMENDE_MODEL", super::model_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().expect("allmende serve starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut peer_id, mut started) = (None, None, Vec::new());
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("node for {layers} did not start"));
            if let Some(p) = line.strip_prefix("peer id: ") {
                peer_id = Some(p.to_string());
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                addr.get_or_insert_with(|| a.to_string());
            }
            let serving = line.starts_with("serving layers");
            started.push(line);
            if serving {
                break;
            }
        }
        Node {
            child,
            addr: addr.expect("a listen address"),
            peer_id: peer_id.expect("a peer id"),
            started,
            _dir: dir,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn allmende(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("ALLMENDE_MODEL", super::model_path())
        .output()
        .expect("allmende runs")
}

/// The JSON object on the last line of a successful command's stdout.
/// The ids of 24 greedy tokens after "Once upon a time, in a small village," from
/// `allmende generate` with `extra` arguments (`--local`, or a swarm to bootstrap from).
pub fn greedy_24(extra: &[&str]) -> Vec<u32> {
    let args = [
        "generate",
        "--no-mdns",
        "--prompt",
        "Once upon a time, in a small village,",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--ignore-eos",
        "--threads",
        "1",
        "--json",
    ];
    ids(&json_of(&allmende(&[&args[..], extra].concat())))
}

pub fn json_of(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "command failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("output");
    serde_json::from_str(last).expect("JSON on the last line")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v["token_ids"].clone()).expect("token_ids")
}

impl Node {
    /// Sends SIGTERM: the graceful leave.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// `allmende status --json` until `ready` holds for its report (or `timeout` passes).
pub fn wait_for_status(
    bootstrap: &str,
    timeout: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let report = json_of(&allmende(&[
            "status",
            "--bootstrap",
            bootstrap,
            "--no-mdns",
            "--json",
        ]));
        if ready(&report) || std::time::Instant::now() >= deadline {
            return report;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `generate` process whose output is collected while it runs.
pub struct Generation {
    child: Child,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Generation {
    pub fn start(args: &[&str]) -> Generation {
        let mut command = Command::new(binary());
        command
            .args(args)
            .env("ALLMENDE_MODEL", super::model_path());
        Self::start_with(command)
    }

    /// Runs `command` (an `allmende` command line) as a generation.
    pub fn start_with(mut command: Command) -> Generation {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("allmende generate starts");
        let collect = |mut source: Box<dyn std::io::Read + Send>| {
            let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = buffer.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = source.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            buffer
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Generation {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits until the process has printed at least `bytes` bytes of text.
    pub fn wait_for_text(&self, bytes: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while self.stdout.lock().unwrap().len() < bytes {
            assert!(
                std::time::Instant::now() < deadline,
                "generation printed nothing; stderr:\n{}",
                String::from_utf8_lossy(&self.stderr.lock().unwrap())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end; returns its exit status, stdout and stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let status = self.child.wait().expect("generate ends");
        std::thread::sleep(Duration::from_millis(100));
        let text = |b: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
        };
        (status, text(&self.stdout), text(&self.stderr))
    }
}
