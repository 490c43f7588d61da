"""Stage-1 training step of TroL vs its plain backbone (same weights, `config.use_traversal` True / False) on CPU:
step time and activation peak, with and without gradient checkpointing.

Run (from the repository root, venv active):
    python bench/bench_train.py            # defaults: Llama 8 layers, H=512, batch 2 x 256 tokens, 15 timed steps
    python bench/bench_train.py --quick    # tiny sizes, smoke run (~15 s, mostly imports of 5 processes)

What is measured. One TroL model (small Llama-style decoder + tiny CLIP at 56 px, 16 image tokens per sample) set up
exactly as stage 1 of the recipe: `trol.trainer.train.prepare_stage` freezes everything but the projector and the
gates, AdamW (torch) over those, model.train(). The training step is driven DIRECTLY, not through SFTTrainer (no
dataloader, collator, logging or callbacks inside the timed region): `loss = model(**batch).loss` (labels: the answer
tokens; the model's own causal-LM loss over all logits), `loss.backward()`, `optimizer.step()`,
`optimizer.zero_grad(set_to_none=True)`. Gradient checkpointing is switched the way the Trainer does it
(`activation_checkpointing_enable()`, non-reentrant, inputs made to require grad). "backbone" is the same model and
weights with `config.use_traversal = False` (one propagation per layer, gates unused, so plain LLaVA-style stage 1).
fp32, default torch thread count.

Timing: the 4 configurations {traversal on/off} x {checkpointing off/on} run interleaved in one process, in rounds;
each round visits both checkpointing settings and alternates TroL/backbone order (A,B then B,A). Median over the timed
rounds after warmup rounds. Peak memory: each configuration alone in a fresh subprocess (hidden `--_mem` flag) with
MALLOC_MMAP_THRESHOLD_=65536; per step VmHWM is reset to the current RSS via /proc/self/clear_refs ("5"), then read
after the step: activation peak = peak during the step - RSS before it (median of 3 warm steps). The CPU use of other
processes during the timed loop is printed: a busy machine inflates and skews timings.

Physical expectation. Stage 1 trains only the projector (and the gates), yet the projector's gradient must reach the
image-token embeddings at the bottom of the decoder, so the backward pass runs through EVERY frozen decoder layer
(input gradients only: no weight-gradient matmuls, about 1x the forward cost instead of 2x). TroL runs each layer twice
in the forward and therefore twice in the backward (and twice in the recompute with checkpointing): the decoder part
of the step costs ~2x, the rest (vision tower without backward, embeddings, LM head + loss forward/backward, AdamW on
the projector) is unchanged, so the step ratio is (2*D + O) / (D + O) < 2; the script prints that estimate from a
matmul-FLOP count. Activations: without checkpointing both propagations' saved tensors are kept (decoder activations
~2x, plus the mixer's); with checkpointing only each TroL layer's input is kept (as for the backbone) and one layer's
two passes are recomputed at a time, so the increase should be small. Paper, Table 4(f) (INFERENCE, 1.8B): TroL time
1.3x, VRAM 6 -> 7 GB; training with traversal on every token is a different regime (~2x decoder compute).
"""

import argparse, gc, json, os, platform, statistics, subprocess, sys, time, types

import torch
from machine import cpu_snapshot, other_cpus  # bench/machine.py (the script's folder is on sys.path)
import transformers
from transformers import CLIPVisionConfig, LlamaConfig

from trol import TrolConfig, TrolForConditionalGeneration
from trol.trainer.train import prepare_stage

DEFAULTS = dict(layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=32000, seq_len=256, batch=2,
                answer_len=64, image_size=56, repeats=15, warmup=2, lr=1e-4)
QUICK = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000, seq_len=64, answer_len=16,
             image_size=28, repeats=3, warmup=1)
CONFIGS = [(ckpt, trav) for ckpt in (False, True) for trav in (True, False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (explicit flags still win)")
    p.add_argument("--_mem", help=argparse.SUPPRESS)  # "ckpt,traversal" as 0/1: memory child for one configuration
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def build(a):
    """The stage-1 model (frozen but projector + gates), its AdamW and one fixed batch."""
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       max_position_embeddings=max(2048, a.seq_len), tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=a.image_size, patch_size=14)
    config = TrolConfig(vision_config=vision, text_config=text, image_token_id=a.vocab - 1)
    model = TrolForConditionalGeneration(config)
    model = prepare_stage(model, types.SimpleNamespace(stage=1))  # the recipe's own stage-1 freezing (checked there)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=a.lr)
    n_image = (a.image_size // 14) ** 2  # CLS dropped
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, a.vocab - 1, (a.batch, a.seq_len), generator=gen)
    ids[:, 1:1 + n_image] = config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -a.answer_len:] = ids[:, -a.answer_len:]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False,
                 pixel_values=torch.randn((a.batch, 3, a.image_size, a.image_size), generator=gen))
    return model, optimizer, batch, n_image


