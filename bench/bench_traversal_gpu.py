"""TroL vs its plain backbone (same weights) on a CUDA GPU: prefill time, per-token decode time, KV-cache bytes, peak
GPU memory of one prefill. The GPU counterpart of bench/bench_traversal.py (which times on CPU in fp32).

Run (from the repository root, `trol` importable):
    python bench/bench_traversal_gpu.py                  # defaults: 16 layers, H=2048, bf16, batch 1 x 1024 tokens
    python bench/bench_traversal_gpu.py --quick          # tiny sizes, smoke run (works on CPU too: --device cpu)

Same model construction as bench_traversal.py (Llama-style decoder inside TroL, tiny unused CLIP tower, weights
copied into LlamaForCausalLM), built directly on the device, cast to --dtype. Each timing is wall clock around one
call with torch.cuda.synchronize() before and after; models interleave (A,B then B,A, ...), medians reported.
Prefill passes logits_to_keep=1 (as generate() does). Decode: one token per call on a prefilled DynamicCache; in the
default inference_traversal="question" mode decoded tokens do not traverse, so decode should cost about the same.
"""

import argparse
import statistics
import sys
import time

import torch
import transformers
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlamaForCausalLM
from trol import TrolConfig, TrolForConditionalGeneration

DEFAULTS = {"layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 8, "intermediate": 5632, "vocab": 32000, "prompt_len": 1024,
                "batch": 1, "repeats": 10, "warmup": 3, "decode_steps": 64}
QUICK = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1000, "prompt_len": 32, "repeats": 3,
             "warmup": 1, "decode_steps": 8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--attn", default="sdpa", help="attn_implementation for both models (eager, sdpa, ...)")
    p.add_argument("--inference-traversal", default="question", choices=["question", "question_answer", "none"])
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one decode step per model")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (explicit flags still win)")
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device); t0 = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t0


def build_models(a, device, dtype):
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=max(2048, a.prompt_len + a.decode_steps + 16), tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = TrolConfig(vision_config=vision, text_config=text, image_token_id=a.vocab - 1,  # prompts avoid this id
                        inference_traversal=a.inference_traversal)
    config._attn_implementation = a.attn
    config.text_config._attn_implementation = a.attn
    with device:
        trol = TrolForConditionalGeneration(config).to(dtype).eval()
        backbone = LlamaForCausalLM(config.text_config).to(dtype).eval()
    backbone.model.load_state_dict(trol.model.language_model.state_dict())
    backbone.lm_head.load_state_dict(trol.lm_head.state_dict())
    return config, trol, backbone


def prefill(model, config, ids, logits_to_keep=1):
    cache = DynamicCache(config=config.text_config)
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep).logits, cache


def main(a):
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | device {name} | dtype {a.dtype}")
    config, trol, backbone = build_models(a, device, dtype)
    tc, models = config.text_config, {"backbone": backbone, "trol": trol}
    print(f"backbone: Llama {tc.num_hidden_layers} layers, H={tc.hidden_size}, heads {tc.num_attention_heads}/"
          f"{tc.num_key_value_heads} KV, I={tc.intermediate_size}, V={tc.vocab_size}, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params, attn "
          f"backbone={backbone.config._attn_implementation} trol={trol.model.language_model.config._attn_implementation}"
          f" | batch {a.batch} x prompt {a.prompt_len} | inference_traversal={config.inference_traversal!r}")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab - 1, (a.batch, a.prompt_len), generator=gen).to(device)
    dec_ids = torch.randint(0, a.vocab - 1, (a.batch, a.decode_steps + a.warmup + 2), generator=gen).to(device)

    with torch.inference_mode():
        ref, _ = prefill(backbone, config, ids, logits_to_keep=0)
        diff = (prefill(trol, config, ids, logits_to_keep=0)[0].float() - ref.float()).abs().max().item()
        assert diff > 0, "TroL logits equal the backbone's: traversal is not running"
        trol.config.use_traversal = False
        plain = prefill(trol, config, ids, logits_to_keep=0)[0]
        trol.config.use_traversal = True
        same = (plain.float() - ref.float()).abs().max().item()
        print(f"sanity: TroL vs backbone max|dlogits| = {diff:.3e} (>0); use_traversal=False vs backbone "
              f"max|dlogits| = {same:.3e}{' (bit-exact)' if same == 0 else ''}")
        del ref, plain

        peak = {}
        for k, m in models.items():  # peak device memory of one prefill above what is allocated before it
            if device.type == "cuda":
                torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                prefill(m, config, ids)
                peak[k] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                peak[k] = 0.0

        pre = {k: [] for k in models}
        for i in range(a.warmup + a.repeats):
            for k in (["trol", "backbone"] if i % 2 == 0 else ["backbone", "trol"]):
                t = timed(lambda k=k: prefill(models[k], config, ids), device)
                if i >= a.warmup:
                    pre[k].append(t)
        caches = {k: prefill(m, config, ids)[1] for k, m in models.items()}
        for k, m in models.items():  # warm up decode on a throwaway cache
            c = prefill(m, config, ids)[1]
            for s in range(a.warmup + 2):
                m(input_ids=dec_ids[:, s:s + 1], past_key_values=c, use_cache=True)
            del c
        dec = {k: [] for k in models}
        for s in range(a.decode_steps):
            for k in (["trol", "backbone"] if s % 2 == 0 else ["backbone", "trol"]):
                tok = dec_ids[:, s:s + 1]
                dec[k].append(timed(lambda k=k, tok=tok: models[k](input_ids=tok, past_key_values=caches[k], use_cache=True),
                                    device))
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            for k, m in models.items():
                c = prefill(m, config, ids)[1]
                for s in range(3):
                    m(input_ids=dec_ids[:, s:s + 1], past_key_values=c, use_cache=True)
                sync(device)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for s in range(3, 8):
                        m(input_ids=dec_ids[:, s:s + 1], past_key_values=c, use_cache=True)
                    sync(device)
                print(f"\n== profile: 5 decode steps, {k}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=40))
                del c
        kv = {k: sum(lay.keys.nbytes + lay.values.nbytes for lay in c.layers) for k, c in caches.items()}
        assert kv["trol"] == kv["backbone"], kv

    med = {n: {k: statistics.median(v) * 1e3 for k, v in d.items()} for n, d in (("pre", pre), ("dec", dec))}
    rows = [(f"prefill time, ms (median of {a.repeats})", med["pre"], "{:.2f}"),
            (f"decode time per token, ms (median of {a.decode_steps})", med["dec"], "{:.3f}"),
            (f"KV-cache MiB after prefill + {a.decode_steps} tokens", {k: v / 2**20 for k, v in kv.items()}, "{:.2f}"),
            ("prefill peak device memory above weights, MiB", peak, "{:.1f}")]
    print("\n| measure | backbone | TroL | ratio |\n|---|---|---|---|")
    for title, v, fmt in rows:
        r = f"{v['trol'] / v['backbone']:.3f}" if v["backbone"] > 0 else "n/a"
        print(f"| {title} | {fmt.format(v['backbone'])} | {fmt.format(v['trol'])} | {r} |")
    both = (("prefill", pre), ("decode", dec))
    paired = ", ".join(f"{n} {statistics.median(t / b for t, b in zip(d['trol'], d['backbone'])):.3f}" for n, d in both)
    mins = ", ".join(f"{n} {min(d['trol']) / min(d['backbone']):.3f}" for n, d in both)
    print(f"Other ratios: median of paired ratios: {paired}; ratio of minima: {mins}.")


if __name__ == "__main__":
    sys.exit(main(parse_args()))
