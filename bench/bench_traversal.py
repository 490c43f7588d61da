"""TroL vs its plain backbone (same weights) on CPU: prefill time, per-token decode time, KV-cache bytes, peak RSS.

Run (from the repository root, venv active):
    python bench/bench_traversal.py            # defaults: 8 layers, H=512, batch 1 x 512 tokens, 7 repeats, 64 steps
    python bench/bench_traversal.py --quick    # tiny sizes, smoke run (~20 s, mostly imports of 3 processes)

One small Llama-style decoder is built inside a TroL model (tiny CLIP vision tower, unused: prompts are text-only) and
copied into `transformers.LlamaForCausalLM`. fp32, eval mode, torch.inference_mode(), default torch thread count.
Timings interleave the two models (A,B then B,A, ...) and report medians. Prefill passes `logits_to_keep=1` (as
generate() does) to both. Peak RSS is measured in a fresh subprocess per model (this script, hidden `--_mem` flag).
Assertions guard that TroL really traverses (w>0, logits differ) and that `use_traversal=False` is bit-identical to
the backbone, and that both KV caches hold exactly the same bytes. The CPU use of OTHER processes during the timed
loops is printed: torch's OpenMP threads stall when one is preempted, so a busy machine inflates and skews timings.
"""

import argparse, copy, gc, hashlib, json, os, platform, resource, statistics, subprocess, sys, time

import torch
from machine import cpu_snapshot, other_cpus  # bench/machine.py (the script's folder is on sys.path)
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


def build_models(a, which=("trol", "backbone")):
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=max(2048, a.prompt_len + a.decode_steps + 16), tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = TrolConfig(vision_config=vision, text_config=text, image_token_id=a.vocab - 1)  # prompts avoid this id
    trol = TrolForConditionalGeneration(config).eval() if "trol" in which else None
    backbone = LlamaForCausalLM(config.text_config).eval() if "backbone" in which else None
    if trol is not None and backbone is not None:
        backbone.model.load_state_dict(trol.model.language_model.state_dict())
        backbone.lm_head.load_state_dict(trol.lm_head.state_dict())
    return config, trol, backbone


def make_ids(a, n, seed):
    return torch.randint(0, a.vocab - 1, (a.batch, n), generator=torch.Generator().manual_seed(seed))


def prefill(model, config, ids, logits_to_keep=1):
    cache = DynamicCache(config=config.text_config)
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep).logits, cache


def sha1(cls) -> str:  # which version of the (concurrently edited) modeling file was measured
    return hashlib.sha1(open(sys.modules[cls.__module__].__file__, "rb").read()).hexdigest()[:10]


