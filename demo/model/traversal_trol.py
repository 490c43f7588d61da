"""The TroL unit, in one place: the gate, the per-call traversal state, the KV-cache guard, the two-pass layer
forward (`TrolLayerForward`) and the image-token LoRA hooks; `modeling_trol.py` composes them into the model.

For decoder layer L_i and hidden states x (B, q, H):

    out1 = L_i(x)                         # first propagation
    out2 = L_i(out1)                      # second propagation, same weights, same mask and positions
    w    = 0.5 * tanh(g_i(out1)) + 0.5    # g_i = Linear(H, 1): one mixing ratio per token
    x'   = (1 - w) * out1 + w * out2      # only where the traversal mask is True, else x' = out1

Remote code: imports torch/transformers and the other remote-code files only.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, StaticLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from .compression_trol import CompressionPlan
from .configuration_trol import TrolConfig

try:  # private: lets the second propagation stay out of `output_attentions` & co.
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older/newer transformers: extra outputs may then hold both passes
    _active_collector = None

TRAVERSAL_KWARG = "trol_traversal"
"""Keyword under which `TrolModel` hands the traversal state to every decoder layer through the backbone's kwargs."""


# ----------------------------------------------------------------------------------------------------------------
# The TroL unit: gate, cache guard, two-pass layer forward.
# ----------------------------------------------------------------------------------------------------------------
class TrolGate(nn.Linear):
    """g_i = Linear(H, 1) returning the mixing ratio w = 0.5*tanh(g_i(x)) + 0.5, shape (B, q, 1).

    A subclass of nn.Linear on purpose: quantizers only convert exact nn.Linear modules, so gates stay in float.
    The input is cast to the gate's own dtype/device (it may be kept in fp32 next to a bf16/4-bit decoder)."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden_states.to(self.weight.device, self.weight.dtype))
        return (0.5 * torch.tanh(logits) + 0.5).to(hidden_states.device, hidden_states.dtype)


@dataclass
class TraversalState:
    """Per-call traversal state handed to the decoder layers.

    gates: the model's gate ModuleList (looked up at call time: PEFT may have wrapped its entries).
    mask: (B, q) bool, True where a token traverses; None means every token of the chunk traverses.
    traverse: False when no token of the call traverses (the state then only carries `image_mask`/`compression`).
    image_mask: (B, q) bool, True at image tokens, for the image-token LoRA; None when the call has no image.
    compression: how layers >= K run on the compressed sequence (visual context compression); None when off."""

    gates: nn.ModuleList
    mask: torch.Tensor | None = None
    traverse: bool = True
    image_mask: torch.Tensor | None = None
    compression: CompressionPlan | None = None

    def gate(self, layer_idx: int) -> nn.Module:
        return self.gates[layer_idx if len(self.gates) > 1 else 0]


class _CacheLayerGuard:
    """Keeps only the first propagation's K/V in one cache layer (TROL.md section 2.2).

    `swap_in_before()` (between the passes) saves the layer as pass 1 left it and restores it as it was before the
    call, so pass 2 attends to [earlier K/V] ++ [its own chunk]; `restore_after()` puts pass 1's state back.
    Dynamic layers rebind their tensors on update, so references suffice. Static layers write in place: for a plain
    StaticLayer only the chunk's slots are copied; other in-place layers (sliding-window rings) are copied whole."""

    def __init__(self, cache: Cache, layer_idx: int):
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise TypeError(
                f"TroL traversal needs a transformers `Cache` with per-layer storage, got {type(cache).__name__}. "
                "Pass a DynamicCache/StaticCache (or let generate() create one)."
            )
        replicate = getattr(cache, "layer_class_to_replicate", None)
        while len(layers) <= layer_idx and replicate is not None:  # DynamicCache() without config grows lazily
            layers.append(replicate())
        self.cache, self.layer = cache, layers[layer_idx]
        self.in_place = bool(getattr(self.layer, "is_compileable", False))
        self.slot_copy = self.in_place and type(self.layer).update is StaticLayer.update
        if self.slot_copy:  # a 0-d device tensor (no host sync), or 0 before the layer exists
            self.before = self.layer.cumulative_length.clone() if self.layer.is_initialized else 0
        else:
            self.before = self._snapshot()

    def _snapshot(self) -> dict:
        state = dict(self.layer.__dict__)
        if self.in_place:
            state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return state

    def _restore(self, state: dict) -> None:
        for key, value in state.items():
            current = self.layer.__dict__.get(key)
            if self.in_place and isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor) \
                    and current.shape == value.shape:
                current.copy_(value)  # keep static addresses (cuda graphs / torch.compile)
            else:
                self.layer.__dict__[key] = value

    def swap_in_before(self, n_tokens: int) -> None:
        """Called between the passes; n_tokens: the chunk length (K/V entries pass 1 wrote)."""
        if getattr(self.cache, "offloading", False):
            self.layer.prefetch()  # Cache.update offloaded the layer after pass 1; pass 2 updates it on-device
        if self.slot_copy:
            layer = self.layer
            self.slots = self.before + torch.arange(n_tokens, device=layer.keys.device)
            self.after = (layer.keys.index_select(2, self.slots), layer.values.index_select(2, self.slots))
            layer.cumulative_length.sub_(n_tokens)  # back to `before`; pass 2 advances it by n_tokens again
        else:
            self.after = self._snapshot()
            self._restore(self.before)

    def restore_after(self) -> None:
        if self.slot_copy:
            keys, values = self.after
            self.layer.keys.index_copy_(2, self.slots, keys)
            self.layer.values.index_copy_(2, self.slots, values)
        else:
            self._restore(self.after)


