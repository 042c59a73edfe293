"""Builds the reference test models and llama.cpp's outputs on them.

From the test model (SmolLM2-135M-Instruct, Q4_1), llama.cpp's llama-quantize makes an
F16 copy and, from it, one file per tensor type; the same weights are also dressed as
each supported architecture (a Llama 3.1-style file, ones with linear and with YaRN
RoPE scaling, Qwen 2-, Qwen 3- and Phi-3-style files; F16 and a quantized type each);
llama-server (on 127.0.0.1) then generates greedy continuations of the golden prompts
on each, with the top log-probabilities at every position. Writes references.json
beside the files.

    python make_references.py --llama-bin DIR --model GGUF --prompts JSON --out DIR
"""

import argparse
import collections
import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

from exact import reference

# Every type llama-quantize makes that the issue lists, as llama-quantize names them.
TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
         "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL"]
# Each architecture's dressed file, and the quantized type it is also checked in.
STYLES = [("llama3-style", lambda b, t: llama3_style(b, t), "Q4_K_M"),
          ("linear-rope", lambda b, t: linear_rope_style(b, t), "Q8_0"),
          ("yarn-rope", lambda b, t: yarn_rope_style(b, t), "Q6_K"),
          ("qwen2-style", lambda b, t: qwen2_style(b, t), "Q8_0"),
          ("qwen3-style", lambda b, t: qwen3_style(b, t), "Q4_K_M"),
          ("phi3-style", lambda b, t: phi3_style(b, t), "Q5_K_M")]
TOKENS = 32
TOP = 5


def log(message):
    print(message, file=sys.stderr, flush=True)


def quantize(bin_dir, source, target, kind):
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    log(f"making {target.name} ...")
    partial = target.with_suffix(".partial")
    out = subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source),
                          str(partial), kind], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"llama-quantize {kind} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    partial.rename(target)


def rewrite(source, target, metadata, tensors=None, arch=None):
    """Copies a GGUF file as architecture `arch` (its own by default), with metadata
    values replaced or added (`None` drops a key) and its tensors passed through
    `tensors(name, array, type)`, which returns the (name, array, type or None)
    triples to write in their place."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    reader = GGUFReader(str(source))
    old_arch = reader.fields["general.architecture"].contents()
    arch = arch or old_arch
    partial = target.with_suffix(".partial")
    writer = GGUFWriter(str(partial), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if name.startswith(old_arch + "."):
            name = arch + name[len(old_arch):]
        if name in metadata:
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for name, entry in metadata.items():
        if entry is not None:
            writer.add_key_value(name, entry[0], entry[1])
    passthrough = lambda name, array, kind: [(name, array, kind)]
    for t in reader.tensors:
        for name, array, kind in (tensors or passthrough)(t.name, np.asarray(t.data), t.tensor_type):
            if kind is None:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)


def fresh(target, source):
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return False
    log(f"making {target.name} ...")
    return True


def llama3_style(base, target):
    """The test model's weights dressed as a Llama 3.1-style file: RoPE frequency
    factors (on every pair, so that short prompts show them), an untied LM head,
    Llama 3's pre-tokenizer and the key/value length keys its converter writes."""
    if not fresh(target, base):
        return
    import numpy as np
    from gguf import GGUFReader, GGUFValueType
    reader = GGUFReader(str(base))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head = (np.asarray(embedding.data).astype(np.float32) * 1.05).astype(np.float16)
    factors = np.geomspace(1.0, 2.0, 32).astype(np.float32)

    def tensors(name, array, kind):
        extra = []
        if name == "token_embd.weight":
            extra = [("rope_freqs.weight", factors, None), ("output.weight", head, None)]
        return [(name, array, kind)] + extra

    rewrite(base, target, {
        "tokenizer.ggml.pre": ("llama-bpe", GGUFValueType.STRING),
        "llama.attention.key_length": (64, GGUFValueType.UINT32),
        "llama.attention.value_length": (64, GGUFValueType.UINT32),
    }, tensors)


