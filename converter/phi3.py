"""TroL-3.8B (InternVL-1.5-mini style) -> TroL folder with transformers' own InternVL vision model and Phi-3.

The released checkpoint (TROL.md section 4; authors' code `trol/arch_phi3/`) holds InternViT-300M-448px, a
LayerNorm-MLP projector and Phi-3-mini whose decoder owns the TroL gates. Key mapping (i: decoder layer, j: vision
layer, C: vision width, r: downsample ratio):

    language_model.model.embed_tokens.weight             -> model.language_model.embed_tokens.weight
    language_model.model.layers.{i}.self_attn.qkv_proj   -> model.language_model.layers.{i}.self_attn.qkv_proj
        (same fused layout in both: rows [q heads | k heads | v heads])
    language_model.model.layers.{i}.self_attn.o_proj     -> ....self_attn.o_proj
    language_model.model.layers.{i}.mlp.gate_up_proj     -> ....mlp.gate_up_proj  (rows [gate | up] in both)
    language_model.model.layers.{i}.mlp.down_proj        -> ....mlp.down_proj
    language_model.model.layers.{i}.input_layernorm      -> ....input_layernorm
    language_model.model.layers.{i}.post_attention_layernorm -> ....post_attention_layernorm
    language_model.model.norm.weight                     -> model.language_model.norm.weight
    language_model.lm_head.weight                        -> lm_head.weight
    vision_model.embeddings.class_embedding [1, 1, C]    -> model.vision_tower.embeddings.cls_token
    vision_model.embeddings.position_embedding [1, 1+n, C] -> model.vision_tower.embeddings.position_embeddings
    vision_model.embeddings.patch_embedding.{weight,bias} -> model.vision_tower.embeddings.patch_embeddings.projection
    vision_model.encoder.layers.{j}.attn.qkv.{weight,bias} [3C, ...] -> model.vision_tower.encoder.layer.{j}.attention
        .{q,k,v}_proj (rows [0:C], [C:2C], [2C:3C]: the original reshapes the output to (3, heads, head_dim))
    vision_model.encoder.layers.{j}.attn.proj            -> ....attention.projection_layer
    vision_model.encoder.layers.{j}.attn.{q,k}_norm      -> ....attention.{q,k}_norm  (only with qk_normalization)
    vision_model.encoder.layers.{j}.mlp.fc1 / fc2        -> ....mlp.fc1 / fc2
    vision_model.encoder.layers.{j}.norm1 / norm2        -> ....layernorm_before / layernorm_after
    vision_model.encoder.layers.{j}.ls1 / ls2            -> ....lambda_1 / lambda_2  (layer scale)
    vision_proj.0 (LayerNorm C/r^2)                      -> model.multi_modal_projector.layer_norm
    vision_proj.1 (Linear C/r^2 -> H)                    -> model.multi_modal_projector.linear_1
    vision_proj.3 (Linear H -> H; .2 is the GELU)        -> model.multi_modal_projector.linear_2
    trol_gating.pt {i}.weight/{i}.bias (one shared gate, L copies) -> model.trol_gates.0.*  (share_gates=True)
    language_model.model.trol_gating.{i}.* (if a checkpoint holds them) -> compared with trol_gating.pt, dropped:
        the authors' loader overwrites them with that file

config.json is the authors' TroLConfig: `llm_config` (their Phi3Config fields, incl. `rope_scaling`,
`sliding_window`), `vision_config` (their InternVisionConfig fields: `qkv_bias`, `qk_normalization`, `norm_type`,
`initializer_factor` = layer-scale init, ...), `downsample_ratio`, `force_image_size`, and fields their forward does
not read (`select_layer`, `ps_version`, `max_dynamic_patch`, `template`, ...). Fields it omits take the authors' class
defaults (InternViT-6B's for the vision tower!), not transformers' ones.

What the authors' forward does, and how the TroL config reproduces it:
- Vision features: the InternViT `last_hidden_state` (it has no final norm; `select_layer` in config.json is not
  read by the feature path) without the CLS token, pixel-shuffled with InternVL's shuffle *including* its final
  transpose (`utils/utils.py`, whatever `ps_version` says) -> `vision_feature_layer=-1`,
  `vision_feature_select_strategy="default"`, `downsample_ratio`, and no post-layernorm (`use_mean_pooling=True`
  makes transformers' final norm an Identity).
- Position embeddings are interpolated (bicubic) on the fly to the input grid; at the stored grid that is the
  identity. With `force_image_size` != the tower's `image_size` they are interpolated here once, the same way.
- Phi-3 RoPE: `rope_scaling` type "su" (Phi-3-mini-128k) or "yarn" becomes transformers' "longrope" with the
  attention factor the original used (su: sqrt(1 + ln s / ln L0), yarn: 0.1 ln s + 1, s = max / original max
  positions); the short/long factor switch on the largest position id is the same in both. (rope_parameters are
  written out in full: transformers 5.23's own legacy "su" path fails for lack of original_max_position_embeddings.)
- Sliding window: the original always runs flash-attn with window_size=(w, w), i.e. w + 1 visible keys; transformers'
  `sliding_window` counts visible keys, so it is set to w + 1.
- Tiles: the tower's input size (`force_image_size` or `vision_config.image_size`; 448 for the release, which the
  authors' preprocessing also hard-codes), 1..6 tiles + a thumbnail (`max_tiles` option).
- Image tokens: `<img>` + `<IMG_CONTEXT>` x (256 per tile) + `</img>`; `image_token_id` = the id of
  `<IMG_CONTEXT>` (the original sets `config.image_token_index` from the tokenizer at load time).
- Traversal: the original traverses every layer twice when a call holds more than one token (the prompt) and once
  while decoding token by token, with w = 0.5 * tanh(gate(out1)) + 0.5 from ONE gate shared by every layer
  (`ModuleList([Linear(H, 1)] * L)` inside the Phi-3 model, filled from trol_gating.pt after loading).
- Generation stops at `<|end|>` (the answers end with it; the original cuts outputs there) and at the tokenizer's
  and Phi-3's own eos.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import InternVLVisionConfig, Phi3Config

from ..configuration_trol import TrolConfig
from ..modeling_trol import interpolate_position_embeddings
from ..processing_trol import TROL_PHI3_TEMPLATE, TrolProcessor, trol_internvl_image_processor
from .common import GATING_FILE, CheckpointSource, ConversionError, Plan, iter_layers, load_shared_gate
from .tokenizer import load_source_tokenizer

logger = logging.getLogger(__name__)

NAME = "phi3"
SOURCE_REPO = "BK-Lee/TroL-3.8B"
LLM = "language_model."
VISION = "vision_model."
IMAGE_TOKEN = "<image>"  # what the chat template writes; the processor expands it
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_START_TOKEN, IMAGE_END_TOKEN = "<img>", "</img>"
END_OF_TURN = "<|end|>"
PHI3_EOS = "<|endoftext|>"
MAX_TILES = 6  # the authors' dynamic_preprocess default (config.json's max_dynamic_patch is not read by it)
SKIPPED_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")  # recomputed by the target model
OPTIONS = ("num_attention_heads", "num_key_value_heads", "vision_num_attention_heads", "max_tiles")

# Defaults of the authors' config classes (configuration_intern_vit.py / configuration_phi3.py) for fields a
# config.json may leave out: the original model would have used these, not transformers' defaults.
ORIGINAL_VISION_DEFAULTS = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "dropout": 0.0, "attention_dropout": 0.0,
    "initializer_range": 0.02, "initializer_factor": 0.1,
}
ORIGINAL_TEXT_DEFAULTS = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    "attention_dropout": 0.0, "hidden_act": "silu", "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "bos_token_id": 1,
    "eos_token_id": 32000, "pad_token_id": 32000, "sliding_window": None,
}

TEXT_RENAMES = {  # under language_model.model.layers.{i}. -> under model.language_model.layers.{i}.
    name: name for name in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                            "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
}
VISION_RENAMES = {  # under vision_model.encoder.layers.{j}. -> under model.vision_tower.encoder.layer.{j}.
    "attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm", "attn.k_norm": "attention.k_norm",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "norm1": "layernorm_before", "norm2": "layernorm_after",
}
PROJECTOR = {0: "layer_norm", 1: "linear_1", 3: "linear_2"}  # vision_proj.{k} -> model.multi_modal_projector.*


def matches(source: CheckpointSource, src_config: dict) -> bool:
    """TroL-3.8B: a Phi-3 LLM (fused qkv_proj) under language_model.*, an InternViT under vision_model.*."""
    llm = src_config.get("llm_config")
    if isinstance(llm, dict) and llm.get("model_type", "phi3") != "phi3":
        return False
    return all(name in source for name in (
        f"{LLM}model.embed_tokens.weight", f"{LLM}model.layers.0.self_attn.qkv_proj.weight",
        f"{VISION}embeddings.class_embedding", "vision_proj.1.weight"))


def _sub_config(src: Path, src_config: dict, key: str) -> dict:
    value = src_config.get(key)
    if not isinstance(value, dict):
        raise ConversionError(
            f"{src / 'config.json'} has no `{key}` section. TroL-3.8B's config.json holds `llm_config` (Phi-3) and "
            "`vision_config` (InternViT); the RoPE scaling and head counts cannot be read from the weights. "
            "Download the repo's config.json with its weights."
        )
    return dict(value)


def _rope_parameters(llm: dict) -> dict:
    """The original Phi-3 RoPE (plain, or su/yarn-scaled with short/long factors) as transformers' rope_parameters."""
    theta = float(llm["rope_theta"])
    scaling = llm.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("su", "yarn", "longrope"):
        raise ConversionError(f"llm_config.rope_scaling has type {kind!r}; the authors' Phi-3 knows only 'su' and "
                              "'yarn' (LongRoPE with short/long factors).")
    original, longest = int(llm["original_max_position_embeddings"]), int(llm["max_position_embeddings"])
    scale = longest / original
    if scale <= 1.0:
        attention_factor = 1.0
    elif kind == "yarn":
        attention_factor = 0.1 * math.log(scale) + 1.0
    else:
        attention_factor = math.sqrt(1 + math.log(scale) / math.log(original))
    attention_factor = float(scaling.get("attention_factor", attention_factor))
    # `factor` only feeds transformers' default attention factor, which is given explicitly here.
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]), "factor": scale,
            "original_max_position_embeddings": original, "attention_factor": attention_factor}


