"""Visual context compression (LLaVolta) in TroL on CPU: prefill time of TroL with K=2, S=8 vs the plain uncompressed
backbone for a 576- and a 1225-token image prompt, and the stage-1 training step time with the 4stage schedule
(its first stage: layer 2 / stride 8) vs no compression. One run prints them side by side.

Run (from the repository root, venv active):
    python bench/bench_compression.py           # defaults: Llama 24 layers (TroL-1.8B depth), H=256, 5 repeats (~4 min, 2 cores)
    python bench/bench_compression.py --quick   # tiny sizes, smoke run (~20 s)

Models: one small Llama-style decoder (random weights) inside TroL models with a 1-layer, 32-wide CLIP vision tower at
336 px (24x24 = 576 image tokens) and 490 px (35x35 = 1225 image tokens), and the same decoder weights in
`transformers.LlamaForCausalLM`. Prompts: [16 text tokens, the image tokens, 24 text tokens], batch 1. Prefill: a
forward on a fresh DynamicCache with logits_to_keep=1 (as generate() does), fp32, eval mode, inference_mode; TroL's
time includes its vision tower and projector, the backbone gets the token ids (its own embeddings). Timings interleave
the models and report medians. Training step: stage 1 (projector + gates train, trainer.train.prepare_stage),
activation checkpointing on (the recipe's), batch 2 x the 576-token prompt with a 24-token answer, loss over the answer
only from the labelled positions (as TRL's fused LM head), AdamW step; the stage is set by the real
CompressionScheduleCallback at step 0 of 1000. Sanity checks assert that the compressed layers really run on the
shorter sequence and that compression changes the output. The CPU use of other processes is printed.
"""

import argparse
import platform
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers
from machine import cpu_snapshot, other_cpus  # bench/machine.py (the script's folder is on sys.path)
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlamaForCausalLM
from trol import TrolConfig, TrolForConditionalGeneration
from trol.trainer.arguments import TrolModelArguments
from trol.trainer.compression import CompressionScheduleCallback
from trol.trainer.train import prepare_stage

DEFAULTS = {"layers": 24, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 688, "vocab": 32000, "repeats": 5,
            "warmup": 1, "train_repeats": 3, "train_batch": 2}
QUICK = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 1000, "repeats": 2,
         "warmup": 1, "train_repeats": 1, "train_batch": 1}
IMAGES = {576: 336, 1225: 490}  # image tokens -> vision image size (patch 14, CLS dropped)
BEFORE, AFTER, ANSWER = 16, 24, 24


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (explicit flags still win)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def build(a):
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=False)
    trols = {}
    for n_tokens, size in IMAGES.items():
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=size, patch_size=14)
        config = TrolConfig(vision_config=vision, text_config=text, image_token_id=a.vocab - 1)
        trols[n_tokens] = TrolForConditionalGeneration(config).eval()
        assert config.image_seq_length == n_tokens
    first = trols[576]
    for model in trols.values():  # one decoder, one head, one set of gates (and projector) for every model
        for name in ("language_model", "trol_gates", "multi_modal_projector"):
            getattr(model.model, name).load_state_dict(getattr(first.model, name).state_dict())
        model.lm_head.load_state_dict(first.lm_head.state_dict())
    backbone = LlamaForCausalLM(first.config.text_config).eval()
    backbone.model.load_state_dict(first.model.language_model.state_dict())
    backbone.lm_head.load_state_dict(first.lm_head.state_dict())
    return trols, backbone


def prompt(a, n_tokens, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, a.vocab - 2, (batch, BEFORE + AFTER), generator=gen)
    ids = torch.cat([text[:, :BEFORE], torch.full((batch, n_tokens), a.vocab - 1), text[:, BEFORE:]], 1)
    pixels = torch.randn((batch, 3, IMAGES[n_tokens], IMAGES[n_tokens]), generator=gen)
    return ids, pixels


def set_compression(model, layer, stride):
    model.config.compression_layer, model.config.compression_stride = layer, stride
    model.config.compression_at_inference = layer is not None


def prefill(model, ids, pixels=None):
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    extra = {} if pixels is None else {"pixel_values": pixels}
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compressed_length(model, fn) -> int:
    """Length of the sequence the last decoder layer's output has (before the expansion back)."""
    seen = []
    handle = model.model.language_model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        fn()
    finally:
        handle.remove()
    return seen[-1]


def bench_prefill(a, trols, backbone):
    rows, loads = {}, []
    with torch.inference_mode():
        for n_tokens, trol in trols.items():
            rows[n_tokens], load = bench_prompt(a, trol, backbone, n_tokens)
            loads.append(load)
    return rows, max(loads)


