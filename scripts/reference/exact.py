"""The exact reference: a model's forward pass in float64 from its weights as the file
holds them (dequantized by the gguf package), written from the architectures'
definitions, independent of llama.cpp and of Allmende. Where a greedy token of
Allmende's differs from llama.cpp's, this decides which side is closer to the model.

For every position of a token sequence (llama.cpp's prompt and continuation) it gives
the exact log-probabilities of the next token's top candidates, and for the prompt the
hidden state of its last position after every layer.
"""

import math

import numpy as np

TOP = 20


class Model:
    def __init__(self, path):
        from gguf import GGUFReader
        from gguf.quants import dequantize
        reader = GGUFReader(str(path))
        fields = reader.fields
        self.arch = fields["general.architecture"].contents()
        get = lambda key, default=None: (fields[f"{self.arch}.{key}"].contents()
                                         if f"{self.arch}.{key}" in fields else default)
        self.layers = int(get("block_count"))
        self.heads = int(get("attention.head_count"))
        self.kv_heads = int(get("attention.head_count_kv", self.heads))
        width = int(get("embedding_length"))
        self.head_dim = int(get("attention.key_length", width // self.heads))
        self.eps = float(get("attention.layer_norm_rms_epsilon"))
        self.base = float(get("rope.freq_base", 10000.0))
        factor = float(get("rope.scaling.factor", 0.0) or 0.0)
        self.scale = 1.0 / factor if factor not in (0.0, 1.0) else 1.0
        # YaRN as transformers computes it (_compute_yarn_parameters, beta_fast 32,
        # beta_slow 1): per pair, a blend of scaled and unscaled frequencies, and the
        # attention factor 0.1 ln(factor) + 1 on cos and sin.
        self.yarn = None
        if get("rope.scaling.type") == "yarn" and self.scale != 1.0:
            original = int(get("rope.scaling.original_context_length",
                               get("context_length")))
            corr = lambda rotations: (self.head_dim * math.log(
                original / (rotations * 2 * math.pi)) / (2 * math.log(self.base)))
            low = max(math.floor(corr(32.0)), 0)
            high = min(math.ceil(corr(1.0)), self.head_dim - 1)
            self.yarn = (low, high, 0.1 * math.log(factor) + 1.0)
        self.halves = self.arch in ("qwen2", "qwen3", "phi3", "gemma2", "gemma3")
        self.gemma(get, width)
        self.t = {}
        for t in reader.tensors:
            values = dequantize(t.data, t.tensor_type).astype(np.float64)
            self.t[t.name] = values.reshape([int(n) for n in reversed(t.shape)])
        self.freqs = self.t.get("rope_freqs.weight")

    def gemma(self, get, width):
        """Gemma's differences, as its reference code defines them and llama.cpp reads
        them from a file: embeddings scaled by sqrt(width), soft-caps, and
        sliding-window (local) layers with their own RoPE."""
        self.embedding_scale, self.attn_cap, self.final_cap = 1.0, None, None
        self.attention_scale = 1.0 / math.sqrt(self.head_dim)
        self.window, self.local = 0, [False] * self.layers
        self.local_rope = (self.base, self.scale)
        if self.arch not in ("gemma2", "gemma3"):
            return
        gemma2 = self.arch == "gemma2"
        self.embedding_scale = math.sqrt(width)
        if self.layers == (46 if gemma2 else 62):
            self.attention_scale = 1.0 / math.sqrt(width // self.heads)
        if gemma2:
            self.attn_cap = float(get("attn_logit_softcapping", 50.0)) or None
        self.final_cap = float(get("final_logit_softcapping", 30.0 if gemma2 else 0.0)) or None
        self.window = int(get("attention.sliding_window", 4096 if gemma2 else 0))
        if self.window == 0:
            return
        pattern = get("attention.sliding_window_pattern", 2 if gemma2 else 6)
        if isinstance(pattern, list):
            self.local = [bool(flag) for flag in pattern]
        else:
            n = int(pattern)
            self.local = [n == 0 or i % n < n - 1 for i in range(self.layers)]
        base = float(get("rope.freq_base_swa", self.base if gemma2 else 10000.0))
        self.local_rope = (base, self.scale if gemma2 else 1.0)

    def norm(self, x, weight):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions, local=False):
        """x: [tokens, heads, head_dim]."""
        half = self.head_dim // 2
        base, scale = self.local_rope if local else (self.base, self.scale)
        inv = base ** (-np.arange(half) * 2.0 / self.head_dim)
        if self.freqs is not None:
            inv = inv / self.freqs
        mscale = 1.0
        if self.yarn is None:
            inv = scale * inv
        else:
            low, high, mscale = self.yarn
            ramp = np.clip((np.arange(half) - low) / max(high - low, 0.001), 0.0, 1.0)
            inv = self.scale * inv * ramp + inv * (1.0 - ramp)
        angles = positions[:, None] * inv[None, :]
        cos = mscale * np.cos(angles)[:, None, :]
        sin = mscale * np.sin(angles)[:, None, :]
        if self.halves:
            x0, x1 = x[..., :half], x[..., half:]
            return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    def layer(self, i, x):
        w = lambda name: self.t.get(f"blk.{i}.{name}")
        tokens = x.shape[0]
        h = self.norm(x, w("attn_norm.weight"))
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if w("attn_qkv.weight") is not None:
            qkv = h @ w("attn_qkv.weight").T
            q, k, v = np.split(qkv, [q_size, q_size + kv_size], axis=-1)
        else:
            q, k, v = h @ w("attn_q.weight").T, h @ w("attn_k.weight").T, h @ w("attn_v.weight").T
        for name, part in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")):
            if w(f"{name}.bias") is not None:
                q, k, v = [a + w(f"{name}.bias") if p == part else a
                           for a, p in ((q, "q"), (k, "k"), (v, "v"))]
        q = q.reshape(tokens, self.heads, self.head_dim)
        k = k.reshape(tokens, self.kv_heads, self.head_dim)
        v = v.reshape(tokens, self.kv_heads, self.head_dim)
        if w("attn_q_norm.weight") is not None:
            q, k = self.norm(q, w("attn_q_norm.weight")), self.norm(k, w("attn_k_norm.weight"))
        positions = np.arange(tokens, dtype=np.float64)
        local = self.local[i]
        q, k = self.rope(q, positions, local), self.rope(k, positions, local)
        group = self.heads // self.kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) * self.attention_scale
        if self.attn_cap is not None:
            scores = self.attn_cap * np.tanh(scores / self.attn_cap)
        distance = positions[:, None] - positions[None, :]
        hidden = (distance < 0) | (local & (distance >= self.window))
        scores += np.where(hidden, -np.inf, 0.0)[None]
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        attended = np.einsum("hts,shd->thd", scores, v).reshape(tokens, q_size)
        x = x + self.post_norm(attended @ w("attn_output.weight").T, w("post_attention_norm.weight"))
        h = self.norm(x, w("ffn_norm.weight"))
        if w("ffn_gate.weight") is not None:
            gate, up = h @ w("ffn_gate.weight").T, h @ w("ffn_up.weight").T
        else:
            gate, up = np.split(h @ w("ffn_up.weight").T, 2, axis=-1)
        if self.arch in ("gemma2", "gemma3"):
            # GELU in its tanh form, as Gemma is defined.
            inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate ** 3)
            gated = 0.5 * gate * (1.0 + np.tanh(inner)) * up
        else:
            gated = gate / (1.0 + np.exp(-gate)) * up
        fed = gated @ w("ffn_down.weight").T
        return x + self.post_norm(fed, w("post_ffw_norm.weight"))

    def post_norm(self, x, weight):
        """Gemma's norms after attention and after the feed-forward, where present."""
        return x if weight is None else self.norm(x, weight)

    def forward(self, ids, prompt_len):
        """Top log-probabilities after each position from prompt_len - 1 on, and the
        prompt's last hidden state after each layer."""
        x = self.t["token_embd.weight"][ids] * self.embedding_scale
        hidden = []
        for i in range(self.layers):
            x = self.layer(i, x)
            hidden.append(x[prompt_len - 1])
        head = self.t.get("output.weight", self.t["token_embd.weight"])
        logits = self.norm(x[prompt_len - 1:], self.t["output_norm.weight"]) @ head.T
        if self.final_cap is not None:
            logits = self.final_cap * np.tanh(logits / self.final_cap)
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        top = []
        for row in logprobs:
            best = np.argsort(-row)[:TOP]
            top.append([{"token_id": int(t), "logprob": float(row[t])} for t in best])
        return top, hidden


def reference(path, continuations, with_hidden=2):
    """The exact reference for each of llama.cpp's continuations on one file, with
    per-layer hidden states for the first `with_hidden` prompts."""
    model = Model(path)
    out = []
    for i, c in enumerate(continuations):
        ids = np.array(c["prompt_token_ids"] + c["token_ids"][:-1])
        top, hidden = model.forward(ids, len(c["prompt_token_ids"]))
        hidden = [[float(v) for v in h] for h in hidden] if i < with_hidden else []
        out.append({"top_logprobs": top, "prompt_hidden": hidden})
    return out


if __name__ == "__main__":
    # python exact.py MODEL.gguf < continuations.json > reference.json: the exact
    # reference for llama.cpp's continuations ([{prompt_token_ids, token_ids}, ...]).
    import json
    import sys
    continuations = json.load(sys.stdin)
    json.dump({"outputs": reference(sys.argv[1], continuations, with_hidden=0)}, sys.stdout)
