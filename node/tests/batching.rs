//! Continuous batching is exact: steps of several sessions computed as one forward
//! give each session the same hidden states, bit for bit, as computing it alone; and a
//! prompt computed at once gives, position by position, what its tokens give one step
//! at a time.

mod support;

use allmende_node::client::ClientModel;
use allmende_node::model::{GgufFile, Shard, ShardCache};
use allmende_protocol::LayerRange;
use candle_core::Tensor;
use indicatif::ProgressBar;

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn batched_steps_equal_steps_alone() {
    let mut gguf = GgufFile::open(&support::model_path()).unwrap();
    let model = ClientModel::from_gguf(&mut gguf).unwrap();
    let range = LayerRange::new(4, 12);
    let shard = Shard::from_gguf(
        &mut gguf,
        model.config.clone(),
        range,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let prompts: [&[u32]; 4] = [&[1, 2, 3], &[400, 5000, 60, 7, 8], &[9000], &[42; 12]];
    let embed = |ids: &[u32]| model.head.embed(ids).unwrap();

    // Two copies of every session's cache: one for batched steps, one for steps alone.
    let mut batched: Vec<ShardCache> = prompts.iter().map(|_| shard.new_cache(64)).collect();
    let mut alone: Vec<ShardCache> = prompts.iter().map(|_| shard.new_cache(64)).collect();

    // Round 0 batches the prompts (prefills of different lengths); rounds 1.. batch one
    // token per session, except that session 3 sends two tokens in round 2.
    for round in 0..4u32 {
        let inputs: Vec<Tensor> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| match (round, i) {
                (0, _) => embed(p),
                (2, 3) => embed(&[round * 7 + i as u32, 11]),
                _ => embed(&[round * 7 + i as u32]),
            })
            .collect();
        let mut jobs: Vec<(&Tensor, &mut ShardCache)> = inputs.iter().zip(&mut batched).collect();
        let together = shard.forward_batch(&mut jobs).unwrap();
        for (i, input) in inputs.iter().enumerate() {
            let single = shard.forward(input, &mut alone[i]).unwrap();
            assert_eq!(
                bits(&together[i]),
                bits(&single),
                "session {i}, round {round}"
            );
        }
    }
    for (b, a) in batched.iter().zip(&alone) {
        assert_eq!(b.len(), a.len());
    }
}

#[test]
fn a_prompt_at_once_equals_its_tokens_one_at_a_time() {
    let mut gguf = GgufFile::open(&support::model_path()).unwrap();
    let model = ClientModel::from_gguf(&mut gguf).unwrap();
    let shard = Shard::from_gguf(
        &mut gguf,
        model.config.clone(),
        LayerRange::new(0, 8),
        &ProgressBar::hidden(),
    )
    .unwrap();
    // Longer than one attention chunk (128 positions), so prefixes span chunks.
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 7919) % 40_000 + 10).collect();
    let hidden = model.head.embed(&ids).unwrap();
    let at_once = shard.forward(&hidden, &mut shard.new_cache(256)).unwrap();
    let mut cache = shard.new_cache(256);
    for t in 0..ids.len() {
        let step = shard
            .forward(&hidden.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap();
        assert_eq!(
            bits(&at_once.narrow(1, t, 1).unwrap()),
            bits(&step),
            "position {t}"
        );
    }
}

#[test]
fn a_batch_refuses_mixed_ranges_and_bad_steps() {
    let path = support::model_path();
    let shard = Shard::load(&path, LayerRange::new(0, 6), &ProgressBar::hidden()).unwrap();
    let hidden = Tensor::zeros(
        (1, 1, shard.config().hidden_size),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut whole = shard.new_cache(8);
    let mut part = shard.new_cache_for(LayerRange::new(2, 6), 8).unwrap();
    let mut jobs = vec![(&hidden, &mut whole), (&hidden, &mut part)];
    assert!(shard.forward_batch(&mut jobs).is_err());
    drop(jobs);
    assert_eq!(whole.len(), 0, "a refused batch advances no cache");

    let wrong = Tensor::zeros(
        (1, 1, 7),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut other = shard.new_cache(8);
    let mut jobs = vec![(&hidden, &mut whole), (&wrong, &mut other)];
    assert!(shard.forward_batch(&mut jobs).is_err());
}
