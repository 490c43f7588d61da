"""TroL-1.8B / TroL-7B (InternLM-XComposer2 style) -> TroL folder with transformers' own Llama as the decoder.

The released checkpoint (TROL.md section 4) holds an InternLM2 LLM, which is a Llama with renamed and fused weights:

    model.tok_embeddings.weight [V+1, H]             -> model.language_model.embed_tokens.weight (row V = <image>)
    model.layers.{i}.attention.wqkv.ffn.weight       -> self_attn.{q,k,v}_proj.weight  (rows per KV head, below)
    model.layers.{i}.attention.wo.ffn.weight         -> self_attn.o_proj.weight
    model.layers.{i}.feed_forward.w1/w3/w2.ffn.weight -> mlp.gate_proj / up_proj / down_proj.weight
    model.layers.{i}.attention_norm / ffn_norm       -> input_layernorm / post_attention_layernorm
    model.norm.weight                                -> model.language_model.norm.weight
    output.weight [V, H]                             -> lm_head.weight [V+1, H] (zero row for <image>, never generated)
    <proj>.lora_A.weight [r, in], .lora_B.weight [out, r] (partial LoRA, image tokens only)
                                                     -> model.image_token_lora.{i}.<target>.lora_A / lora_B
    vit.vision_tower.vision_model.*                  -> model.vision_tower.*  (CLIP-L/14 at 490 px)
    vision_proj.0 / vision_proj.2                    -> model.multi_modal_projector.linear_1 / linear_2
    trol_gating.pt {i}.weight/{i}.bias (one shared gate, L copies) -> model.trol_gates.0.*

wqkv rows: for each KV head j, [q heads j*g .. j*g+g-1, k head j, v head j], head_dim rows each (g = heads/kv).
The fused partial LoRA of wqkv becomes three LoRAs sharing the same A (its B rows split like wqkv): the same delta.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from ..configuration_trol import TrolConfig
from ..processing_trol import (
    TROL_INTERNLM2_TEMPLATE,
    TrolProcessor,
    trol_clip_image_processor,
)
from .common import (
    GATING_FILE,
    CheckpointSource,
    ConversionError,
    Plan,
    iter_layers,
    load_shared_gate,
)

NAME = "internlm2"
VISION_PREFIX = "vit.vision_tower."
KNOWN_HEADS = {2048: (16, 8), 4096: (32, 8)}  # hidden size -> (heads, kv heads) of InternLM2-1.8B / -7B
SKIPPED_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")  # recomputed by the target model
IMAGE_TOKEN = "<image>"
END_OF_TURN = "[UNUSED_TOKEN_145]"
PROJECTIONS = {  # original module (under model.layers.{i}.) -> target names inside the Llama decoder layer
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}


def matches(source: CheckpointSource, src_config: dict) -> bool:
    return "model.tok_embeddings.weight" in source and "output.weight" in source


def _llm_config(src_config: dict) -> dict:
    for key in ("llm_config", "text_config"):
        if isinstance(src_config.get(key), dict):
            return {**src_config, **src_config[key]}
    return src_config


def _split_qkv(tensor: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """wqkv rows (per KV head: g query heads, one key head, one value head) -> q, k, v rows. Works for the weight
    (out, in), the bias (out,) and the partial LoRA's B (out, r)."""
    groups = heads // kv_heads
    grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    q = grouped[:, :groups].reshape(heads * head_dim, *tensor.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *tensor.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *tensor.shape[1:])
    return q.clone(), k.clone(), v.clone()


