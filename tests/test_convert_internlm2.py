"""trol-convert for TroL-1.8B/7B: a tiny checkpoint written in the ORIGINAL layout (InternLM2 names, fused per-KV-head
wqkv, partial LoRA on every projection, CLIP under vit.vision_tower, vision_proj, trol_gating.pt with L identical
copies, a sentencepiece tokenizer) is converted, loaded with trust_remote_code, and checked against an independent
plain-torch re-implementation of the original forward written here from TROL.md (sections 1, 2, 4)."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText
from trol.converter import ConversionError, convert, load_shared_gate
from trol.converter.cli import main as convert_main

spm = pytest.importorskip("sentencepiece")

H, HEADS, KV, LAYERS, FFN, RANK = 64, 4, 2, 2, 96, 8
HEAD_DIM = H // HEADS
VH, VHEADS, VLAYERS, PATCH, GRID = 32, 4, 2, 14, 2  # CLIP: 28 px -> 2 x 2 patches (+ CLS)
N_IMG = GRID * GRID
THETA, EPS = 1e6, 1e-5
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is in the image? A red circle and a blue square.",
          "[UNUSED_TOKEN_146]user\nHow many shapes are there?[UNUSED_TOKEN_145]", "1234567890 colours, shapes",
          "assistant\nThere are three shapes: two squares and a triangle."] * 20
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def train_tokenizer(folder):
    (folder / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        user_defined_symbols=[f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)], add_dummy_prefix=False,
        remove_extra_whitespaces=False, minloglevel=2,
    )
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "</s>", "add_bos_token": True, "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}))
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()


def original_state(vocab: int, seed: int = 0) -> dict:
    """Random weights under the released checkpoint's names and layouts (scaled so that activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=gen) * scale

    state = {"model.tok_embeddings.weight": rnd(vocab + 1, H, scale=1.0), "model.norm.weight": 1 + rnd(H, scale=0.1),
             "output.weight": rnd(vocab, H)}
    qkv_out = (HEADS + 2 * KV) * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state[p + "attention_norm.weight"] = 1 + rnd(H, scale=0.1)
        state[p + "ffn_norm.weight"] = 1 + rnd(H, scale=0.1)
        for name, (n_in, n_out) in {"attention.wqkv": (H, qkv_out), "attention.wo": (H, H),
                                    "feed_forward.w1": (H, FFN), "feed_forward.w3": (H, FFN),
                                    "feed_forward.w2": (FFN, H)}.items():
            state[f"{p}{name}.ffn.weight"] = rnd(n_out, n_in)
            state[f"{p}{name}.lora_A.weight"] = rnd(RANK, n_in)
            state[f"{p}{name}.lora_B.weight"] = rnd(n_out, RANK, scale=0.3)
        state[p + "attention.rotary_emb.inv_freq"] = torch.zeros(HEAD_DIM // 2)  # saved by old transformers
    v = "vit.vision_tower.vision_model."
    state[v + "embeddings.class_embedding"] = rnd(VH, scale=0.5)
    state[v + "embeddings.patch_embedding.weight"] = rnd(VH, 3, PATCH, PATCH, scale=0.05)
    state[v + "embeddings.position_embedding.weight"] = rnd(N_IMG + 1, VH, scale=0.5)
    state[v + "embeddings.position_ids"] = torch.arange(N_IMG + 1)[None]
    for name in ("pre_layrnorm", "post_layernorm"):
        state[f"{v}{name}.weight"], state[f"{v}{name}.bias"] = 1 + rnd(VH, scale=0.1), rnd(VH, scale=0.1)
    for i in range(VLAYERS):
        p = f"{v}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{p}self_attn.{name}.weight"], state[f"{p}self_attn.{name}.bias"] = rnd(VH, VH), rnd(VH, scale=.1)
        for name in ("layer_norm1", "layer_norm2"):
            state[f"{p}{name}.weight"], state[f"{p}{name}.bias"] = 1 + rnd(VH, scale=0.1), rnd(VH, scale=0.1)
        state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"] = rnd(2 * VH, VH), rnd(2 * VH, scale=0.1)
        state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = rnd(VH, 2 * VH), rnd(VH, scale=0.1)
    state["vision_proj.0.weight"], state["vision_proj.0.bias"] = rnd(H, VH), rnd(H, scale=0.1)
    state["vision_proj.2.weight"], state["vision_proj.2.bias"] = rnd(H, H), rnd(H, scale=0.1)
    return state


