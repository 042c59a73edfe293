//! Weights over the swarm (real processes on loopback): donors started with only the
//! model id fetch exactly their layers from the nodes serving the model, keep serving
//! once the seed has left, pass the weights on to a later donor, resume from their
//! cache, and blame a chunk that does not match the model on the peer that sent it;
//! with the model's file on an HTTP server, a donor reads only its layers' bytes there.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use allmende_node::model::GgufFile;
use allmende_node::weights::plan::layer_of;
use support::file_server::FileServer;
use support::swarm::{greedy_24, Node};

fn printed<'a>(node: &'a Node, prefix: &str) -> &'a str {
    node.started
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {:?}", node.started))
}

/// The layers a node serves, from its "serving layers A..B of" line.
fn served(node: &Node) -> (u32, u32) {
    let range = printed(node, "serving layers ").split(' ').next().unwrap();
    let (a, b) = range.split_once("..").unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// Bytes the model file's tensors of layers `start..end` take.
fn layer_bytes(start: u32, end: u32) -> u64 {
    let gguf = GgufFile::open(&support::model_path()).unwrap();
    gguf.tensor_names()
        .filter(|n| layer_of(n).is_some_and(|l| (start..end).contains(&l)))
        .map(|n| gguf.tensor_bytes(n))
        .sum()
}

/// Bytes a donor's cache holds on disk (its data file's allocated blocks and its
/// manifest).
fn cache_disk_bytes(dir: &Path, model: &str) -> u64 {
    let dir = dir.join(model);
    let data = std::fs::metadata(dir.join("tensors")).unwrap();
    data.blocks() * 512 + std::fs::metadata(dir.join("manifest")).unwrap().len()
}

fn donor(layers: &str, bootstrap: &str, model: &str, dir: &Path, extra: &[&str]) -> Node {
    let dir = dir.to_str().unwrap();
    let args = [&["--model-id", model, "--weights-dir", dir][..], extra].concat();
    Node::start(layers, Some(bootstrap), &args)
}

#[test]
fn donors_fetch_their_layers_serve_without_the_seed_and_pass_them_on() {
    let seed = Node::start("0..30", None, &[]);
    let model = printed(&seed, "model id: ").to_string();
    let dirs = tempfile::tempdir().unwrap();
    let (dir_a, dir_b, dir_c) = (
        dirs.path().join("a"),
        dirs.path().join("b"),
        dirs.path().join("c"),
    );
    // A capped donor takes what fits; the second the rest.
    let a = donor(
        "auto",
        &seed.addr,
        &model,
        &dir_a,
        &["--max-memory", "110MiB", "--max-step-positions", "512"],
    );
    let (start, split) = served(&a);
    assert!(start == 0 && split < 30, "{:?}", a.started);
    let b = donor(&format!("{split}..30"), &seed.addr, &model, &dir_b, &[]);
    for (node, (start, end), dir) in [(&a, (0, split), &dir_a), (&b, (split, 30), &dir_b)] {
        let line = printed(node, "fetched ");
        eprintln!("layers {start}..{end}: fetched {line}");
        let layers = layer_bytes(start, end);
        let manifest = std::fs::metadata(dir.join(&model).join("manifest"))
            .unwrap()
            .len();
        let on_disk = cache_disk_bytes(dir, &model);
        eprintln!(
            "  on disk {on_disk} bytes for {layers} bytes of layers and a {manifest}-byte manifest"
        );
        assert!(
            on_disk <= layers + manifest + layers / 100,
            "layers {start}..{end}: {on_disk} bytes on disk for {layers} of layers"
        );
        assert!(on_disk >= layers, "the layers are on disk");
    }

    // The seed leaves; the donors serve the model alone, with --local's tokens.
    let mut seed = seed;
    seed.terminate();
    assert!(seed.wait_exit(Duration::from_secs(60)).is_some());
    let local = greedy_24(&["--local"]);
    assert_eq!(greedy_24(&["--bootstrap", &b.addr]), local);

    // A later donor fetches from the donors; killed and restarted alone, with no peer
    // to ask, it serves from its cache and fetches nothing.
    let c = donor("0..4", &a.addr, &model, &dir_c, &[]);
    eprintln!("after the seed left: fetched {}", printed(&c, "fetched "));
    let mut c = c;
    c.kill();
    let cache = dir_c.to_str().unwrap();
    let c = Node::start(
        "0..4",
        None,
        &["--model-id", &model, "--weights-dir", cache],
    );
    let again = printed(&c, "fetched ");
    assert!(again.starts_with("0.0 MiB of layers 0..4"), "{again}");
    drop((a, b, c));
}

#[test]
fn a_chunk_that_does_not_match_is_blamed_on_its_sender_and_fetched_elsewhere() {
    let honest = Node::start("20..30", None, &[]);
    let model = printed(&honest, "model id: ").to_string();

    let dir = tempfile::tempdir().unwrap();
    let liar_file = dir.path().join("liar.gguf");
    tampered_copy(&liar_file, &model);
    let liar = Node::start(
        "0..20",
        Some(&honest.addr),
        &["--model", liar_file.to_str().unwrap()],
    );
    assert_eq!(printed(&liar, "model id: "), model);

    // Layer 0's hosts come first: the liar is asked, caught, and the honest node,
    // which holds the whole file, gives the chunk.
    let cache = dir.path().join("cache");
    let donor = donor("0..2", &honest.addr, &model, &cache, &[]);
    let banned = printed(&donor, "banned ");
    assert!(banned.starts_with(&liar.peer_id), "{banned}");
    assert!(
        !donor
            .started
            .iter()
            .any(|l| l.contains(&honest.peer_id) && l.starts_with("banned")),
        "{:?}",
        donor.started
    );
    assert_eq!(served(&donor), (0, 2));
}

/// A copy of the model at `path` with one byte of layer 0 changed, which still claims
/// the honest model's id (the id of a file is remembered beside it, by size and time).
fn tampered_copy(path: &Path, model: &str) {
    std::fs::copy(support::model_path(), path).unwrap();
    let at = GgufFile::open(path)
        .unwrap()
        .tensor_start("blk.0.attn_q.weight")
        .unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize + 100] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
    let meta = std::fs::metadata(path).unwrap();
    let mtime = meta
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut sidecar = path.as_os_str().to_owned();
    sidecar.push(".allmende-model-id");
    std::fs::write(sidecar, format!("{} {mtime} {model}\n", meta.len())).unwrap();
}

