"""Writes a synthetic model of Llama 3.2 1B's shape for speed benchmarks: 2048 wide,
16 layers, 32 heads / 8 KV heads, 8192 FFN, and Llama 3's real 128256-token
vocabulary (from llama.cpp's vocabulary-only GGUF), in F16. Random weights scaled by
1/sqrt(fan-in), so activations stay finite through every layer; the outputs mean
nothing, and only the time to compute them is measured.

    python synthetic.py --vocab ggml-vocab-llama-bpe.gguf --out FILE
"""

import argparse
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

WIDTH, LAYERS, HEADS, KV_HEADS, FFN = 2048, 16, 32, 8, 8192


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    vocab = GGUFReader(args.vocab)
    writer = GGUFWriter(args.out + ".partial", "llama")
    for name, field in vocab.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    tokens = len(vocab.fields["tokenizer.ggml.tokens"].contents())
    head_dim = WIDTH // HEADS
    writer.add_block_count(LAYERS)
    writer.add_context_length(8192)
    writer.add_embedding_length(WIDTH)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    rng = np.random.default_rng(1)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    print(f"writing {args.out} ...", file=sys.stderr, flush=True)
    writer.add_tensor("token_embd.weight", matrix(tokens, WIDTH))
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    kv = KV_HEADS * head_dim
    for i in range(LAYERS):
        print(f"  layer {i + 1}/{LAYERS}", file=sys.stderr, flush=True)
        for name, shape in [("attn_q", (WIDTH, WIDTH)), ("attn_k", (kv, WIDTH)),
                            ("attn_v", (kv, WIDTH)), ("attn_output", (WIDTH, WIDTH)),
                            ("ffn_gate", (FFN, WIDTH)), ("ffn_up", (FFN, WIDTH)),
                            ("ffn_down", (WIDTH, FFN))]:
            writer.add_tensor(f"blk.{i}.{name}.weight", matrix(*shape))
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(WIDTH, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    import os
    os.rename(args.out + ".partial", args.out)


if __name__ == "__main__":
    main()