def linear_rope_style(base, target):
    """The test model with linear RoPE scaling by 2 (positions halved), as Llama 2
    long-context fine-tunes and some Mistral derivatives write it."""
    if not fresh(target, base):
        return
    from gguf import GGUFValueType
    rewrite(base, target, {
        "llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
        "llama.rope.scaling.factor": (2.0, GGUFValueType.FLOAT32),
    })


def yarn_rope_style(base, target):
    """The test model with YaRN scaling by 4 over an original context of 2048, as
    Qwen 2.5's long-context configurations and many fine-tunes write it."""
    if not fresh(target, base):
        return
    from gguf import GGUFValueType
    rewrite(base, target, {
        "llama.rope.scaling.type": ("yarn", GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32),
        "llama.rope.scaling.original_context_length": (2048, GGUFValueType.UINT32),
    })


def model_shape(base):
    from gguf import GGUFReader
    fields = GGUFReader(str(base)).fields
    heads = int(fields["llama.attention.head_count"].contents())
    kv_heads = int(fields["llama.attention.head_count_kv"].contents())
    return heads, kv_heads


def unpermute(w, heads):
    """Undoes llama's converter permutation of Q or K rows (adjacent RoPE pairs back
    to halves), so that the weights compute the same model under "neox" RoPE."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def neox_layout(heads, kv_heads):
    def layer_tensor(name, array):
        if name.endswith("attn_q.weight"):
            return unpermute(array, heads)
        if name.endswith("attn_k.weight"):
            return unpermute(array, kv_heads)
        return array
    return layer_tensor


def qwen2_style(base, target):
    """The weights as a Qwen 2-style file: halves-RoPE layout and non-zero Q, K and V
    biases (small enough that the model stays itself)."""
    if not fresh(target, base):
        return
    import numpy as np
    heads, kv_heads = model_shape(base)
    layout = neox_layout(heads, kv_heads)
    rng = np.random.default_rng(2)

    def tensors(name, array, kind):
        out = [(name, layout(name, array), kind)]
        for part in ("attn_q", "attn_k", "attn_v"):
            if name.endswith(part + ".weight"):
                bias = (rng.standard_normal(array.shape[0]) * 0.1).astype(np.float32)
                out.append((name.replace(".weight", ".bias"), bias, None))
        return out

    rewrite(base, target, {}, tensors, arch="qwen2")


def qwen3_style(base, target):
    """The weights as a Qwen 3-style file: halves-RoPE layout and per-head Q and K
    RMS norms (weights from 1 to 1.5: attention as sharp as the model's own, not sharper)."""
    if not fresh(target, base):
        return
    import numpy as np
    from gguf import GGUFValueType
    heads, kv_heads = model_shape(base)
    layout = neox_layout(heads, kv_heads)
    rng = np.random.default_rng(3)

    def tensors(name, array, kind):
        out = [(name, layout(name, array), kind)]
        for part, norm in (("attn_q", "attn_q_norm"), ("attn_k", "attn_k_norm")):
            if name.endswith(part + ".weight"):
                size = array.shape[0] // (heads if part == "attn_q" else kv_heads)
                weight = (1.0 + 0.5 * rng.random(size)).astype(np.float32)
                out.append((name.replace(part, norm), weight, None))
        return out

    rewrite(base, target, {
        "qwen3.attention.key_length": (64, GGUFValueType.UINT32),
        "qwen3.attention.value_length": (64, GGUFValueType.UINT32),
    }, tensors, arch="qwen3")


def phi3_style(base, target):
    """The weights as a Phi-3-style file: halves-RoPE layout, Q, K and V fused into
    attn_qkv, gate and up fused into ffn_up, and a sliding window."""
    if not fresh(target, base):
        return
    import numpy as np
    from gguf import GGUFValueType
    heads, kv_heads = model_shape(base)
    layout = neox_layout(heads, kv_heads)
    held = {}

    def tensors(name, array, kind):
        array = layout(name, array)
        prefix, _, part = name.rpartition(".")[0].rpartition(".")
        if part in ("attn_q", "attn_k", "ffn_gate"):
            held[name] = (array, kind)
            return []
        if part == "attn_v":
            q, kind_q = held.pop(f"{prefix}.attn_q.weight")
            k, _ = held.pop(f"{prefix}.attn_k.weight")
            return [(f"{prefix}.attn_qkv.weight", np.concatenate([q, k, array]), kind_q)]
        if part == "ffn_up":
            gate, _ = held.pop(f"{prefix}.ffn_gate.weight")
            return [(name, np.concatenate([gate, array]), kind)]
        return [(name, array, kind)]

    rewrite(base, target, {
        "phi3.attention.sliding_window": (2048, GGUFValueType.UINT32),
    }, tensors, arch="phi3")


def tensor_types(path):
    from gguf import GGUFReader
    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors)
    return dict(sorted(counts.items()))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


