//! Splitting the model into shards is exact: the same hidden states and logits,
//! bit for bit, whether the layers run as one shard or as several in sequence.

mod support;

use std::sync::Arc;

use allmende_node::client::sampling::argmax;
use allmende_node::client::{ClientModel, LocalPipeline, Pipeline};
use allmende_node::model::{GgufFile, Shard};
use allmende_protocol::LayerRange;
use indicatif::ProgressBar;

fn shards(ranges: &[(u32, u32)]) -> Vec<Arc<Shard>> {
    ranges
        .iter()
        .map(|&(a, b)| {
            let shard = Shard::load(
                &support::model_path(),
                LayerRange::new(a, b),
                &ProgressBar::hidden(),
            )
            .unwrap();
            Arc::new(shard)
        })
        .collect()
}

/// Prefill then `steps` greedy decode steps; the logits of every step.
fn run(
    model: &ClientModel,
    shards: Vec<Arc<Shard>>,
    prompt: &[u32],
    steps: usize,
) -> Vec<Vec<f32>> {
    let mut pipeline = LocalPipeline::new(shards, prompt.len() + steps);
    let hidden = pipeline
        .forward(&model.head.embed(prompt).unwrap())
        .unwrap();
    let mut all = vec![model.head.last_logits(&hidden).unwrap()];
    for _ in 0..steps {
        let next = argmax(all.last().unwrap());
        let hidden = pipeline
            .forward(&model.head.embed(&[next]).unwrap())
            .unwrap();
        all.push(model.head.last_logits(&hidden).unwrap());
    }
    all
}

#[test]
fn three_shards_equal_one_bit_for_bit() {
    let model = ClientModel::load(&support::model_path()).unwrap();
    let prompt = model
        .tokenizer
        .encode("Once upon a time, in a small village,")
        .unwrap();
    let whole = run(&model, shards(&[(0, 30)]), &prompt, 32);
    let split = run(&model, shards(&[(0, 10), (10, 20), (20, 30)]), &prompt, 32);
    assert_eq!(whole.len(), 33);
    for (step, (a, b)) in whole.iter().zip(&split).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "logits differ at step {step} (0 is the prefill)");
    }
}

#[test]
fn uneven_splits_are_exact_too() {
    let model = ClientModel::load(&support::model_path()).unwrap();
    let prompt = model.tokenizer.encode("def fibonacci(n):").unwrap();
    let whole = run(&model, shards(&[(0, 30)]), &prompt, 8);
    let split = run(
        &model,
        shards(&[(0, 1), (1, 17), (17, 29), (29, 30)]),
        &prompt,
        8,
    );
    assert_eq!(whole, split);
}

#[test]
fn a_shard_reads_only_its_own_layers() {
    let path = support::model_path();
    let mut gguf = GgufFile::open(&path).unwrap();
    let config = allmende_node::model::ModelConfig::from_gguf(&gguf).unwrap();
    let shard = Shard::from_gguf(
        &mut gguf,
        config,
        LayerRange::new(10, 20),
        &ProgressBar::hidden(),
    )
    .unwrap();
    let expected: u64 = (10..20)
        .map(|i| allmende_node::model::shard::layer_bytes(&gguf, i))
        .sum();
    assert_eq!(gguf.tensor_bytes_read(), expected);
    let all: u64 = (0..30)
        .map(|i| allmende_node::model::shard::layer_bytes(&gguf, i))
        .sum();
    assert!(
        expected * 3 <= all + all / 10,
        "10 of 30 layers read {expected} of {all} bytes"
    );
    assert_eq!(shard.range(), LayerRange::new(10, 20));
}
