//! llama.cpp, the independent reference of the architecture tests, from
//! `ALLMENDE_LLAMA_CPP_DIR` (`scripts/llama-cpp.sh`; `scripts/test.sh` sets it):
//! llama-server on a model file, on a free port of 127.0.0.1, and llama-quantize, with
//! the files it makes kept between runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{free_port, request};

/// Top log-probabilities asked of llama-server at each generated position.
pub const TOP: usize = 10;

/// The directory of llama.cpp's programs and libraries. Tests fail, rather than skip,
/// without it.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("ALLMENDE_LLAMA_CPP_DIR").map(PathBuf::from).expect(
        "ALLMENDE_LLAMA_CPP_DIR is not set: run scripts/llama-cpp.sh and point it at the directory above build/ (scripts/test.sh does)",
    );
    let bin = dir.join("build/bin");
    assert!(
        bin.join("llama-server").exists(),
        "{} has no llama-server: run scripts/llama-cpp.sh",
        bin.display()
    );
    bin
}

/// `source` requantized by llama-quantize to `kind` (as it names types) at `target`,
/// written beside it first so that no half-written file is ever at `target`.
pub fn quantize(source: &Path, target: &Path, kind: &str) {
    let bin = bin_dir();
    let partial = target.with_extension("partial");
    let out = Command::new(bin.join("llama-quantize"))
        .env("LD_LIBRARY_PATH", &bin)
        .arg("--allow-requantize")
        .arg(source)
        .arg(&partial)
        .arg(kind)
        .output()
        .expect("llama-quantize runs");
    assert!(
        out.status.success(),
        "llama-quantize {kind} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, target).unwrap();
}

/// `source` requantized to `kind`, in `name`'s working directory: made again only when
/// `source` changes, not on every run.
pub fn requantized(source: &Path, name: &str, kind: &str) -> PathBuf {
    let target = work_dir(name).join(format!("{name}-{kind}.gguf"));
    if !fresh(&target, &[source]) {
        quantize(source, &target, kind);
    }
    target
}

/// A directory of the test build's own for the files `name`'s tests make, kept between
/// runs.
pub fn work_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `target` exists and is newer than every one of `sources`.
pub fn fresh(target: &Path, sources: &[&Path]) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match modified(target) {
        Some(made) => sources
            .iter()
            .all(|s| modified(s).is_some_and(|m| m <= made)),
        None => false,
    }
}

/// The llama-servers this process started and has not stopped: servers held in
/// statics (shared by a binary's tests) are never dropped, so they are killed as the
/// process exits instead of outliving it.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

extern "C" fn kill_running() {
    let pids = RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for &pid in pids.iter() {
        #[allow(unsafe_code)]
        // SAFETY: a signal to a child this process started and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

fn track(pid: u32) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        #[allow(unsafe_code)]
        // SAFETY: registers a function without arguments to run at exit.
        unsafe {
            libc::atexit(kill_running);
        }
    });
    let mut pids = RUNNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    pids.push(pid);
}

/// llama-server on one model file; killed when dropped, or when the process exits.
pub struct LlamaServer {
    child: Child,
    addr: SocketAddr,
}

impl LlamaServer {
    /// Serves `model`, chatting in llama.cpp's built-in format `chat_format`.
    pub fn start(model: &Path, chat_format: &str) -> Self {
        let bin = bin_dir();
        let port = free_port();
        let child = Command::new(bin.join("llama-server"))
            .env("LD_LIBRARY_PATH", &bin)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "1", "-c", "2048", "-np", "1"])
            // Without Jinja, the name picks llama.cpp's built-in format.
            .args(["--chat-template", chat_format, "--no-jinja"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        track(child.id());
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if std::net::TcpStream::connect(server.addr).is_ok()
                && request(server.addr, "GET", "/health", None).0 == 200
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("llama-server on {} exited: {status}", model.display());
            }
            assert!(Instant::now() < deadline, "llama-server never served");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `messages` in the server's chat format, with the opening of the model's turn.
    pub fn apply_template(&self, messages: &Value) -> String {
        let body = json!({"messages": messages});
        let (status, reply) = request(self.addr, "POST", "/apply-template", Some(&body));
        assert_eq!(status, 200, "{reply}");
        reply["prompt"].as_str().expect("a prompt").to_string()
    }

    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let body = json!({"content": text, "add_special": true});
        let (status, reply) = request(self.addr, "POST", "/tokenize", Some(&body));
        assert_eq!(status, 200, "{reply}");
        ids(&reply["tokens"])
    }

    /// Greedy continuation of `prompt` (token ids): the ids, and per position the
    /// [`TOP`] tokens' log-probabilities.
    pub fn complete(&self, prompt: &[u32], tokens: usize) -> Vec<(u32, Vec<(u32, f32)>)> {
        let body = json!({
            "prompt": prompt, "n_predict": tokens, "temperature": 0, "top_k": 1,
            "cache_prompt": false, "ignore_eos": true, "n_probs": TOP,
        });
        let (status, reply) = request(self.addr, "POST", "/completion", Some(&body));
        assert_eq!(status, 200, "{reply}");
        let positions = reply["completion_probabilities"]
            .as_array()
            .expect("log-probabilities");
        positions
            .iter()
            .map(|p| {
                let top = p["top_logprobs"].as_array().expect("top log-probabilities");
                let top = top
                    .iter()
                    .map(|t| (id(&t["id"]), t["logprob"].as_f64().unwrap() as f32))
                    .collect();
                (id(&p["id"]), top)
            })
            .collect()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut pids = RUNNING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pids.retain(|&pid| pid != self.child.id());
    }
}

fn id(v: &Value) -> u32 {
    v.as_u64().expect("a token id") as u32
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("token ids").iter().map(id).collect()
}