def build_text_config(llm: dict, *, num_attention_heads: int | None = None,
                      num_key_value_heads: int | None = None) -> Phi3Config:
    """Phi3Config from config.json's llm_config (the authors' Phi3Config fields, their defaults where omitted)."""
    llm = {**ORIGINAL_TEXT_DEFAULTS, **llm}
    llm["num_attention_heads"] = num_attention_heads or llm["num_attention_heads"]
    llm["num_key_value_heads"] = num_key_value_heads or llm["num_key_value_heads"] or llm["num_attention_heads"]
    window = llm["sliding_window"]
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act",
              "max_position_embeddings", "original_max_position_embeddings", "initializer_range", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    return Phi3Config(**{name: llm[name] for name in fields}, rope_parameters=_rope_parameters(llm),
                      sliding_window=None if window is None else int(window) + 1)


def build_vision_config(vision: dict, image_size: int, *,
                        vision_num_attention_heads: int | None = None) -> InternVLVisionConfig:
    """InternVLVisionConfig from config.json's vision_config (InternViT field names, the authors' defaults)."""
    vision = {**ORIGINAL_VISION_DEFAULTS, **vision}
    if vision["norm_type"] not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"vision_config.norm_type={vision['norm_type']!r} is neither layer_norm nor rms_norm.")
    if vision["qk_normalization"] and float(vision["layer_norm_eps"]) != 1e-6:
        raise ConversionError(f"InternViT with qk_normalization and layer_norm_eps={vision['layer_norm_eps']}: "
                              "transformers' InternVL q/k norms use eps 1e-6; this tower cannot be expressed.")
    patch = vision["patch_size"]
    return InternVLVisionConfig(
        hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision_num_attention_heads or vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"], hidden_act=vision["hidden_act"],
        attention_bias=bool(vision["qkv_bias"]), use_qk_norm=bool(vision["qk_normalization"]),
        norm_type=vision["norm_type"], layer_norm_eps=float(vision["layer_norm_eps"]),
        attention_dropout=float(vision["attention_dropout"]), projection_dropout=float(vision["dropout"]),
        hidden_dropout_prob=0.0, initializer_range=vision["initializer_range"],
        layer_scale_init_value=float(vision["initializer_factor"]), image_size=image_size, patch_size=patch,
        num_channels=vision["num_channels"], use_mask_token=False, use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # no final LayerNorm: the original tower has none
    )