def configure(model, ckpt: bool, traversal: bool):
    model.config.use_traversal = traversal
    if ckpt and not model.is_activation_checkpointing:
        model.activation_checkpointing_enable()  # as the Trainer: non-reentrant, embedding outputs require grad
    elif not ckpt and model.is_activation_checkpointing:
        model.activation_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()


def train_step(model, optimizer, batch):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def check(model, optimizer, batch):
    """The comparison must be what it claims: traversal changes the loss, gradients reach projector and gates only."""
    with torch.no_grad():
        losses = {}
        for trav in (True, False):
            configure(model, False, trav)
            losses[trav] = model(**batch).loss.item()
    assert abs(losses[True] - losses[False]) > 1e-6, f"traversal does not change the loss: {losses}"
    configure(model, False, True)
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith(("model.multi_modal_projector.", "model.trol_gates.")) for n in with_grad)
    assert any(n.startswith("model.trol_gates.") for n in with_grad) and any("projector" in n for n in with_grad)
    optimizer.zero_grad(set_to_none=True)
    return losses


def step_flops(a, traversal: bool, ckpt: bool) -> float:
    """Matmul FLOPs of one step (the physical expectation): decoder forward, its input-gradient backward (frozen
    weights: 1 matmul per linear instead of 2; attention scores 2 matmuls), recompute under checkpointing, LM head
    forward + input gradient over every position. Vision tower and elementwise work ignored."""
    n, h, t = a.batch * a.seq_len, a.hidden, a.seq_len
    kv = h // a.heads * a.kv_heads
    linear = 2 * n * (2 * h * h + 2 * h * kv + 3 * h * a.intermediate)
    attention = 4 * a.batch * t * t * h
    forward = a.layers * (linear + attention)
    backward = a.layers * (linear + 2 * attention)
    decoder = (2 if ckpt else 1) * forward + backward
    head = 2 * (2 * n * h * a.vocab)
    return (2 if traversal else 1) * decoder + head


def vm_hwm_mib() -> float:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**10


def vm_rss_mib() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 2**10


def mem_child(a):
    """Fresh process: one configuration; 1 cold + 3 warm steps, each with VmHWM reset just before."""
    ckpt, trav = (bool(int(x)) for x in a._mem.split(","))
    model, optimizer, batch, _ = build(a)
    configure(model, ckpt, trav)
    deltas, reset = [], True
    for _ in range(4):
        gc.collect()
        try:
            open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS (Linux >= 4.0)
        except OSError:
            reset = False
        before = vm_rss_mib()
        train_step(model, optimizer, batch)
        deltas.append(vm_hwm_mib() - before)
    print(json.dumps({"cold": deltas[0], "warm": statistics.median(deltas[1:]), "reset": reset,
                      "rss_after": vm_rss_mib()}))


def run_mem(ckpt, trav, argv):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--_mem", f"{int(ckpt)},{int(trav)}"],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def name(ckpt):
    return "checkpointing on" if ckpt else "checkpointing off"