def timed(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0  # noqa: E702


def peak_rss_mib() -> float:
    """VmHWM: this process's peak RSS, resettable. Not ru_maxrss: on Linux a child started by fork+exec inherits the
    parent's high-water mark in ru_maxrss, which hides the child's own peak (ru_maxrss is only the fallback)."""
    try:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**10
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def mem_child(a):
    """Fresh process: build ONE model; for 1 cold + 3 warm prefills, reset the peak-RSS mark, prefill, read it."""
    config, trol, backbone = build_models(a, which=(a._mem,))
    ids, deltas = make_ids(a, a.prompt_len, seed=1), []
    with torch.inference_mode():
        for _ in range(4):
            gc.collect()
            try:  # Linux >= 4.0: VmHWM := current RSS, so earlier peaks (build, last prefill) cannot hide this one
                open("/proc/self/clear_refs", "w").write("5"); reset = True  # noqa: E702
            except OSError:
                reset = False
            r0 = peak_rss_mib()
            prefill(trol or backbone, config, ids)
            deltas.append(peak_rss_mib() - r0)
            if len(deltas) == 1:
                total = peak_rss_mib()
    print(json.dumps({"cold": deltas[0], "warm": statistics.median(deltas[1:]), "total": total, "reset": reset}))


def run_mem(which, argv):
    # A fixed mmap threshold makes glibc return every block >= 64 KiB to the OS on free, so RSS follows live tensors
    # instead of whatever the allocator kept from earlier (same setting for both models; timings are not run here).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--_mem", which],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(a, argv):
    s0 = cpu_snapshot(); time.sleep(1.0); load0 = other_cpus(s0, cpu_snapshot())  # noqa: E702
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
          f"torch threads {torch.get_num_threads()} | os.cpu_count {os.cpu_count()} | other load {load0:.2f} CPUs")
    # 4. peak RSS of one prefill, each model alone in a fresh process (run first, while this process is small)
    mem = {k: run_mem(k, argv) for k in ("backbone", "trol")}
    config, trol, backbone = build_models(a)
    tc, models = config.text_config, {"backbone": backbone, "trol": trol}
    assert trol.model.language_model.config._attn_implementation == backbone.config._attn_implementation
    print(f"backbone: Llama {tc.num_hidden_layers} layers, H={tc.hidden_size}, heads {tc.num_attention_heads}/"
          f"{tc.num_key_value_heads} KV, I={tc.intermediate_size}, V={tc.vocab_size}, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params, attn="
          f"{backbone.config._attn_implementation}, fp32 | batch {a.batch} x prompt {a.prompt_len} | TroL "
          f"inference_traversal={config.inference_traversal!r}, modeling file sha1 {sha1(type(trol))}")
    ids, dec_ids = make_ids(a, a.prompt_len, seed=1), make_ids(a, a.decode_steps + a.warmup + 2, seed=2)

    with torch.inference_mode():
        # sanity: the benchmark must compare traversal vs no traversal on identical weights
        ref, _ = prefill(backbone, config, ids, logits_to_keep=0)
        w = torch.stack([g(torch.randn(4, tc.hidden_size)) for g in trol.model.trol_gates])
        assert float(w.min()) > 0, "gates give w == 0: TroL would equal the backbone"
        diff = (prefill(trol, config, ids, logits_to_keep=0)[0] - ref).abs().max().item()
        assert diff > 1e-4, f"TroL logits equal the backbone's (max |diff| {diff}): traversal is not running"
        assert trol.model.config is trol.config
        trol.config.use_traversal = False
        plain = prefill(trol, config, ids, logits_to_keep=0)[0]
        trol.config.use_traversal = True
        assert torch.equal(plain, ref), "use_traversal=False is not bit-identical to LlamaForCausalLM"
        print(f"sanity: gate w in [{w.min():.3f}, {w.max():.3f}]; TroL vs backbone max|dlogits| = {diff:.3e} (>0, OK); "
              "use_traversal=False == backbone bit-exactly (OK)")
        del ref, plain

        # 1. prefill time, interleaved
        pre, s0 = {k: [] for k in models}, None
        for i in range(a.warmup + a.repeats):
            s0 = cpu_snapshot() if i == a.warmup else s0
            for k in (["trol", "backbone"] if i % 2 == 0 else ["backbone", "trol"]):
                t = timed(lambda: prefill(models[k], config, ids))
                if i >= a.warmup:
                    pre[k].append(t)
        load_pre = other_cpus(s0, cpu_snapshot())
        # 2. decode time per token, interleaved per step, from same-length prefilled caches
        caches = {k: prefill(m, config, ids)[1] for k, m in models.items()}
        for k, m in models.items():  # warmup on throwaway deep copies
            c = copy.deepcopy(caches[k])
            for s in range(a.warmup + 2):
                m(input_ids=dec_ids[:, s:s + 1], past_key_values=c, use_cache=True)
        dec = {k: [] for k in models}
        gc.collect()
        s0 = cpu_snapshot()
        for s in range(a.decode_steps):
            for k in (["trol", "backbone"] if s % 2 == 0 else ["backbone", "trol"]):
                tok = dec_ids[:, s:s + 1]
                dec[k].append(timed(lambda: models[k](input_ids=tok, past_key_values=caches[k], use_cache=True)))
        load_dec = other_cpus(s0, cpu_snapshot())
        # 3. KV-cache bytes after prefill + decoding
        kv = {k: sum(lay.keys.nbytes + lay.values.nbytes for lay in c.layers) for k, c in caches.items()}
        lens = {k: c.get_seq_length() for k, c in caches.items()}
        assert lens["trol"] == lens["backbone"] == a.prompt_len + a.decode_steps, lens
        assert kv["trol"] == kv["backbone"], f"KV cache bytes differ: {kv}"

    med = {n: {k: statistics.median(v) * 1e3 for k, v in d.items()} for n, d in (("pre", pre), ("dec", dec))}
    rows = [
        (f"prefill time, ms (median of {a.repeats})", med["pre"], "<= 2.10 (physical 2.0)", "{:.1f}"),
        (f"decode time per token, ms (median of {a.decode_steps})", med["dec"], "<= 1.05", "{:.2f}"),
        (f"KV-cache MiB after prefill + {a.decode_steps} tokens", {k: v / 2**20 for k, v in kv.items()},
         "== 1.00 (asserted)", "{:.3f}"),
        ("prefill activation peak, MiB, warm (peak RSS in prefill - RSS before; median of 3)",
         {k: v["warm"] for k, v in mem.items()}, "report", "{:.1f}"),
        ("prefill activation peak, MiB, cold (first prefill of the process)", {k: v["cold"] for k, v in mem.items()},
         "report", "{:.1f}"),
        ("prefill total peak RSS, MiB, cold (python + torch + weights + activations)",
         {k: v["total"] for k, v in mem.items()}, "report", "{:.1f}"),
    ]
    print("\n| measure | backbone | TroL | ratio | target |\n|---|---|---|---|---|")
    for name, v, target, fmt in rows:
        r = f"{v['trol'] / v['backbone']:.3f}" if v["backbone"] > 0 else "n/a"
        print(f"| {name} | {fmt.format(v['backbone'])} | {fmt.format(v['trol'])} | {r} | {target} |")
    both = (("prefill", pre), ("decode", dec))
    paired = ", ".join(f"{n} {statistics.median(t / b for t, b in zip(d['trol'], d['backbone'])):.3f}" for n, d in both)
    mins = ", ".join(f"{n} {min(d['trol']) / min(d['backbone']):.3f}" for n, d in both)
    print(f"\nKV bytes exact: backbone {kv['backbone']} == TroL {kv['trol']}; cache length {lens['trol']} tokens.")
    print(f"Other ratios: median of paired (adjacent-in-time) ratios: {paired}; ratio of minima: {mins}. Prefill "
          f"min-max ms: backbone {min(pre['backbone'])*1e3:.1f}-{max(pre['backbone'])*1e3:.1f}, "
          f"TroL {min(pre['trol'])*1e3:.1f}-{max(pre['trol'])*1e3:.1f}.")
    reset = all(v["reset"] for v in mem.values())
    print("Memory: each model built alone in a fresh subprocess (TroL's also holds the tiny vision tower, projector, "
          "gates) with MALLOC_MMAP_THRESHOLD_=65536; VmHWM read before and after each prefill (DynamicCache, "
          "logits_to_keep=1)" + (", reset to the current RSS before each via /proc/self/clear_refs" if reset else
                                 ", NOT reset (no /proc/self/clear_refs): earlier peaks may hide later ones") +
          ". Activation peaks include the new KV cache (same size for both).")
    busy = max(load0, load_pre, load_dec) > 0.2
    print(f"CPUs used by other processes: before {load0:.2f}, during prefill loop {load_pre:.2f}, during decode loop "
          f"{load_dec:.2f}" + (" -- WARNING: busy machine, timings are inflated and noisy; re-run when idle."
                               if busy else " (idle machine)"))
    verdict = [(n, med[k]["trol"] / med[k]["backbone"], lim) for n, k, lim in (("prefill", "pre", 2.10),
                                                                                ("decode", "dec", 1.05))]
    print("targets (ratio of medians): " + ", ".join(f"{n} {r:.3f} {'OK' if r <= lim else 'OVER'} (<= {lim})"
                                                     for n, r, lim in verdict))

if __name__ == "__main__":
    args = parse_args()
    mem_child(args) if args._mem else main(args, sys.argv[1:])