def shared_gate_file(path, seed: int = 1, differ: bool = False):
    gen = torch.Generator().manual_seed(seed)
    weight, bias = (torch.randn(1, H, generator=gen) * 0.3).bfloat16(), torch.tensor([-0.4]).bfloat16()
    gates = {}
    for i in range(LAYERS):
        gates[f"{i}.weight"], gates[f"{i}.bias"] = weight.clone(), bias.clone()
    if differ:
        gates["1.bias"] = torch.tensor([0.7]).bfloat16()
    torch.save(gates, path)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny TroL-1.8B-shaped release folder, in two safetensors shards like the hub's."""
    src = tmp_path_factory.mktemp("original")
    vocab = train_tokenizer(src)
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in original_state(vocab).items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, src / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["TroLForCausalLM"], "model_type": "internlm2", "hidden_size": H, "intermediate_size": FFN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": LAYERS, "rms_norm_eps": EPS,
        "rope_theta": THETA, "max_position_embeddings": 256, "vocab_size": vocab, "bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "image_token_index": vocab,
        "rope_scaling": None, "torch_dtype": "bfloat16"}))
    shared_gate_file(src / "trol_gating.pt")
    return src, vocab


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    src, _ = original
    out = tmp_path_factory.mktemp("converted") / "TroL-tiny"
    convert(src, out, dtype="float32", vision_num_attention_heads=VHEADS, max_shard_size="40KB",
            source_repo="BK-Lee/TroL-1.8B", license="apache-2.0")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: the original TroL-1.8B/7B forward, in plain torch, on the ORIGINAL tensors.
