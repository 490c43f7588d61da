"""TroL ("Traversal of Layers", Lee et al., EMNLP 2024) on top of any transformers decoder.

A TroL model is LLaVA-shaped: vision encoder -> projector (Linear, act, Linear) -> decoder-only LLM. The novelty is
the *traversal* of every decoder layer L_i (paper Eq. 1-2), which lives in `TrolLayerForward`
(traversal_trol.py):

    out1 = L_i(x)                         # first propagation
    out2 = L_i(out1)                      # second propagation, same weights, same mask and positions
    w    = 0.5 * tanh(g_i(out1)) + 0.5    # g_i = Linear(H, 1): one mixing ratio per token
    x'   = (1 - w) * out1 + w * out2      # only where the traversal mask is True, else x' = out1

It is hooked into the decoder's *own* layer loop by replacing `forward` on each decoder-layer instance with a
picklable callable object. The backbone keeps its state-dict keys, PEFT target names, hidden-state counts, gradient
checkpointing, deepcopy and pickling; calling `model.language_model` alone is exactly the plain backbone.

Where this departs from the paper or the authors' code, and why:
- KV cache: only the FIRST propagation's keys/values are kept (`_CacheLayerGuard`); the second propagation attends to
  [earlier cached K/V] ++ [its own K/V for the chunk] and leaves nothing in the cache. The cache is exactly the size
  of the backbone's, and works for DynamicCache (sliding-window layers too) and StaticCache.
- Mask rule: training and calls on an empty cache traverse every (non-padding) token; calls on a non-empty cache
  traverse according to `config.inference_traversal`. `generate()` carries the prompt's mask so that generation
  from a fresh prompt means the same thing with and without a cache (generated tokens never traverse in `question`
  mode). Padding tokens never traverse (the original traversed them; it only changed padding outputs).
- Gates are per layer by default (the paper); the released checkpoints share one gate (`share_gates=True`).
  A fresh gate starts at a small mixing ratio (`gate_init_mixing_ratio`), not at PyTorch's random init.
- With gradient checkpointing the whole TroL layer (both passes + mixer) is one checkpoint: activation memory per
  layer is the backbone's, recomputation costs the two passes once more.
- No hard-coded devices, dtypes, quantization or flash-attn imports: all come from `from_pretrained` options.
- The image-token LoRA of TroL-1.8B/7B (InternLM-XComposer2's "partial LoRA") is a general config option
  (`image_token_lora_rank`), added by forward hooks on the backbone's own projections instead of a vendored
  InternLM2 model; it acts at image-token positions in both propagations, exactly as the original.
- Not in the paper: visual context compression (LLaVolta, `compression_layer`/`compression_stride`), which pools the
  image tokens at the input of layer K so that both propagations of every later layer run on a shorter sequence. It
  rides the same path as the traversal (a `CompressionPlan` in the `TraversalState`); see compression_trol.py.
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep

from .compression_trol import CompressionPlan, cache_record, first_compressed_layer, plan_compression, seen_tokens
from .configuration_trol import TrolConfig
from .traversal_trol import (
    TRAVERSAL_KWARG,
    ImageTokenLoRA,
    TraversalState,
    TrolGate,
    TrolLayerForward,
    colocate_gates,
    image_token_lora_modules,
    install_image_token_lora,
    install_traversal,
)

AUTO_MAP = {
    "AutoConfig": "configuration_trol.TrolConfig",
    "AutoModel": "modeling_trol.TrolModel",
    "AutoModelForImageTextToText": "modeling_trol.TrolForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_trol.TrolForConditionalGeneration",
}
QUANTIZATION_SKIP_MODULES = ("model.vision_tower", "model.multi_modal_projector", "model.trol_gates", "lm_head")
"""Module-name prefixes kept in float when a bitsandbytes config names no skip modules of its own."""

# ----------------------------------------------------------------------------------------------------------------
# The LLaVA-shaped composition.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrolModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `image_hidden_states` (n_images, n_tokens, H): the projected image features."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class TrolCausalLMOutputWithPast(ModelOutput):
    """loss (scalar), logits (B, q or logits_to_keep, V), past_key_values, hidden_states, attentions,
    image_hidden_states."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class TrolMultiModalProjector(nn.Module):
    """[LayerNorm ->] Linear(vision features -> H) -> act -> Linear(H -> H). The LayerNorm is InternVL's
    (`projector_layernorm=True`); vision features are C x n_feature_layers (x 1/downsample_ratio^2 when shuffled)."""

    def __init__(self, config: TrolConfig):
        super().__init__()
        n_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        in_features = config.vision_config.hidden_size * n_layers
        if config.downsample_ratio is not None:
            in_features *= round(1 / config.downsample_ratio) ** 2
        hidden = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(in_features) if config.projector_layernorm else None
        self.linear_1 = nn.Linear(in_features, hidden, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            image_features = self.layer_norm(image_features)
        return self.linear_2(self.act(self.linear_1(image_features)))


def pixel_shuffle(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle (its "v2", final transpose included): (n, side*side, C) tokens on a square grid ->
    (n, (side*ratio)^2, C/ratio^2)."""
    n, tokens, channels = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens or (side * ratio) % 1:
        raise ValueError(f"pixel shuffle needs a square grid divisible by 1/{ratio}; got {tokens} tokens per image.")
    x = features.reshape(n, side, side, channels)
    x = x.reshape(n, side, int(side * ratio), int(channels / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(side * ratio), int(side * ratio), int(channels / ratio**2))
    x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, int(channels / ratio**2))


class TrolPreTrainedModel(PreTrainedModel):
    config_class = TrolConfig
    config: TrolConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the traversal mask decides on the host whether a second pass runs

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as usual, with every Auto class pointing at the remote-code files that travel with the folder."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, with TroL's default quantization skips: a bitsandbytes config that names
        no `llm_int8_skip_modules` quantizes only the decoder (vision tower, projector, gates and lm_head stay in
        float). Gates are moved next to their decoder layer when a device map spreads the model."""
        if quantization_config is not None and getattr(quantization_config, "llm_int8_skip_modules", 0) is None:
            quantization_config = copy.deepcopy(quantization_config)
            quantization_config.llm_int8_skip_modules = list(QUANTIZATION_SKIP_MODULES)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        model = super().from_pretrained(*args, **kwargs)
        install_image_token_lora(model)  # a quantizer may have replaced the hooked projections
        if getattr(model, "hf_device_map", None):
            colocate_gates(model)
        return model

    def _init_weights(self, module):
        if isinstance(module, TrolGate):
            ratio = self.config.gate_init_mixing_ratio
            if self.config.gate_init_std > 0:
                init.normal_(module.weight, 0.0, self.config.gate_init_std)
            else:
                init.zeros_(module.weight)
            init.constant_(module.bias, math.atanh(2 * ratio - 1))
        elif isinstance(module, ImageTokenLoRA):  # as PEFT: A random, B zero, so a fresh LoRA adds nothing
            init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            init.zeros_(module.lora_B)
        elif isinstance(module, nn.Linear) and any(module is m for m in self._projector_linears()):
            init.normal_(module.weight, 0.0, getattr(self.config.text_config, "initializer_range", 0.02))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def _projector_linears(self):
        base = getattr(self, self.base_model_prefix, self)
        projector = getattr(base, "multi_modal_projector", None)
        return [] if projector is None else [projector.linear_1, projector.linear_2]


class TrolModel(TrolPreTrainedModel):
    """Vision tower + projector + decoder (no LM head), with the traversal gates."""

    def __init__(self, config: TrolConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = TrolMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.trol_gates = nn.ModuleList(TrolGate(config.text_config.hidden_size) for _ in range(config.num_gates))
        if config.image_token_lora_rank > 0:
            self.image_token_lora = image_token_lora_modules(config, self.language_model)
        install_traversal(self.language_model)
        install_image_token_lora(self)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def image_input_shape(self) -> tuple[int, int, int]:
        """(C, height, width) of one image or tile that the vision tower takes."""
        size = self.config.vision_config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (self.config.vision_config.num_channels, *size)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (n_images, C, S, S) -> projected features (n_images, n_tokens, H)."""
        vision_config = self.config.vision_config
        expected = self.image_input_shape
        size = expected[1:]
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected (n_images, {', '.join(map(str, expected))}) "
                f"for this vision tower ({vision_config.model_type}, image_size={size[0]}). "
                "Preprocess images with the model's processor."
            )
        vision_dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values.to(vision_dtype), output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        features = torch.cat([outputs.hidden_states[i] for i in layers], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS
        if self.config.downsample_ratio is not None:
            features = pixel_shuffle(features, self.config.downsample_ratio)
        weight = self.multi_modal_projector.linear_1.weight
        return self.multi_modal_projector(features.to(weight.dtype if weight.is_floating_point() else features.dtype))

    def _merge_image_features(self, input_ids, inputs_embeds, image_features) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter the image features into the image-token positions -> (inputs_embeds, image mask (B, q))."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            image_mask = (inputs_embeds == image_embed).all(-1)
        else:
            image_mask = input_ids == self.config.image_token_id
        n_tokens, (n_images, per_image) = int(image_mask.sum()), image_features.shape[:2]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"The prompt holds {n_tokens} image tokens (id {self.config.image_token_id}) but {n_images} image(s) "
                f"give {n_images} x {per_image} = {n_images * per_image} features. Each image placeholder must be "
                f"expanded to {per_image} image tokens, one placeholder per image (the processor does this)."
            )
        features = image_features.to(inputs_embeds.device, inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])
        image_mask = image_mask.to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(image_mask[..., None], features), image_mask

    def _check_context_length(self, length: int, past: int) -> None:
        text_config = self.config.text_config
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            return  # a scaled RoPE (YaRN, dynamic, ...) supports more than max_position_embeddings
        limit = getattr(text_config, "max_position_embeddings", None)
        if limit is not None and past + length > limit:
            raise ValueError(
                f"The sequence is {past + length} tokens ({past} cached + {length} new), more than the decoder's "
                f"context of max_position_embeddings={limit}. Shorten the prompt or use fewer/smaller images "
                "(the processor never truncates through image tokens), or lower max_new_tokens."
            )

    def traversal_state(self, inputs_embeds, attention_mask, past_length: int, traversal_mask, image_mask=None):
        """Resolve which tokens of this call traverse (TROL.md section 2.3). None when none does and no image-token
        LoRA needs `image_mask` (B, q)."""
        state = self._traversal_state(inputs_embeds, attention_mask, past_length, traversal_mask)
        if image_mask is None or not hasattr(self, "image_token_lora"):
            return state
        if state is None:
            return TraversalState(self.trol_gates, traverse=False, image_mask=image_mask)
        state.image_mask = image_mask
        return state

    def _traversal_state(self, inputs_embeds, attention_mask, past_length: int, traversal_mask):
        batch, length = inputs_embeds.shape[:2]
        if traversal_mask is not None:
            if tuple(traversal_mask.shape) != (batch, length):
                raise ValueError(
                    f"traversal_mask has shape {tuple(traversal_mask.shape)} but the inputs are (batch={batch}, "
                    f"length={length}); give one boolean per input token of this call."
                )
            mask = traversal_mask.to(inputs_embeds.device, torch.bool)
        else:
            if self.training:
                traverse = self.config.training_traversal == "all"
            else:
                mode = self.config.inference_traversal
                traverse = mode == "question_answer" or (mode == "question" and past_length == 0)
            if not traverse:
                return None
            if attention_mask is not None and attention_mask.ndim == 2:
                mask = attention_mask[:, -length:].to(inputs_embeds.device, torch.bool)  # padding never traverses
            else:
                mask = None
        if not self.config.use_traversal or (mask is not None and not bool(mask.any())):
            return None
        return TraversalState(self.trol_gates, None if mask is None or bool(mask.all()) else mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        traversal_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> TrolModelOutputWithPast:
        """input_ids (B, q) or inputs_embeds (B, q, H); pixel_values (n_images, C, S, S) with one expanded image
        placeholder per image; traversal_mask (B, q) bool overrides the default traversal rule for this call.

        With visual context compression on (`config.compression_layer`), layers >= K run on a shorter sequence, yet
        last_hidden_state is (B, q, H): image positions hold their group's state, padding positions zeros."""
        if (input_ids is None) == (inputs_embeds is None):
            given = "both" if input_ids is not None else "neither"
            raise ValueError(f"Give exactly one of input_ids or inputs_embeds ({given} was given).")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        past = seen_tokens(past_key_values)  # at full length, also when layers >= K hold a compressed sequence
        image_features = image_mask = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
            inputs_embeds, image_mask = self._merge_image_features(input_ids, inputs_embeds, image_features)
        elif self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            # A text-only micro-batch on one rank must still run the vision path: ZeRO-3/FSDP gather parameters
            # collectively (a rank that skips them hangs the others) and DDP expects every trainable parameter used.
            dummy = inputs_embeds.new_zeros((1, *self.image_input_shape))
            inputs_embeds = inputs_embeds + 0.0 * self.get_image_features(dummy).sum().to(inputs_embeds.dtype)
        if pixel_values is None and input_ids is not None and past == 0 \
                and bool((input_ids == self.config.image_token_id).any()):
            raise ValueError(
                f"The prompt holds {int((input_ids == self.config.image_token_id).sum())} image tokens "
                f"(id {self.config.image_token_id}) but no pixel_values were given."
            )
        self._check_context_length(inputs_embeds.shape[1], past)
        state = self.traversal_state(inputs_embeds, attention_mask, past, traversal_mask, image_mask)
        per_image = image_features.shape[1] if image_features is not None else None
        plan, position_ids = self.compression_plan(inputs_embeds, attention_mask, position_ids, past_key_values, past,
                                                   image_mask, per_image)
        if plan is not None:
            state = state if state is not None else TraversalState(self.trol_gates, traverse=False)
            plan.compress_state(state)
            state.compression = plan
        kwargs["return_dict"] = True
        if state is not None:
            kwargs[TRAVERSAL_KWARG] = state
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        last_hidden_state, hidden_states = outputs.last_hidden_state, outputs.hidden_states
        if plan is not None:  # back to the caller's length: labels and losses outside the model stay aligned
            last_hidden_state = plan.expand(last_hidden_state)
            hidden_states = plan.expand_hidden_states(hidden_states)
            plan.record(outputs.past_key_values)
        return TrolModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )

    def compression_plan(self, inputs_embeds, attention_mask, position_ids, past_key_values, past: int, image_mask,
                         tokens_per_image: int | None) -> tuple[CompressionPlan | None, torch.Tensor | None]:
        """Visual context compression for this call (compression_trol.py), or None, and the position ids to give the
        decoder (explicit whenever compression is involved, so that pooled and unpooled layers agree on them).

        The call pools its image tokens when compression is on for the mode (training, or `compression_at_inference`)
        and it holds images; a cache whose layers >= K already hold a compressed sequence needs a plan for every later
        call (their masks differ from layer 0's) whatever the mode."""
        config = self.config
        record = cache_record(past_key_values)
        layer = None
        if self.training or config.compression_at_inference:
            layer = first_compressed_layer(config.compression_layer, config.text_config.num_hidden_layers)
        pool = layer is not None and image_mask is not None and bool(image_mask.any())
        if record is not None:
            if pool and layer != record.layer:
                raise ValueError(
                    f"The cache holds a sequence compressed from layer {record.layer} on, but the model now compresses "
                    f"from layer {layer}: use a fresh cache after changing compression_layer."
                )
            layer = record.layer
        elif not pool:
            return None, position_ids
        if position_ids is None:  # what the decoder would use, at full length
            batch, length = inputs_embeds.shape[:2]
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).expand(batch, length)
        plan = plan_compression(
            self.language_model, layer=layer, stride=config.compression_stride, tokens_per_image=tokens_per_image,
            pool=pool, image_mask=image_mask, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values,
        )
        return plan, position_ids


class TrolForConditionalGeneration(TrolPreTrainedModel, GenerationMixin):
    """TrolModel + LM head. `generate()` accepts `traversal_mask` (B, prompt_len) for the prompt."""

    def __init__(self, config: TrolConfig):
        super().__init__(config)
        self.model = TrolModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{self._embedding_name()}.weight"}
        self.post_init()
        generation = self.generation_config
        if generation is not None:
            text = config.text_config
            # An image token in the output would need image features that do not exist: never generate it.
            if not generation.suppress_tokens:
                generation.suppress_tokens = [config.image_token_id]
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(generation, name, None) is None and getattr(text, name, None) is not None:
                    setattr(generation, name, getattr(text, name))
            if generation.pad_token_id is None and generation.eos_token_id is not None:
                eos = generation.eos_token_id
                generation.pad_token_id = eos[0] if isinstance(eos, list) else eos

    def _embedding_name(self) -> str:
        embeddings = self.model.get_input_embeddings()
        return next(name for name, module in self.model.language_model.named_modules() if module is embeddings)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        traversal_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> TrolCausalLMOutputWithPast:
        """As `TrolModel.forward`, plus labels (B, q) with -100 ignored (shifted inside the loss) and
        logits_to_keep (keep only the last n positions' logits, 0 = all)."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            traversal_mask=traversal_mask,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = backbone_logits(self.config.text_config, self.lm_head(hidden_states))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return TrolCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, inputs=None, generation_config=None, traversal_mask=None, **kwargs):
        """`GenerationMixin.generate` that carries the prompt's traversal mask through every step, cached or not.

        traversal_mask (B, prompt_len) bool: which prompt tokens traverse; default: every non-padding prompt token
        (none in `inference_traversal="none"` mode). Generated tokens traverse only in `question_answer` mode."""
        record = cache_record(kwargs.get("past_key_values"))
        if record is not None and record.layer == 0:
            raise ValueError(
                "This cache holds a sequence compressed from layer 0 on, so no cache layer holds the full-length "
                "sequence that generate() measures when it continues from a cache. Continue with compression_layer >= 1, "
                "or generate from the whole conversation with a fresh cache."
            )
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
        if prompt is not None and prompt.ndim >= 2:
            shape = tuple(prompt.shape[:2])
            if traversal_mask is None:
                attention = kwargs.get("attention_mask")
                if attention is not None and attention.ndim == 2:
                    traversal_mask = attention.bool()
                else:
                    traversal_mask = torch.ones(shape, dtype=torch.bool, device=prompt.device)
                if self.config.inference_traversal == "none":
                    traversal_mask = torch.zeros_like(traversal_mask)
            elif tuple(traversal_mask.shape) != shape:
                raise ValueError(
                    f"traversal_mask has shape {tuple(traversal_mask.shape)} but the prompt is {shape}; give one "
                    "boolean per prompt token."
                )
            traversal_mask = traversal_mask.to(prompt.device, torch.bool)
        return super().generate(inputs, generation_config, traversal_mask=traversal_mask, **kwargs)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """As GenerationMixin's (beam search, num_return_sequences), except for pixel_values (n_images, C, S, S), which
        are not one row per sample: each sample's images are repeated as a block, so every copy of a sample sees its
        own images in order (a plain repeat_interleave would hand a 2-image sample's copies [img0, img0], [img1, img1])."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None and input_ids.ndim == 2:
            per_image = self.config.image_seq_length
            counts = ((input_ids == self.config.image_token_id).sum(1) // per_image).tolist()
            if sum(counts) == pixel_values.shape[0]:
                pixel_values = torch.cat([images for images in pixel_values.split(counts) for _ in range(expand_size)])
            else:  # not image-token prompts the model can merge (it raises a clear error): keep transformers' rule
                pixel_values = pixel_values.repeat_interleave(expand_size, dim=0)
        elif pixel_values is not None and expand_size > 1:
            pixel_values = pixel_values.repeat_interleave(expand_size, dim=0)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids,
                                                                        **model_kwargs)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 *args, **kwargs):
        # An assistant (draft) model gets the generation kwargs too: the traversal mask is this model's own business.
        model_kwargs = {k: v for k, v in model_kwargs.items() if k != "traversal_mask"}
        return super()._get_candidate_generator(generation_config, input_ids, inputs_tensor, logits_processor,
                                                model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False,
                                      traversal_mask=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if traversal_mask is not None:
            # The chunk of this step covers absolute positions [start, start + length): the prompt's mask for prompt
            # positions, the mode's rule for generated ones. Without a cache the chunk is the whole sequence.
            chunk = model_inputs.get("input_ids")
            length = (chunk if chunk is not None else model_inputs["inputs_embeds"]).shape[1]
            cache = model_inputs.get("past_key_values")
            start = seen_tokens(cache) if kwargs.get("use_cache", True) else 0
            n_generated = max(start + length - traversal_mask.shape[1], 0)
            decoded = self.config.inference_traversal == "question_answer"
            generated = torch.full((traversal_mask.shape[0], n_generated), decoded, device=traversal_mask.device)
            model_inputs["traversal_mask"] = torch.cat([traversal_mask, generated], dim=1)[:, start:start + length]
        compresses = self.config.compression_layer is not None and self.config.compression_at_inference
        if compresses and attention_mask is not None and attention_mask.ndim == 2:
            # compressed layers rebuild their masks from the 2-D padding mask (a static cache would get a 4-D one)
            model_inputs["attention_mask"] = attention_mask
        return model_inputs

    # -- construction from a vision model and a language model (what stage 1 starts from) -----------------------
    @classmethod
    def from_vision_and_text(
        cls,
        vision: str | PreTrainedConfig,
        text: str | PreTrainedConfig,
        *,
        image_token_id: int | None = None,
        image_size: int | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> "TrolForConditionalGeneration":
        """Build an untrained TroL model: vision encoder and decoder pretrained (given as hub ids / local folders)
        or random (given as configs); projector and gates freshly initialised.

        image_token_id: an existing token id of the decoder's vocabulary to use as the image token. If None, one
        embedding row (mean of the others) and one output row are appended and the new id (= old vocab size) is used.
        image_size: run the vision encoder at this resolution instead of its pretraining one (TroL-1.8B/7B: CLIP-L/14
        at 490 px). Its position embeddings are interpolated bicubically once, here, and saved with the model.
        config_kwargs: any other TrolConfig field (share_gates, gate_init_mixing_ratio, vision_feature_layer, ...)."""
        vision_config = vision if isinstance(vision, PreTrainedConfig) else AutoConfig.from_pretrained(vision)
        vision_config = getattr(vision_config, "vision_config", None) or vision_config  # full CLIP/SigLIP configs
        text_config = text if isinstance(text, PreTrainedConfig) else AutoConfig.from_pretrained(text)
        text_config = copy.deepcopy(text_config.get_text_config(decoder=True))  # the caller's config stays untouched
        vision_config = copy.deepcopy(vision_config)
        language_model, vision_tower = None, None
        if not isinstance(text, PreTrainedConfig):
            language_model = AutoModelForCausalLM.from_pretrained(text, dtype=dtype)
        if not isinstance(vision, PreTrainedConfig):
            vision_tower = _load_vision_tower(vision, vision_config, dtype)
        if image_size is not None and image_size != _side(vision_config.image_size):
            vision_config, vision_tower = _resize_vision_tower(vision_config, vision_tower, image_size)
        if image_token_id is None:
            image_token_id = text_config.vocab_size
            text_config.vocab_size += 1
            if language_model is not None:
                language_model.resize_token_embeddings(text_config.vocab_size, mean_resizing=True)
        elif not 0 <= image_token_id < text_config.vocab_size:
            raise ValueError(
                f"image_token_id={image_token_id} is outside the decoder's vocabulary (size {text_config.vocab_size}); "
                "pass an existing id or None to append a new token."
            )
        if "vision_feature_select_strategy" not in config_kwargs and vision_config.model_type.startswith("siglip"):
            config_kwargs["vision_feature_select_strategy"] = "full"  # SigLIP has no CLS token
        config = TrolConfig(
            vision_config=vision_config, text_config=text_config, image_token_id=image_token_id, **config_kwargs
        )
        if vision_tower is None and language_model is None:
            model = cls(config)
        else:
            # Build the skeleton on the meta device and move the pretrained parts in: a 7B decoder is never held twice.
            with torch.device("meta"):
                model = cls(config)
            base = model.model
            base.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(vision_config)
            if language_model is not None:
                base.language_model = language_model.get_decoder()
                install_traversal(base.language_model)
                head = language_model.get_output_embeddings()
                model.lm_head = head if not config.tie_word_embeddings else nn.Linear(
                    head.in_features, head.out_features, bias=False, device="meta")
            else:
                base.language_model = AutoModel.from_config(text_config)
                install_traversal(base.language_model)
            for module in (base.multi_modal_projector, base.trol_gates, model.lm_head):
                if any(p.is_meta for p in module.parameters()):
                    module.to_empty(device="cpu")
                    for sub in module.modules():
                        model._init_weights(sub)
            if config.tie_word_embeddings:
                model.lm_head.weight = base.language_model.get_input_embeddings().weight
        if dtype is not None:
            model.to(dtype)
        return model


def backbone_logits(text_config: PreTrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    """Apply what the backbone's own *ForCausalLM head does after its Linear, so TroL logits equal the backbone's:
    Gemma2/3 final-logit soft-capping, Cohere `logit_scale`, Granite `logits_scaling`."""
    if (cap := getattr(text_config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    if (scale := getattr(text_config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (scaling := getattr(text_config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    return logits


def _side(size) -> int:
    return size[0] if isinstance(size, (list, tuple)) else size


def interpolate_position_embeddings(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(n_positions, D) position embeddings of a square patch grid (plus a leading CLS row when n_positions is a
    square plus one) -> the same for a new_grid x new_grid grid; bicubic, computed in fp32."""
    n_positions, dim = weight.shape
    n_extra = n_positions - math.isqrt(n_positions) ** 2
    if n_extra not in (0, 1):
        raise ValueError(f"Cannot interpolate {n_positions} position embeddings: not a square grid (+ CLS).")
    old_grid = math.isqrt(n_positions - n_extra)
    grid = weight[n_extra:].float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(weight.dtype)
    return torch.cat([weight[:n_extra], grid])


def _resize_vision_tower(vision_config, vision_tower, image_size: int):
    """A vision config at `image_size`, and the pretrained tower (if any) with interpolated position embeddings."""
    patch = _side(vision_config.patch_size)
    if image_size % patch:
        raise ValueError(f"image_size={image_size} must be a multiple of the patch size {patch}.")
    vision_config = copy.deepcopy(vision_config)
    vision_config.image_size = [image_size, image_size] if isinstance(vision_config.image_size, (list, tuple)) \
        else image_size
    if vision_tower is None:
        return vision_config, None
    state = vision_tower.state_dict()
    keys = [k for k in state if k.endswith(("position_embedding.weight", "position_embeddings"))]
    if len(keys) != 1:
        raise ValueError(f"Cannot find the position embeddings of {type(vision_tower).__name__} (found {keys}).")
    key = keys[0]
    weight = state[key]
    resized = interpolate_position_embeddings(weight.reshape(-1, weight.shape[-1]), image_size // patch)
    state[key] = resized.reshape(*weight.shape[:-2], -1, weight.shape[-1])
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    resized_tower = AutoModel.from_config(vision_config).to(weight.dtype)
    missing, unexpected = resized_tower.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise ValueError(f"Resizing the vision tower lost weights: missing {missing}, unexpected {unexpected}.")
    return vision_config, resized_tower


def _load_vision_tower(name_or_path: str, vision_config: PreTrainedConfig, dtype) -> nn.Module:
    """The vision encoder's pretrained weights as its vision-only model (CLIPVisionModel from a full CLIP repo, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    vision_class = MODEL_MAPPING[type(vision_config)]
    return vision_class.from_pretrained(name_or_path, dtype=dtype)


# Remote code: save_pretrained copies this file (and configuration_trol.py, reached by relative import) into the folder.
TrolModel.register_for_auto_class("AutoModel")
TrolForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "ImageTokenLoRA",
    "TraversalState",
    "TrolForConditionalGeneration",
    "TrolGate",
    "TrolLayerForward",
    "TrolModel",
    "TrolPreTrainedModel",
    "install_image_token_lora",
    "install_traversal",
]