def build_config(source: CheckpointSource, src_config: dict, *, num_attention_heads: int | None = None,
                 num_key_value_heads: int | None = None, vision_num_attention_heads: int | None = None) -> TrolConfig:
    """TrolConfig from the source config.json where it speaks, from the tensor shapes otherwise."""
    llm = _llm_config(src_config)
    embed_rows, hidden = source.shape("model.tok_embeddings.weight")
    out_rows = source.shape("output.weight")[0]
    if embed_rows != out_rows + 1:
        raise ConversionError(f"model.tok_embeddings has {embed_rows} rows and output {out_rows}: the released "
                              "TroL-1.8B/7B have one more embedding row (<image>) than output rows.")
    layers = len(list(iter_layers(source, "model.layers.{i}.attention_norm.weight")))
    heads = num_attention_heads or llm.get("num_attention_heads") or KNOWN_HEADS.get(hidden, (None, None))[0]
    kv_heads = num_key_value_heads or llm.get("num_key_value_heads") or KNOWN_HEADS.get(hidden, (None, None))[1]
    if not heads or not kv_heads:
        raise ConversionError(f"Cannot tell the attention heads of a hidden size {hidden} InternLM2 from "
                              f"{source.src}/config.json; pass --num-attention-heads and --num-key-value-heads.")
    head_dim = hidden // heads
    qkv_rows = source.shape("model.layers.0.attention.wqkv.ffn.weight")[0]
    if qkv_rows != (heads + 2 * kv_heads) * head_dim:
        raise ConversionError(f"wqkv has {qkv_rows} rows, but {heads} heads / {kv_heads} KV heads of dim {head_dim} "
                              f"need {(heads + 2 * kv_heads) * head_dim}: wrong head counts.")
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 1e6))}
    scaling = llm.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) == "dynamic":
        rope = {**rope, "rope_type": "dynamic", "factor": float(scaling["factor"])}  # NTK only past the context
    eos = int(llm.get("eos_token_id", 2))
    text_config = LlamaConfig(
        vocab_size=embed_rows, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim,
        intermediate_size=source.shape("model.layers.0.feed_forward.w1.ffn.weight")[0], hidden_act="silu",
        max_position_embeddings=int(llm.get("max_position_embeddings", 32768)),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-5)), rope_parameters=rope,
        attention_bias="model.layers.0.attention.wqkv.ffn.bias" in source, mlp_bias=False,
        bos_token_id=int(llm.get("bos_token_id", 1)), eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )
    vision = VISION_PREFIX + "vision_model."
    width, _, patch, _ = source.shape(vision + "embeddings.patch_embedding.weight")
    grid = math.isqrt(source.shape(vision + "embeddings.position_embedding.weight")[0] - 1)
    vision_heads = vision_num_attention_heads or (16 if width == 1024 else None)
    if not vision_heads:
        raise ConversionError(f"Cannot tell the heads of a width-{width} CLIP tower; pass --vision-num-attention-heads.")
    vision_config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=source.shape(vision + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=len(list(iter_layers(source, vision + "encoder.layers.{i}.layer_norm1.weight"))),
        num_attention_heads=vision_heads, image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=768,
    )
    lora_rank = source.shape("model.layers.0.attention.wqkv.lora_A.weight")[0]
    return TrolConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_id=int(llm.get("image_token_index", out_rows)),
        projector_hidden_act="gelu", multimodal_projector_bias=True, vision_feature_layer=-1,
        vision_feature_select_strategy="default", share_gates=True,
        image_token_lora_rank=lora_rank, image_token_lora_alpha=float(lora_rank),  # alpha / r = 256 / 256
    )