# ---------------------------------------------------------------------------------------------------------------
def rms_norm(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def plora(sd, name, x, im_mask):
    """Partial LoRA: base Linear everywhere, + B(A(x)) (scale 256/256 = 1) only at image tokens."""
    out = x @ sd[name + ".ffn.weight"].T
    delta = (x @ sd[name + ".lora_A.weight"].T) @ sd[name + ".lora_B.weight"].T
    return torch.where(im_mask[..., None], out + delta, out)


def rope(x, positions):
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    freqs = positions[..., None].float() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    half = torch.cat([-x[..., HEAD_DIM // 2:], x[..., : HEAD_DIM // 2]], -1)
    return x * cos + half * sin


def internlm2_layer(sd, i, x, positions, attend, im_mask):
    p = f"model.layers.{i}."
    b, q, _ = x.shape
    h = rms_norm(x, sd[p + "attention_norm.weight"])
    qkv = plora(sd, p + "attention.wqkv", h, im_mask).reshape(b, q, KV, HEADS // KV + 2, HEAD_DIM)
    queries = qkv[:, :, :, : HEADS // KV].reshape(b, q, HEADS, HEAD_DIM).transpose(1, 2)
    keys, values = qkv[:, :, :, -2].transpose(1, 2), qkv[:, :, :, -1].transpose(1, 2)
    queries, keys = rope(queries, positions), rope(keys, positions)
    keys, values = keys.repeat_interleave(HEADS // KV, 1), values.repeat_interleave(HEADS // KV, 1)
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~attend[:, None], float("-inf")).softmax(-1)
    attn = (scores @ values).transpose(1, 2).reshape(b, q, H)
    x = x + plora(sd, p + "attention.wo", attn, im_mask)
    h = rms_norm(x, sd[p + "ffn_norm.weight"])
    gate_up = F.silu(plora(sd, p + "feed_forward.w1", h, im_mask)) * plora(sd, p + "feed_forward.w3", h, im_mask)
    return x + plora(sd, p + "feed_forward.w2", gate_up, im_mask)


def clip_features(sd, pixels):
    v = "vit.vision_tower.vision_model."

    def ln(x, name):
        return F.layer_norm(x, (VH,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    patches = F.conv2d(pixels, sd[v + "embeddings.patch_embedding.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd[v + "embeddings.class_embedding"].expand(pixels.shape[0], 1, VH)
    x = ln(torch.cat([cls, patches], 1) + sd[v + "embeddings.position_embedding.weight"], v + "pre_layrnorm")
    for i in range(VLAYERS):
        p = f"{v}encoder.layers.{i}."

        def lin(t, name, p=p):
            return t @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]

        h = ln(x, p + "layer_norm1")
        b, n, _ = h.shape
        q, k, vv = (lin(h, f"self_attn.{m}").reshape(b, n, VHEADS, -1).transpose(1, 2) for m in ("q_proj", "k_proj",
                                                                                                  "v_proj"))
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(VH // VHEADS)).softmax(-1) @ vv
        x = x + lin(a.transpose(1, 2).reshape(b, n, VH), "self_attn.out_proj")
        h = lin(ln(x, p + "layer_norm2"), "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), "mlp.fc2")  # quick_gelu
    return x[:, 1:]  # last encoder layer, before post_layernorm, CLS dropped


def reference_logits(sd, gate, input_ids, attention_mask, pixels, image_id, traverse):
    """Logits (B, q, V) of the original model; `traverse` (B, q) marks the tokens that traverse (TROL.md 2.1)."""
    x = sd["model.tok_embeddings.weight"][input_ids]
    im_mask = input_ids == image_id
    features = clip_features(sd, pixels)
    features = F.gelu(features @ sd["vision_proj.0.weight"].T + sd["vision_proj.0.bias"])
    features = features @ sd["vision_proj.2.weight"].T + sd["vision_proj.2.bias"]
    x = x.masked_scatter(im_mask[..., None], features.reshape(-1, H))
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    q = input_ids.shape[1]
    attend = torch.tril(torch.ones(q, q, dtype=torch.bool))[None] & attention_mask.bool()[:, None, :]
    attend = attend | torch.eye(q, dtype=torch.bool)[None]  # padded rows attend to themselves (outputs unused)
    for i in range(LAYERS):
        out1 = internlm2_layer(sd, i, x, positions, attend, im_mask)
        out2 = internlm2_layer(sd, i, out1, positions, attend, im_mask)
        w = 0.5 * torch.tanh(out1 @ gate[0].T + gate[1]) + 0.5
        x = torch.where(traverse[..., None], (1 - w) * out1 + w * out2, out1)
    return rms_norm(x, sd["model.norm.weight"]) @ sd["output.weight"].T


def original_tensors(src):
    from safetensors.torch import load_file

    sd = {}
    for file in sorted(src.glob("model-*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(file).items()})
    gates = torch.load(src / "trol_gating.pt", weights_only=True)
    return sd, (gates["0.weight"].float(), gates["0.bias"].float())


def prompts(vocab, image_id):
    """Two left-padded prompts `<s> text <image>x4 text` of different lengths, one image each."""
    gen = torch.Generator().manual_seed(5)
    rows = []
    for length in (11, 8):
        ids = torch.randint(10, vocab, (length,), generator=gen)
        ids[0], ids[2:2 + N_IMG] = 1, image_id
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((2, width), 2)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids):], mask[b, width - len(ids):] = ids, 1
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    pixels = (torch.rand(2, 3, GRID * PATCH, GRID * PATCH, generator=gen) - mean) / 0.27
    return input_ids, mask, pixels


def test_converted_model_matches_the_original_forward_in_prefill_and_cached_greedy_decoding(original, converted):
    src, vocab = original
    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules")  # the folder's own remote code
    assert model.config.image_token_id == vocab and model.config.share_gates
    sd, gate = original_tensors(src)
    input_ids, mask, pixels = prompts(vocab, vocab)

    prefill = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits
    want = reference_logits(sd, gate, input_ids, mask, pixels, vocab, traverse=mask.bool())
    real = mask.bool()
    torch.testing.assert_close(prefill[..., :vocab][real], want[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(prefill[..., vocab], torch.zeros_like(prefill[..., vocab]))  # the <image> row added

    steps = 4
    out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape[1] == input_ids.shape[1] + steps
    assert not (out.sequences[:, input_ids.shape[1]:] == vocab).any()
    prompt_len = input_ids.shape[1]
    for t in range(steps):
        seq = out.sequences[:, : prompt_len + t]
        attention = torch.cat([mask, torch.ones(2, t, dtype=mask.dtype)], 1)
        traverse = torch.cat([mask.bool(), torch.zeros(2, t, dtype=torch.bool)], 1)  # prompt tokens only
        step_want = reference_logits(sd, gate, seq, attention, pixels, vocab, traverse)[:, -1]
        torch.testing.assert_close(out.logits[t][:, :vocab], step_want, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.sequences[:, prompt_len + t], step_want.argmax(-1))


def test_partial_lora_and_traversal_both_matter(original, converted):
    """Guards the parity test against passing vacuously: dropping either feature moves the logits."""
    src, vocab = original
    sd, gate = original_tensors(src)
    input_ids, mask, pixels = prompts(vocab, vocab)
    full = reference_logits(sd, gate, input_ids, mask, pixels, vocab, mask.bool())
    no_traversal = reference_logits(sd, gate, input_ids, mask, pixels, vocab, torch.zeros_like(mask, dtype=bool))
    no_lora = dict(sd)
    for name in sd:
        if "lora_B" in name:
            no_lora[name] = torch.zeros_like(sd[name])
    without_lora = reference_logits(no_lora, gate, input_ids, mask, pixels, vocab, mask.bool())
    real = mask.bool()
    assert (full - no_traversal)[real].abs().max() > 1e-2
    assert (full - without_lora)[real].abs().max() > 1e-2


def test_output_folder_is_a_complete_trol_release(original, converted):
    vocab = original[1]
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_trol.TrolForConditionalGeneration"
    assert config["image_token_lora_rank"] == RANK and config["text_config"]["model_type"] == "llama"
    assert len(list(converted.glob("model-*-of-*.safetensors"))) > 1  # written shard by shard (40KB shards)
    assert not list(converted.glob("*.bin")) and not list(converted.glob("*.pt"))
    for name in ("configuration_trol.py", "modeling_trol.py", "processing_trol.py", "generation_config.json",
                 "chat_template.jinja", "trol_conversion.json"):
        assert (converted / name).exists(), name
    generation = json.loads((converted / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert generation["eos_token_id"] == [2, tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")]
    assert vocab in generation["suppress_tokens"]
    assert tokenizer.convert_tokens_to_ids("<image>") == vocab and tokenizer.pad_token_id == tokenizer.eos_token_id
    marker = json.loads((converted / "trol_conversion.json").read_text())
    assert marker["source_repo"] == "BK-Lee/TroL-1.8B" and marker["license"] == "apache-2.0"


def test_chat_template_reproduces_the_original_prompt(converted):
    from transformers import AutoProcessor
    from trol import TROL_SYSTEM_PROMPT

    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (f"<s>[UNUSED_TOKEN_146]system\n{TROL_SYSTEM_PROMPT}[UNUSED_TOKEN_145]\n"
                    "[UNUSED_TOKEN_146]user\n<image>\nWhat is this?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")


def test_gate_file_must_be_a_plain_state_dict_of_tensors(tmp_path):
    torch.save(torch.nn.Linear(H, 1), tmp_path / "module.pt")  # a pickled module: code, not tensors
    with pytest.raises(ConversionError, match="not a plain state dict of tensors"):
        load_shared_gate(tmp_path / "module.pt", LAYERS)
    torch.save({"0.weight": torch.zeros(1, H), "0.bias": [0.0], "1.weight": torch.zeros(1, H),
                "1.bias": torch.zeros(1)}, tmp_path / "list.pt")
    with pytest.raises(ConversionError, match="state dict of tensors"):
        load_shared_gate(tmp_path / "list.pt", LAYERS)
    torch.save({"0.weight": torch.zeros(1, H), "0.bias": torch.zeros(1)}, tmp_path / "short.pt")
    with pytest.raises(ConversionError, match="one gate per layer"):
        load_shared_gate(tmp_path / "short.pt", LAYERS)
    with pytest.raises(ConversionError, match="missing"):
        load_shared_gate(tmp_path / "absent.pt", LAYERS)


def test_differing_gate_copies_warn_with_the_layers_and_use_layer_zero(tmp_path, caplog):
    shared_gate_file(tmp_path / "g.pt", differ=True)
    with caplog.at_level(logging.WARNING):
        _, bias = load_shared_gate(tmp_path / "g.pt", LAYERS)
    assert "layers [1] differ" in caplog.text
    assert float(bias) == pytest.approx(-0.4, abs=1e-2)


def test_bad_sources_are_refused_with_the_fix(original, tmp_path):
    src, _ = original
    with pytest.raises(ConversionError, match="No model.safetensors"):
        convert(tmp_path, tmp_path / "out")
    not_empty = tmp_path / "full"
    not_empty.mkdir()
    (not_empty / "mine.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not empty"):
        convert(src, not_empty, vision_num_attention_heads=VHEADS)
    assert (not_empty / "mine.txt").read_text() == "keep me"
    assert convert_main([str(src), str(not_empty)]) == 2  # the CLI prints the error and exits 2


def test_cli_converts_a_single_file_source_and_keeps_its_dtype(original, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    src = tmp_path / "single"  # the same release with one model.safetensors instead of shards + index
    shutil.copytree(original[0], src, ignore=shutil.ignore_patterns("model-*", "*.index.json"))
    state = {}
    for file in sorted(original[0].glob("model-*.safetensors")):
        state.update(load_file(file))
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    code = convert_main([str(src), str(tmp_path / "out"), "--vision-num-attention-heads", str(VHEADS)])
    assert code == 0 and "trust_remote_code=True" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["share_gates"] is True  # the source's dtype, no --dtype given
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_converted_folder_publishes_as_a_release_that_loads_in_a_clean_process(converted, tmp_path):
    from trol.hub_upload import publish

    release = publish(converted, "someone/TroL-tiny", dry_run=True, output=tmp_path / "release")
    assert release.validation["model_class"] == "TrolForConditionalGeneration" and release.validation["new_tokens"]
    card = release.card.content
    assert "BK-Lee/TroL-1.8B" in card and "apache-2.0" in card
