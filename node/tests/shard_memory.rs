//! A shard holds only its own layers in memory. Alone in its own test binary (its own
//! process), so the resident set measured is this test's alone.

mod support;

use allmende_node::model::shard::layer_bytes;
use allmende_node::model::{GgufFile, Shard};
use allmende_protocol::LayerRange;
use indicatif::ProgressBar;

#[test]
fn ten_of_thirty_layers_cost_a_third_of_the_memory() {
    let path = support::model_path();
    let gguf = GgufFile::open(&path).unwrap();
    let ten: u64 = (10..20).map(|i| layer_bytes(&gguf, i)).sum();
    let thirty: u64 = (0..30).map(|i| layer_bytes(&gguf, i)).sum();
    drop(gguf);

    let before = support::rss_bytes(std::process::id());
    let shard = Shard::load(&path, LayerRange::new(10, 20), &ProgressBar::hidden()).unwrap();
    let held = support::rss_bytes(std::process::id()).saturating_sub(before);
    eprintln!(
        "10 of 30 layers: RSS grew by {:.1} MB; their weights are {:.1} MB of {:.1} MB",
        held as f64 / 1e6,
        ten as f64 / 1e6,
        thirty as f64 / 1e6
    );
    // The layer weights, plus the RoPE tables (2 MB) and the GGUF metadata held while
    // loading (about 4 MB of vocabulary strings): far below the other 20 layers.
    assert!(
        held <= ten + 12_000_000,
        "RSS grew by {held} bytes for {ten} bytes of weights"
    );
    assert!(held < thirty / 2);
    drop(shard);
}