def _tile_size(src_config: dict, vision: dict) -> int:
    size = src_config.get("force_image_size") or vision.get("image_size", ORIGINAL_VISION_DEFAULTS["image_size"])
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _reason(err: Exception) -> str:
    cause = err.__cause__ if isinstance(err, StrictDataclassError) and err.__cause__ else err
    return f"{type(cause).__name__}: {cause}"


def build_config(source: CheckpointSource, src_config: dict, image_token_id: int, *,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                 vision_num_attention_heads: int | None = None) -> TrolConfig:
    """TrolConfig from the source config.json, checked against the tensors it must describe."""
    llm = _sub_config(source.src, src_config, "llm_config")
    vision = _sub_config(source.src, src_config, "vision_config")
    try:
        text_config = build_text_config(llm, num_attention_heads=num_attention_heads,
                                        num_key_value_heads=num_key_value_heads)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ConversionError(f"{source.src / 'config.json'}: llm_config (with the options given) is no valid "
                              f"Phi-3 config: {_reason(err)}") from err
    try:
        vision_config = build_vision_config(vision, _tile_size(src_config, vision),
                                            vision_num_attention_heads=vision_num_attention_heads)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ConversionError(f"{source.src / 'config.json'}: vision_config (with the options given) is no valid "
                              f"InternViT config: {_reason(err)}") from err
    for what, pattern, configured in (
        ("decoder", f"{LLM}model.layers.{{i}}.input_layernorm.weight", text_config.num_hidden_layers),
        ("vision", f"{VISION}encoder.layers.{{i}}.norm1.weight", vision_config.num_hidden_layers),
    ):
        found = len(list(iter_layers(source, pattern)))
        if found != configured:
            raise ConversionError(f"config.json gives the {what} {configured} layers but the checkpoint holds "
                                  f"{found}: the config does not belong to these weights.")
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = text_config.hidden_size // heads
    qkv_rows = source.shape(f"{LLM}model.layers.0.self_attn.qkv_proj.weight")[0]
    if text_config.hidden_size % heads or qkv_rows != (heads + 2 * kv_heads) * head_dim:
        raise ConversionError(f"qkv_proj has {qkv_rows} rows, but {heads} heads / {kv_heads} KV heads of a hidden "
                              f"size {text_config.hidden_size} need {(heads + 2 * kv_heads) * head_dim}: wrong head "
                              "counts (pass --num-attention-heads / --num-key-value-heads).")
    if vision_config.hidden_size % vision_config.num_attention_heads:
        raise ConversionError(f"A vision width of {vision_config.hidden_size} does not split into "
                              f"{vision_config.num_attention_heads} heads; pass --vision-num-attention-heads.")
    ratio = float(src_config.get("downsample_ratio", 0.5))
    return TrolConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        projector_hidden_act="gelu", multimodal_projector_bias=True, projector_layernorm=True,
        downsample_ratio=ratio, vision_feature_layer=-1, vision_feature_select_strategy="default",
        share_gates=True, tie_word_embeddings=False,
    )