def bench_prompt(a, trol, backbone, n_tokens):
    """Interleaved prefills of one prompt: backbone, TroL uncompressed, TroL K=2,S=8 -> medians (ms), lengths, load."""
    ids, pixels = prompt(a, n_tokens)
    set_compression(trol, None, 1)
    plain = prefill(trol, ids, pixels)
    set_compression(trol, 2, 8)
    length = compressed_length(trol, lambda: prefill(trol, ids, pixels))
    expected = BEFORE + AFTER + -(-n_tokens // 8)
    assert length == expected, (length, expected)
    assert (prefill(trol, ids, pixels) - plain).abs().max() > 1e-5, "compression changed nothing"

    def trol_at(layer, stride):
        set_compression(trol, layer, stride)
        prefill(trol, ids, pixels)

    runs = {"backbone": lambda: prefill(backbone, ids), "trol_k2s8": lambda: trol_at(2, 8),
            "trol_plain": lambda: trol_at(None, 1)}
    times, s0 = {k: [] for k in runs}, None
    for i in range(a.warmup + a.repeats):
        s0 = cpu_snapshot() if i == a.warmup else s0
        for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            t = timed(runs[k])
            if i >= a.warmup:
                times[k].append(t)
    load = other_cpus(s0, cpu_snapshot())
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()}, length, ids.shape[1]), load


def bench_training(a, trols):
    model = trols[576]
    ids, pixels = prompt(a, 576, batch=a.train_batch, seed=1)
    answer = torch.randint(3, a.vocab - 2, (a.train_batch, ANSWER), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([ids, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER:] = answer
    model.config.compression_at_inference = False
    model = prepare_stage(model, SimpleNamespace(stage=TrolModelArguments.stage)).train()
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    shift = labels[:, 1:]
    keep = shift != -100

    def step():
        hidden = model.model(input_ids=ids, pixel_values=pixels, use_cache=False).last_hidden_state[:, :-1]
        loss = F.cross_entropy(model.lm_head(hidden[keep]), shift[keep])  # the labelled positions only (fused head)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = {}
    for name, schedule in (("none", "none"), ("4stage", "4stage")):
        callback = CompressionScheduleCallback(schedule)
        state = SimpleNamespace(max_steps=1000, global_step=0, stateful_callbacks={})
        callback.on_train_begin(None, state, None, model=model)
        settings[name] = (model.config.compression_layer, model.config.compression_stride)
    assert settings == {"none": (None, 1), "4stage": (2, 8)}, settings

    def use(name):
        model.config.compression_layer, model.config.compression_stride = settings[name]

    times, s0 = {k: [] for k in settings}, None
    for i in range(a.warmup + a.train_repeats):
        s0 = cpu_snapshot() if i == a.warmup else s0
        for name in (list(settings) if i % 2 == 0 else list(settings)[::-1]):
            use(name)
            t = timed(step)
            if i >= a.warmup:
                times[name].append(t)
    load = other_cpus(s0, cpu_snapshot())
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, ids.shape, load


def main(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    s0 = cpu_snapshot()
    time.sleep(1.0)
    load0 = other_cpus(s0, cpu_snapshot())
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
          f"torch threads {torch.get_num_threads()} | other load {load0:.2f} CPUs")
    trols, backbone = build(a)
    tc = backbone.config
    print(f"backbone: Llama {tc.num_hidden_layers} layers, H={tc.hidden_size}, heads {tc.num_attention_heads}/"
          f"{tc.num_key_value_heads} KV, I={tc.intermediate_size}, V={tc.vocab_size}, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params, attn={tc._attn_implementation}, fp32")
    rows, load_pre = bench_prefill(a, trols, backbone)
    train, train_shape, load_train = bench_training(a, trols)

    n = a.layers
    print(f"\n| prefill, batch 1, median of {a.repeats} | backbone ms | TroL ms | TroL K=2,S=8 ms | "
          "TroL/backbone | TroL K=2,S=8 / backbone | arithmetic | target |\n|---|---|---|---|---|---|---|---|")
    verdicts = []
    for n_tokens, (ms, length, q) in rows.items():
        arithmetic = 2 * (2 * q + (n - 2) * length) / (n * q)  # layer passes x tokens, TroL K=2,S=8 vs backbone
        ratio = ms["trol_k2s8"] / ms["backbone"]
        verdicts.append(ratio <= 0.6)
        print(f"| {n_tokens}-token image ({q} tokens -> {length} from layer 2) | {ms['backbone']:.1f} | "
              f"{ms['trol_plain']:.1f} | {ms['trol_k2s8']:.1f} | {ms['trol_plain'] / ms['backbone']:.2f} | "
              f"{ratio:.2f} | {arithmetic:.2f} | <= 0.6 {'OK' if ratio <= 0.6 else 'OVER'} |")
    print(f"\n| stage-1 training step, batch {train_shape[0]} x {train_shape[1]} tokens, median of {a.train_repeats} "
          f"| no compression ms | 4stage (stage 1: layer 2 / stride 8) ms | ratio |\n|---|---|---|---|")
    print(f"| TroL, activation checkpointing, AdamW | {train['none']:.0f} | {train['4stage']:.0f} | "
          f"{train['4stage'] / train['none']:.2f} |")
    busy = max(load0, load_pre, load_train) > 0.2
    print(f"\nCPUs used by other processes: before {load0:.2f}, prefill loops {load_pre:.2f}, training loop "
          f"{load_train:.2f}" + (" -- WARNING: busy machine, timings are inflated and noisy." if busy else
                                 " (idle machine)"))
    print("arithmetic = 2 x (2 x q + (N - 2) x q_compressed) / (N x q): token-layer passes, attention's quadratic term "
          "ignored (it favours compression further).")
    return all(verdicts)


if __name__ == "__main__":
    main(parse_args())
