//! A model's identity is the hash of its manifest, not of its file: the real model
//! rewritten with another alignment and its tensors in reverse order (every offset
//! moves) keeps its id, and one flipped byte of one weight changes the id and is
//! found in exactly one chunk of that tensor. The copies are written by the `gguf`
//! Python package (`ALLMENDE_TEST_PYTHON`).

mod support;

use std::path::Path;
use std::process::Command;

use allmende_node::model::{manifest, GgufFile};
use allmende_protocol::Manifest;

/// Copies the GGUF file argv[1] to argv[2] with alignment argv[3], tensors in reverse
/// order, and byte argv[5] of tensor argv[4] flipped (if named).
const REWRITE: &str = r#"
import sys
import gguf
src, dst, alignment, flip, at = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
reader = gguf.GGUFReader(src)
arch = reader.fields["general.architecture"].contents()
writer = gguf.GGUFWriter(dst, arch)
writer.add_custom_alignment(alignment)
for field in reader.fields.values():
    if field.name in ("general.architecture", "general.alignment") or field.name.startswith("GGUF."):
        continue
    kind = field.types[0]
    sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
tensors = list(reversed(reader.tensors))
for t in tensors:
    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for t in tensors:
    data = t.data
    if t.name == flip:
        data = data.copy()
        data.view("u1").reshape(-1)[at] ^= 1
    writer.write_tensor_data(data)
writer.close()
"#;

fn rewrite(src: &Path, dst: &Path, alignment: u32, flip: Option<(&str, u64)>) {
    let python = std::env::var("ALLMENDE_TEST_PYTHON").expect(
        "ALLMENDE_TEST_PYTHON is not set: run scripts/setup-test-deps.sh and point it at the Python it prints (scripts/test.sh does)",
    );
    let (name, at) = flip.unwrap_or(("", 0));
    let status = Command::new(python)
        .args(["-c", REWRITE])
        .arg(src)
        .arg(dst)
        .args([alignment.to_string(), name.to_string(), at.to_string()])
        .status()
        .expect("python runs");
    assert!(status.success(), "rewriting the model failed");
}

fn manifest_of(path: &Path) -> (Manifest, GgufFile) {
    let gguf = GgufFile::open(path).unwrap();
    let m = manifest(&gguf, &indicatif::ProgressBar::hidden()).unwrap();
    (m, gguf)
}

#[test]
fn a_models_id_is_its_weights_not_its_files_layout() {
    let original = support::model_path();
    let dir = tempfile::tempdir().unwrap();
    let (base, base_file) = manifest_of(&original);
    assert_eq!(
        allmende_node::model::model_id(&original, &indicatif::ProgressBar::hidden()).unwrap(),
        base.id()
    );

    let moved = dir.path().join("moved.gguf");
    rewrite(&original, &moved, 64, None);
    let (same, moved_file) = manifest_of(&moved);
    let name = "blk.0.attn_q.weight";
    assert_ne!(
        base_file.tensor_start(name),
        moved_file.tensor_start(name),
        "the copy lays the tensors out elsewhere"
    );
    assert_eq!(same.id(), base.id());

    let entry = base.tensor("token_embd.weight").unwrap();
    assert!(entry.chunks.len() > 2, "the embedding spans several chunks");
    let at = allmende_protocol::manifest::CHUNK_BYTES + 7;
    let flipped = dir.path().join("flipped.gguf");
    rewrite(&original, &flipped, 32, Some(("token_embd.weight", at)));
    let (changed, _) = manifest_of(&flipped);
    assert_ne!(changed.id(), base.id());
    let differing: Vec<(String, usize)> = base
        .tensors()
        .iter()
        .zip(changed.tensors())
        .flat_map(|(a, b)| {
            assert_eq!(a.name, b.name);
            let name = a.name.clone();
            let chunks = a.chunks.iter().zip(&b.chunks).enumerate();
            chunks
                .filter(|(_, (x, y))| x != y)
                .map(move |(i, _)| (name.clone(), i))
        })
        .collect();
    assert_eq!(differing, vec![("token_embd.weight".to_string(), 1)]);
}