def tensors(source: CheckpointSource, config: TrolConfig, gate: tuple[torch.Tensor, torch.Tensor]):
    """Yield (target name, tensor) lazily, one source tensor read at a time."""
    text = config.text_config
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    yield "model.language_model.embed_tokens.weight", source.take("model.tok_embeddings.weight")
    yield "model.language_model.norm.weight", source.take("model.norm.weight")
    output = source.take("output.weight")
    yield "lm_head.weight", torch.cat([output, output.new_zeros(1, output.shape[1])])  # <image>: logit 0, suppressed
    del output
    for i in range(text.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.language_model.layers.{i}."
        lora = f"model.image_token_lora.{i}."
        yield dst + "input_layernorm.weight", source.take(src + "attention_norm.weight")
        yield dst + "post_attention_layernorm.weight", source.take(src + "ffn_norm.weight")
        qkv = src + "attention.wqkv."
        names = ("q_proj", "k_proj", "v_proj")
        for part in ("weight", "bias"):
            if qkv + "ffn." + part in source:
                for name, t in zip(names, _split_qkv(source.take(qkv + "ffn." + part), heads, kv_heads, head_dim)):
                    yield f"{dst}self_attn.{name}.{part}", t
        lora_a = source.take(qkv + "lora_A.weight")
        for name, t in zip(names, _split_qkv(source.take(qkv + "lora_B.weight"), heads, kv_heads, head_dim)):
            yield f"{lora}{name}.lora_A", lora_a.clone()
            yield f"{lora}{name}.lora_B", t
        for original, target in PROJECTIONS.items():
            leaf = target.rsplit(".", 1)[-1]
            for part in ("weight", "bias"):
                if f"{src}{original}.ffn.{part}" in source:
                    yield f"{dst}{target}.{part}", source.take(f"{src}{original}.ffn.{part}")
            yield f"{lora}{leaf}.lora_A", source.take(f"{src}{original}.lora_A.weight")
            yield f"{lora}{leaf}.lora_B", source.take(f"{src}{original}.lora_B.weight")
        for name in source.keys():  # e.g. rotary inv_freq saved by old transformers versions
            if name.startswith(src) and name.endswith(SKIPPED_BUFFERS):
                source.skip(name)
    for name in source.keys():
        if name.startswith(VISION_PREFIX):
            if name.endswith(SKIPPED_BUFFERS):
                source.skip(name)
            else:
                # transformers 5's CLIPVisionModel keeps its tensors without the old "vision_model." level
                yield "model.vision_tower." + name[len(VISION_PREFIX):].removeprefix("vision_model."), source.take(name)
    for index, target in ((0, "linear_1"), (2, "linear_2")):
        for part in ("weight", "bias"):
            yield f"model.multi_modal_projector.{target}.{part}", source.take(f"vision_proj.{index}.{part}")
    yield "model.trol_gates.0.weight", gate[0]
    yield "model.trol_gates.0.bias", gate[1]


def build_processor(src: Path, config: TrolConfig, image_size: int):
    from .tokenizer import convert_internlm2_tokenizer

    tokenizer = convert_internlm2_tokenizer(src, image_token=IMAGE_TOKEN, image_token_id=config.image_token_id)
    return TrolProcessor(
        image_processor=trol_clip_image_processor(image_size), tokenizer=tokenizer,
        chat_template=TROL_INTERNLM2_TEMPLATE, image_token=IMAGE_TOKEN, num_image_tokens=config.image_seq_length,
    )


def plan(src: Path, source: CheckpointSource, src_config: dict, **options) -> Plan:
    """options: num_attention_heads, num_key_value_heads, vision_num_attention_heads (for non-standard sizes)."""
    config = build_config(source, src_config, **options)
    gate = load_shared_gate(src / GATING_FILE, config.text_config.num_hidden_layers)
    processor = build_processor(src, config, config.vision_config.image_size)
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        raise ConversionError(f"The tokenizer in {src} has no {END_OF_TURN} token; it is not InternLM2's.")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise ConversionError(f"The tokenizer maps {IMAGE_TOKEN} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
                              f"the checkpoint's image row is {config.image_token_id}.")
    size = "7B" if config.text_config.hidden_size == 4096 else "1.8B" if config.text_config.hidden_size == 2048 else ""
    return Plan(
        config=config, tensors=tensors(source, config, gate), processor=processor,
        eos_token_ids=[config.text_config.eos_token_id, end_of_turn],
        source_repo=f"BK-Lee/TroL-{size}" if size else "",
        notes=("Converted by trol-convert from the authors' release: InternLM2 expressed as transformers' Llama "
               "(fused wqkv split per KV head), the image-token partial LoRA as image_token_lora_rank="
               f"{config.image_token_lora_rank}, CLIP-L/14 at {config.vision_config.image_size} px, the shared "
               "gate of trol_gating.pt (share_gates=True); the LM head gained a zero row for <image>, which "
               "generation suppresses."),
    )


__all__ = ["NAME", "build_config", "matches", "plan", "tensors"]
