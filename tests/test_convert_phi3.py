"""trol-convert for TroL-3.8B: a tiny checkpoint written in the ORIGINAL layout (Phi-3 under `language_model.*` with
fused qkv_proj / gate_up_proj and su-scaled RoPE, InternViT under `vision_model.*` with a fused qkv and layer scale,
`vision_proj.{0,1,3}`, trol_gating.pt with L identical copies, a config.json with `llm_config` / `vision_config`, a
tokenizer.json holding Phi-3's and InternVL's special tokens) is converted, loaded with trust_remote_code, and checked
against an independent plain-torch re-implementation of the original forward written here from the authors' code
(trol/arch_phi3/*, utils/utils.py): prefill logits and cached greedy decoding, with the image tokens and pixel values
that the converted processor makes."""

import json
import math
import string

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast
from trol.converter import ConversionError, convert, detect
from trol.converter import phi3 as phi3_converter
from trol.converter.common import CheckpointSource

H, HEADS, KV, LAYERS, FFN = 64, 4, 2, 2, 96
HEAD_DIM = H // HEADS
VH, VHEADS, VLAYERS, VFFN, PATCH, TILE = 32, 4, 2, 64, 14, 56  # InternViT: 56-px tiles -> 4 x 4 patches (+ CLS)
GRID = TILE // PATCH
TOKENS_PER_TILE = (GRID // 2) ** 2  # pixel shuffle 0.5: 4 x 4 -> 2 x 2 tokens of width 4 * VH
THETA, EPS, VEPS = 10000.0, 1e-5, 1e-6
SLIDING_WINDOW = 262144  # Mini-InternVL-Chat-4B-V1-5's llm_config value
VOCAB = 112  # embedding rows; the tokenizer has 107 tokens (Phi-3's checkpoint is padded likewise)
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
BASE = ["<unk>", "<s>", "</s>"]
ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<img>", "</img>", "<IMG_CONTEXT>"]
IDS = {token: i for i, token in enumerate(BASE + CHARS + ADDED)}
IMAGE_ID, END_ID, EOT_ID = IDS["<IMG_CONTEXT>"], IDS["<|end|>"], IDS["<|endoftext|>"]
SYSTEM = ("You are AI model created by Byung-Kwan Lee, Ph.D. candidate, KAIST EE, of which AI model name is TroL "
          "(Traversal of Layers).") + " " + "You must give helpful, detailed, and polite answers to the user's questions"
QUESTION = "What is in the image?"
N_TILES = 3  # a 2:1 image -> 2 x 1 tiles + the thumbnail
GEN = torch.Generator().manual_seed(0)


def original_prompt(n_tiles: int) -> str:
    """The authors' eval prompt (make_instruction with prompt_rule, '<image>' -> '<img><IMG_CONTEXT></img>', then
    each <IMG_CONTEXT> repeated 256 x tiles; here 4 x tiles)."""
    question = "<image>\n" + QUESTION
    prompt = "\n".join(["<s><|system|>\n" + SYSTEM + "<|end|>", "<|user|>\n" + question + "<|end|>", "<|assistant|>\n"])
    prompt = prompt.replace("<image>", "<img><IMG_CONTEXT></img>")
    return prompt.replace("<IMG_CONTEXT>", "<IMG_CONTEXT>" * (TOKENS_PER_TILE * n_tiles))


def char_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(BASE + CHARS)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(BASE + ADDED)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    assert all(tokenizer.convert_tokens_to_ids(t) == i for t, i in IDS.items())
    return tokenizer


PROMPT_LENGTH = len(char_tokenizer()(original_prompt(N_TILES), add_special_tokens=False).input_ids)
ORIGINAL_MAX = PROMPT_LENGTH + 1  # the 2nd decoding step crosses from the short to the long RoPE factors
MAX_POSITIONS = 4 * ORIGINAL_MAX
SHORT_FACTOR = (1 + torch.rand(HEAD_DIM // 2, generator=GEN)).tolist()
LONG_FACTOR = (2 + 4 * torch.rand(HEAD_DIM // 2, generator=GEN)).tolist()


def source_config() -> dict:
    """config.json shaped like the release: TroLConfig's fields with llm_config (Phi3Config) and vision_config
    (InternVisionConfig) as the authors' classes write them."""
    return {
        "architectures": ["TroLForCausalLM"], "model_type": "trol", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": TILE, "max_dynamic_patch": 6, "min_dynamic_patch": 1,
        "pad2square": False, "ps_version": "v2", "select_layer": -1, "template": "phi3-chat", "use_thumbnail": True,
        "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "float32", "transformers_version": "4.41.2",
        "llm_config": {
            "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_dropout": 0.0, "bos_token_id": 1,
            "embd_pdrop": 0.0, "eos_token_id": EOT_ID, "hidden_act": "silu", "hidden_size": H,
            "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": MAX_POSITIONS,
            "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV,
            "original_max_position_embeddings": ORIGINAL_MAX, "pad_token_id": EOT_ID, "resid_pdrop": 0.0,
            "rms_norm_eps": EPS, "rope_theta": THETA, "sliding_window": SLIDING_WINDOW, "tie_word_embeddings": False,
            "rope_scaling": {"type": "su", "short_factor": SHORT_FACTOR, "long_factor": LONG_FACTOR},
            "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": VOCAB,
        },
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "attention_dropout": 0.0,
            "drop_path_rate": 0.1, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": VH, "image_size": TILE,
            "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": VFFN, "layer_norm_eps": VEPS,
            "norm_type": "layer_norm", "num_attention_heads": VHEADS, "num_channels": 3, "num_hidden_layers": VLAYERS,
            "patch_size": PATCH, "qk_normalization": False, "qkv_bias": True, "use_flash_attn": True,
        },
    }


def original_state(seed: int = 0) -> dict:
    """Random weights under the released checkpoint's names and layouts (scaled so that activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        return torch.randn(*shape, generator=gen) * (scale if scale is not None else 1 / math.sqrt(shape[-1]))

    llm = "language_model.model."
    state = {llm + "embed_tokens.weight": rnd(VOCAB, H, scale=1.0), llm + "norm.weight": 1 + rnd(H, scale=0.1),
             "language_model.lm_head.weight": rnd(VOCAB, H)}
    for i in range(LAYERS):
        p = f"{llm}layers.{i}."
        state |= {p + "self_attn.qkv_proj.weight": rnd((HEADS + 2 * KV) * HEAD_DIM, H),
                  p + "self_attn.o_proj.weight": rnd(H, H), p + "mlp.gate_up_proj.weight": rnd(2 * FFN, H),
                  p + "mlp.down_proj.weight": rnd(H, FFN), p + "input_layernorm.weight": 1 + rnd(H, scale=0.1),
                  p + "post_attention_layernorm.weight": 1 + rnd(H, scale=0.1)}
    v = "vision_model."
    state |= {v + "embeddings.class_embedding": rnd(1, 1, VH, scale=1.0),
              v + "embeddings.position_embedding": rnd(1, GRID * GRID + 1, VH, scale=0.5),
              v + "embeddings.patch_embedding.weight": rnd(VH, 3, PATCH, PATCH, scale=1 / math.sqrt(3 * PATCH**2)),
              v + "embeddings.patch_embedding.bias": rnd(VH, scale=0.1)}
    for j in range(VLAYERS):
        p = f"{v}encoder.layers.{j}."
        state |= {p + "attn.qkv.weight": rnd(3 * VH, VH), p + "attn.qkv.bias": rnd(3 * VH, scale=0.1),
                  p + "attn.proj.weight": rnd(VH, VH), p + "attn.proj.bias": rnd(VH, scale=0.1),
                  p + "mlp.fc1.weight": rnd(VFFN, VH), p + "mlp.fc1.bias": rnd(VFFN, scale=0.1),
                  p + "mlp.fc2.weight": rnd(VH, VFFN), p + "mlp.fc2.bias": rnd(VH, scale=0.1),
                  p + "ls1": 0.5 + rnd(VH, scale=0.2), p + "ls2": 0.5 + rnd(VH, scale=0.2)}
        for norm in ("norm1", "norm2"):
            state |= {f"{p}{norm}.weight": 1 + rnd(VH, scale=0.1), f"{p}{norm}.bias": rnd(VH, scale=0.1)}
    state |= {"vision_proj.0.weight": 1 + rnd(4 * VH, scale=0.1), "vision_proj.0.bias": rnd(4 * VH, scale=0.1),
              "vision_proj.1.weight": rnd(H, 4 * VH), "vision_proj.1.bias": rnd(H, scale=0.1),
              "vision_proj.3.weight": rnd(H, H), "vision_proj.3.bias": rnd(H, scale=0.1)}
    return state


def shared_gate(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, generator=gen) * 0.1, torch.randn(1, generator=gen) * 0.3


def write_source(folder, state: dict, config: dict | None = None, gate=True) -> None:
    """The hub repo's files: two safetensors shards + index (LLM | vision and projector), config.json,
    trol_gating.pt (the state dict of ModuleList([Linear(H, 1)] * L): L keys sharing one weight and one bias),
    tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = {"model-00001-of-00002.safetensors": {k: t for k, t in state.items() if k.startswith("language_model")},
              "model-00002-of-00002.safetensors": {k: t for k, t in state.items() if not k.startswith("language")}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or source_config(), indent=2))
    if gate:
        weight, bias = shared_gate()
        torch.save({f"{i}.{part}": t for i in range(LAYERS) for part, t in (("weight", weight), ("bias", bias))},
                   folder / "trol_gating.pt")
    char_tokenizer().save_pretrained(folder)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    src = tmp_path_factory.mktemp("TroL-3.8B-original")
    state = original_state()
    write_source(src, state)
    return src, state


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "TroL-3.8B"
    return convert(original[0], out, arch="phi3", dtype="float32")


# ----------------------------------------------------------------------------------------------------------------
# The original TroL-3.8B forward, re-implemented from the authors' code (facts, not their code).
# ----------------------------------------------------------------------------------------------------------------
def original_pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """utils.pixel_shuffle(x, 0.5) of the authors, as the sequence of views they wrote: (n, w, h, c) -> ..."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3)
    x = x.reshape(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3)  # the final transpose ("v2")
    return x


def pixel_shuffle_by_index(x: torch.Tensor) -> torch.Tensor:
    """The same in closed form: token (i, j) of the 2x-smaller grid = [x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j],
    x[2i+1, 2j+1]] along channels (n, g, g, C) -> (n, (g/2)^2, 4C), row-major tokens."""
    blocks = [x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]]
    return torch.cat(blocks, dim=-1).reshape(x.shape[0], -1, 4 * x.shape[-1])


def intern_vit(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternVisionModel(...).last_hidden_state: (n, 3, S, S) -> (n, 1 + g*g, VH). No final norm."""
    v = "vision_model."
    x = F.conv2d(pixels, sd[v + "embeddings.patch_embedding.weight"], sd[v + "embeddings.patch_embedding.bias"],
                 stride=PATCH)
    n, _, gh, gw = x.shape
    x = torch.cat([sd[v + "embeddings.class_embedding"].expand(n, 1, VH), x.flatten(2).transpose(1, 2)], dim=1)
    pos = sd[v + "embeddings.position_embedding"]
    stored = math.isqrt(pos.shape[1] - 1)  # the original interpolates the patch positions on every call
    grid_pos = pos[:, 1:].reshape(1, stored, stored, VH).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    x = x + torch.cat([pos[:, :1], grid_pos.reshape(1, VH, gh * gw).transpose(1, 2)], dim=1)
    for j in range(VLAYERS):
        p = f"{v}encoder.layers.{j}."
        h = F.layer_norm(x, (VH,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], VEPS)
        qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(n, -1, 3, VHEADS, VH // VHEADS)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * (VH // VHEADS) ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ val).transpose(1, 2).reshape(n, -1, VH) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + out * sd[p + "ls1"]
        h = F.layer_norm(x, (VH,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], VEPS)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
        x = x + (h + sd[p + "mlp.fc2.bias"]) * sd[p + "ls2"]
    return x


def image_features(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """extract_feature + vision_proj: (n_tiles, 3, S, S) -> (n_tiles * 4, H)."""
    tokens = intern_vit(sd, pixels)[:, 1:]  # CLS dropped
    features = pixel_shuffle_by_index(tokens.reshape(tokens.shape[0], GRID, GRID, VH))
    h = F.layer_norm(features, (4 * VH,), sd["vision_proj.0.weight"], sd["vision_proj.0.bias"], 1e-5)
    h = F.gelu(h @ sd["vision_proj.1.weight"].T + sd["vision_proj.1.bias"])
    return (h @ sd["vision_proj.3.weight"].T + sd["vision_proj.3.bias"]).reshape(-1, H)


def su_rope(positions: torch.Tensor):
    """Phi3SuScaledRotaryEmbedding: short factors up to original_max positions, long beyond (decided on the largest
    position of the call); cos/sin scaled by sqrt(1 + ln(max/original_max) / ln(original_max))."""
    factors = torch.tensor(LONG_FACTOR if int(positions.max()) + 1 > ORIGINAL_MAX else SHORT_FACTOR)
    inv_freq = 1.0 / (factors * THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = math.sqrt(1 + math.log(MAX_POSITIONS / ORIGINAL_MAX) / math.log(ORIGINAL_MAX))
    return emb.cos() * scale, emb.sin() * scale


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rms_norm(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def phi3_layer(sd: dict, i: int, x: torch.Tensor, positions: torch.Tensor, past):
    """One Phi-3 decoder layer on a chunk x (T, H) at `positions`, after the cached (k, v) `past` (or None).
    Returns (output, this chunk's (k, v))."""
    p = f"language_model.model.layers.{i}."
    q, k, v = (rms_norm(x, sd[p + "input_layernorm.weight"]) @ sd[p + "self_attn.qkv_proj.weight"].T).split(
        [HEADS * HEAD_DIM, KV * HEAD_DIM, KV * HEAD_DIM], dim=-1)
    cos, sin = su_rope(positions)
    q = rotate(q.reshape(-1, HEADS, HEAD_DIM).transpose(0, 1), cos, sin)
    k = rotate(k.reshape(-1, KV, HEAD_DIM).transpose(0, 1), cos, sin)
    v = v.reshape(-1, KV, HEAD_DIM).transpose(0, 1)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
    keys, values = keys.repeat_interleave(HEADS // KV, 0), values.repeat_interleave(HEADS // KV, 0)
    scores = q @ keys.transpose(1, 2) / math.sqrt(HEAD_DIM)
    key_positions = torch.arange(keys.shape[1])
    scores = scores.masked_fill(key_positions[None, None, :] > positions[None, :, None], float("-inf"))
    attn = (torch.softmax(scores, dim=-1) @ values).transpose(0, 1).reshape(-1, HEADS * HEAD_DIM)
    x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
    gate, up = (rms_norm(x, sd[p + "post_attention_layernorm.weight"]) @ sd[p + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
    return x + (up * F.silu(gate)) @ sd[p + "mlp.down_proj.weight"].T, (k, v)


def original_forward(sd: dict, gate, x: torch.Tensor, cache: list, traverse: bool = True):
    """Phi3Model.forward of the authors on a chunk x (T, H) of embeddings after `cache` (updated in place): a chunk
    of more than one token traverses every layer (pass 2 without the cache, pass 1's K/V kept), a single token takes
    one pass. Returns logits (T, V)."""
    cached = bool(cache)
    past = cache[0][0].shape[1] if cached else 0
    positions = torch.arange(past, past + x.shape[0])
    for i in range(LAYERS):
        out1, kv = phi3_layer(sd, i, x, positions, cache[i] if cached else None)
        if x.shape[0] > 1 and traverse:
            out2, _ = phi3_layer(sd, i, out1, positions, None)
            w = 0.5 * torch.tanh(out1 @ gate[0].T + gate[1]) + 0.5
            x = out1 * (1 - w) + out2 * w
        else:
            x = out1
        if not cached:
            cache.append(kv)
        else:
            cache[i] = (torch.cat([cache[i][0], kv[0]], 1), torch.cat([cache[i][1], kv[1]], 1))
    return rms_norm(x, sd["language_model.model.norm.weight"]) @ sd["language_model.lm_head.weight"].T


def original_generate(sd, gate, input_ids, pixels, steps: int, banned: list[int]):
    """Prefill (image features scattered into the <IMG_CONTEXT> positions) + greedy cached decoding."""
    embeds = sd["language_model.model.embed_tokens.weight"][input_ids].clone()
    embeds[input_ids == IMAGE_ID] = image_features(sd, pixels)
    cache, logits = [], []
    step_logits = original_forward(sd, gate, embeds, cache)
    prefill, tokens = step_logits, []
    for _ in range(steps):
        logits.append(step_logits[-1])
        choice = step_logits[-1].clone()
        choice[banned] = float("-inf")
        tokens.append(int(choice.argmax()))
        step_logits = original_forward(sd, gate, sd["language_model.model.embed_tokens.weight"][tokens[-1:]], cache)
    return prefill, torch.stack(logits), tokens


def chat_inputs(processor):
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (TILE, 2 * TILE, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, processor(images=[image], text=text, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
def test_pixel_shuffle_reference_is_the_authors_view_sequence():
    x = torch.randn(3, GRID, GRID, 5)
    expected = original_pixel_shuffle(x).reshape(3, -1, 20)
    torch.testing.assert_close(pixel_shuffle_by_index(x), expected, rtol=0, atol=0)


def test_converted_model_matches_the_original_forward_in_prefill_and_cached_greedy_decoding(original, converted):
    _, sd = original
    gate = shared_gate()
    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    _, inputs = chat_inputs(processor)
    input_ids = inputs["input_ids"]
    assert input_ids.shape == (1, PROMPT_LENGTH) and int((input_ids == IMAGE_ID).sum()) == TOKENS_PER_TILE * N_TILES
    steps = 4
    banned = [IMAGE_ID, *model.generation_config.eos_token_id]  # suppressed image token; eos held off by min length
    ref_prefill, ref_logits, ref_tokens = original_generate(sd, gate, input_ids[0], inputs["pixel_values"], steps,
                                                            banned)
    with torch.no_grad():
        prefill = model(**inputs).logits[0]
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(prefill, ref_prefill, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(out.logits), ref_logits, rtol=1e-5, atol=1e-5)
    assert out.sequences[0, PROMPT_LENGTH:].tolist() == ref_tokens

    # The comparison has teeth: the shared gate mixes noticeably, and without traversal the logits move.
    embeds = sd["language_model.model.embed_tokens.weight"][input_ids[0]].clone()
    embeds[input_ids[0] == IMAGE_ID] = image_features(sd, inputs["pixel_values"])
    assert (ref_prefill - original_forward(sd, gate, embeds, [], traverse=False)).abs().max() > 0.1
    model.config.use_traversal = False
    with torch.no_grad():
        assert (model(**inputs).logits[0] - ref_prefill).abs().max() > 0.1


def test_processor_writes_the_original_prompt_and_tiles(converted):
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    text, inputs = chat_inputs(processor)
    assert text == "\n".join(["<s><|system|>\n" + SYSTEM + "<|end|>", "<|user|>\n<image>\n" + QUESTION + "<|end|>",
                              "<|assistant|>\n"])
    expected = char_tokenizer()(original_prompt(N_TILES), add_special_tokens=False).input_ids
    assert inputs["input_ids"][0].tolist() == expected
    assert tuple(inputs["pixel_values"].shape) == (N_TILES, 3, TILE, TILE)


def test_output_folder_is_a_complete_trol_release(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "trol" and config["auto_map"]["AutoModelForImageTextToText"]
    assert config["image_token_id"] == IMAGE_ID and config["share_gates"] and config["projector_layernorm"]
    assert config["downsample_ratio"] == 0.5 and config["vision_feature_select_strategy"] == "default"
    assert config["vision_config"]["model_type"] == "internvl_vision" and config["vision_config"]["use_mean_pooling"]
    text = config["text_config"]
    assert text["model_type"] == "phi3" and text["sliding_window"] == SLIDING_WINDOW + 1  # flash-attn's (w, w)
    rope = text["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["short_factor"] == SHORT_FACTOR
    assert rope["original_max_position_embeddings"] == ORIGINAL_MAX
    assert rope["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(ORIGINAL_MAX)))
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [END_ID, IDS["</s>"], EOT_ID]
    assert generation["suppress_tokens"] == [IMAGE_ID]
    marker = json.loads((converted / "trol_conversion.json").read_text())
    assert marker["source_repo"] == "BK-Lee/TroL-3.8B" and "trol_gating.pt" in marker["notes"]
    for name in ("configuration_trol.py", "modeling_trol.py", "processing_trol.py", "tokenizer.json"):
        assert (converted / name).is_file()


def test_detection_tells_trol_3_8b_from_other_layouts(original, tmp_path):
    src, _ = original
    source = CheckpointSource(src)
    assert phi3_converter.matches(source, source_config())
    assert detect(source, source_config()) == "phi3"
    other = tmp_path / "internlm2"
    other.mkdir()
    internlm2 = {"model.tok_embeddings.weight": torch.zeros(2, 2), "output.weight": torch.zeros(1, 2)}
    save_file(internlm2, other / "model-00001-of-00001.safetensors")
    (other / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(internlm2, "model-00001-of-00001.safetensors")}))
    assert not phi3_converter.matches(CheckpointSource(other), {})
    llava_like = {**source_config(), "llm_config": {"model_type": "llama"}}
    assert not phi3_converter.matches(source, llava_like)


def _without(state: dict, name: str) -> dict:
    return {k: v for k, v in state.items() if k != name}


@pytest.mark.parametrize("case, expected", [
    ("missing tensor", "lacks 1 tensors.*vision_model.encoder.layers.1.attn.qkv.weight"),
    ("missing gate file", "trol_gating.pt is missing"),
    ("layer count", "gives the decoder 3 layers but the checkpoint holds 2"),
    ("no llm_config", "has no `llm_config` section"),
    ("wrong heads", "llm_config .* is no valid Phi-3 config: .*short_factor field must have length 16"),
])
def test_bad_sources_are_refused_before_anything_is_written(original, tmp_path, case, expected):
    state, config, gate = original[1], source_config(), True
    if case == "missing tensor":
        state = _without(state, "vision_model.encoder.layers.1.attn.qkv.weight")
    elif case == "missing gate file":
        gate = False
    elif case == "layer count":
        config["llm_config"]["num_hidden_layers"] = 3
    elif case == "no llm_config":
        del config["llm_config"]
    else:
        config["llm_config"]["num_attention_heads"] = 2
    src, out = tmp_path / "src", tmp_path / "out"
    write_source(src, state, config, gate)
    with pytest.raises(ConversionError, match=expected):
        convert(src, out, arch="phi3")
    assert not out.exists()


def test_head_counts_can_be_overridden_and_unknown_options_are_refused(original, tmp_path):
    config = source_config()
    del config["llm_config"]["num_key_value_heads"]  # the authors' default: as many KV heads as heads (wrong here)
    src = tmp_path / "src"
    write_source(src, original[1], config)
    with pytest.raises(ConversionError, match="qkv_proj has 128 rows"):
        convert(src, tmp_path / "a", arch="phi3")
    out = convert(src, tmp_path / "b", arch="phi3", dtype="float32", num_key_value_heads=KV)
    assert json.loads((out / "config.json").read_text())["text_config"]["num_key_value_heads"] == KV
    with pytest.raises(ConversionError, match="does not know the options"):
        convert(src, tmp_path / "c", arch="phi3", num_heads=4)


def test_force_image_size_interpolates_the_position_embeddings_once_as_the_original_did_per_call(tmp_path):
    """A tower pretrained at 42 px (3 x 3 positions) run at force_image_size=56: the original interpolates the
    positions bicubically on every call; the converted tower stores them interpolated."""
    config, state, gen = source_config(), original_state(), torch.Generator().manual_seed(2)
    config["vision_config"]["image_size"] = 42
    state["vision_model.embeddings.position_embedding"] = torch.randn(1, 3 * 3 + 1, VH, generator=gen) * 0.5
    write_source(tmp_path / "src", state, config)
    out = convert(tmp_path / "src", tmp_path / "out", arch="phi3", dtype="float32")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    pixels = torch.randn(2, 3, TILE, TILE, generator=gen)
    with torch.no_grad():
        features = model.get_image_features(pixels)
    assert list(model.config.vision_config.image_size) == [TILE, TILE]
    torch.testing.assert_close(features.reshape(-1, H), image_features(state, pixels), rtol=1e-5, atol=1e-5)


def test_gate_copies_inside_the_checkpoint_are_consumed_and_the_gate_file_wins(original, tmp_path, caplog):
    """Had the authors saved the model with its `language_model.model.trol_gating` ModuleList, the checkpoint would
    hold L copies of the gate; their loader overwrites them with trol_gating.pt, and so does the converter."""
    weight, bias = shared_gate()
    state = dict(original[1])
    for i in range(LAYERS):
        state[f"language_model.model.trol_gating.{i}.weight"] = weight + (0.5 if i == 1 else 0.0)
        state[f"language_model.model.trol_gating.{i}.bias"] = bias.clone()
    write_source(tmp_path / "src", state)
    with caplog.at_level("WARNING"):
        out = convert(tmp_path / "src", tmp_path / "out", arch="phi3", dtype="float32")
    assert "language_model.model.trol_gating.1.weight" in caplog.text and "trol_gating.pt" in caplog.text
    converted = load_file(out / "model.safetensors")
    torch.testing.assert_close(converted["model.trol_gates.0.weight"], weight, rtol=0, atol=0)
    assert not any("trol_gating" in name for name in converted)
