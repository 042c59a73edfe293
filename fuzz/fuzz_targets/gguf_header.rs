//! The GGUF header reader: a model file from anywhere must give a model or an error.
#![no_main]

use std::io::Write;

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
    if let Ok(gguf) = GgufFile::open(&path) {
        let _ = ModelConfig::from_gguf(&gguf);
    }
});
