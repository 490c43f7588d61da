"""Peak memory of `trol-convert`'s weight path against the size of the checkpoint it converts.

Writes a synthetic checkpoint in the released TroL-1.8B/7B layout (random bf16 weights, real tensor shapes of the
chosen size, fewer layers so it fits a laptop disk), then converts its weights in a child process and reports the
child's peak resident memory next to the checkpoint's size:

    python bench/bench_convert_memory.py                      # TroL-7B shapes, 4 of 32 layers: about 3.3 GB
    python bench/bench_convert_memory.py --hidden 2048 --layers 24 --heads 16   # all of TroL-1.8B's shapes

The claim checked: the converter streams tensor by tensor and writes shard by shard, so its peak is about one output
shard plus the largest tensor (never the whole model, let alone two copies). Source tensors are read through
memory maps; file pages the kernel keeps resident count in RSS but are reclaimable, so the figure is an upper bound.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import torch
from trol.converter import internlm2
from trol.converter.common import CheckpointSource, expected_state, load_shared_gate, write_weights
src, out, shard = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def status(key):  # kB; VmHWM is this process's own peak (ru_maxrss would include the parent's from before exec)
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))
base = status("VmRSS")
anon_peak = [status("RssAnon")]
def sample():  # anonymous memory = what the converter holds; file pages of the memory maps are reclaimable cache
    while True:
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
source = CheckpointSource(src)
config = internlm2.build_config(source, json.loads((src / "config.json").read_text()))
gate = load_shared_gate(src / "trol_gating.pt", config.text_config.num_hidden_layers)
files = write_weights(out, internlm2.tensors(source, config, gate), expected_state(config), None, shard)
peak = status("VmHWM")
anon_peak[0] = max(anon_peak[0], status("RssAnon"))
print("RESULT", json.dumps({"baseline_kib": base, "peak_kib": peak, "anon_peak_kib": anon_peak[0], "files": len(files),
                            "seconds": time.perf_counter() - start}))
"""


def write_source(folder: Path, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                 shard_bytes: int) -> int:
    """Random bf16 tensors under the released names, in shards of about `shard_bytes`. Returns total bytes."""
    head_dim = hidden // heads
    shapes = {"model.tok_embeddings.weight": (vocab + 1, hidden), "model.norm.weight": (hidden,),
              "output.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "attention_norm.weight"] = shapes[p + "ffn_norm.weight"] = (hidden,)
        for name, (n_in, n_out) in {"attention.wqkv": (hidden, (heads + 2 * kv_heads) * head_dim),
                                    "attention.wo": (hidden, hidden), "feed_forward.w1": (hidden, ffn),
                                    "feed_forward.w3": (hidden, ffn), "feed_forward.w2": (ffn, hidden)}.items():
            shapes[f"{p}{name}.ffn.weight"] = (n_out, n_in)
            shapes[f"{p}{name}.lora_A.weight"] = (256, n_in)
            shapes[f"{p}{name}.lora_B.weight"] = (n_out, 256)
    v, width = "vit.vision_tower.vision_model.", 1024
    shapes.update({v + "embeddings.class_embedding": (width,), v + "embeddings.patch_embedding.weight": (width, 3, 14, 14),
                   v + "embeddings.position_embedding.weight": (1226, width)})
    for name in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{v}{name}.weight"] = shapes[f"{v}{name}.bias"] = (width,)
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{name}.weight"], shapes[f"{p}self_attn.{name}.bias"] = (width, width), (width,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{name}.weight"] = shapes[f"{p}{name}.bias"] = (width,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (4096, width), (4096,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (width, 4096), (width,)
    shapes.update({"vision_proj.0.weight": (hidden, width), "vision_proj.0.bias": (hidden,),
                   "vision_proj.2.weight": (hidden, hidden), "vision_proj.2.bias": (hidden,)})
    shard, shard_size, weight_map, total, index = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        tensor = (torch.randn(shape) * 0.02).bfloat16()
        shard[name] = tensor
        shard_size += tensor.numel() * 2
        total += tensor.numel() * 2
        if shard_size >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_attention_heads": heads,
                                                    "num_key_value_heads": kv_heads, "rope_theta": 1e6}))
    gate_w, gate_b = torch.randn(1, hidden).bfloat16(), torch.zeros(1).bfloat16()
    torch.save({k: v for i in range(layers) for k, v in ((f"{i}.weight", gate_w), (f"{i}.bias", gate_b))},
               folder / "trol_gating.pt")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=None, help="default: 14336 for hidden 4096, else 4 x hidden")
    parser.add_argument("--vocab", type=int, default=92544)
    parser.add_argument("--max-shard-size", default="1GB", help="output shard size given to the converter")
    args = parser.parse_args()
    ffn = args.ffn or (14336 if args.hidden == 4096 else 4 * args.hidden)
    with tempfile.TemporaryDirectory(prefix="trol-bench-convert-") as scratch:
        src, out = Path(scratch) / "src", Path(scratch) / "out"
        src.mkdir()
        out.mkdir()
        started = time.perf_counter()
        total = write_source(src, args.hidden, args.layers, args.heads, args.kv_heads, ffn, args.vocab, 2 * 10**9)
        print(f"synthetic checkpoint: {total / 2**30:.2f} GiB bf16 ({args.layers} layers of hidden {args.hidden}), "
              f"written in {time.perf_counter() - started:.0f} s")
        child = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), args.max_shard_size],
                               check=False, capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not lines:
            print(child.stderr[-3000:])
            return 1
        result = json.loads(lines[-1].split(" ", 1)[1])
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        peak, base = result["peak_kib"] * 1024, result["baseline_kib"] * 1024
        print(f"converted into {result['files']} shards of at most {args.max_shard_size} "
              f"({written / 2**30:.2f} GiB) in {result['seconds']:.0f} s")
        anon = result["anon_peak_kib"] * 1024
        print(f"peak RSS of the converting process: {peak / 2**30:.2f} GiB; anonymous (what the converter holds): "
              f"{anon / 2**30:.2f} GiB; the rest is file pages of the memory-mapped source (reclaimable page cache)")
        print(f"after imports: {base / 2**30:.2f} GiB; anonymous peak / checkpoint size: {anon / total:.2f}; "
              f"peak RSS / checkpoint size: {peak / total:.2f}   (two full copies held would be >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
