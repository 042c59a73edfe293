//! Which tensors a node needs and which peers to ask for them: pure functions.

use allmende_protocol::manifest::TensorEntry;
use allmende_protocol::{LayerRange, Manifest};

/// The tensors that only a client holds: its embedding, final norm and LM head.
pub const CLIENT_TENSORS: [&str; 3] = ["token_embd.weight", "output_norm.weight", "output.weight"];

/// The layer a tensor belongs to (`blk.N.…`), if it belongs to one.
pub fn layer_of(name: &str) -> Option<u32> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The tensors a server of `range` loads: its layers' own, and those outside every
/// layer that the layers share (RoPE factors), not the client's.
pub fn shard_tensors(manifest: &Manifest, range: LayerRange) -> Vec<&TensorEntry> {
    manifest
        .tensors()
        .iter()
        .filter(|t| match layer_of(&t.name) {
            Some(layer) => range.contains(layer),
            None => !CLIENT_TENSORS.contains(&t.name.as_str()),
        })
        .collect()
}

/// Peers to ask for a chunk of a tensor of `layer`, in order: those hosting that layer
/// (starting at `spread` among them, so a tensor's chunks are fetched from all of
/// them), then the others, which may hold the whole file.
pub fn sources<P: Clone>(layer: Option<u32>, peers: &[(P, LayerRange)], spread: usize) -> Vec<P> {
    let hosts = |(_, range): &&(P, LayerRange)| layer.is_none_or(|l| range.contains(l));
    let mut first: Vec<P> = peers.iter().filter(hosts).map(|(p, _)| p.clone()).collect();
    if !first.is_empty() {
        let at = spread % first.len();
        first.rotate_left(at);
    }
    let rest = peers.iter().filter(|p| !hosts(p)).map(|(p, _)| p.clone());
    first.extend(rest);
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use allmende_protocol::manifest::MetaValue;

    fn entry(name: &str) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            ggml_type: 0,
            shape: vec![4],
            bytes: 16,
            chunks: vec![[0; 32]],
        }
    }

    #[test]
    fn a_shard_needs_its_layers_and_the_shared_tensors_only() {
        let names = [
            "token_embd.weight",
            "output_norm.weight",
            "output.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.weight",
            "blk.1.attn_q.weight",
            "blk.1.ffn_up.weight",
            "blk.10.attn_q.weight",
            "blk.2.attn_q.weight",
        ];
        let manifest = Manifest::new(
            [(
                "general.architecture".into(),
                MetaValue::String("llama".into()),
            )],
            names.iter().map(|n| entry(n)),
        );
        let needed: Vec<&str> = shard_tensors(&manifest, LayerRange::new(1, 3))
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(
            needed,
            [
                "blk.1.attn_q.weight",
                "blk.1.ffn_up.weight",
                "blk.2.attn_q.weight",
                "rope_freqs.weight"
            ]
        );
        assert_eq!(layer_of("blk.10.attn_q.weight"), Some(10));
        assert_eq!(layer_of("output.weight"), None);
        assert_eq!(layer_of("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn hosts_of_the_layer_come_first_and_share_the_chunks() {
        let r = LayerRange::new;
        let peers = [("a", r(0, 10)), ("b", r(10, 20)), ("c", r(5, 15))];
        assert_eq!(sources(Some(7), &peers, 0), ["a", "c", "b"]);
        assert_eq!(sources(Some(7), &peers, 1), ["c", "a", "b"]);
        assert_eq!(sources(Some(17), &peers, 5), ["b", "a", "c"]);
        // Nobody hosts it: every peer, in order.
        assert_eq!(sources(Some(25), &peers, 3), ["a", "b", "c"]);
        // Outside the layers: every peer, spread.
        assert_eq!(sources(None, &peers, 1), ["b", "c", "a"]);
    }
}
