"""GPU checks that the CPU test suite cannot make: bf16 on CUDA, flash_attention_2, 4-bit NF4 on CUDA, and a
device map over several GPUs (each gate next to its layer). Run on a CUDA machine:

    pip install -e ".[test]" && pip install flash-attn --no-build-isolation   # flash-attn optional
    python bench/gpu_check.py

Prints one line per check and exits non-zero if any check fails. Tiny random models, nothing is downloaded.
"""

import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import position_ids_from, prompt_batch, tiny_model
from transformers import BitsAndBytesConfig
from trol import TrolForConditionalGeneration

RESULTS: list[tuple[str, bool, str]] = []
_LAST = [time.perf_counter()]


def check(name: str, ok: bool, detail: str = "") -> None:
    """One result line; [..s] is the wall time since the previous line (GPU work is synchronised before it)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    now = time.perf_counter()
    detail = f"{detail}  [{now - _LAST[0]:.2f}s]".strip()
    _LAST[0] = now
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def guarded(name: str, fn) -> None:
    """Run one section; an exception is one FAIL line (with its traceback) instead of ending the whole run."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        check(name, False, f"raised {type(error).__name__}: {error}")


def cached_equals_uncached(model, ids, mask, pixels) -> float:
    """Max |logit difference| between cached greedy decoding and one no-cache forward with a prompt-only mask."""
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    n_new = out.sequences.shape[1] - ids.shape[1]
    attention = torch.cat([mask, torch.ones(mask.shape[0], n_new, dtype=mask.dtype, device=mask.device)], 1)
    traversal = torch.cat([mask.bool(), torch.zeros(mask.shape[0], n_new, dtype=torch.bool, device=mask.device)], 1)
    reference = model(input_ids=out.sequences, attention_mask=attention, position_ids=position_ids_from(attention),
                      pixel_values=pixels, traversal_mask=traversal, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    return (torch.stack(out.logits, 1).float() - reference.float()).abs().max().item()


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    ids, mask, pixels = (t.cuda() for t in prompt_batch((9, 6)))
    folder = Path(tempfile.mkdtemp()) / "tiny"
    tiny_model("llama").save_pretrained(folder)
    reference = TrolForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()

    implementations = ["eager", "sdpa"]
    try:
        import flash_attn  # noqa: F401

        implementations.append("flash_attention_2")
    except ImportError:
        check("flash_attention_2", False, "flash-attn is not installed (pip install -e '.[flash]')")

    def bf16(implementation):
        model = TrolForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                             attn_implementation=implementation).cuda().eval()
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        error = (logits.float()[real] - expected[real]).abs().max().item()
        check(f"bf16 {implementation}: logits vs fp32", error < 0.1, f"max|d|={error:.3g}")
        error = cached_equals_uncached(model, ids, mask, pixels)
        check(f"bf16 {implementation}: cached == uncached (question mode)", error < 0.1, f"max|d|={error:.3g}")

    for implementation in implementations:
        guarded(f"bf16 {implementation}", lambda impl=implementation: bf16(impl))
    guarded("4-bit NF4 on CUDA", lambda: nf4(folder, ids, mask, pixels, expected, real))
    guarded("device_map cuda:0 + cpu offload", lambda: offload(folder, ids, mask, pixels, expected, real))
    guarded("device_map=auto over GPUs", lambda: several_gpus(folder, ids, mask, pixels, expected, real))
    guarded("image-token LoRA + compression in bf16", lambda: lora_and_compression(ids, mask, pixels, real))
    return 0 if all(ok for _, ok, _ in RESULTS) else 1


def nf4(folder, ids, mask, pixels, expected, real):
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = TrolForConditionalGeneration.from_pretrained(folder, quantization_config=q4, device_map="cuda:0").eval()
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    error = (logits.float()[real] - expected[real]).abs().mean().item()
    check("4-bit NF4 on CUDA: logits close to fp32", error < 0.2, f"mean|d|={error:.3g}")
    generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, num_beams=5)
    check("4-bit NF4 on CUDA: 5-beam generate", generated.shape[1] == ids.shape[1] + 4)


def offload(folder, ids, mask, pixels, expected, real):
    """One-GPU stand-in for a spread model: decoder layer 1 (and its gate) offloaded to CPU through accelerate's hooks
    (weights stream to cuda:0 per call), everything else on cuda:0; fp32, so logits must match the fp32 reference."""
    device_map = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model.embed_tokens": 0,
                  "model.language_model.layers.0": 0, "model.language_model.layers.1": "cpu",
                  "model.language_model.norm": 0, "model.language_model.rotary_emb": 0, "model.trol_gates.0": 0,
                  "model.trol_gates.1": "cpu", "lm_head": 0}
    model = TrolForConditionalGeneration.from_pretrained(folder, device_map=device_map, dtype=torch.float32).eval()
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    error = (logits.float()[real] - expected[real]).abs().max().item()
    check("device_map cuda:0 + cpu offload: logits", error < 1e-4, f"max|d|={error:.3g}")
    error = cached_equals_uncached(model, ids, mask, pixels)
    check("device_map cuda:0 + cpu offload: cached == uncached", error < 1e-4, f"max|d|={error:.3g}")


def lora_and_compression(ids, mask, pixels, real):
    """The two features added for the released checkpoints and LLaVolta, on CUDA in bf16 (sdpa): image-token LoRA
    (random A/B) with compression at inference (K=1, S=2): bf16 vs fp32 logits, and cached == uncached decoding."""
    folder = Path(tempfile.mkdtemp()) / "lora"
    model = tiny_model("llama", image_token_lora_rank=4, compression_layer=1, compression_stride=2,
                       compression_at_inference=True)
    with torch.no_grad():
        for parameter in model.model.image_token_lora.parameters():
            parameter.normal_(0, 0.3)
    model.save_pretrained(folder)
    reference = TrolForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    model = TrolForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    error = (logits.float()[real] - expected[real]).abs().max().item()
    check("image-token LoRA + compression, bf16: logits vs fp32", error < 0.1, f"max|d|={error:.3g}")
    error = cached_equals_uncached(reference, ids, mask, pixels)
    check("image-token LoRA + compression, fp32: cached == uncached", error < 1e-4, f"max|d|={error:.3g}")


def several_gpus(folder, ids, mask, pixels, expected, real):
    if torch.cuda.device_count() > 1:
        model = TrolForConditionalGeneration.from_pretrained(folder, device_map="auto", dtype=torch.float32).eval()
        placed = all(g.weight.device == next(layer.parameters()).device
                     for g, layer in zip(model.model.trol_gates, model.model.language_model.layers))
        check("device_map=auto over GPUs: each gate with its layer", placed, str(model.hf_device_map))
        logits = model(input_ids=ids.cpu(), attention_mask=mask.cpu(), pixel_values=pixels.cpu()).logits
        error = (logits.float().cpu()[real.cpu()] - expected.cpu()[real.cpu()]).abs().max().item()
        check("device_map=auto over GPUs: logits", error < 1e-4, f"max|d|={error:.3g}")
    else:
        print("SKIP  device_map over several GPUs (one GPU)")


if __name__ == "__main__":
    sys.exit(main())