#[test]
fn a_donor_reads_only_its_layers_bytes_from_the_models_http_server() {
    let seed = Node::start("0..30", None, &[]);
    let model = printed(&seed, "model id: ").to_string();
    let files = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(support::model_path(), files.path().join("model.gguf")).unwrap();
    tampered_copy(&files.path().join("other.gguf"), &model);
    let server = FileServer::start(files.path());

    // Layers 5..12 read from the whole file, then from the model split into three
    // files as llama.cpp splits one (found by name from the first file's URL): the
    // layers' bytes and each file's header, nothing else.
    let layers = layer_bytes(5, 12);
    let parts = split_model(files.path(), 3);
    for (file, headers) in [
        ("model.gguf", vec![support::model_path()]),
        ("split-00001-of-00003.gguf", parts),
    ] {
        let before = server.sent();
        let cache = tempfile::tempdir().unwrap();
        let url = format!("http://{}/{file}", server.addr);
        let reader = donor(
            "5..12",
            &seed.addr,
            &model,
            cache.path(),
            &["--model-url", &url],
        );
        let line = printed(&reader, "fetched ");
        eprintln!("fetched {line}");
        assert!(
            line.contains("from 0 peers and"),
            "every chunk from the server: {line}"
        );
        let sent = server.sent() - before;
        let header: u64 = headers.iter().map(|p| header_bytes(p)).sum();
        let reads: u64 = headers.iter().map(|p| header_reads(header_bytes(p))).sum();
        eprintln!(
            "the server sent {sent} bytes for {layers} bytes of layers and {header} of headers"
        );
        assert!(sent >= layers + header, "{sent}");
        assert!(sent <= layers + reads + layers / 100, "{sent}");
    }

    // A server whose file differs from the model is dropped at its first bad chunk,
    // and the peers give the rest.
    let cache = tempfile::tempdir().unwrap();
    let url = format!("http://{}/other.gguf", server.addr);
    let misled = donor(
        "0..2",
        &seed.addr,
        &model,
        cache.path(),
        &["--model-url", &url],
    );
    assert!(
        misled
            .started
            .iter()
            .any(|l| l.starts_with(&url) && l.contains("is not this model")),
        "{:?}",
        misled.started
    );
    assert_eq!(served(&misled), (0, 2));
}

/// Where a GGUF file's tensor data starts: its header's size.
fn header_bytes(path: &Path) -> u64 {
    let gguf = GgufFile::open(path).unwrap();
    gguf.tensor_names()
        .filter_map(|n| gguf.tensor_start(n))
        .min()
        .unwrap()
}

/// What reading a header of `bytes` costs: 64 KiB, then as much again until it is in.
fn header_reads(bytes: u64) -> u64 {
    bytes.max(64 << 10).next_power_of_two()
}

/// The test model split into `count` files `split-0000K-of-0000N.gguf` in `dir`, its
/// tensors in file order spread over them, each file with the `split.*` keys and its
/// own tensor table (the metadata stays in the swarm's manifest).
fn split_model(dir: &Path, count: usize) -> Vec<std::path::PathBuf> {
    use support::gguf_writer::Gguf;
    let mut model = GgufFile::open(&support::model_path()).unwrap();
    let mut names: Vec<String> = model.tensor_names().map(str::to_string).collect();
    names.sort_by_key(|n| model.tensor_start(n));
    let per = names.len().div_ceil(count);
    let mut paths = Vec::new();
    for (k, part) in names.chunks(per).enumerate() {
        let mut file = Gguf::default()
            .u32("split.no", k as u32)
            .u32("split.count", count as u32)
            .u32("split.tensors.count", names.len() as u32);
        for name in part {
            let info = model.tensor_info(name).unwrap();
            let dims: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
            let (code, len) = (info.dtype.code(), model.tensor_bytes(name) as usize);
            file = file.tensor(name, &dims, code, len);
        }
        let path = dir.join(format!("split-{:05}-of-{count:05}.gguf", k + 1));
        let mut bytes = file.bytes();
        std::fs::write(&path, &bytes).unwrap();
        let written = GgufFile::open(&path).unwrap();
        for name in part {
            let at = written.tensor_start(name).unwrap() as usize;
            let data = model.tensor(name).unwrap().bytes;
            bytes[at..at + data.len()].copy_from_slice(&data);
        }
        std::fs::write(&path, &bytes).unwrap();
        paths.push(path);
    }
    paths
}
