"""Builds the reference test models and llama.cpp's outputs on them.

From the test model (SmolLM2-135M-Instruct, Q4_1), llama.cpp's llama-quantize makes an
F16 copy and, from it, one file per tensor type; the same weights are also dressed as
a Llama 3.1-style file (F16 and Q4_K_M); llama-server (on 127.0.0.1) then
generates greedy continuations of the golden prompts on each, with the top
log-probabilities at every position. Writes references.json beside the files.

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

# Every type llama-quantize makes that the issue lists, as llama-quantize names them.
TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
         "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
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


def rewrite(source, target, metadata, extra_tensors):
    """Copies a GGUF file with metadata values replaced or added and extra tensors."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    reader = GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    partial = target.with_suffix(".partial")
    writer = GGUFWriter(str(partial), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        if name in metadata:
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for name, (value, kind) in metadata.items():
        writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, array in extra_tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)


def llama3_style(base, target):
    """The test model's weights dressed as a Llama 3.1-style file: RoPE frequency
    factors (on every pair, so that short prompts show them), an untied LM head,
    Llama 3's pre-tokenizer and the key/value length keys its converter writes."""
    if target.exists() and target.stat().st_mtime >= base.stat().st_mtime:
        return
    import numpy as np
    from gguf import GGUFReader, GGUFValueType
    log(f"making {target.name} ...")
    reader = GGUFReader(str(base))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head = (np.asarray(embedding.data).astype(np.float32) * 1.05).astype(np.float16)
    factors = np.geomspace(1.0, 2.0, 32).astype(np.float32)
    rewrite(base, target, {
        "tokenizer.ggml.pre": ("llama-bpe", GGUFValueType.STRING),
        "llama.attention.key_length": (64, GGUFValueType.UINT32),
        "llama.attention.value_length": (64, GGUFValueType.UINT32),
    }, {"rope_freqs.weight": factors, "output.weight": head})


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
    llama3 = args.out / "llama3-style-F16.gguf"
    llama3_style(base, llama3)
    files = [(kind, base, args.out / f"smollm2-{kind}.gguf") for kind in TYPES]
    files += [("F16", llama3, args.out / "llama3-style-F16.gguf"),
              ("Q4_K_M", llama3, args.out / "llama3-style-Q4_K_M.gguf")]
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
        models.append({"type": kind, "file": path.name, "tensor_types": tensor_types(path),
                       "outputs": outputs})
    (args.out / "references.json").write_text(json.dumps(
        {"tokens": TOKENS, "top": TOP, "models": models}, indent=1))
    log(f"wrote {args.out / 'references.json'}")


if __name__ == "__main__":
    main()