@contextmanager
def _outputs_not_recorded():
    """Drop whatever transformers' output recorders (attentions, router logits, ...) collect inside the block, so
    `output_attentions=True` returns one entry per layer (the first propagation's), like the backbone."""
    collected = _active_collector.get() if _active_collector is not None else None
    lengths = {k: len(v) for k, v in (collected or {}).items() if isinstance(v, list)}
    try:
        yield
    finally:
        for key, n in lengths.items():
            del collected[key][n:]


_IMAGE_TOKEN_MASK: ContextVar[torch.Tensor | None] = ContextVar("trol_image_token_mask", default=None)
"""(B, q) image-token mask of the decoder layer running now; set by `TrolLayerForward` around its passes (inside
the checkpointed function, so recomputation sees it too), read by the image-token LoRA hooks."""


class ImageTokenLoRA(nn.Module):
    """delta(x) = scale * B(A(x)) for one decoder projection (in_features -> out_features), added to that
    projection's output at image-token positions only (`config.image_token_lora_rank`).

    Plain parameters, not nn.Linear, so quantizers leave them alone. Shapes: lora_A (r, in), lora_B (out, r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.device, self.lora_A.dtype))
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class _ImageTokenLoRAHook:
    """Forward hook on a decoder projection: output + delta(input) where the current image-token mask is True.
    A picklable object holding its LoRA module (deepcopy maps the reference to the copied module)."""

    def __init__(self, lora: ImageTokenLoRA):
        self.lora = lora

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        mask = _IMAGE_TOKEN_MASK.get()
        if mask is None:
            return None
        delta = self.lora(args[0]).to(output.device, output.dtype)
        return torch.where(mask.to(output.device)[..., None], output + delta, output)


def _projection(layer: nn.Module, target: str) -> nn.Module:
    found = [module for name, module in layer.named_modules() if name.rsplit(".", 1)[-1] == target]
    if len(found) != 1:
        raise ValueError(
            f"image_token_lora_targets names {target!r}, which matches {len(found)} modules in a "
            f"{type(layer).__name__}; give names that match exactly one projection per decoder layer."
        )
    return found[0]


def image_token_lora_modules(config: TrolConfig, language_model: nn.Module) -> nn.ModuleList:
    """One ModuleDict {target: ImageTokenLoRA} per decoder layer, sized from the projections it serves."""
    rank, scale = config.image_token_lora_rank, config.image_token_lora_scale
    per_layer = []
    for layer in decoder_layers(language_model):
        loras = {}
        for target in config.image_token_lora_targets:
            projection = _projection(layer, target)
            loras[target] = ImageTokenLoRA(projection.in_features, projection.out_features, rank, scale,
                                           config.image_token_lora_dropout)
        per_layer.append(nn.ModuleDict(loras))
    return nn.ModuleList(per_layer)


def install_image_token_lora(model: nn.Module) -> None:
    """Hook each image-token LoRA onto its projection (idempotent). Run again after a quantizer replaced the
    projections; a projection wrapped later (PEFT) keeps the hook on its base layer."""
    base = getattr(model, "model", model)
    loras = getattr(base, "image_token_lora", None)
    if loras is None:
        return
    for layer, layer_loras in zip(decoder_layers(base.language_model), loras):
        for target, lora in layer_loras.items():
            projection = _projection(layer, target)
            if not any(isinstance(hook, _ImageTokenLoRAHook)
                       for module in projection.modules() for hook in module._forward_hooks.values()):
                projection.register_forward_hook(_ImageTokenLoRAHook(lora))


class TrolLayerForward:
    """Replaces `forward` on one decoder-layer instance. Without a `TraversalState` in the kwargs it is exactly the
    layer's own forward; with one, it runs the two propagations and the TroL-Mixer.

    A plain picklable object holding the layer and its index, so deepcopy/pickle/state_dict keep working."""

    def __init__(self, layer: nn.Module, layer_idx: int):
        self.layer = layer
        self.layer_idx = layer_idx

    def __call__(self, *args, **kwargs):
        state: TraversalState | None = kwargs.pop(TRAVERSAL_KWARG, None)
        forward = type(self.layer).forward
        if state is None:
            return forward(self.layer, *args, **kwargs)
        if args:
            hidden_states, args = args[0], args[1:]
        else:
            hidden_states = kwargs.pop("hidden_states")
        plan = state.compression
        if plan is not None and self.layer_idx >= plan.layer:
            if args:
                raise TypeError(
                    f"Visual context compression substitutes the mask and positions the decoder passes to layer "
                    f"{self.layer_idx}, but {type(self.layer).__name__} receives them positionally; it supports "
                    "decoders whose layer loop passes them as keywords (Llama, Qwen, Mistral, Phi3, Gemma families)."
                )
            # pooled once at layer K (outside any checkpoint: recomputation reuses the pooled input)
            hidden_states, kwargs, state = plan.enter(self.layer_idx, hidden_states, kwargs)
        layer = self.layer
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing and layer.training:
            # One checkpoint around both passes + mixer; the class forward's own per-pass checkpointing is bypassed.
            # As transformers does for checkpointed layers, training drops the cache.
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if kwargs.get("past_key_values") is not None and not layer._can_checkpoint_with_cache:
                kwargs["past_key_values"] = None
            inner = getattr(forward, "__wrapped__", forward)
            run = partial(self.traverse, inner, state, **kwargs)
            return layer._gradient_checkpointing_func(run, hidden_states, *args)
        return self.traverse(forward, state, hidden_states, *args, **kwargs)

    def traverse(self, forward, state: TraversalState, hidden_states: torch.Tensor, *args, **kwargs):
        token = _IMAGE_TOKEN_MASK.set(state.image_mask)
        try:
            if not state.traverse:  # only the image-token LoRA is active in this call
                return forward(self.layer, hidden_states, *args, **kwargs)
            return self._two_passes(forward, state, hidden_states, *args, **kwargs)
        finally:
            _IMAGE_TOKEN_MASK.reset(token)

    def _two_passes(self, forward, state: TraversalState, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        guard = _CacheLayerGuard(cache, self.layer_idx) if cache is not None else None
        out1 = forward(self.layer, hidden_states, *args, **kwargs)
        h1 = out1[0] if isinstance(out1, tuple) else out1
        w = state.gate(self.layer_idx)(h1)  # (B, q, 1)
        if guard is not None:
            guard.swap_in_before(h1.shape[1])
        with _outputs_not_recorded():
            out2 = forward(self.layer, h1, *args, **kwargs)
        if guard is not None:
            guard.restore_after()
        h2 = out2[0] if isinstance(out2, tuple) else out2
        mixed = (1 - w) * h1 + w * h2
        if state.mask is not None:
            mixed = torch.where(state.mask.to(h1.device)[..., None], mixed, h1)
        return (mixed, *out1[1:]) if isinstance(out1, tuple) else mixed


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder's layer ModuleList: `.layers` (Llama family) or the child ModuleList of num_hidden_layers."""
    layers = getattr(language_model, "layers", None)
    n_layers = language_model.config.num_hidden_layers
    if isinstance(layers, nn.ModuleList):
        return layers
    for child in language_model.children():
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            return child
    raise ValueError(
        f"Cannot find the decoder layers of {type(language_model).__name__}: expected a `.layers` ModuleList or a "
        f"child ModuleList of {n_layers} layers. TroL supports decoder-only transformers models with a layer loop."
    )


