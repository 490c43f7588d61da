"""A saved TroL folder as a first-class hub model: remote code in a clean process, dtypes, quantization, device maps,
attention implementations, streaming."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import PIL.Image
import pytest
import torch
from tiny import char_tokenizer, prompt_batch, tiny_model
from transformers import BitsAndBytesConfig, TextIteratorStreamer

from trol import TROL_INTERNLM2_TEMPLATE, TrolForConditionalGeneration, TrolProcessor, trol_clip_image_processor

CLEAN_PROCESS_LOAD = """
import sys
sys.modules["trol"] = None  # this process must not be able to import the repository's package
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
folder, inputs_file, out_file = sys.argv[1:4]
inputs = torch.load(inputs_file)
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert type(config).__name__ == "TrolConfig" and config.model_type == "trol"
results = {}
for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
    model = auto.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "TrolForConditionalGeneration", type(model)
    with torch.no_grad():
        results[auto.__name__] = model(**inputs).logits
    results[auto.__name__ + "_generate"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(base).__name__ == "TrolModel", type(base)
with torch.no_grad():
    results["AutoModel"] = base(**inputs).last_hidden_state
from PIL import Image
from transformers import AutoProcessor, pipeline
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(processor).__name__ == "TrolProcessor"
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
def chat(color, question):
    return [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (40, 30), color)},
                                         {"type": "text", "text": question}]}]
chats = [chat((200, 10, 10), "What is it?"), chat((10, 10, 200), "Which colour is it?")]
single = pipe(text=chats[0], max_new_tokens=4, return_full_text=False)
batched = pipe(text=chats, max_new_tokens=4, return_full_text=False, batch_size=2)
results["pipeline_single"] = single[0]["generated_text"]
results["pipeline_batched"] = [row[0]["generated_text"] for row in batched]
modules = sorted(name for name in sys.modules if name.startswith("transformers_modules") and "modeling_trol" in name)
assert modules, "the model did not come from the folder's remote code"
assert not any(name == "trol" or name.startswith("trol.") for name in sys.modules if sys.modules[name] is not None)
torch.save(results, out_file)
"""


def run_clean_process(script: str, *args, tmp_path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter, in an empty working directory, offline, with its own modules cache."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH"}}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(script), *map(str, args)], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_saved_folder_carries_remote_code_and_a_full_auto_map(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "configuration_trol.py", "modeling_trol.py", "generation_config.json"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_trol.TrolConfig",
        "AutoModel": "modeling_trol.TrolModel",
        "AutoModelForImageTextToText": "modeling_trol.TrolForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_trol.TrolForConditionalGeneration",
    }
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0
    assert generation["suppress_tokens"] == [127]


def test_clean_process_loads_through_auto_classes_and_reproduces_logits(tmp_path):
    model = tiny_model("qwen2")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor = TrolProcessor(trol_clip_image_processor(28), char_tokenizer(), num_image_tokens=4,
                              chat_template=TROL_INTERNLM2_TEMPLATE)
    processor.save_pretrained(folder)
    ids, mask, pixels = prompt_batch((9, 6))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    torch.save(inputs, tmp_path / "inputs.pt")
    run_clean_process(CLEAN_PROCESS_LOAD, folder, tmp_path / "inputs.pt", tmp_path / "out.pt", tmp_path=tmp_path)
    results = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        hidden = model.model(**inputs).last_hidden_state
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for name in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
        torch.testing.assert_close(results[name], logits, rtol=0, atol=1e-6)
        assert torch.equal(results[name + "_generate"], generated)
    torch.testing.assert_close(results["AutoModel"], hidden, rtol=0, atol=1e-6)
    # the pipeline answers as processor + generate do in this process, alone and batched
    chats = [pipeline_chat((200, 10, 10), "What is it?"), pipeline_chat((10, 10, 200), "Which colour is it?")]
    expected = []
    for conversation in chats:
        batch = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt")
        new = model.generate(**batch, max_new_tokens=4)[:, batch["input_ids"].shape[1]:]
        expected.append(processor.post_process_image_text_to_text(new)[0])
    assert results["pipeline_single"] == expected[0]
    assert results["pipeline_batched"] == expected


def pipeline_chat(color, question):
    image = PIL.Image.new("RGB", (40, 30), color)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_loading_keeps_gates_working(tmp_path, dtype):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = TrolForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    ids, mask, pixels = prompt_batch((9, 6))
    out = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 0.15, torch.float16: 0.02}[dtype]
    torch.testing.assert_close(out.logits.float()[real], reference[real], rtol=0, atol=tolerance)
    loaded.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3)


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantizes_only_the_decoder_by_default(tmp_path, bits):
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    if bits == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
        quantized_class = bnb.nn.Linear4bit
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
        quantized_class = bnb.nn.Linear8bitLt
    loaded = TrolForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quantization).eval()
    assert quantization.llm_int8_skip_modules is None  # the caller's config is not mutated
    decoder_linears = [m for n, m in loaded.model.language_model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert decoder_linears and all(isinstance(m, quantized_class) for m in decoder_linears)
    kept = [loaded.lm_head, loaded.model.multi_modal_projector.linear_1, *loaded.model.trol_gates,
            loaded.model.vision_tower.encoder.layers[0].self_attn.q_proj]
    for module in kept:
        assert not isinstance(module, quantized_class) and module.weight.is_floating_point()
    ids, mask, pixels = prompt_batch((9, 6))
    logits = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
    reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    assert (logits[real] - reference[real]).abs().mean() < 0.1  # quantized, yet the same model
    out = loaded.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4, num_beams=2)
    assert out.shape == (2, ids.shape[1] + 4)


def test_device_map_auto_loads_and_keeps_each_gate_with_its_layer(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = TrolForConditionalGeneration.from_pretrained(tmp_path, device_map="auto").eval()
    # one CPU: everything lands on it (a multi-GPU placement needs GPUs; colocate_gates handles it there)
    for gate, layer in zip(loaded.model.trol_gates, loaded.model.language_model.layers):
        assert gate.weight.device == next(layer.parameters()).device
    ids, mask, pixels = prompt_batch((9, 6))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                               model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attn_implementation_at_load(tmp_path, attn_implementation):
    tiny_model("llama").save_pretrained(tmp_path)
    loaded = TrolForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=attn_implementation)
    assert loaded.model.language_model.config._attn_implementation == attn_implementation
    ids, mask, pixels = prompt_batch((9, 6))
    assert torch.isfinite(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits).all()


def test_flash_attention_2_is_declared_and_fails_clearly_without_flash_attn(tmp_path):
    assert TrolForConditionalGeneration._supports_flash_attn
    tiny_model("llama").save_pretrained(tmp_path)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises((ImportError, ValueError), match="(?i)flash"):
            TrolForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    else:  # pragma: no cover - GPU machines
        pytest.skip("flash-attn is installed: exercised on CUDA by bench/gpu_check.py")


class _TokenizerForStreaming:
    """The least a TextIteratorStreamer needs: decode ids to text."""

    def decode(self, ids, **kwargs):
        return "".join(f"<{int(i)}>" for i in ids)


def test_streaming_generation_yields_the_generated_tokens():
    model = tiny_model("llama")
    ids, mask, pixels = prompt_batch((9,))
    streamer = TextIteratorStreamer(_TokenizerForStreaming(), skip_prompt=True)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs={**kwargs, "streamer": streamer})
    thread.start()
    text = "".join(streamer)
    thread.join()
    expected = model.generate(**kwargs)[0, ids.shape[1]:]
    assert text == "".join(f"<{int(i)}>" for i in expected)
