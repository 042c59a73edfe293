//! Tokenization against llama.cpp's own test vectors: the vocabulary-only GGUFs in
//! llama.cpp's `models/` (real vocabularies of real model families) with their
//! `.gguf.inp` texts and `.gguf.out` token ids. The llama.cpp tree is the one
//! `scripts/llama-cpp.sh` unpacks; `scripts/test.sh` passes it as
//! `ALLMENDE_LLAMA_CPP_DIR`.

use std::path::PathBuf;

use allmende_node::client::ModelTokenizer;
use allmende_node::model::GgufFile;

/// The vocabularies of the families this tokenizer supports.
const VOCABULARIES: &[&str] = &["gpt-2", "llama-bpe", "qwen2", "llama-spm", "phi-3"];

const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn models_dir() -> PathBuf {
    let dir = std::env::var_os("ALLMENDE_LLAMA_CPP_DIR").expect(
        "ALLMENDE_LLAMA_CPP_DIR is not set: run scripts/llama-cpp.sh and point it at the directory above build/ (scripts/test.sh does)",
    );
    let models = PathBuf::from(dir).join("src/models");
    assert!(models.is_dir(), "{} is missing", models.display());
    models
}

#[test]
fn every_supported_vocabulary_tokenizes_as_llama_cpp() {
    let models = models_dir();
    for name in VOCABULARIES {
        let path = models.join(format!("ggml-vocab-{name}.gguf"));
        let gguf = GgufFile::open(&path).unwrap();
        let tokenizer = ModelTokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inputs = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
        let outputs = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
        let inputs: Vec<&str> = inputs.split(SEPARATOR).collect();
        let outputs: Vec<Vec<u32>> = outputs
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        // The file ends with one separator more than it has texts.
        let inputs = &inputs[..outputs.len()];
        let mut wrong = Vec::new();
        for (text, expected) in inputs.iter().zip(&outputs) {
            let ours = tokenizer.encode_without_bos(text).unwrap();
            if &ours != expected {
                wrong.push(format!("{text:?}: ours {ours:?}, llama.cpp {expected:?}"));
            }
        }
        eprintln!("{name}: {} texts, {} differ", outputs.len(), wrong.len());
        assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
    }
}

#[test]
fn bos_is_added_once_even_when_the_text_writes_it() {
    let models = models_dir();
    for (name, bos_text) in [("llama-bpe", "<|begin_of_text|>"), ("llama-spm", "<s>")] {
        let gguf = GgufFile::open(&models.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let tokenizer = ModelTokenizer::from_gguf(&gguf).unwrap();
        let bos = tokenizer.bos().unwrap();
        let plain = tokenizer.encode("Hello world").unwrap();
        assert_eq!(plain[0], bos, "{name}: BOS is added");
        assert_ne!(plain[1], bos, "{name}");
        let written = tokenizer.encode(&format!("{bos_text}Hello world")).unwrap();
        assert_eq!(written[0], bos, "{name}");
        assert_ne!(written[1], bos, "{name}: a second BOS");
    }
}
