//! Model files written to attack the loader: each malformed header kind, written by
//! the test, opened by the real binary (`generate --local` and `serve`) in a memory
//! group. Each must be refused with an error that names the problem, promptly,
//! within the group's memory, by a clean exit: never a panic, an abort or the
//! kernel's OOM killer. The group keeps a loader that still trusts the file from
//! taking the machine down with it.

mod support;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::cgroup::MemoryCage;
use support::gguf_writer::{array_header, tiny_llama, Gguf, ARRAY, GGML_F32, STRING};
use support::swarm::binary;

/// Far above what refusing a file costs, far below what the attacks ask for.
const MEMORY_LIMIT: u64 = 1 << 30;
const TIME_LIMIT: Duration = Duration::from_secs(60);

/// Runs `allmende args…` in its own memory group; its exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cage = MemoryCage::new(MEMORY_LIMIT);
    let stderr_path = dir.path().join("stderr");
    let mut child = Command::new("sh")
        .args(["-c", r#"echo $$ > "$0" && exec "$@""#])
        .arg(cage.procs())
        .arg(binary())
        .args(args)
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .expect("allmende starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("allmende {args:?} still ran after {TIME_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert_eq!(
        cage.oom_kills(),
        0,
        "allmende {args:?} ran out of memory:\n{stderr}"
    );
    (status.code(), stderr)
}

/// `generate --local` and `serve` both refuse `model`, naming each of `expected`.
fn refused(model: &Path, expected: &[&str]) {
    let file = model.to_str().unwrap();
    let generate = [
        "generate",
        "--local",
        "--model",
        file,
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ];
    let serve = [
        "serve",
        "--model",
        file,
        "--layers",
        "0..1",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--threads",
        "1",
    ];
    for args in [&generate[..], &serve[..]] {
        let (code, stderr) = run(args);
        let command = args[0];
        assert!(
            code.is_some(),
            "{command} on {file} was killed by a signal:\n{stderr}"
        );
        assert_ne!(code, Some(0), "{command} accepted {file}");
        assert!(
            !stderr.contains("panicked"),
            "{command} panicked:\n{stderr}"
        );
        for part in expected {
            assert!(
                stderr.contains(part),
                "{command}'s error lacks {part:?}:\n{stderr}"
            );
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn written(dir: &Path, name: &str, gguf: &Gguf) -> std::path::PathBuf {
    write(dir, name, &gguf.bytes())
}

#[test]
fn a_file_of_under_100_bytes_with_alignment_zero() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Gguf::default().u32("general.alignment", 0).bytes();
    assert!(bytes.len() < 100, "{} bytes", bytes.len());
    let file = write(dir.path(), "tiny.gguf", &bytes);
    refused(&file, &["general.alignment is 0"]);
}

#[test]
fn alignment_zero_or_not_a_power_of_two() {
    let dir = tempfile::tempdir().unwrap();
    let zero = written(
        dir.path(),
        "zero.gguf",
        &tiny_llama().u32("general.alignment", 0),
    );
    refused(&zero, &["general.alignment is 0"]);
    let three = written(
        dir.path(),
        "three.gguf",
        &tiny_llama().u32("general.alignment", 3),
    );
    refused(&three, &["general.alignment is 3", "power of two"]);
}

/// 2^28 one-byte elements fit the (sparse) file, but decoded they are 2^28 values
/// of 32 bytes: 8 GiB.
#[test]
fn a_metadata_array_that_costs_more_memory_than_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let len = 1u64 << 28;
    let header = tiny_llama()
        .raw("tokenizer.ggml.token_type", ARRAY, array_header(0, len))
        .bytes();
    let path = write(dir.path(), "array.gguf", &header);
    let file = File::options().write(true).open(&path).unwrap();
    file.set_len(header.len() as u64 + len).unwrap();
    refused(
        &path,
        &[
            "tokenizer.ggml.token_type",
            "268435456 elements",
            "more than the header's limit",
        ],
    );
}

#[test]
fn a_string_longer_than_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // A string's length, then no string.
    let gguf = tiny_llama().raw("general.name", STRING, (1u64 << 40).to_le_bytes().to_vec());
    let path = written(dir.path(), "string.gguf", &gguf);
    refused(
        &path,
        &["is truncated", "general.name", "1099511627776 bytes"],
    );
}

#[test]
fn a_tensor_without_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama().tensor("token_embd.weight", &[], GGML_F32, 4);
    let path = written(dir.path(), "scalar.gguf", &gguf);
    refused(&path, &["tensor token_embd.weight has 0 dimensions"]);
}

#[test]
fn tensor_dimensions_whose_product_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama().tensor("token_embd.weight", &[1 << 40, 1 << 40], GGML_F32, 0);
    let path = written(dir.path(), "overflow.gguf", &gguf);
    refused(&path, &["tensor token_embd.weight", "overflows"]);
}

#[test]
fn a_context_length_past_any_model() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama().u64("llama.context_length", 1 << 40);
    let path = written(dir.path(), "context.gguf", &gguf);
    refused(
        &path,
        &["llama.context_length is 1099511627776", "limit of 1048576"],
    );
}

#[test]
fn a_block_count_past_any_model() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama().u64("llama.block_count", 1 << 40);
    let path = written(dir.path(), "blocks.gguf", &gguf);
    refused(
        &path,
        &["llama.block_count is 1099511627776", "limit of 4096"],
    );
}

/// Hyper-parameters whose products overflow: heads times head size.
#[test]
fn head_counts_and_sizes_past_any_model() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tiny_llama()
        .u64("llama.attention.head_count", 1 << 33)
        .u64("llama.attention.key_length", 1 << 33);
    let path = written(dir.path(), "heads.gguf", &gguf);
    refused(&path, &["llama.attention.head_count is 8589934592"]);
}
