"""TroL configuration: a vision encoder, a projector and any decoder-only language model, plus the TroL knobs.

Every TroL behaviour is a documented field here (one source of truth); `modeling_trol.py` only reads them.
This file is remote code: it imports torch/transformers only.
"""

from typing import Literal

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

INFERENCE_TRAVERSAL_MODES = ("question", "question_answer", "none")
TRAINING_TRAVERSAL_MODES = ("all", "none")
VISION_FEATURE_SELECT_STRATEGIES = ("default", "full")
DEFAULT_IMAGE_TOKEN_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrolConfig(PreTrainedConfig):
    r"""
    Configuration of a TroL ("Traversal of Layers", Lee et al., EMNLP 2024) vision-language model.

    Args:
        vision_config (`dict` or `PreTrainedConfig`):
            Config of the vision encoder (any `AutoModel` vision model: CLIP, SigLIP, ...). Default: CLIP ViT-L/14-336.
        text_config (`dict` or `PreTrainedConfig`):
            Config of the decoder-only language model (any `AutoModel` decoder of transformers: Llama, Qwen2, Qwen3,
            Mistral, Phi3, Gemma2, ...). Default: Llama.
        image_token_id (`int`):
            Token id whose positions receive the projected image features (one token per image feature).
        projector_hidden_act (`str`):
            Activation between the two Linear layers of the projector (Linear -> act -> Linear).
        multimodal_projector_bias (`bool`):
            Whether the projector's Linear layers have a bias.
        projector_layernorm (`bool`):
            Put a LayerNorm before the projector's first Linear (InternVL's LayerNorm-MLP projector, TroL-3.8B).
        downsample_ratio (`float` or `None`):
            Pixel-shuffle the vision features on their square grid by this factor before the projector (InternVL:
            0.5 turns 32x32 tokens of dim C into 16x16 tokens of dim 4C). `None`: no pixel shuffle.
        vision_feature_layer (`int` or `list[int]`):
            Hidden state(s) of the vision encoder used as image features (index into `hidden_states`, so -1 is the
            output of the last encoder layer before any post-layernorm). Several layers are concatenated.
        vision_feature_select_strategy (`"default"` or `"full"`):
            `"default"` drops the first (CLS) token of each image, `"full"` keeps every token (use it for encoders
            without a CLS token, such as SigLIP).
        use_traversal (`bool`):
            Master switch. `False` turns the model into its plain backbone: one propagation per layer, gates unused.
            Meant for ablations and benchmarks; the weights stay loadable either way.
        share_gates (`bool`):
            `False` (the paper): one gate Linear(H, 1) per decoder layer. `True`: one gate shared by every layer
            (what the released BK-Lee/TroL checkpoints hold).
        gate_init_mixing_ratio (`float`):
            Mixing ratio w = 0.5*tanh(g(x))+0.5 that a freshly initialised gate produces for every token (its bias is
            set to atanh(2w-1), its weight to N(0, gate_init_std)). Small, so that untrained traversal barely moves a
            pretrained backbone (paper Table 7: untrained traversal hurts), yet far from tanh saturation so the gate
            still learns quickly. Must lie strictly between 0 and 1.
        gate_init_std (`float`):
            Standard deviation of the normal init of a fresh gate's weight; 0 makes w start exactly at
            `gate_init_mixing_ratio` for every token.
        inference_traversal (`"question"`, `"question_answer"` or `"none"`):
            Which tokens traverse at inference (paper Tables 9/10). `"question"`: prompt tokens traverse, decoded
            tokens take one plain pass (default, as in the paper). `"question_answer"`: decoded tokens traverse too
            (every decoding step costs two passes). `"none"`: nothing traverses (same cost as the backbone, gates
            ignored).
        training_traversal (`"all"` or `"none"`):
            Which tokens traverse in training mode. `"all"` (the paper and the original code): every non-padding
            token. `"none"`: no token (an ablation; the gates then receive no gradient).
        image_token_lora_rank (`int`):
            Rank of the image-token LoRA ("partial LoRA" of InternLM-XComposer2, which TroL-1.8B/7B carry): a low-rank
            delta `scale * B(A(x))` added to the output of each targeted decoder projection at image-token positions
            only, in both propagations; text tokens see the plain projection. 0 (default): no image-token LoRA.
        image_token_lora_alpha (`float` or `None`):
            The delta is scaled by alpha / rank; `None` means alpha = rank (scale 1.0, as in TroL-1.8B/7B).
        image_token_lora_dropout (`float`):
            Dropout on the LoRA input in training mode (the original used 0.05 in training; no effect at inference).
        image_token_lora_targets (`list[str]`):
            Names of the projections inside each decoder layer that get an image-token LoRA, matched against the last
            component of the module name (`q_proj` matches `self_attn.q_proj`). Default: every attention and MLP
            projection of the Llama family.
        compression_layer (`int` or `None`):
            Visual context compression (LLaVolta, Chen et al., NeurIPS 2024): at the input of this decoder layer K the
            image tokens of each image (or tile) are average-pooled in groups of `compression_stride`, and layers
            K..N-1 (both propagations of each) run on the shorter sequence; text tokens are untouched. 0 or -1: before
            the first layer; K >= number of layers: nothing is compressed; `None` (default): off. Training schedules
            (`trol-train --compression_schedule`) set it per stage. Outputs keep the input's length.
        compression_stride (`int`):
            Group size S of the visual context compression (>= 1; 1 pools nothing). An image's ragged last group is
            averaged over its real size.
        compression_at_inference (`bool`):
            Also compress in eval mode (forward and generate: the prefill is compressed, decoding continues at the
            next real position). `False` (default): compression acts in training mode only. A model trained with
            compression until the end should infer with it (LLaVolta's "heavy"), one whose schedule ends uncompressed
            ("4stage") without.
    """

    model_type = "trol"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    projector_layernorm: bool = False
    downsample_ratio: float | None = None
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    use_traversal: bool = True
    share_gates: bool = False
    gate_init_mixing_ratio: float = 0.1
    gate_init_std: float = 0.0
    inference_traversal: Literal["question", "question_answer", "none"] = "question"
    training_traversal: Literal["all", "none"] = "all"
    tie_word_embeddings: bool = False
    image_token_lora_rank: int = 0
    image_token_lora_alpha: float | None = None
    image_token_lora_dropout: float = 0.0
    image_token_lora_targets: list[str] | None = None
    compression_layer: int | None = None
    compression_stride: int = 8
    compression_at_inference: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The decoder decides whether its output head is tied to its embeddings.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self._check_trol_fields()

    def _check_trol_fields(self) -> None:
        choices = {
            "inference_traversal": INFERENCE_TRAVERSAL_MODES,
            "training_traversal": TRAINING_TRAVERSAL_MODES,
            "vision_feature_select_strategy": VISION_FEATURE_SELECT_STRATEGIES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"TrolConfig.{name}={value!r} is not supported; choose one of {list(allowed)}.")
        if not 0.0 < self.gate_init_mixing_ratio < 1.0:
            raise ValueError(
                f"TrolConfig.gate_init_mixing_ratio={self.gate_init_mixing_ratio} must lie strictly between 0 and 1 "
                "(the gate's output 0.5*tanh(.)+0.5 never reaches 0 or 1); 0.1 is the default."
            )
        if self.vision_feature_select_strategy == "default" and self.vision_config.model_type.startswith("siglip"):
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the first token as a CLS token, but "
                f"{self.vision_config.model_type} has none (it would drop a real patch); use 'full'."
            )
        if self.downsample_ratio is not None and not (0 < self.downsample_ratio <= 1
                                                      and (1 / self.downsample_ratio).is_integer()):
            raise ValueError(
                f"TrolConfig.downsample_ratio={self.downsample_ratio} must be 1/k for an integer k (0.5 for InternVL) "
                "or None."
            )
        if self.gate_init_std < 0:
            raise ValueError(f"TrolConfig.gate_init_std={self.gate_init_std} must be >= 0.")
        if self.image_token_lora_rank < 0 or not 0.0 <= self.image_token_lora_dropout < 1.0:
            raise ValueError(
                f"TrolConfig.image_token_lora_rank={self.image_token_lora_rank} must be >= 0 (0 = off) and "
                f"image_token_lora_dropout={self.image_token_lora_dropout} in [0, 1)."
            )
        if self.compression_layer is not None and (isinstance(self.compression_layer, bool)
                                                   or not isinstance(self.compression_layer, int)
                                                   or self.compression_layer < -1):
            raise ValueError(
                f"TrolConfig.compression_layer={self.compression_layer!r} must be a decoder layer index >= -1 "
                "(0 or -1: compress before the first layer) or None (no compression)."
            )
        if isinstance(self.compression_stride, bool) or not isinstance(self.compression_stride, int) \
                or self.compression_stride < 1:
            raise ValueError(
                f"TrolConfig.compression_stride={self.compression_stride!r} must be an integer >= 1 (LLaVolta: 8 or 2; "
                "1 pools nothing)."
            )
        if self.image_token_lora_targets is None:
            self.image_token_lora_targets = list(DEFAULT_IMAGE_TOKEN_LORA_TARGETS)

    @property
    def image_grid(self) -> int:
        """Side of the vision encoder's patch grid for one image (or tile)."""
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
        return image_size // patch_size

    @property
    def image_seq_length(self) -> int:
        """Image tokens (= features) per image or tile: the patch grid, pixel-shuffled when configured."""
        side = self.image_grid
        if self.downsample_ratio is not None:
            side = int(side * self.downsample_ratio)
        keeps_cls = self.vision_feature_select_strategy == "full" and not self.vision_config.model_type.startswith(
            "siglip")
        return side * side + int(keeps_cls)

    @property
    def image_token_lora_scale(self) -> float:
        """alpha / rank of the image-token LoRA."""
        alpha = self.image_token_lora_alpha if self.image_token_lora_alpha is not None else self.image_token_lora_rank
        return alpha / self.image_token_lora_rank if self.image_token_lora_rank else 0.0

    @property
    def num_gates(self) -> int:
        """Number of gate Linear(H, 1) modules: one per decoder layer, or one when shared."""
        return 1 if self.share_gates else self.text_config.num_hidden_layers


TrolConfig.register_for_auto_class()  # remote code: save_pretrained copies this file next to config.json

__all__ = ["TrolConfig"]