def colocate_gates(model: nn.Module) -> None:
    """Put each gate (and image-token LoRA) on the device of the decoder layer it serves, after a device map spread
    the model. They are small; their forwards move inputs/outputs anyway, this only avoids the round trips."""
    base = getattr(model, "model", model)
    layers, gates = decoder_layers(base.language_model), base.trol_gates
    per_layer = list(gates) if len(gates) == len(layers) else []  # one shared gate stays where the map put it
    loras = getattr(base, "image_token_lora", None)
    for i, layer in enumerate(layers):
        device = next(layer.parameters()).device
        if device.type == "meta":
            continue
        for module in ([per_layer[i]] if per_layer else []) + ([loras[i]] if loras is not None else []):
            if next(module.parameters()).device != device:
                module.to(device)


def install_traversal(language_model: nn.Module) -> None:
    """Route every decoder layer's forward through `TrolLayerForward` (idempotent)."""
    for idx, layer in enumerate(decoder_layers(language_model)):
        if not isinstance(layer.__dict__.get("forward"), TrolLayerForward):
            layer.forward = TrolLayerForward(layer, idx)


__all__ = [
    "TRAVERSAL_KWARG",
    "ImageTokenLoRA",
    "TraversalState",
    "TrolGate",
    "TrolLayerForward",
    "colocate_gates",
    "decoder_layers",
    "image_token_lora_modules",
    "install_image_token_lora",
    "install_traversal",
]
