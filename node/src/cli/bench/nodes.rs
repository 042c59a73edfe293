//! Server processes for the benchmark: this binary's own `serve`, on loopback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use allmende_protocol::LayerRange;
use anyhow::{anyhow, bail, Context};

/// How long a node may take to load its layers and start serving.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `allmende serve`, stopped when dropped.
pub struct ServeProcess {
    child: Child,
    pub range: LayerRange,
    /// Its listen address with /p2p/<peer id>.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Starts a node for `range` with `threads` compute threads, joined to `bootstrap`.
    /// One benchmark client opens every session, so the per-peer limits are lifted.
    pub fn start(
        model: &Path,
        range: LayerRange,
        threads: usize,
        bootstrap: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let exe = std::env::current_exe().context("finding this program")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--layers", &format!("{}..{}", range.start, range.end)])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .arg("--identity")
            .arg(dir.path().join("identity.key"))
            .args(["--threads", &threads.to_string()])
            // Room for many concurrent sessions; the per-peer limits stay the defaults
            // a donor runs with.
            .args(["--max-sessions", "64"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match std::env::var_os("ALLMENDE_BENCH_NODE_LOG") {
                Some(_) => Stdio::inherit(),
                None => Stdio::null(),
            });
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().context("starting allmende serve")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut peer = None;
        loop {
            let line = match rx.recv_timeout(START_TIMEOUT) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    bail!("the node for layers {range} did not start");
                }
            };
            if let Some(p) = line.strip_prefix("peer id: ") {
                peer = Some(p.to_string());
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                addr.get_or_insert_with(|| a.to_string());
            }
            if line.starts_with("serving layers") {
                break;
            }
        }
        let (Some(addr), Some(peer)) = (addr, peer) else {
            let _ = child.kill();
            bail!("the node for layers {range} reported no address");
        };
        let addr = match addr.contains("/p2p/") {
            true => addr,
            false => format!("{addr}/p2p/{peer}"),
        };
        Ok(Self {
            child,
            range,
            addr,
            _dir: dir,
        })
    }

    /// The process's peak resident set (VmHWM) in bytes, where the system reports it.
    pub fn peak_rss(&self) -> Option<u64> {
        self.proc_kib("status", "VmHWM:").map(|kib| kib * 1024)
    }

    /// Its memory now in transparent huge pages (AnonHugePages) in bytes, where the
    /// system reports it: the weights, when huge pages are available.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        self.proc_kib("smaps_rollup", "AnonHugePages:")
            .map(|kib| kib * 1024)
    }

    /// The kB figure of the line starting with `key` in `/proc/<pid>/<file>`.
    fn proc_kib(&self, file: &str, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).ok()?;
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` contiguous ranges covering `0..layers` as evenly as possible.
pub fn split_layers(layers: u32, n: u32) -> Vec<LayerRange> {
    let n = n.clamp(1, layers.max(1));
    (0..n)
        .map(|i| LayerRange::new(layers * i / n, layers * (i + 1) / n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_layer_once() {
        for (layers, n) in [(30, 3), (30, 4), (30, 1), (5, 8), (30, 30)] {
            let ranges = split_layers(layers, n);
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, layers);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            assert!(ranges.iter().all(|r| !r.is_empty()));
        }
    }
}
