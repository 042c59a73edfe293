//! Whole GGUF files, as a model hub could serve them: the header, metadata and
//! tensor table, the hyper-parameters read from them and the tokenizer built from
//! them must give a model or an error, within the memory limit the fuzzer sets.
#![no_main]

use std::io::Write;

use allmende_node::client::ModelTokenizer;
use allmende_node::model::{GgufFile, ModelConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // GgufFile reads from a path, as the node does; a per-process file in /dev/shm
    // (or the temp dir) keeps this fast.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("allmende-fuzz-{}.gguf", std::process::id()));
    let Ok(mut file) = std::fs::File::create(&path) else { return };
    if file.write_all(data).is_err() {
        return;
    }
    drop(file);
    let Ok(mut gguf) = GgufFile::open(&path) else { return };
    let _ = ModelConfig::from_gguf(&gguf);
    let _ = ModelTokenizer::from_gguf(&gguf);
    // The tensor data the header points at (each inside the file, as the open
    // checked), read as the loader reads it.
    let names: Vec<String> = gguf.tensor_names().map(str::to_string).collect();
    for name in names {
        let _ = gguf.tensor(&name);
    }
});
