"""Dresses a Gemma 3 GGUF file as Gemma 2, for testing the gemma2 architecture against
llama.cpp on real weights (no Gemma 2 file is small enough to fetch for tests): the
architecture and its keys renamed; the per-head Q and K norms (which Gemma 2 lacks)
dropped, and Q and K weights scaled to make up for them on average (without, scores
grow so large that rounding alone moves the model's choices); Gemma 2's attention and
final logit soft-caps set; a short sliding window, so that test prompts cross it; and
local layers given their own RoPE base (Gemma 3's local one), so that local and global
layers turn differently. The result is no trained model, but llama.cpp and Allmende
must compute it alike.

    python dress-gemma2.py SOURCE.gguf TARGET.gguf
"""

import os
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

SOURCE_ARCH = "gemma3"
ARCH = "gemma2"
SET = {
    "attn_logit_softcapping": (50.0, GGUFValueType.FLOAT32),
    "final_logit_softcapping": (30.0, GGUFValueType.FLOAT32),
    "attention.sliding_window": (64, GGUFValueType.UINT32),
    "rope.freq_base_swa": (10000.0, GGUFValueType.FLOAT32),
}
# Gemma 3's pattern of local layers, if the file has one: Gemma 2's default applies.
DROP = {"attention.sliding_window_pattern"}
DROP_TENSORS = ("attn_q_norm.weight", "attn_k_norm.weight")


def norm_scales(reader):
    """Per layer and projection (attn_q, attn_k), the factor that brings the RMS of its
    outputs, for inputs of RMS 1 scaled by the layer's attn_norm, to the RMS of the
    weights of the norm Gemma 3 applies after it."""
    tensors = {t.name: t for t in reader.tensors}

    def values(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).astype(np.float64)

    scales = {}
    for name in tensors:
        if not name.endswith((".attn_q.weight", ".attn_k.weight")):
            continue
        layer = name.rsplit(".", 2)[0]
        weights = values(name)
        inputs = values(f"{layer}.attn_norm.weight") ** 2
        rms = np.sqrt(np.mean(weights ** 2 @ inputs))
        norm = values(name.replace(".weight", "_norm.weight"))
        scales[name] = np.sqrt(np.mean(norm ** 2)) / rms
    return scales


def main(source, target):
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    if arch != SOURCE_ARCH:
        sys.exit(f"{source} is a {arch} file, not {SOURCE_ARCH}")
    partial = target + ".partial"
    writer = GGUFWriter(partial, ARCH)
    prefix = SOURCE_ARCH + "."
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if name.startswith(prefix):
            key = name[len(prefix):]
            if key in DROP or key in SET:
                continue
            name = f"{ARCH}.{key}"
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for key, (value, kind) in SET.items():
        writer.add_key_value(f"{ARCH}.{key}", value, kind)
    scales = norm_scales(reader)
    for t in reader.tensors:
        if t.name.endswith(DROP_TENSORS):
            continue
        if t.name in scales:
            scaled = dequantize(t.data, t.tensor_type) * scales[t.name]
            writer.add_tensor(t.name, scaled.astype(np.float32))
            continue
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
