"""Tiny random configs and inputs shared by the tests (hidden 32, 2 layers; nothing is downloaded)."""

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipVisionConfig,
)

from trol import TrolConfig, TrolForConditionalGeneration, trol_clip_image_processor

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1
PAD = 0
IMAGE_SIZE = 28  # 2x2 patches of 14 px -> 4 image tokens (CLIP drops its CLS)
TOKENS_PER_IMAGE = 4

_COMMON = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
)

DECODERS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=8),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "phi3": lambda: Phi3Config(**_COMMON),
    # sliding-window layers (window 4 < prompt length) alternating with global ones, attention + final softcapping
    "gemma2": lambda: Gemma2Config(
        **_COMMON, head_dim=8, sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        query_pre_attn_scalar=8,
    ),
}

VISION = {
    "clip": lambda: CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=14,
    ),
    "siglip": lambda: SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
        patch_size=14,
    ),
}


def tiny_config(decoder: str = "llama", vision: str = "clip", **trol_kwargs) -> TrolConfig:
    text_config = DECODERS[decoder]()
    trol_kwargs.setdefault("vision_feature_select_strategy", "full" if vision == "siglip" else "default")
    return TrolConfig(vision_config=VISION[vision](), text_config=text_config, image_token_id=IMAGE_TOKEN,
                      **trol_kwargs)


def tiny_model(decoder: str = "llama", vision: str = "clip", seed: int = 0, gate_ratio: float = 0.4,
               **trol_kwargs) -> TrolForConditionalGeneration:
    """A tiny TroL model in eval mode whose gates mix strongly (w around `gate_ratio`, varying per token)."""
    trol_kwargs.setdefault("gate_init_mixing_ratio", gate_ratio)
    trol_kwargs.setdefault("gate_init_std", 0.5)
    torch.manual_seed(seed)
    model = TrolForConditionalGeneration(tiny_config(decoder, vision, **trol_kwargs)).eval()
    if decoder == "gemma2":
        model.set_attn_implementation("eager")  # attention softcapping needs eager attention
    return model


def prompt_batch(lengths=(9, 6), images_per_prompt=1, seed: int = 0):
    """Left-padded prompts `[text, image tokens, text]` of the given real lengths (image tokens included).

    Returns input_ids (B, P), attention_mask (B, P), pixel_values (B * images_per_prompt, 3, S, S)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids = torch.randint(3, IMAGE_TOKEN - 1, (length,), generator=gen)
        n_image = TOKENS_PER_IMAGE * images_per_prompt
        if n_image:
            ids[1:1 + n_image] = IMAGE_TOKEN
        input_ids[row, width - length:] = ids
        attention_mask[row, width - length:] = 1
    n_images = len(lengths) * images_per_prompt
    pixel_values = torch.randn((n_images, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen) if n_images else None
    return input_ids, attention_mask, pixel_values


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as generate() derives them from a left-padded attention mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "<|system|>", "<|user|>",
            "<|assistant|>", "<|end|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
CONTEXT = 14  # id of <IMG_CONTEXT>


def char_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Lossless character-level tokenizer: printable ASCII + special tokens; pad 0, bos 1, eos 2, <image> 127."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    vocab["<image>"] = IMAGE_TOKEN
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS + ["<image>"])
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", **extra)


def save_pretrained_parts(root) -> None:
    """What stage 1 starts from, as if downloaded: root/vision (tiny CLIP + its image processor) and root/text (tiny
    Llama + a tokenizer that knows <image>), with fixed seeds."""
    torch.manual_seed(0)
    AutoModel.from_config(VISION["clip"]()).save_pretrained(root / "vision")
    trol_clip_image_processor(IMAGE_SIZE).save_pretrained(root / "vision")
    AutoModelForCausalLM.from_config(DECODERS["llama"]()).save_pretrained(root / "text")
    char_tokenizer().save_pretrained(root / "text")