def main(a, argv):
    s0 = cpu_snapshot(); time.sleep(1.0); load0 = other_cpus(s0, cpu_snapshot())  # noqa: E702
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} | "
          f"torch threads {torch.get_num_threads()} | os.cpu_count {os.cpu_count()} | loadavg "
          f"{open('/proc/loadavg').read().split()[:3]} | other load {load0:.2f} CPUs")
    mem = {(ckpt, trav): run_mem(ckpt, trav, argv) for ckpt, trav in CONFIGS}  # first, while this process is small

    model, optimizer, batch, n_image = build(a)
    losses = check(model, optimizer, batch)
    tc = model.config.text_config
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"backbone: Llama {tc.num_hidden_layers} layers, H={tc.hidden_size}, heads {tc.num_attention_heads}/"
          f"{tc.num_key_value_heads} KV, I={tc.intermediate_size}, V={tc.vocab_size}, attn={tc._attn_implementation}, "
          f"fp32 | CLIP {a.image_size}px -> {n_image} image tokens | batch {a.batch} x {a.seq_len} tokens, loss on "
          f"the last {a.answer_len} | trainable {n_train / 1e6:.3f}M (projector + {len(model.model.trol_gates)} gates) "
          f"of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M | sanity: loss TroL {losses[True]:.4f} != "
          f"backbone {losses[False]:.4f}; grads only on projector + gates (OK)")

    times = {c: [] for c in CONFIGS}
    s0 = None
    for r in range(a.warmup + a.repeats):
        if r == a.warmup:
            gc.collect()
            s0 = cpu_snapshot()
        for ckpt in ((False, True) if r % 2 == 0 else (True, False)):
            for trav in ((True, False) if r % 2 == 0 else (False, True)):
                configure(model, ckpt, trav)
                t0 = time.perf_counter()
                train_step(model, optimizer, batch)
                if r >= a.warmup:
                    times[(ckpt, trav)].append(time.perf_counter() - t0)
    load = other_cpus(s0, cpu_snapshot())

    med = {c: statistics.median(v) * 1e3 for c, v in times.items()}
    print("\n| setting | backbone | TroL | ratio |\n|---|---|---|---|")
    for ckpt in (False, True):
        b, t = med[(ckpt, False)], med[(ckpt, True)]
        print(f"| step time, ms, {name(ckpt)} (median of {a.repeats}) | {b:.1f} | {t:.1f} | {t / b:.3f} |")
    for ckpt in (False, True):
        b, t = mem[(ckpt, False)]["warm"], mem[(ckpt, True)]["warm"]
        print(f"| activation peak, MiB, {name(ckpt)} (peak RSS in step - RSS before; median of 3 warm) | {b:.1f} | "
              f"{t:.1f} | {t / b:.3f} |")
    for ckpt in (False, True):
        b, t = mem[(ckpt, False)]["cold"], mem[(ckpt, True)]["cold"]
        print(f"| activation peak, MiB, {name(ckpt)}, cold (first step: + AdamW state, allocator warmup) | {b:.1f} | "
              f"{t:.1f} | {t / b:.3f} |")
    for ckpt in (False, True):
        b = step_flops(a, False, ckpt)
        t = step_flops(a, True, ckpt)
        print(f"| expected (matmul-FLOP model), {name(ckpt)}: GFLOP per step | {b / 1e9:.2f} | {t / 1e9:.2f} | "
              f"{t / b:.3f} |")
    paired = ", ".join(
        f"{name(ckpt)} {statistics.median(t / b for t, b in zip(times[(ckpt, True)], times[(ckpt, False)])):.3f}"
        for ckpt in (False, True))
    spread = ", ".join(f"{'TroL' if trav else 'backbone'}/{'ckpt' if ckpt else 'no-ckpt'} "
                       f"{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}" for (ckpt, trav), v in times.items())
    print(f"\nOther ratios: median of paired (adjacent-in-time) TroL/backbone ratios: {paired}. Min-max ms: {spread}.")
    ck = {trav: med[(True, trav)] / med[(False, trav)] for trav in (False, True)}
    print(f"Checkpointing costs (time on / off): backbone {ck[False]:.3f}, TroL {ck[True]:.3f}.")
    reset = all(v["reset"] for v in mem.values())
    print("Memory: each configuration alone in a fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536, VmHWM "
          + ("reset to the current RSS before each step via /proc/self/clear_refs" if reset else
             "NOT reset (no /proc/self/clear_refs): earlier peaks may hide later ones") + ".")
    print("Paper reference, Table 4(f) (inference, TroL-1.8B): time 1.3x, VRAM 6 -> 7 GB. Training traverses every "
          "token in both the forward and the (input-gradient) backward through the frozen decoder: expect the ratio "
          "of the FLOP model above, i.e. just under 2x, not 1.3x.")
    busy = max(load0, load) > 0.2
    print(f"CPUs used by other processes: before {load0:.2f}, during the timed loop {load:.2f}"
          + (" -- WARNING: busy machine, timings are inflated and noisy; re-run when idle." if busy
             else " (idle machine)") + f"; loadavg now {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    args = parse_args()
    mem_child(args) if args._mem else main(args, sys.argv[1:])