def _vision_layer_parts(vision: InternVLVisionConfig) -> list[tuple[str, str]]:
    """(original, target) names under one vision layer, fused qkv excepted, for this tower's options."""
    parts = [("ls1", "lambda_1"), ("ls2", "lambda_2")]
    norm_parts = ("weight", "bias") if vision.norm_type == "layer_norm" else ("weight",)
    for original, target in VISION_RENAMES.items():
        if original.startswith(("attn.q_norm", "attn.k_norm")):
            leaves = ("weight",) if vision.use_qk_norm else ()
        else:
            leaves = norm_parts if original.startswith("norm") else ("weight", "bias")
        parts += [(f"{original}.{leaf}", f"{target}.{leaf}") for leaf in leaves]
    return parts


def _qkv_parts(vision: InternVLVisionConfig) -> tuple[str, ...]:
    return ("weight", "bias") if vision.attention_bias else ("weight",)


def _required_names(config: TrolConfig) -> list[str]:
    names = [f"{LLM}model.embed_tokens.weight", f"{LLM}model.norm.weight", f"{LLM}lm_head.weight",
             f"{VISION}embeddings.class_embedding", f"{VISION}embeddings.position_embedding",
             f"{VISION}embeddings.patch_embedding.weight", f"{VISION}embeddings.patch_embedding.bias"]
    names += [f"vision_proj.{k}.{part}" for k in PROJECTOR for part in ("weight", "bias")]
    for i in range(config.text_config.num_hidden_layers):
        names += [f"{LLM}model.layers.{i}.{name}" for name in TEXT_RENAMES]
    vision = config.vision_config
    for j in range(vision.num_hidden_layers):
        src = f"{VISION}encoder.layers.{j}."
        names += [f"{src}attn.qkv.{part}" for part in _qkv_parts(vision)]
        names += [src + original for original, _ in _vision_layer_parts(vision)]
    return names


