"""TroL vs its plain backbone (same weights) on CPU: prefill time, per-token decode time, KV-cache bytes, peak RSS.

Run (from the repository root, venv active):
    python bench/bench_traversal.py            # defaults: 8 layers, H=512, batch 1 x 512 tokens, 7 repeats, 64 steps
    python bench/bench_traversal.py --quick    # tiny sizes, smoke run in seconds

One small Llama-style decoder is built inside a TroL model (tiny CLIP vision tower, unused: prompts are text-only) and
copied into `transformers.LlamaForCausalLM`. fp32, eval mode, torch.inference_mode(), default torch thread count.
Timings interleave the two models (order alternates A,B / B,A per repeat) and report medians. Prefill passes
`logits_to_keep=1` (what generate() does), so the LM head is not a full-vocabulary matmul in either model. Peak RSS is
measured in a fresh subprocess per model (this script with the hidden `--_mem` flag). Assertions guard that TroL
really traverses (logits differ, w>0) and that `use_traversal=False` is bit-identical to the backbone.
"""

import argparse, copy, gc, json, os, platform, resource, statistics, subprocess, sys, time

import torch
import transformers
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlamaForCausalLM

from trol import TrolConfig, TrolForConditionalGeneration


DEFAULTS = dict(layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=32000, prompt_len=512, batch=1,
                repeats=7, warmup=2, decode_steps=64)  # repeats: timed prefills; decode_steps: timed decode tokens
QUICK = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000, prompt_len=32, repeats=3,
             warmup=1, decode_steps=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (explicit flags still win)")
    p.add_argument("--_mem", choices=["trol", "backbone"], help=argparse.SUPPRESS)
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def build_config(a) -> TrolConfig:
    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=max(2048, a.prompt_len + a.decode_steps + 16), tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    return TrolConfig(vision_config=vision, text_config=text, image_token_id=a.vocab - 1)  # prompts avoid this id


def build_models(a, which=("trol", "backbone")):
    torch.manual_seed(0)
    config = build_config(a)
    trol = TrolForConditionalGeneration(config).eval() if "trol" in which else None
    backbone = None
    if "backbone" in which:
        backbone = LlamaForCausalLM(config.text_config).eval()
        if trol is not None:
            backbone.model.load_state_dict(trol.model.language_model.state_dict())
            backbone.lm_head.load_state_dict(trol.lm_head.state_dict())
    return config, trol, backbone


def make_ids(a, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, a.vocab - 1, (a.batch, n), generator=g)