class Server:
    """llama-server on one model file, on loopback."""

    def __init__(self, bin_dir, model, workdir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"{model.stem}.server.log", "w")
        self.process = subprocess.Popen(
            [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "-t", "2", "-c", "1024", "-np", "1", "--no-webui"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"llama-server exited on {model}: see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        sys.exit(f"llama-server did not start on {model}")

    def continuation(self, prompt):
        ids = post(self.url + "/tokenize", {"content": prompt, "add_special": True,
                                            "parse_special": True})["tokens"]
        out = post(self.url + "/completion", {
            "prompt": ids, "n_predict": TOKENS, "temperature": 0, "n_probs": TOP,
            "ignore_eos": True, "cache_prompt": False, "return_tokens": True,
            "post_sampling_probs": False, "samplers": ["top_k"], "top_k": 1})
        probs = out["completion_probabilities"]
        return {
            "prompt": prompt,
            "prompt_token_ids": ids,
            "token_ids": [p["id"] for p in probs],
            "logprobs": [p["logprob"] for p in probs],
            "top_logprobs": [[{"token_id": t["id"], "logprob": t["logprob"]}
                              for t in p["top_logprobs"]] for p in probs],
        }

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-bin", type=pathlib.Path, required=True)
    parser.add_argument("--model", type=pathlib.Path, required=True)
    parser.add_argument("--prompts", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = [o["prompt"] for o in json.loads(args.prompts.read_text())["outputs"]]

    base = args.out / "smollm2-base-F16.gguf"
    quantize(args.llama_bin, args.model, base, "F16")
    files = [(kind, base, args.out / f"smollm2-{kind}.gguf") for kind in TYPES]
    for style, make, quantized in STYLES:
        dressed = args.out / f"{style}-F16.gguf"
        make(base, dressed)
        files += [("F16", dressed, dressed),
                  (quantized, dressed, args.out / f"{style}-{quantized}.gguf")]
    models = []
    for kind, source, path in files:
        if path != source:
            quantize(args.llama_bin, source, path, kind)
        log(f"llama.cpp on {path.name} ...")
        server = Server(args.llama_bin, path, args.out)
        try:
            outputs = [server.continuation(p) for p in prompts]
        finally:
            server.stop()
        log(f"exact reference (float64) on {path.name} ...")
        exact = path.with_name(path.stem + ".exact.json")
        exact.write_text(json.dumps({"outputs": reference(path, outputs)}))
        models.append({"type": kind, "file": path.name, "exact": exact.name,
                       "tensor_types": tensor_types(path), "outputs": outputs})
    (args.out / "references.json").write_text(json.dumps(
        {"tokens": TOKENS, "top": TOP, "models": models}, indent=1))
    log(f"wrote {args.out / 'references.json'}")


if __name__ == "__main__":
    main()