def tensors(source: CheckpointSource, config: TrolConfig, gate: tuple[torch.Tensor, torch.Tensor]):
    """Yield (target name, tensor) lazily, one source tensor read at a time."""
    text, vision = config.text_config, config.vision_config
    yield "model.language_model.embed_tokens.weight", source.take(f"{LLM}model.embed_tokens.weight")
    for i in range(text.num_hidden_layers):
        for original, target in TEXT_RENAMES.items():
            yield f"model.language_model.layers.{i}.{target}", source.take(f"{LLM}model.layers.{i}.{original}")
    yield "model.language_model.norm.weight", source.take(f"{LLM}model.norm.weight")
    yield "lm_head.weight", source.take(f"{LLM}lm_head.weight")

    dst = "model.vision_tower.embeddings."
    yield dst + "cls_token", source.take(f"{VISION}embeddings.class_embedding")
    positions = source.take(f"{VISION}embeddings.position_embedding")
    grid = vision.image_size[0] // vision.patch_size[0]
    if positions.shape[1] != grid * grid + 1:  # force_image_size: the original interpolated on every call
        positions = interpolate_position_embeddings(positions[0], grid)[None]
    yield dst + "position_embeddings", positions
    for part in ("weight", "bias"):
        yield dst + f"patch_embeddings.projection.{part}", source.take(f"{VISION}embeddings.patch_embedding.{part}")
    for j in range(vision.num_hidden_layers):
        src, dst = f"{VISION}encoder.layers.{j}.", f"model.vision_tower.encoder.layer.{j}."
        for part in _qkv_parts(vision):
            # the original reshapes qkv(x) to (..., 3, heads, head_dim): q, k, v are consecutive blocks of C rows
            for name, block in zip(("q_proj", "k_proj", "v_proj"), source.take(f"{src}attn.qkv.{part}").chunk(3)):
                yield f"{dst}attention.{name}.{part}", block.clone()
        for original, target in _vision_layer_parts(vision):
            yield dst + target, source.take(src + original)

    for index, target in PROJECTOR.items():
        for part in ("weight", "bias"):
            yield f"model.multi_modal_projector.{target}.{part}", source.take(f"vision_proj.{index}.{part}")
    yield "model.trol_gates.0.weight", gate[0]
    yield "model.trol_gates.0.bias", gate[1]


def _skip_extras(source: CheckpointSource, gate: tuple[torch.Tensor, torch.Tensor], num_layers: int) -> None:
    """Buffers the target recomputes, and copies of the gates inside the checkpoint (the original model owns them as
    `language_model.model.trol_gating`; its loader then overwrites them with trol_gating.pt, so that file wins)."""
    prefix = f"{LLM}model.trol_gating."
    differing, names = [], source.keys()
    for name in names:
        if name.endswith(SKIPPED_BUFFERS):
            source.skip(name)
        elif name.startswith(prefix):
            index, _, part = name[len(prefix):].partition(".")
            if not (index.isdigit() and int(index) < num_layers and part in ("weight", "bias")):
                continue  # unknown: left for the unused-tensor check to report
            reference = gate[0] if part == "weight" else gate[1]
            if not torch.equal(source.take(name).to(reference.dtype), reference):
                differing.append(name)
    if differing:
        logger.warning("%d gate tensors inside the checkpoint (e.g. %s) differ from %s; the original loader "
                       "overwrites them with that file, so its gate is used.", len(differing), differing[0],
                       GATING_FILE)