def prefill(model, config, ids, logits_to_keep=1):
    cache = DynamicCache(config=config.text_config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits, cache


def kv_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0  # noqa: E702


def peak_rss_mib() -> float:
    """VmHWM (this mm's peak RSS; resettable). ru_maxrss is the fallback only: on Linux a child started by
    fork+exec inherits the parent's high-water mark in ru_maxrss, which would hide the child's own peak."""
    try:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**10
    except (OSError, IndexError):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return r / (2**20 if platform.system() == "Darwin" else 2**10)


def busy_cpus(dt=1.0) -> float:
    """CPUs kept busy by other processes over dt seconds while this one sleeps (from /proc/stat; nan elsewhere)."""
    try:
        read = lambda: [int(x) for x in open("/proc/stat").readline().split()[1:]]  # noqa: E731
        s0 = read(); time.sleep(dt); s1 = read()  # noqa: E702
    except OSError:
        return float("nan")
    d = [b - c for b, c in zip(s1, s0)]
    return (1 - (d[3] + d[4]) / sum(d)) * (os.cpu_count() or 1)


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the high-water mark (VmHWM) to the current RSS."""
    try:
        open("/proc/self/clear_refs", "w").write("5"); return True  # noqa: E702
    except OSError:
        return False


def mem_child(a):
    """Fresh process: build ONE model, then one prefill; print peak RSS before/after as JSON."""
    config, trol, backbone = build_models(a, which=(a._mem,))
    model = trol if a._mem == "trol" else backbone
    ids = make_ids(a, a.prompt_len, seed=1)
    gc.collect()
    reset = reset_peak_rss()  # else the build's transient peak can hide the prefill's
    r0 = peak_rss_mib()
    with torch.inference_mode():
        prefill(model, config, ids)
    print(json.dumps({"r0": r0, "r1": peak_rss_mib(), "reset": reset}))


def run_mem(which, argv):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--_mem", which],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(a, argv):
    load0 = busy_cpus()
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
          f"torch threads {torch.get_num_threads()} | os.cpu_count {os.cpu_count()} | other load {load0:.2f} CPUs")
    # 4. peak RSS of one prefill, each model alone in a fresh process (started first, while this process is small)
    mem = {k: run_mem(k, argv) for k in ("backbone", "trol")}
    act = {k: v["r1"] - v["r0"] for k, v in mem.items()}
    config, trol, backbone = build_models(a)
    tc = config.text_config
    assert trol.model.language_model.config._attn_implementation == backbone.config._attn_implementation
    n_dec = sum(p.numel() for p in backbone.parameters())
    print(f"backbone: Llama {tc.num_hidden_layers} layers, H={tc.hidden_size}, heads {tc.num_attention_heads}/"
          f"{tc.num_key_value_heads} KV, I={tc.intermediate_size}, V={tc.vocab_size}, {n_dec / 1e6:.1f}M params, "
          f"attn={backbone.config._attn_implementation}, fp32 | batch {a.batch} x prompt {a.prompt_len}")
    ids = make_ids(a, a.prompt_len, seed=1)
    dec_ids = make_ids(a, a.decode_steps + a.warmup + 4, seed=2)
    models = {"backbone": backbone, "trol": trol}

    with torch.inference_mode():
        # ---- sanity: the benchmark must compare traversal vs no traversal on identical weights ----
        ref, _ = prefill(backbone, config, ids, logits_to_keep=0)
        w = torch.stack([g(torch.randn(4, tc.hidden_size)) for g in trol.model.trol_gates])
        assert float(w.min()) > 0, "gates give w == 0: TroL would equal the backbone"
        got, _ = prefill(trol, config, ids, logits_to_keep=0)
        diff = (got - ref).abs().max().item()
        assert diff > 1e-4, f"TroL logits equal the backbone's (max |diff| {diff}): traversal is not running"
        assert trol.model.config is trol.config
        trol.config.use_traversal = False
        plain, _ = prefill(trol, config, ids, logits_to_keep=0)
        trol.config.use_traversal = True
        assert torch.equal(plain, ref), "use_traversal=False is not bit-identical to LlamaForCausalLM"
        print(f"sanity: gate w in [{w.min():.3f}, {w.max():.3f}]; TroL vs backbone max|dlogits| = {diff:.3e} (>0, OK); "
              "use_traversal=False == backbone bit-exactly (OK)")
        del ref, got, plain

        # ---- 1. prefill time, interleaved ----
        pre = {k: [] for k in models}
        for i in range(a.warmup + a.repeats):
            order = ["trol", "backbone"] if i % 2 == 0 else ["backbone", "trol"]
            for k in order:
                t = timed(lambda: prefill(models[k], config, ids))
                if i >= a.warmup:
                    pre[k].append(t)
        # ---- 2. decode time per token, interleaved, from identical-length prefilled caches ----
        caches = {k: prefill(m, config, ids)[1] for k, m in models.items()}
        for k, m in models.items():  # warmup on throwaway copies
            c = copy.deepcopy(caches[k])
            for s in range(a.warmup + 2):
                m(input_ids=dec_ids[:, s:s + 1], past_key_values=c, use_cache=True)
        dec = {k: [] for k in models}
        gc.collect()
        for s in range(a.decode_steps):
            order = ["trol", "backbone"] if s % 2 == 0 else ["backbone", "trol"]
            for k in order:
                tok = dec_ids[:, s:s + 1]
                dec[k].append(timed(lambda: models[k](input_ids=tok, past_key_values=caches[k], use_cache=True)))
        # ---- 3. KV cache bytes after prefill + decoding ----
        kv = {k: kv_bytes(c) for k, c in caches.items()}
        lens = {k: c.get_seq_length() for k, c in caches.items()}
        assert lens["trol"] == lens["backbone"] == a.prompt_len + a.decode_steps, lens
        assert kv["trol"] == kv["backbone"], f"KV cache bytes differ: {kv}"

    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    ratio = lambda b, t: t / b if b else float("nan")  # noqa: E731
    pb, pt, db, dt = med(pre["backbone"]), med(pre["trol"]), med(dec["backbone"]), med(dec["trol"])
    rows = [
        (f"prefill time, ms (median of {a.repeats})", pb, pt, "<= 2.10 (physical 2.0)", "{:.1f}"),
        (f"decode time per token, ms (median of {a.decode_steps})", db, dt, "<= 1.05", "{:.2f}"),
        (f"KV-cache MiB after prefill+{a.decode_steps} tokens", kv["backbone"] / 2**20, kv["trol"] / 2**20,
         "== 1.00 (asserted)", "{:.3f}"),
        ("prefill activation peak, MiB (peak RSS in prefill - RSS after build)", act["backbone"], act["trol"], "report",
         "{:.1f}"),
        ("prefill total peak RSS, MiB (weights + torch + activations)", mem["backbone"]["r1"], mem["trol"]["r1"], "report",
         "{:.1f}"),
    ]
    print("\n| measure | backbone | TroL | ratio | target |\n|---|---|---|---|---|")
    for name, b, t, target, fmt in rows:
        print(f"| {name} | {fmt.format(b)} | {fmt.format(t)} | {ratio(b, t):.3f} | {target} |")
    print(f"\nKV bytes exact: backbone {kv['backbone']} == TroL {kv['trol']}; cache length {lens['trol']}.")
    paired = lambda d: statistics.median(t / b for t, b in zip(d["trol"], d["backbone"]))  # noqa: E731
    print(f"prefill min-max ms: backbone {min(pre['backbone'])*1e3:.1f}-{max(pre['backbone'])*1e3:.1f}, TroL "
          f"{min(pre['trol'])*1e3:.1f}-{max(pre['trol'])*1e3:.1f}. Median of paired (adjacent-in-time) ratios: "
          f"prefill {paired(pre):.3f}, decode {paired(dec):.3f}.")
    reset = all(v["reset"] for v in mem.values())
    print("Memory: each model is built alone in a fresh subprocess (TroL's process also holds the tiny vision tower,"
          " projector and gates); peak RSS (VmHWM) read after the build " + ("(high-water mark reset to the current RSS via "
          "/proc/self/clear_refs)" if reset else "(NOT reset: the build's transient peak may hide the prefill's)") +
          " and after one prefill (DynamicCache, logits_to_keep=1). The activation peak includes the new KV cache"
          " (same size for both) and allocator/page effects, so small values are noisy.")
    load = busy_cpus()
    print(f"other load at end: {load:.2f} CPUs" + (" -- WARNING: busy machine; torch's OpenMP threads stall when another"
          " process preempts one of them, timings inflate (up to 10x seen) and get noisy" if max(load, load0) > 0.2 else ""))
    verdict = [("prefill", pt / pb, 2.10), ("decode", dt / db, 1.05)]
    print("targets: " + ", ".join(f"{n} {r:.3f} {'OK' if r <= lim else 'OVER'} (<= {lim})" for n, r, lim in verdict))


if __name__ == "__main__":
    args = parse_args()
    if args._mem:
        mem_child(args)
    else:
        main(args, sys.argv[1:])