def _single_token_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def plan(src: Path, source: CheckpointSource, src_config: dict, **options) -> Plan:
    """Options (all optional; the CLI's flags of the same names):
    num_attention_heads / num_key_value_heads: decoder head counts, replacing config.json's llm_config values
        (e.g. for test-sized models whose config omits them);
    vision_num_attention_heads: InternViT heads, replacing vision_config.num_attention_heads;
    max_tiles: most 448-px tiles per image in the processor (default 6, as the authors' preprocessing)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConversionError(f"The phi3 converter does not know the options {unknown}; it takes {list(OPTIONS)}.")
    max_tiles = int(options.pop("max_tiles", None) or MAX_TILES)
    llm = _sub_config(Path(src), src_config, "llm_config")
    max_length = int(llm.get("max_position_embeddings", ORIGINAL_TEXT_DEFAULTS["max_position_embeddings"]))
    # Phi-3's tokenizer + InternVL's <img>, </img>, <IMG_CONTEXT>, ...; refuses a tokenizer without <IMG_CONTEXT>
    tokenizer = load_source_tokenizer(src, image_token=IMAGE_CONTEXT_TOKEN, model_max_length=max_length)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    recorded = src_config.get("image_token_index")
    if recorded is not None and int(recorded) != image_token_id:
        raise ConversionError(f"config.json says image_token_index={recorded} but the tokenizer maps "
                              f"{IMAGE_CONTEXT_TOKEN} to {image_token_id}; tokenizer and weights do not belong "
                              "together.")
    config = build_config(source, src_config, image_token_id, **options)
    text = config.text_config
    if image_token_id >= text.vocab_size:
        raise ConversionError(f"{IMAGE_CONTEXT_TOKEN} has id {image_token_id}, outside the decoder's "
                              f"{text.vocab_size} embeddings.")
    missing = [name for name in _required_names(config) if name not in source]
    if missing:
        raise ConversionError(f"The checkpoint in {src} lacks {len(missing)} tensors of a TroL-3.8B with this "
                              f"config.json, e.g. {missing[:6]}: the download is incomplete (some shard missing?) "
                              "or it is another architecture (pass --arch).")
    gate = load_shared_gate(Path(src) / GATING_FILE, text.num_hidden_layers)
    _skip_extras(source, gate, text.num_hidden_layers)

    processor = TrolProcessor(
        image_processor=trol_internvl_image_processor(tile_size=config.vision_config.image_size[0],
                                                      max_tiles=max_tiles),
        tokenizer=tokenizer, chat_template=TROL_PHI3_TEMPLATE, image_token=IMAGE_TOKEN,
        num_image_tokens=config.image_seq_length, image_context_token=IMAGE_CONTEXT_TOKEN,
        image_start_token=IMAGE_START_TOKEN, image_end_token=IMAGE_END_TOKEN,
    )
    end_of_turn = _single_token_id(tokenizer, END_OF_TURN)
    if end_of_turn is None:
        raise ConversionError(f"The tokenizer in {src} has no {END_OF_TURN} token; it is not Phi-3's.")
    eos = [end_of_turn, tokenizer.eos_token_id, _single_token_id(tokenizer, PHI3_EOS), text.eos_token_id]
    eos = list(dict.fromkeys(int(t) for t in eos if t is not None and 0 <= int(t) < text.vocab_size))
    return Plan(
        config=config, tensors=tensors(source, config, gate), processor=processor, eos_token_ids=eos,
        source_repo=SOURCE_REPO,
        notes=("Converted by trol-convert from the authors' release: Phi-3 as transformers' Phi3 (same fused "
               f"qkv_proj/gate_up_proj), RoPE {text.rope_parameters['rope_type']}, InternViT as transformers' "
               "InternVL vision model (fused qkv split, ls1/ls2 -> lambda_1/lambda_2, no final norm), last-layer "
               f"features without CLS, pixel shuffle {config.downsample_ratio} (with InternVL's transpose), "
               "LayerNorm-MLP projector, the shared gate of trol_gating.pt (share_gates=True); "
               f"{IMAGE_CONTEXT_TOKEN} is the image token, generation stops at {END_OF_TURN}."),
    )


__all__ = ["NAME", "build_config", "build_text_config", "build_vision_config", "matches", "plan", "tensors"]
